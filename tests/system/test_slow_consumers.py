"""A stalled HTTP client and a stalled MQTT device do not stall the other sessions (real processes).

``splitglm.bench.slow`` on the open demo topology: two HTTP streams and two devices run their requests
beside a long HTTP stream and a republishing device that read their answers, and beside the same two that
do not, alternating, three rounds each; the median of the rounds' per-token p99 beside the stallers must
stay close to the one beside the readers.
"""

from __future__ import annotations

import json

import pytest

from splitglm.bench.slow import slow_consumers
from splitglm.bench.soak import DeviceSession, HttpSession, device_tier
from splitglm.bench.speculative import prompts
from splitglm.system import LocalSystem

pytestmark = pytest.mark.slow

# The issue asks for 1.5x, and `splitglm bench soak` reports that ratio (slow_consumers.p99_ratio). A p99 of
# a few hundred gaps on two cores that a CI run shares with other jobs swings by more than 1.5x on its own,
# so the test asserts a looser bound; a real stall (a victim waiting on a staller) gives a ratio of 10x or more.
LOOSE_RATIO = 2.5


def test_stalled_consumers_leave_the_others_per_token_p99(demo_checkpoint):
    from partitioner.plan.demo import demo_plan

    plan = str(demo_plan(demo_checkpoint))
    texts = [text for _, text in prompts(4)]
    with LocalSystem(plan, device_agent=False, edge_args=("--stream-send-timeout-s", "300")) as system:
        tier = device_tier(plan)
        devices = [DeviceSession(f"victim-{i}", system.broker, tier) for i in range(2)]
        try:
            report = slow_consumers([HttpSession(system.http), HttpSession(system.http), *devices], texts,
                                    system.http, system.broker, tier, repeats=3, max_tokens=48)
        finally:
            for device in devices:
                device.close()
    print(json.dumps(report, indent=2))
    assert len(report["rounds"]) == 6 and len(report["stalled_p99_ms"]) == 3
    for round_ in report["rounds"]:
        assert round_["mqtt_frames"] > 20, round_
        assert (round_["http_bytes_read"] > 0) == round_["read"], round_
    assert report["p99_ratio"] <= LOOSE_RATIO, report
