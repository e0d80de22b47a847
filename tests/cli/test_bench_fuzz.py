"""``splitglm bench fuzz``'s runner: inputs counted, failures counted (not raised), RSS measured, shares split."""

from __future__ import annotations

from hypothesis import strategies as st

from splitglm.bench.fuzz import SHARES, format_report, run_target, split
from splitglm.cli import build_parser
from splitglm.fuzz import FuzzFailure


class Every7th:
    """A target whose property breaks on every 7th input and whose end-of-run check fails."""

    name = "fake"

    def __init__(self):
        self.seen = 0

    def strategy(self):
        return st.integers()

    def check(self, example):
        self.seen += 1
        if self.seen % 7 == 0:
            raise FuzzFailure(f"input {self.seen} broke it")
        if self.seen == 3:
            raise KeyError("a broken harness")

    def finish(self):
        raise FuzzFailure("leaked")


def test_failures_are_counted_and_the_run_goes_on():
    report = run_target(Every7th(), 1200, seed=0, progress=False)
    assert report.inputs == 1200 and report.failures == 1200 // 7 + 2  # + the harness error + the end check
    assert report.examples[0] == "KeyError in the harness: 'a broken harness'" and len(report.examples) == 5
    assert len(report.rss_trace_mib) == 10 and report.rss_before_mib > 0 and report.inputs_per_s > 0
    assert report.growth_mib == round(report.rss_after_mib - report.rss_before_mib, 1)
    lines = format_report({"targets": [vars(report)], "inputs": 1200, "failures": report.failures, "seconds": 1.0,
                           "seed": 0})
    assert lines[1].startswith("fake") and "failure: input 7 broke it" in "\n".join(lines)


def test_inputs_are_shared_among_the_targets():
    assert sum(split(100_000, list(SHARES)).values()) == 100_000
    assert split(10, ["frames", "http"]) == {"frames": 9, "http": 1}


def test_the_subcommand_parses():
    args = build_parser().parse_args(["bench", "fuzz", "--inputs", "500", "--targets", "frames", "--json"])
    assert (args.inputs, args.targets, args.json) == (500, "frames", True)
