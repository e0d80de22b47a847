"""llama.cpp (llama-cpp-python) on a GGUF, timed and judged the way ``bench cpu`` times splitglm's tiers.

An optional benchmark dependency, never a test one: ``pip install '.[bench-llama]'`` (llama-cpp-python,
which compiles llama.cpp: about 8 minutes on 2 cores). ``load`` raises ``LlamaCppMissing`` with that line.
Token ids go in as they are: the demo model and its GGUF share the vocabulary.
"""

from __future__ import annotations

import math
import time

import numpy as np

from .stats import median

INSTALL = "pip install '.[bench-llama]'  (llama-cpp-python; it compiles llama.cpp, about 8 minutes on 2 cores)"


class LlamaCppMissing(RuntimeError):
    """llama-cpp-python does not import."""


def load(gguf: str, threads: int, context: int, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on ``threads`` threads (decode and batches alike), ``context`` positions."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise LlamaCppMissing(f"llama.cpp rows need llama-cpp-python: {INSTALL}") from e
    return Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=context, n_batch=context,
                 logits_all=logits_all, verbose=False)


def decode_ms(llm, prompt: list[int], steps: int, warm: int = 4) -> float:
    """Median ms of a one-token step after ``prompt``, feeding back the greedy token (as splitglm's rows do)."""
    llm.reset()
    llm.eval(prompt)
    times = []
    for i in range(warm + steps):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        began = time.perf_counter()
        llm.eval([token])
        if i >= warm:
            times.append(1e3 * (time.perf_counter() - began))
    return median(times)


def prefill_tok_s(llm, prompt: list[int], repeats: int = 3) -> float:
    """Prompt tokens a second, one prompt of ``len(prompt)`` tokens from an empty cache (median of repeats)."""
    times = []
    for _ in range(repeats):
        llm.reset()
        began = time.perf_counter()
        llm.eval(prompt)
        times.append(time.perf_counter() - began)
    return len(prompt) / median(times)


def perplexity(llm, windows: list[list[int]]) -> float:
    """exp(mean next-token NLL) over the windows, each from an empty cache (``llm`` made with logits_all)."""
    total, count = 0.0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)  # (T-1, V)
        top = logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0]
        total += float((logz - logits[np.arange(len(ids) - 1), ids[1:]]).sum())
        count += len(ids) - 1
    return math.exp(total / count)
