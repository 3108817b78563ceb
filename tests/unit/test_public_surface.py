"""The public surface of the modules users import, pinned (as python-websockets pins its ``__all__``).

A name added to or removed from one of these ``__all__`` lists makes this test fail until the list
below changes with it, so every change of the public surface shows in review.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PUBLIC: dict[str, list[str]] = {
    "im_actors.client": [
        "Ack",
        "Msgs",
        "Client",
        "ClientClosed",
        "ConnectFailed",
        "ConnectionLost",
        "NO_RECONNECT_CLOSE_CODES",
        "backoff_delay",
    ],
    "im_actors.delivery": ["Cursor", "Delivery", "FillNext", "Hole", "Step", "SyncRange"],
    "im_actors.protocol": [
        "PROTO_VERSION",
        "SUBPROTOCOL_MSGPACK",
        "SUBPROTOCOL_JSON",
        "SUBPROTOCOLS",
        "Limits",
        "SERVER_LIMITS",
        "Request",
        "REQUEST_TYPES",
        "encode",
        "decode",
        "parse_auth",
        "parse_request",
        "msg_frame",
        "answer_frame",
        "body_size",
    ],
    "im_actors.errors": [
        "ImError",
        "RequestError",
        "BadRequest",
        "Unauthorized",
        "Forbidden",
        "TooLarge",
        "Conflict",
        "RateLimited",
        "Unavailable",
        "StorageUnavailable",
        "Internal",
        "CloseConnection",
        "ConfigError",
        "ServiceError",
        "CLOSE_GOING_AWAY",
        "CLOSE_INVALID_UTF8",
        "CLOSE_TOO_BIG",
        "CLOSE_PROTOCOL",
        "CLOSE_AUTH",
        "TOKEN_EXPIRED",
        "CLOSE_AUTH_TIMEOUT",
        "CLOSE_REPLACED",
        "CLOSE_RATE",
        "CLOSE_SLOW",
        "CLOSE_RECONNECT",
        "RECONNECT_CLOSE_CODES",
        "NO_RECONNECT_CLOSE_CODES",
        "error_from_frame",
    ],
    "im_actors.config": ["Config", "load_config"],
}


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_all_is_pinned(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert sorted(module.__all__) == sorted(PUBLIC[module_name])
    assert len(set(module.__all__)) == len(module.__all__), "a name listed twice"


@pytest.mark.parametrize("module_name", sorted(PUBLIC))
def test_every_public_name_exists_and_classes_and_functions_say_what_they_do(module_name: str) -> None:
    module = importlib.import_module(module_name)
    for name in module.__all__:
        obj = getattr(module, name)  # AttributeError: listed but not defined
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"{module_name}.{name} has no docstring"


def test_the_close_code_sets_come_from_one_table() -> None:
    from im_actors import client, errors

    assert client.NO_RECONNECT_CLOSE_CODES is errors.NO_RECONNECT_CLOSE_CODES
    assert errors.RECONNECT_CLOSE_CODES | errors.NO_RECONNECT_CLOSE_CODES == set(errors.CLOSE_RECONNECT)
    assert errors.RECONNECT_CLOSE_CODES.isdisjoint(errors.NO_RECONNECT_CLOSE_CODES)
    # PROTOCOL.md section 7, the "reconnect?" column
    assert errors.RECONNECT_CLOSE_CODES == {1001, 4408, 4429, 4508}
    assert errors.NO_RECONNECT_CLOSE_CODES == {1007, 1009, 4400, 4401, 4409}
