"""The per-answer report of a generation: what the owner tells its client besides the text.

The device agent (its JSON answer on ``results/{device_id}``) and the edge's HTTP API (the ``splitglm``
object of a response) both report a finished ``runtime.owner.Generation`` with ``report``: the path of
each token, the router's switches, predicted and actual latency, the stages, the budget and whether it
was met, whether the answer is degraded, the policy and the speculation counts. Times are in
milliseconds, rounded to ``DECIMALS`` places.
"""

from __future__ import annotations

from protos import splitglm_pb2 as pb

PATH_NAMES = {pb.ACCURATE: "accurate", pb.FAST: "fast"}
UNSPECIFIED = "unspecified"  # the name of a path that is not set
DECIMALS = 3  # of every time reported, in ms


def path_name(path: int) -> str:
    """'accurate' / 'fast' for a pb.Path value ('unspecified' when not set)."""
    return PATH_NAMES.get(path, UNSPECIFIED)


def paths_name(names: list[str]) -> str | None:
    """The one path every token took, "mixed" when they differ (None without tokens)."""
    return names[0] if len(set(names)) == 1 else ("mixed" if names else None)


def ms(value: float | None) -> float | None:
    """A time in ms as reported (None stays None)."""
    return None if value is None else round(value, DECIMALS)


def report(generation, budget_ms: float | None, total_ms: float | None = None, ttft_ms: float | None = None) -> dict:
    """The report of a (finished or interrupted) generation under a latency budget of ``budget_ms`` (None:
    none); ``total_ms`` and ``ttft_ms`` default to the generation's own (an HTTP request counts from its
    arrival instead)."""
    total_ms = generation.total_ms if total_ms is None else total_ms
    ttft_ms = generation.ttft_ms if ttft_ms is None else ttft_ms
    paths = [path_name(p) for p in generation.paths]
    return {
        "paths": paths,
        "path": paths_name(paths),
        "switches": list(generation.switches),  # the edge router's: {"token", "to", "reason"}
        "predicted_ms": ms(generation.predicted_ms),  # the edge router's prediction of the whole completion
        "actual_ms": ms(total_ms),
        "timings_ms": {"ttft": ms(ttft_ms), "per_token": ms(generation.per_token_ms), "total": ms(total_ms)},
        "stages_ms": generation.stage_breakdown(),  # mean ms per token after the first: owner, links, tiers
        "budget_met": None if budget_ms is None else total_ms <= budget_ms,
        "degraded": bool(generation.degraded),  # the cloud failed: the edge's fast tail answered
        "policy": generation.policy or generation.params.policy or None,  # the router's, else the one asked
        "speculative": dict(generation.speculative),  # drafts the cloud verified, accepted, round trips
    }
