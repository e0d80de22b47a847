"""``splitglm bench fanin``, tiny: three devices through a real Mosquitto (TLS, logins, ACL), nothing lost."""

from __future__ import annotations

import os

import pytest

from splitglm.bench.fanin import Ledger, bench_fanin, cpu_seconds, format_rows, schedule


def test_the_schedule_spreads_the_starts_over_the_first_interval():
    assert schedule(2, 2, 1.0) == [(0.0, 0, 0), (0.5, 1, 0), (1.0, 0, 1), (1.5, 1, 1)]


def test_the_ledger_tells_delivered_lost_and_duplicated_readings_apart():
    ledger = Ledger()
    for i, reading in enumerate(["a", "b", "c"]):
        ledger.published(reading, float(i))
    ledger.answered({"readings": [{"id": "a"}, {"id": "b"}]}, 2.0)
    ledger.answered({"readings": [{"id": "b"}], "error": "boom"}, 3.0)
    ledger.answered({"readings": [{"id": "elsewhere"}]}, 3.0)  # another level's: not counted
    row = ledger.row(timeout_s=60.0)
    assert (row["readings"], row["answers"], row["errors"]) == (3, 2, 1)
    assert (row["delivered"], row["lost"], row["duplicated"]) == (1, 1, 1)
    # a waited 2 s, b 1 s to its first answer; nearest rank (splitglm.bench.stats): p50 is the 1st of 2, p99 the 2nd
    assert (row["p50_ms"], row["p99_ms"]) == (1000.0, 2000.0)


def test_cpu_seconds_of_this_process_are_a_number():
    assert cpu_seconds(os.getpid()) > 0 and cpu_seconds(2**22 + 12345) is None


@pytest.mark.slow
def test_a_tiny_fanin_delivers_every_reading_once(talking_plan):
    seen = []
    rows = bench_fanin(talking_plan, devices=(3,), readings_per_device=2, interval_s=0.2, max_tokens=1,
                       answer_timeout_s=120.0, progress=lambda n, done, total: seen.append((n, done, total)))
    (row,) = rows
    assert row["devices"] == 3 and row["readings"] == 6
    assert row["delivered"] == row["readings"] and row["lost"] == 0 and row["duplicated"] == 0, row
    assert row["errors"] == 0 and 1 <= row["answers"] <= 6
    assert row["p99_ms"] >= row["p50_ms"] > 0 and row["wall_s"] > 0
    assert all(isinstance(row[k], float) for k in ("broker_cpu_pct", "edge_cpu_pct", "devices_cpu_pct")), row
    assert row["broker"].startswith("mosquitto (secure") and row["max_tokens"] == 1
    assert seen and seen[-1] == (3, 6, 6)
    assert "delivered" in format_rows(rows)
