"""The one-process demo: a chat completion through device, edge and cloud segments.

Hidden states cross both links as real serialized frames of the chosen codec.
(`splitglm demo` runs the same split as separate processes over MQTT and gRPC; this is `demo --local`.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from partitioner.convert import default_cache_dir, demo_model
from partitioner.eval.quality import FrameLink
from partitioner.plan.export import cached_plan, export_plan, fixed_plan
from runtime.checkpoint import load_spec, load_tokenizer
from runtime.local import Chain, split_segments


@dataclass
class DemoResult:
    text: str
    tokens: int
    splits: tuple[int, int]
    codec: str
    ttft_ms: float  # prompt in -> first token out
    per_token_ms: float  # mean time of each later token
    link_bytes: tuple[int, int]  # frame bytes on device->edge and edge->cloud


def default_splits(num_layers: int) -> tuple[int, int]:
    """A third of the layers on each tier."""
    return num_layers // 3, 2 * num_layers // 3


def demo_plan(
    model: str | None = None,
    codecs: tuple[str, str] = ("int8+outliers", "int8+outliers"),
    out: str | None = None,
) -> Path:
    """The demo's plan folder (a third of the layers per tier, no compression), exported once.

    Into ``out`` if given (must be new or empty), else into the cache (reused afterwards).
    """
    path = model or str(demo_model())
    plan = fixed_plan(default_splits(load_spec(path).num_layers), codecs)
    if out:
        export_plan(path, plan, out)
        return Path(out)
    return cached_plan(path, plan, default_cache_dir() / "plans")


def run_local_demo(
    model: str | None,
    prompt: str,
    max_tokens: int,
    codec: str,
    on_text: Callable[[str], None] = lambda piece: None,
) -> DemoResult:
    path = model or str(demo_model())
    spec = load_spec(path)
    tokenizer = load_tokenizer(path)
    splits = default_splits(spec.num_layers)
    links = [FrameLink(codec, spec.hidden_size), FrameLink(codec, spec.hidden_size)]
    chain = Chain(split_segments(path, *splits), links)
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    tokens, stamps, shown = [], [], ""
    start = time.perf_counter()
    for token, _ in chain.generate(list(prompt_ids), max_tokens, stop_ids=spec.eos_token_ids):
        stamps.append(time.perf_counter())
        if token in spec.eos_token_ids:
            break
        tokens.append(token)
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        on_text(text[len(shown) :])
        shown = text
    ttft = (stamps[0] - start) * 1000 if stamps else 0.0
    per_token = (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return DemoResult(shown, len(tokens), splits, codec, ttft, per_token, (links[0].bytes, links[1].bytes))
