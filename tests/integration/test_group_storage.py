"""The store on the real MongoDB-wire server: a group's size must not turn into index work, and a
pooled connection the server dropped must not turn into an error answer.

Issue 14, defect 2: creating a 9,999-member group stalled a direct pair's commits for 0.4-0.8 s.
Timing each storage call showed the stall in one write, the group's checkpoint (a 9,999-member
``update_one``: 493 ms on SecantusDB, while a one-entry commit beside it took 298 ms), because
``groups.members`` carried a multikey index that nothing reads. The checkpoint now stores no
``members`` array (the open spans are the members), and setup drops the index an older
deployment built. The latency itself is measured by ``benchmarks/big_group_stall.py``.
"""

from __future__ import annotations

import asyncio
import secrets

from drivers.tcpproxy import TcpProxy, mongo_upstream, proxied_mongo_url
from im_actors.config import Config
from im_actors.membership import Membership
from im_actors.store import Store


async def test_a_group_checkpoint_writes_no_indexed_member_array(base_config: Config) -> None:
    cfg = base_config.model_copy(update={"mongo_db": f"im_groupdoc_{secrets.token_hex(3)}"})
    store = Store(cfg)
    groups = store._groups
    try:
        await groups.create_index([("members", 1)])  # what every deployment before the fix built
        await groups.insert_one({"_id": "old", "members": ["a", "b"], "name": "n", "owner": "a", "roles": {}})
        other = Store(cfg)  # every store writer sets up at once when a deployment starts
        try:
            await asyncio.gather(store.setup(), other.setup())
        finally:
            await other.close()
        await store.setup()  # idempotent
        keys = [[k for k, _ in info["key"]] for info in (await groups.index_information()).values()]
        assert ["members"] not in keys and ["_id"] in keys

        users = [f"u{i}" for i in range(1000)]
        m = Membership()
        await store.insert_group({"_id": "g1", **m.to_doc(), "name": "big"})
        m.apply("u0", {"event": "created", "users": users, "owner": "u0", "name": "big"}, 1)
        m.apply("u0", {"event": "removed", "users": ["u7"]}, 2)
        await store.checkpoint_group("g1", m.to_doc())
        doc = await store.group_doc("g1")
        assert doc is not None and "members" not in doc
        back = Membership.from_doc(doc)
        assert back.members == set(users) - {"u7"} and back.seq == 2 and back.ranges("u7", 5) == [(1, 2)]

        # a document of the first format (members, no spans) is read as before, and its array goes
        # at its next checkpoint
        old = await store.group_doc("old")
        assert old is not None
        om = Membership.from_doc(old)
        assert om.members == {"a", "b"}
        om.apply("a", {"event": "added", "users": ["c"]}, 3)
        await store.checkpoint_group("old", om.to_doc())
        old = await store.group_doc("old")
        assert old is not None and "members" not in old and Membership.from_doc(old).members == {"a", "b", "c"}
    finally:
        await store._mongo.drop_database(cfg.mongo_db)
        await store.close()


async def test_a_pooled_connection_the_server_dropped_while_idle_is_not_an_error(base_config: Config) -> None:
    """The million-frame fuzz run's 5 ``unavailable`` answers: SecantusDB closes a connection idle
    for 300 s, and the next operation on it that pymongo cannot retry (a ``delete_many``, or any
    write with retryable writes off) failed with AutoReconnect. ``mongo_max_idle_ms`` retires the
    pooled connection first. The server's idle timeout is played by the proxy, scaled down: the
    driver's monitor talks every 0.5 s and stays, the pool's connection idle for 1.5 s goes."""
    proxy = TcpProxy(mongo_upstream(base_config.mongo_url))
    await proxy.start()
    url = proxied_mongo_url(base_config.mongo_url, proxy.port)
    cfg = base_config.model_copy(
        update={
            "mongo_db": f"im_idle_{secrets.token_hex(3)}",
            "mongo_url": url + ("&" if "?" in url else "?") + "heartbeatFrequencyMS=500",
            "mongo_max_idle_ms": 1000,
        }
    )
    store = Store(cfg)
    try:
        await store.register_token("alice", "phone", "log", "tok-1")
        await asyncio.sleep(1.5)
        assert await proxy.drop_idle(1.2) >= 1  # the pool's connection, not the monitor's
        await store.unregister_tokens("alice", "phone")  # delete_many: pymongo never retries it
        assert (await store.push_tokens(["alice"]))["alice"] == {}
    finally:
        await store._mongo.drop_database(cfg.mongo_db)
        await store.close()
        await proxy.aclose()
