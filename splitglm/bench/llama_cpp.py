"""llama.cpp (llama-cpp-python) on a GGUF, timed and judged the way ``bench cpu`` times splitglm's tiers.

An optional benchmark dependency, never a test one: ``pip install '.[bench-llama]'`` (llama-cpp-python,
which compiles llama.cpp: about 8 minutes on 2 cores). ``load`` raises ``LlamaCppMissing`` with that line, or,
where the build dies on this CPU (``probe``: a child process decodes two tokens first), with how to rebuild it.
Token ids go in as they are: the demo model and its GGUF share the vocabulary.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import time

import numpy as np

from .stats import median

INSTALL = "pip install '.[bench-llama]'  (llama-cpp-python; it compiles llama.cpp, about 8 minutes on 2 cores)"


# A native build on a CPU with AMX can die in ggml's AMX kernel (a general protection fault at ldtilecfg was seen
# on a 2-core Xeon VM whose AMX oneDNN uses); this build keeps AVX-512 (VNNI, BF16) and leaves AMX out.
REBUILD = ("CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON "
           "-DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF' "
           "pip install --force-reinstall --no-deps --no-cache-dir llama-cpp-python==0.3.36")
PROBE = ("import sys\nfrom llama_cpp import Llama\n"
         "llm = Llama(model_path=sys.argv[1], n_threads=1, n_ctx=64, n_batch=64, verbose=False)\n"
         "llm.eval([1, 2])\nllm.eval([3])\n")


class LlamaCppMissing(RuntimeError):
    """llama-cpp-python does not import, or dies on this CPU; ``hint`` says what to do (install or rebuild it)."""

    def __init__(self, message: str, hint: str = INSTALL):
        super().__init__(message)
        self.hint = hint


def load(gguf: str, threads: int, context: int, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on ``threads`` threads (decode and batches alike), ``context`` positions."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise LlamaCppMissing(f"llama.cpp rows need llama-cpp-python: {INSTALL}") from e
    problem = probe(gguf)
    if problem:
        raise LlamaCppMissing(problem, hint=problem)
    return Llama(model_path=gguf, n_threads=threads, n_threads_batch=threads, n_ctx=context, n_batch=context,
                 logits_all=logits_all, verbose=False)


@functools.cache
def probe(gguf: str) -> str | None:
    """Why llama-cpp-python cannot decode ``gguf`` here, found in a child process (a crash there does not take
    the bench's rows with it), or None."""
    try:
        done = subprocess.run([sys.executable, "-c", PROBE, gguf], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return "llama-cpp-python did not decode two tokens in 10 minutes"
    if done.returncode == 0:
        return None
    if done.returncode < 0:
        return (f"llama-cpp-python died of signal {-done.returncode} decoding two tokens on this CPU; "
                f"rebuild it: {REBUILD}")
    return f"llama-cpp-python failed ({done.returncode}): {done.stderr.strip()[-500:]}"


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
