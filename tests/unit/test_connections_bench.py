"""The pure parts of benchmarks/connections.py."""

from __future__ import annotations

import resource

from benchmarks import connections as bench


def test_split_counts() -> None:
    assert bench.split_counts(10, 4) == [3, 3, 2, 2]
    assert bench.split_counts(8000, 4) == [2000] * 4
    assert bench.split_counts(1, 3) == [1, 0, 0]
    assert sum(bench.split_counts(9999, 7)) == 9999


def test_per_connection_kb() -> None:
    assert bench.per_connection_kb(100 << 20, 110 << 20, 1024) == 10.0
    assert bench.per_connection_kb(0, 1 << 20, 0) == 0.0


def test_raise_nofile_limit_reaches_the_hard_limit() -> None:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        soft, hard = bench.raise_nofile_limit()
        assert hard == before[1]
        assert soft == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)
