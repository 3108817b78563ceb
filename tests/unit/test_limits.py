"""Token buckets and the hub's rate-limit tables (im_actors/limits.py), driven with a hand-held clock."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from im_actors.auth import issue_token, verify_token
from im_actors.config import load_config
from im_actors.errors import CloseConnection, ConfigError
from im_actors.limits import AddressRates, RefusalWindow, TokenBucket, UserRates
from im_actors.router import HubTable, make_app
from im_actors.session import SessionShard


def test_token_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.1)  # one token every 100 ms
    assert b.take(0.05) == pytest.approx(0.05)
    assert b.take(0.1) == 0.0
    assert not b.full(0.1)
    assert b.full(10.0)


def test_token_bucket_rate_zero_is_unlimited() -> None:
    b = TokenBucket(rate=0.0, burst=1, now=0.0)
    assert all(b.take(0.0) == 0.0 for _ in range(1000))


def test_user_rates_sends_and_requests_and_retry_after() -> None:
    rates = UserRates(send_rate=1.0, send_burst=2, request_rate=10.0, request_burst=5)
    rates.opened("alice", 0.0)
    assert rates.check("alice", "send", 0.0) == 0
    assert rates.check("alice", "send", 0.0) == 0
    assert rates.check("alice", "send", 0.0) == 1000  # next send in 1 s
    assert rates.check("alice", "sync", 0.0) == 0  # the refused send gave its request token back
    assert rates.check("alice", "sync", 0.0) == 0
    assert rates.check("alice", "sync", 0.0) == 0
    assert rates.check("alice", "sync", 0.0) == 100  # 5 requests taken: next in 100 ms
    assert rates.check("alice", "send", 1.0) == 0  # obeying retry_after_ms succeeds
    assert rates.check("bob", "send", 0.0) == 0  # not connected here: nothing to count against


def test_user_rates_survive_reconnects_until_full_then_pruned() -> None:
    rates = UserRates(send_rate=1.0, send_burst=1, request_rate=100.0, request_burst=100)
    rates.opened("alice", 0.0)
    assert rates.check("alice", "send", 0.0) == 0
    rates.closed("alice")
    assert rates.prune(0.5) == 0  # bucket not full yet: kept, so reconnecting does not refill it
    rates.opened("alice", 0.5)
    assert rates.check("alice", "send", 0.5) == 500
    rates.closed("alice")
    assert rates.prune(5.0) == 1 and "alice" not in rates.users


def test_refusal_window_closes_one_over_the_max() -> None:
    w = RefusalWindow(max_refusals=3, window_s=10.0)
    assert [w.refused(t) for t in (0.0, 1.0, 2.0)] == [False, False, False]
    assert w.refused(3.0) is True
    w2 = RefusalWindow(max_refusals=3, window_s=1.0)
    assert not any(w2.refused(t * 0.6) for t in range(20))  # a new window every second: never 4 in one
    assert not any(RefusalWindow(0, 1.0).refused(0.0) for _ in range(100))  # 0: never close


def test_address_rates_bucket_open_count_and_bounded_table() -> None:
    a = AddressRates(rate=1.0, burst=2, max_open=2, max_tracked=2)
    assert a.admit("1.1.1.1", 0.0) == 0.0
    a.opened("1.1.1.1")
    assert a.admit("1.1.1.1", 0.0) == 0.0
    a.opened("1.1.1.1")
    assert a.admit("1.1.1.1", 0.0) > 0  # two open already
    a.closed("1.1.1.1")
    assert a.admit("1.1.1.1", 0.0) == pytest.approx(1.0)  # bucket empty: next in 1 s
    assert a.admit("2.2.2.2", 0.0) == 0.0
    assert a.admit("3.3.3.3", 0.0) > 0  # table full of busy addresses: refused, not grown
    assert len(a.buckets) == 2
    assert a.admit("3.3.3.3", 100.0) == 0.0  # the others went quiet and were pruned


def test_session_shard_bounds_devices_per_user_over_all_hubs() -> None:
    cfg = load_config(jwt_secret="s" * 32)
    shard = SessionShard(cfg, None, None, None)  # type: ignore[arg-type]
    shard.connect("alice", "d1", "hub-0", 1, 2)
    shard.connect("alice", "d2", "hub-1", 2, 2)
    with pytest.raises(CloseConnection) as info:
        shard.connect("alice", "d3", "hub-0", 3, 2)
    assert info.value.close_code == 4429
    assert shard.connect("alice", "d1", "hub-1", 4, 2) == ("hub-0", 1)  # replacing a device is no new one
    shard.disconnect("alice", "d2", "hub-1", 2)
    shard.connect("alice", "d3", "hub-0", 3, 2)
    shard.connect("alice", "d4", "hub-0", 5, 0)  # 0 = no limit


def test_config_rules_across_keys_name_the_keys() -> None:
    with pytest.raises(ConfigError, match="jwt_public_key"):
        load_config(jwt_algorithm="RS256")
    with pytest.raises(ConfigError, match="tls_key_file"):
        load_config(tls_cert_file="cert.pem")
    with pytest.raises(ConfigError, match="max_frame_items"):
        load_config(max_frame_items=100, max_group_members=1000)
    with pytest.raises(ConfigError, match="rate_send_per_s"):
        load_config(rate_send_per_s=-1)


def test_empty_hs256_secret_refuses_every_token() -> None:
    cfg = load_config(jwt_secret="")
    import jwt

    token = jwt.encode({"sub": "alice", "exp": 2**40}, "x" * 32, algorithm="HS256")
    with pytest.raises(CloseConnection) as info:
        verify_token(cfg, token)
    assert info.value.close_code == 4401


async def test_dev_login_is_404_unless_enabled() -> None:
    for enabled, status in ((False, 404), (True, 200)):
        cfg = load_config(jwt_secret=secrets.token_hex(16), dev_login=enabled)
        async with TestClient(TestServer(make_app(cfg, HubTable()))) as client:
            resp = await client.post("/v1/login", json={"user": "alice"})
            assert resp.status == status
            if enabled:
                assert verify_token(cfg, (await resp.json())["token"]) == "alice"


async def test_router_refuses_large_login_bodies() -> None:
    cfg = load_config(jwt_secret=secrets.token_hex(16), dev_login=True)
    async with TestClient(TestServer(make_app(cfg, HubTable()))) as client:
        resp = await client.post("/v1/login", data=b"{" + b" " * (1 << 20) + b"}")
        assert resp.status == 413


def test_dev_login_under_rs256_needs_the_private_key() -> None:
    with pytest.raises(ConfigError, match="jwt_private_key"):
        make_app(load_config(jwt_algorithm="RS256", jwt_public_key="pem", dev_login=True), HubTable())
    cfg = load_config(jwt_algorithm="RS256", jwt_public_key="pem")
    with pytest.raises(ConfigError, match="jwt_private_key"):
        issue_token(cfg, "alice")


@pytest.mark.parametrize(
    "remote, key",
    [
        (("203.0.113.7", 5000), "203.0.113.7"),
        (("2001:db8:1:2:aaaa::1", 5000, 0, 0), "2001:db8:1:2::/64"),
        (("2001:db8:1:2:bbbb::9", 5000, 0, 0), "2001:db8:1:2::/64"),  # same /64: same subscriber
        (("::ffff:198.51.100.4", 5000, 0, 0), "198.51.100.4"),  # IPv4-mapped counts as the IPv4 address
        (None, "?"),
    ],
)
def test_hub_counts_ipv4_whole_and_ipv6_per_64(remote: Any, key: str) -> None:
    from im_actors.hub import _address_key

    class Conn:
        remote_address = remote

    assert _address_key(Conn()) == key  # type: ignore[arg-type]


# --- refusals that count (issue 14, defect 3) -------------------------------------------------------


def _run_client(
    inflight: int, seconds: float, key_of: Any, commit_s: float = 0.004, rtt_s: float = 0.001
) -> tuple[bool, int, int]:
    """Simulate one connection with ``inflight`` sends in flight that obeys every ``retry_after_ms``
    (a refused send is resent with the same cmid when it was told; an acked one is followed by a
    new send), against the default buckets and refusal limit; the hub's ``_admit`` order of calls.

    Returns ``(closed, refusals, acks)``.
    """
    import heapq

    cfg = load_config()
    rates = UserRates(cfg.rate_send_per_s, cfg.rate_send_burst, cfg.rate_request_per_s, cfg.rate_request_burst)
    rates.opened("alice", 0.0)
    window = RefusalWindow(cfg.rate_refusals_max, cfg.rate_refusals_window_s)
    arrivals = [(0.0, slot, f"c{slot}") for slot in range(inflight)]  # (time, slot, cmid)
    heapq.heapify(arrivals)
    sent = inflight
    refusals = acks = 0
    while arrivals:
        now, slot, cmid = heapq.heappop(arrivals)
        if now > seconds:
            break
        wait_ms = rates.check("alice", "send", now)
        if not wait_ms:
            acks += 1
            heapq.heappush(arrivals, (now + commit_s + rtt_s, slot, f"c{sent}"))  # the next message
            sent += 1
            continue
        refusals += 1
        if window.refused(now, key_of(cmid), wait_ms / 1000):
            return True, refusals, acks
        heapq.heappush(arrivals, (now + wait_ms / 1000 + rtt_s, slot, cmid))  # obeys retry_after_ms
    return False, refusals, acks


def test_a_client_with_8_sends_in_flight_that_obeys_retry_after_is_never_closed() -> None:
    closed, refusals, acks = _run_client(8, 30.0, key_of=lambda cmid: ("send", "d:alice:bob", cmid))
    assert not closed
    assert refusals > 3000  # refused all the time: the bucket, not the closing, limits it
    assert acks >= 50 * 30  # and it gets the whole rate (50 sends/s after the 200 burst)
    # Counting every refusal (the rule before the fix, key=None) closed the same client.
    assert _run_client(8, 30.0, key_of=lambda cmid: None)[0]


def test_a_client_that_resends_before_its_time_is_closed() -> None:
    w = RefusalWindow(max_refusals=5, window_s=10.0)
    key = ("send", "d:alice:bob", "c1")
    results = [w.refused(0.001 * i, key, 0.5) for i in range(10)]  # told 500 ms, back after 1 ms
    assert results.index(True) == 6  # the first refusal is free, the next five count, the sixth closes


def test_a_client_that_fires_new_requests_at_an_empty_bucket_is_closed() -> None:
    w = RefusalWindow(max_refusals=5, window_s=10.0)
    results = [w.refused(0.001 * i, ("send", "d:alice:bob", f"c{i}"), 0.02) for i in range(10)]
    assert results.index(True) == 6  # one new request per 20 ms refill window is free, not ten


def test_a_retry_that_obeyed_never_counts_and_memory_is_bounded() -> None:
    from im_actors.limits import REFUSALS_REMEMBERED

    w = RefusalWindow(max_refusals=1, window_s=10.0)
    key = ("sync", "d:alice:bob")
    assert not w.refused(0.0, key, 1.0)  # new: free
    assert not any(w.refused(1.0 + i, key, 1.0) for i in range(50))  # back each time when told
    for i in range(REFUSALS_REMEMBERED * 2):
        w.refused(100.0 + i, ("send", "c", str(i)), 0.5)
    assert len(w.told) <= REFUSALS_REMEMBERED
