"""``splitglm bench structured``: the cost of structured output per token, tokens/s with and without a schema.

    splitglm bench structured [--model DIR] [--devices cpu cuda] [--batches 1 32] [--steps 128] [--quick]
                              [--shape glm4-9b]

The demo model split as the demo splits it: the edge part (embedding + layers [0, k2)) makes each step's
hidden states, untimed; the cloud tier ([k2, L) + norm + head + sampling) is the timed tier. On ``cpu`` it
is a PyTorch ``Segment`` (fp32); on ``cuda`` the ``CudaEngine`` (bf16, CUDA graphs), as the cloud runs it.
B sessions decode greedily in lockstep, each step one call of the tier with every session's row. Three
runs of the same steps per device and batch size, interleaved ``--repeats`` times:

- **plain**: no logit processing (on the GPU: sampled inside the graph);
- **schema**: under ``SCHEMA``'s grammar (llguidance, the demo model's vocabulary): each step's rows carry
  every session's mask lazily (``TokenState.rows``), as in service; the tier computes them inside its call
  (all sessions at once, in llguidance's threads; on the GPU while the layers run) and applies them while
  sampling (on the GPU in the engine's sampling graph, ``runtime.static_sampling``; on the CPU
  ``runtime.sampling.sample_processed``), and the matcher consumes the token (``TokenState.commit``). A
  session whose grammar has ended (its JSON closed, then the end-of-text token, the one the mask allows
  there) starts again on a new prompt; so does one that reaches ``--max-new`` tokens;
- **penalties**: presence and frequency penalties, no grammar: the processing path alone, for reference.

Every run restarts each session at the steps the first schema run did, so the runs decode the same number
of positions at the same context lengths; a restart's prefill is not timed. The timed time of a step is
the rows, the tier's call (masks included; it returns the tokens on the host) and the commits.
Reported per device and batch size: tokens/s of each run (median over repeats), the schema's and the
penalties' overhead (``stats.overhead_pct`` of the time per token) and ratio (``stats.ratio`` of
tokens/s), the host's mask ms per token (``mask_ms_per_token``: every session's mask computed together,
measured apart before each step, untimed) and the commits' ms per token (timed), the ms a step adds, and
how many schema episodes ended in parseable JSON. ``--out FILE`` writes the JSON
(``examples/results/structured-<card>.json``).

The demo model's cloud step is short (about 0.5 ms at batch 1 on an H100), so on the GPU the fixed costs of
a schema weigh far more than they would on the cloud segment splitglm serves on GPUs. ``--shape glm4-9b``
(GPU only) times instead the cloud segment of ``splitglm bench cloud-gpu``: random bf16 weights of
GLM-4-9B-0414's shape, every layer, its norm and its 151,552-row head. The grammar is still the demo
model's vocabulary (49,152 tokens; the masks are 151,552 wide, the rows past the tokenizer never allowed,
as a GLM-4 head's padding rows are), and the edge part is a random embedding of each token (untimed). The
weights are random, so only the speed means anything; the grammar still makes every ended episode parse.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from .options import MODEL_HELP, add_command
from .stats import median, overhead_pct, ratio

SCHEMA = {  # a weather station's reading: nested objects, enums, bounded integers and numbers, an array
    "type": "object",
    "properties": {
        "station": {"type": "object", "properties": {
            "id": {"type": "integer", "minimum": 1, "maximum": 9999},
            "kind": {"enum": ["urban", "rural", "coastal", "alpine"]}},
            "required": ["id", "kind"], "additionalProperties": False},
        "reading": {"type": "object", "properties": {
            "temperature_c": {"type": "number", "minimum": -60, "maximum": 60},
            "humidity_pct": {"type": "integer", "minimum": 0, "maximum": 100},
            "wind": {"enum": ["calm", "breeze", "gale", "storm"]}},
            "required": ["temperature_c", "humidity_pct", "wind"], "additionalProperties": False},
        "alerts": {"type": "array", "items": {"enum": ["frost", "heat", "flood", "wind"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["station", "reading", "alerts", "ok"],
    "additionalProperties": False,
}  # fmt: skip
PLACES = ("a harbour", "a mountain pass", "a city roof", "a farm", "an island", "a glacier", "a desert", "a forest")
MODES = ("plain", "schema", "penalties")
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.5}


def prompt_ids(tokenizer, session: int, episode: int) -> list[int]:
    """A chat prompt asking for one station's reading as JSON (the place varies by session and episode)."""
    place = PLACES[(session + 3 * episode) % len(PLACES)]
    text = f"Station {session * 100 + episode} stands on {place}. Give its latest reading as JSON."
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True, return_dict=False))


class RandomEmbedding:
    """The untimed edge part of ``--shape``: each token's row of a random embedding table, on the GPU."""

    def __init__(self, spec):
        from runtime.cuda_weights import random_weights

        self.table = random_weights(spec, 0, embed=True, head=False, dtype=torch.bfloat16, device="cuda").embed

    def __call__(self, items) -> list[torch.Tensor]:
        return [self.table[item.input_ids.to("cuda")] for item in items]

    def close_session(self, session_id: str) -> None:
        pass


def shape_tiers(spec):
    """(edge part, timed cloud tier, sync) for ``--shape``'s ``spec``: the cloud segment ``bench cloud-gpu``
    times."""
    from runtime.cuda import CudaEngine
    from runtime.cuda_weights import random_weights

    weights = random_weights(spec, spec.num_layers, embed=False, head=True, dtype=torch.bfloat16, device="cuda")
    cloud = CudaEngine(weights=weights, spec=spec, start=0, head=True, dtype=torch.bfloat16, pool_mib=2048,
                       prefill_chunk=128, max_batch=32, max_positions=1024)
    return RandomEmbedding(spec), cloud, torch.cuda.synchronize


def build_tiers(model: str, device: str):
    """(edge part, timed cloud tier, sync) for the demo's split of ``model`` on ``device``."""
    from partitioner.plan.demo import default_splits
    from runtime.checkpoint import load_spec
    from runtime.segment import Segment

    layers = load_spec(model).num_layers
    _, k2 = default_splits(layers)
    if device == "cpu":
        edge = Segment.from_checkpoint(model, 0, k2, embed=True)
        return edge, Segment.from_checkpoint(model, k2, layers, head=True), lambda: None
    from runtime.cuda import CudaEngine

    common = {"dtype": torch.bfloat16, "pool_mib": 1024, "prefill_chunk": 64, "max_positions": 1024}
    edge = CudaEngine(Segment.from_checkpoint(model, 0, k2, embed=True, dtype=torch.bfloat16), **common)
    cloud = CudaEngine(Segment.from_checkpoint(model, k2, layers, head=True, dtype=torch.bfloat16), **common)
    return edge, cloud, torch.cuda.synchronize


class Lockstep:
    """``batch`` sessions decoding greedily in lockstep on (edge, cloud) in one mode; times the cloud's part."""

    def __init__(self, tiers, tokenizer, grammars, mode: str, batch: int, max_new: int, tag: str,
                 prefetch: bool | None = None):
        from runtime.generation import prefetches_masks

        self.edge, self.cloud, self.sync = tiers
        self.prefetch = prefetches_masks(self.cloud) if prefetch is None else prefetch
        self.tokenizer, self.grammars, self.mode, self.max_new, self.tag = tokenizer, grammars, mode, max_new, tag
        self.batch = batch
        self.episodes = [0] * batch
        self.states: list = [None] * batch
        self.pos = [0] * batch
        self.timed_ms = self.mask_ms = self.commit_ms = 0.0
        self.tokens = 0
        self.ended = self.cut = self.valid = 0

    def _sid(self, i: int) -> str:
        return f"{self.tag}-{self.mode}-{i}-{self.episodes[i]}"

    def start(self, sessions: list[int]) -> None:
        """(Re)start these sessions on a new prompt: the edge and the cloud prefill it (untimed)."""
        from runtime.generation import TokenState
        from runtime.sampling import SamplingParams
        from runtime.segment import SegmentInput

        params = SamplingParams(**(PENALTIES if self.mode == "penalties" else {}))
        items = []
        for i in sessions:
            if self.states[i] is not None:
                self._finish(i)
            matcher = self.grammars.matcher("json_schema", json.dumps(SCHEMA)) if self.mode == "schema" else None
            self.states[i] = TokenState(params, matcher, prefetch=self.prefetch)
            ids = torch.tensor(prompt_ids(self.tokenizer, i, self.episodes[i]))
            self.pos[i] = len(ids)
            items.append((i, ids))
        hidden = self.edge([SegmentInput(self._sid(i), 0, input_ids=ids) for i, ids in items])
        out = self.cloud([SegmentInput(self._sid(i), 0, hidden=h, sample=self.states[i].rows(len(ids)))
                          for (i, ids), h in zip(items, hidden)])
        for (i, _), sampled in zip(items, out):
            self.states[i].commit(sampled.tokens)

    def _finish(self, i: int, count: bool = True) -> None:
        """Close a session's caches; count how its episode ended (and, under the schema, whether it parses)."""
        state = self.states[i]
        if count and state.matcher is not None:
            done = state.matcher.stopped
            self.ended, self.cut = self.ended + done, self.cut + (not done)
            try:
                json.loads(self.tokenizer.decode(state.tokens, skip_special_tokens=True))
                self.valid += 1
            except ValueError:
                pass
        for tier in (self.edge, self.cloud):
            tier.close_session(self._sid(i))
        self.episodes[i] += 1

    def step(self) -> list[int]:
        """One timed decode step of every session; the sessions to restart (their grammar's end-of-text token
        sampled, or max_new tokens)."""
        from runtime.grammar import masks_together
        from runtime.segment import SegmentInput

        sids = [self._sid(i) for i in range(self.batch)]
        inputs = [SegmentInput(sid, self.pos[i], input_ids=torch.tensor(self.states[i].tokens[-1:]))
                  for i, sid in enumerate(sids)]
        hidden = self.edge(inputs)
        self.sync()
        matchers = [s.matcher for s in self.states if s.matcher is not None]
        if matchers:  # the masks' host time, measured apart (the timed step computes them again, as in service)
            before = time.perf_counter()
            masks_together(matchers)
            self.mask_ms += (time.perf_counter() - before) * 1e3
        started = time.perf_counter()
        rows = [self.states[i].rows(self.pos[i] + 1) for i in range(self.batch)]  # masks lazy: the tier computes
        out = self.cloud([SegmentInput(sid, self.pos[i], hidden=h, sample=rows[i])  # them inside its call (on a
                          for i, (sid, h) in enumerate(zip(sids, hidden))])  # GPU, while the layers run)
        sampled = time.perf_counter()
        closed = [s.matcher is not None and s.matcher.stopped for s in self.states]  # JSON done: this is its EOS
        for state, o in zip(self.states, out):
            state.commit(o.tokens)
        done = time.perf_counter()
        self.timed_ms += (done - started) * 1e3
        self.commit_ms += (done - sampled) * 1e3
        self.tokens += self.batch
        for i in range(self.batch):
            self.pos[i] += 1
        return [i for i, s in enumerate(self.states) if closed[i] or len(s.tokens) >= self.max_new]

    def close(self) -> None:
        for i in range(self.batch):
            self._finish(i, count=False)  # (episodes cut by the run's end are not counted)


def decode(tiers, tokenizer, grammars, mode: str, batch: int, steps: int, max_new: int, tag: str,
           schedule: list[list[int]] | None = None, prefetch: bool | None = None) -> tuple[dict, list[list[int]]]:
    """One run of ``steps`` lockstep steps; (its figures, the sessions restarted after each step). With a
    ``schedule``, sessions restart where it says (and at max_new), else where they end. ``prefetch``: the
    sessions' ``TokenState`` prefetch (None: as the tier serves, ``prefetches_masks``)."""
    run = Lockstep(tiers, tokenizer, grammars, mode, batch, max_new, tag, prefetch)
    run.start(list(range(batch)))
    restarts = []
    for s in range(steps):
        ending = run.step()
        if schedule is not None:
            ending = sorted(set(schedule[s]) | {i for i in ending if len(run.states[i].tokens) >= max_new})
        restarts.append(ending)
        if ending and s + 1 < steps:
            run.start(ending)
    run.close()
    figures = {"tok_s": run.tokens / run.timed_ms * 1e3, "ms_per_step": run.timed_ms / steps,
               "mask_ms_per_token": run.mask_ms / run.tokens, "commit_ms_per_token": run.commit_ms / run.tokens}
    if mode == "schema":
        figures.update(episodes_ended=run.ended, episodes_cut=run.cut, episodes_valid_json=run.valid)
    return figures, restarts


def measure(tiers, tokenizer, grammars, batch: int, steps: int, repeats: int, max_new: int, tag: str,
            prefetch: bool | None = None) -> dict:
    """Every mode ``repeats`` times, interleaved, at one batch size (after a short warm-up of each)."""
    for mode in MODES:  # warm-up: graphs captured, grammar compiled, caches allocated
        decode(tiers, tokenizer, grammars, mode, batch, 4, max_new, f"{tag}-warm", prefetch=prefetch)
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    schedule = None
    for r in range(repeats):
        for mode in MODES:
            figures, restarts = decode(tiers, tokenizer, grammars, mode, batch, steps, max_new, f"{tag}-{r}",
                                       None if mode == "schema" else schedule, prefetch)
            if mode == "schema" and schedule is None:
                schedule = restarts
            runs[mode].append(figures)
    out: dict = {"batch": batch, "steps": steps, "repeats": repeats}
    for mode in MODES:
        out[f"{mode}_tok_s"] = round(median(f["tok_s"] for f in runs[mode]), 1)
        out[f"{mode}_ms_per_step"] = round(median(f["ms_per_step"] for f in runs[mode]), 3)
    plain_ms = 1e3 / out["plain_tok_s"]
    for mode in ("schema", "penalties"):
        out[f"{mode}_overhead_pct"] = overhead_pct(1e3 / out[f"{mode}_tok_s"], plain_ms)
        out[f"{mode}_ratio"] = ratio(out[f"{mode}_tok_s"], out["plain_tok_s"])
        out[f"{mode}_added_ms_per_step"] = round(out[f"{mode}_ms_per_step"] - out["plain_ms_per_step"], 3)
    for key in ("mask_ms_per_token", "commit_ms_per_token"):
        out[key] = round(median(f[key] for f in runs["schema"]), 4)
    for key in ("episodes_ended", "episodes_cut", "episodes_valid_json"):
        out[key] = sum(f[key] for f in runs["schema"])
    return out


def bench_structured(model: str, devices=("cpu", "cuda"), batches=(1, 32), steps: int = 128, repeats: int = 3,
                     max_new: int = 96, progress=None, shape: str | None = None, prefetch: bool | None = None) -> dict:
    """The figures of every device (cuda only where CUDA is available) and batch size, and the setting;
    ``shape``: the GPU cloud tier is that shape's random segment (``shape_tiers``); ``prefetch``: ``decode``'s."""
    from runtime.checkpoint import GlmSpec, load_spec, load_tokenizer
    from runtime.grammar import Grammars, Vocabulary

    from .cloud_gpu import SHAPES

    spec = GlmSpec.from_config(SHAPES[shape]) if shape else load_spec(model)
    tokenizer = load_tokenizer(model)
    grammars = Grammars(Vocabulary.load(model, spec.vocab_size))
    grammars.matcher("json_schema", json.dumps(SCHEMA))
    result: dict = {"date": time.strftime("%Y-%m-%d"), "model": Path(model).name, "shape": shape,
                    "vocab_size": spec.vocab_size,
                    "schema_compile_ms": round(grammars.last_compile_ms, 2),
                    "torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "max_new": max_new, "penalties": PENALTIES,
                    "mask_prefetch": "auto" if prefetch is None else ("on" if prefetch else "off"), "rows": []}
    for device in devices:
        if device == "cuda" and not torch.cuda.is_available():
            result["cuda"] = "not available"
            continue
        if device == "cuda":
            result["card"] = torch.cuda.get_device_name()
        tiers = shape_tiers(spec) if shape else build_tiers(model, device)
        for batch in batches:
            row = {"device": device, **measure(tiers, tokenizer, grammars, batch, steps, repeats, max_new, device,
                                               prefetch)}
            result["rows"].append(row)
            if progress is not None:
                progress(row)
        del tiers
    return result


COLUMNS = (("device", "device", "{}"), ("batch", "batch", "{}"), ("plain tok/s", "plain_tok_s", "{:.1f}"),
           ("schema tok/s", "schema_tok_s", "{:.1f}"), ("overhead %", "schema_overhead_pct", "{:+.1f}"),
           ("ratio", "schema_ratio", "{:.3f}"), ("mask ms/tok", "mask_ms_per_token", "{:.3f}"),
           ("+ms/step", "schema_added_ms_per_step", "{:+.3f}"), ("penalties tok/s", "penalties_tok_s", "{:.1f}"),
           ("penalties %", "penalties_overhead_pct", "{:+.1f}"), ("valid/episodes", None, None))  # fmt: skip


def format_table(result: dict) -> list[str]:
    """The rows as an aligned text table, then the setting."""
    cells = [[name for name, _, _ in COLUMNS]]
    for row in result["rows"]:
        valid = f"{row['episodes_valid_json']}/{row['episodes_ended'] + row['episodes_cut']}"
        cells.append([fmt.format(row[key]) if key else valid for _, key, fmt in COLUMNS])
    widths = [max(len(r[c]) for r in cells) for c in range(len(COLUMNS))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    setting = {k: v for k, v in result.items() if k != "rows"}
    return [*lines, "", " ".join(f"{k}={v}" for k, v in setting.items())]


def add_parser(sub) -> None:
    p = add_command(sub, "structured", run, "the cost of structured output: tokens/s with and without a JSON "
                    "schema's grammar, on the CPU tier and the GPU cloud engine")
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], default=["cpu", "cuda"],
                   help="tiers to measure (cuda is skipped without a GPU; default: both)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32], help="sessions per step (default 1 32)")
    p.add_argument("--steps", type=int, default=128, help="timed decode steps per run (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved runs per mode; medians reported (default 3)")
    p.add_argument("--max-new", type=int, default=96, help="tokens after which a session restarts (default 96)")
    p.add_argument("--shape", choices=["glm4-9b"], help="GPU only: time the random cloud segment of this shape "
                   "(bench cloud-gpu's) instead of the demo model's cloud tier; the grammar keeps the demo vocabulary")
    p.add_argument("--mask-prefetch", choices=["auto", "on", "off"], default="auto",
                   help="compute each session's next mask in the background after its commit: on, off, or as the "
                   "tier serves (auto: off on the GPU engine, which computes the masks while its layers run)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="seconds: CPU, batches 1 and 4, 6 steps, 1 repeat")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--out", help="also write the JSON to this file (e.g. examples/results/structured-h100.json)")


def run(args: argparse.Namespace) -> int:
    from partitioner.convert import demo_model

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.devices, args.batches, args.steps, args.repeats = ["cpu"], [1, 4], 6, 1
    if args.shape and args.devices != ["cuda"]:
        sys.stderr.write("splitglm bench structured: --shape times the GPU cloud tier only; add --devices cuda\n")
        return 2
    progress = None if args.json else lambda row: sys.stderr.write(f"measured {row['device']} batch {row['batch']}\n")
    result = bench_structured(args.model or str(demo_model()), tuple(args.devices), tuple(args.batches), args.steps,
                              args.repeats, args.max_new, progress, args.shape,
                              {"auto": None, "on": True, "off": False}[args.mask_prefetch])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    sys.stdout.write(json.dumps(result) + "\n" if args.json else "\n".join(format_table(result)) + "\n")
    return 0
