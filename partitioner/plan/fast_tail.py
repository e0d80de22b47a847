"""The edge's fast tail: a compressed copy of the cloud's layers [k2, L) + final norm + LM head.

The edge runs it to finish a token alone when the cloud is too slow or down
(the router, ``edge_node.policy``). It is exported as its own tier folder
(``PLAN/fast_tail/``) and compressed at load like every tier.

Choosing its compression by measurement (``choose_fast_tail``):

- quality: the accurate tail (uncompressed) and each candidate are fed the SAME
  hidden states at k2 (the uncompressed model's, over windows of real text);
  reported as the candidate's perplexity change against the accurate tail's
  and the share of positions whose greedy next token is the same;
- speed: one decode step and the prefill cost per position of the candidate at the
  edge's threads, the candidates taking turns, each keeping its fastest round (``profiler.step_times``);
- choice: the fastest decode step among the candidates within the floor
  (perplexity increase <= ``max_perplexity_increase_pct`` and agreement >=
  ``min_token_agreement``); "none" (the exact copy) always meets it.

Distilled students (``splitglm distill --layers K2,L``, ``DistilledTail``) join the candidates under
``<compression name>@<first 12 hex of their weights' sha256>``, measured the same way; a chosen one's
weights are what the plan's ``fast_tail/`` folder holds.

Measurements are cached in the model's measurement file (``partitioner.plan.measure``)
under ``"fast_tail"`` -> ``"k2=<k2>"`` -> candidate, so re-partitioning is cheap.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from partitioner.eval.tails import compare_scores, hidden_windows, segment_front, tail_scores
from partitioner.plan.profiler import decode_paths, faster_compiled, step_times
from runtime.build import build_segment
from runtime.checkpoint import load_spec
from runtime.compress.named import COMPRESSIONS
from runtime.segment import Segment

logger = logging.getLogger(__name__)

# Candidate compressions of the fast tail (runtime.compress descriptions). "+head" also
# quantises the LM head, often the largest matrix of a small model's tail ("int4+int8head": the
# second pass finds only the head left as a plain linear). SmoothQuant is left out: it needs
# calibration data at load time, which a tier artifact does not carry.
FAST_TAIL_COMPRESSIONS: dict[str, list[dict]] = {
    **{name: COMPRESSIONS[name] for name in ("none", "int8", "int4") if name in COMPRESSIONS},
    "int8+head": [{"pass": "int8", "activations": "bf16", "include_head": True}],
    "int4+int8head": [
        {"pass": "int4", "group_size": 32},
        {"pass": "int8", "activations": "bf16", "include_head": True},
    ],
    "int4+head": [{"pass": "int4", "group_size": 32, "include_head": True}],
    "w8a8+head": [{"pass": "int8", "activations": "int8", "include_head": True}],
}
# Measured by default: on the demo model int4 on the head (agreement 0.84) and W8A8 (+2.3% perplexity)
# break the default floor, so they are left out unless asked for (``names``).
CANDIDATES = tuple(n for n in FAST_TAIL_COMPRESSIONS if n not in ("int4+head", "w8a8+head"))
DEFAULT_FAST_TAIL = "int8" if "int8" in COMPRESSIONS else "none"  # fixed plans (no measurement)



@dataclass(frozen=True)
class DistilledTail:
    """A distilled fast tail offered to the choice: its folder and its tier's compression entry."""

    folder: str
    entry: dict

    @classmethod
    def offer(cls, folders, model_id: str, k2: int, num_layers: int) -> dict[str, DistilledTail]:
        """{candidate name: tail} of the ``splitglm distill`` folders that are layers [k2, L) + head of this
        model (verified); one of other layers is left out with a warning (the plan cut elsewhere)."""
        from runtime.artifacts import verify_manifest

        offered = {}
        for folder in folders:
            manifest = verify_manifest(folder, {"tier": "student", "model": model_id})
            if manifest["layers"] != [k2, num_layers] or not manifest["head"]:
                logger.warning("%s holds layers %s, not this plan's fast tail [%d, %d) + head: not offered",
                               folder, manifest["layers"], k2, num_layers)
                continue
            digest = manifest["files"]["model.safetensors"][:12]
            offered[f"{manifest['compression']['name']}@{digest}"] = cls(str(folder), manifest["compression"])
        return offered


def fast_tail_entry(name: str, students: dict[str, DistilledTail] | None = None) -> dict:
    """The fast tail's compression as plan.json / manifest.json record it (like ``measure.compression_entry``)."""
    if students and name in students:
        return students[name].entry
    if name not in FAST_TAIL_COMPRESSIONS:
        raise ValueError(f"unknown fast-tail compression {name!r}; known: {', '.join(FAST_TAIL_COMPRESSIONS)}")
    return {"name": name, "backend": "torch", "passes": FAST_TAIL_COMPRESSIONS[name]}


@dataclass(frozen=True)
class Floor:
    """The least quality a fast tail must keep, against the accurate tail on the same hidden states."""

    max_perplexity_increase_pct: float = 2.0
    min_token_agreement: float = 0.9

    def meets(self, quality: dict) -> bool:
        return (
            quality["perplexity_delta_pct"] <= self.max_perplexity_increase_pct
            and quality["token_agreement"] >= self.min_token_agreement
        )


# ---- choice ---------------------------------------------------------------------------------------


def pick_fast_tail(measured: dict[str, dict], floor: Floor) -> str:
    """The candidate with the fastest step among those within ``floor`` (ties: the more accurate).

    ``measured``: {name: {"perplexity_delta_pct", "token_agreement", "step_ms", ...}}. With none
    within the floor, the most accurate one (highest agreement), with a warning.
    """
    fit = [name for name, m in measured.items() if floor.meets(m)]
    if not fit:
        best = max(measured, key=lambda n: (measured[n]["token_agreement"], -measured[n]["perplexity_delta_pct"]))
        logger.warning("no fast-tail compression meets %s; taking the most accurate, %s", floor, best)
        return best
    return min(fit, key=lambda n: (measured[n]["step_ms"], measured[n]["perplexity_delta_pct"]))


@dataclass
class FastTailChoice:
    name: str
    floor: Floor
    measured: dict[str, dict] = field(default_factory=dict)  # per candidate: quality and timing
    students: dict[str, DistilledTail] = field(default_factory=dict)  # the distilled candidates
    decode: dict = field(default_factory=lambda: {"path": "eager"})  # its CPU decode path (``choose_decode_path``)

    @property
    def step_ms(self) -> float:
        """The chosen tail's decode step on its chosen CPU decode path (a draft's cost at the edge), ms."""
        measured = self.decode.get(f"{self.decode['path']}_ms")  # None: not timed that way (or no compiler)
        return measured if measured is not None else self.measured[self.name]["step_ms"]

    @property
    def entry(self) -> dict:
        return fast_tail_entry(self.name, self.students)

    @property
    def source(self) -> str | None:
        """The folder whose weights the fast tail ships (a distilled student's), or None (the model's)."""
        return self.students[self.name].folder if self.name in self.students else None

    def record(self) -> dict:
        """plan.json's ``"fast_tail"``: the compression, its quality, the floor and every candidate."""
        return {
            "compression": self.entry,
            "quality": self.measured[self.name],
            "floor": asdict(self.floor),
            "candidates": self.measured,
            "cpu_decode": self.decode,
        }


def measure_fast_tails(
    model: str | os.PathLike,
    k2: int,
    ids: torch.Tensor,
    threads: int = 1,
    names: list[str] | None = None,
    data: dict | None = None,
    window: int = 512,
    progress: bool = False,
    students: dict[str, DistilledTail] | None = None,
) -> dict[str, dict]:
    """Quality (``compare_scores``) and speed (``step_times``) of each candidate for layers [k2, L) + head.

    Every candidate still to measure is held at once (the exact copy is the largest), so their
    timings can take turns. ``names``: default ``CANDIDATES``. ``data``: the model's measurement
    cache (``measure.load_measurements``); what it holds is reused, what is measured is added (the
    caller saves it).
    """
    students = students or {}
    names = (names or list(CANDIDATES)) + [n for n in students if n not in (names or ())]
    L = load_spec(model).num_layers
    cache = (data if data is not None else {}).setdefault("fast_tail", {}).setdefault(f"k2={k2}", {})
    for name in names:
        cache.setdefault(name, {}).setdefault("timing", {})
    todo_quality = [n for n in names if "quality" not in cache[n]]
    todo_timing = [n for n in names if str(threads) not in cache[n]["timing"]]
    tails = {
        name: build_segment(students[name].folder if name in students else model, k2, L, False, True,
                            fast_tail_entry(name, students))
        for name in dict.fromkeys(todo_quality + todo_timing)
    }
    if todo_quality:
        front = Segment.from_checkpoint(model, 0, k2, embed=True)
        windows = hidden_windows(segment_front(front), ids, window)
        del front
        reference = tail_scores(Segment.from_checkpoint(model, k2, L, head=True), windows)
        for name in tqdm(todo_quality, desc="fast tail quality", disable=not progress, leave=False):
            cache[name]["quality"] = compare_scores(reference, tail_scores(tails[name], windows))
    if todo_timing:
        for name, timing in step_times({n: tails[n] for n in todo_timing}, threads).items():
            cache[name]["timing"][str(threads)] = timing
    return {n: {**cache[n]["quality"], **cache[n]["timing"][str(threads)]} for n in names}


def choose_fast_tail(
    model: str | os.PathLike,
    k2: int,
    ids: torch.Tensor,
    threads: int = 1,
    floor: Floor = Floor(),
    data: dict | None = None,
    names: list[str] | None = None,
    window: int = 512,
    progress: bool = False,
    students: dict[str, DistilledTail] | None = None,
) -> FastTailChoice:
    """Measure each candidate compression of [k2, L) + head on ``ids`` (T,) and pick (``pick_fast_tail``)."""
    measured = measure_fast_tails(model, k2, ids, threads, names, data, window, progress, students)
    name = pick_fast_tail(measured, floor)
    logger.info("fast tail at k2=%d: %s (%s)", k2, name, measured[name])
    return FastTailChoice(name, floor, measured, dict(students or {}))


def choose_decode_path(model: str | os.PathLike, k2: int, choice: FastTailChoice, threads: int, wanted: str = "auto",
                       data: dict | None = None) -> dict:
    """The chosen tail's CPU decode path (``runtime.cpu_decode``), set on ``choice.decode``: ``wanted`` ("eager",
    "compiled") or, for "auto", the shorter of the two steps measured side by side (``profiler.decode_paths``,
    cached in ``data`` beside the tail's other measurements)."""
    if wanted == "eager":
        choice.decode = {"path": "eager"}
        return choice.decode
    cache = (data if data is not None else {}).setdefault("fast_tail", {}).setdefault(f"k2={k2}", {})
    timings = cache.setdefault(choice.name, {}).setdefault("cpu_decode", {})
    if str(threads) not in timings:
        L = load_spec(model).num_layers
        source = choice.source or model
        eager, compiled = (build_segment(source, k2, L, False, True, choice.entry) for _ in range(2))
        timings[str(threads)] = decode_paths(eager, compiled, threads)
    measured = timings[str(threads)]
    faster = "compiled" if faster_compiled(measured) else "eager"
    choice.decode = {**measured, "path": faster if wanted == "auto" else wanted}
    logger.info("fast tail at k2=%d decodes %s (%s)", k2, choice.decode["path"], measured)
    return choice.decode
