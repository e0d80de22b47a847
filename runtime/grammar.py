"""Constrained decoding: a generation's grammar, compiled by llguidance against the model's vocabulary.

Why llguidance (and not xgrammar): it is one self-contained wheel with no dependencies (xgrammar needs torch
and transformers at import, which the cloud's slim image and the device do not carry); it takes JSON
schemas, Lark grammars and regular expressions; its matcher rolls back tokens, which a speculative round
needs (the cloud computes the mask after each draft, then returns to the committed tokens); and it computes
a 49k-token mask in tens of microseconds on a CPU without precompiling the whole vocabulary per grammar.

The pieces:

- ``Vocabulary``: the model's tokenizer as llguidance's ``LLTokenizer``, built once per tier from the
  ``tokenizer.json`` the plan ships with every tier that samples (the cloud too: the vocabulary is public;
  the prompt never crosses).
- ``Grammars``: compiles a ``pb.Grammar`` (json_object, json_schema, lark, regex) under ``GrammarLimits``
  (text size, JSON nesting, compile time, llguidance's own parser limits) into a ready matcher, keeping the
  compiled ones in an LRU cache (a new session copies the cached matcher: no compile). A grammar the library
  cannot take raises ``GrammarError`` with the reason.
- ``Matcher``: one generation's state: ``consume`` the tokens sampled, ``masks(drafts)`` the allowed ids at
  the next position and after each draft (for a speculative verification; the drafts are rolled back), and
  ``fork`` for n > 1 and draft sessions.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["GRAMMAR_KINDS", "GrammarError", "GrammarLimits", "Grammars", "Matcher", "Vocabulary", "masks_together",
           "schema_depth", "tier_grammars", "without_annotations"]

logger = logging.getLogger(__name__)

GRAMMAR_KINDS = ("json_object", "json_schema", "lark", "regex")


class GrammarError(ValueError):
    """A grammar that cannot be used: the message names the reason (the caller answers INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class GrammarLimits:
    max_bytes: int = 64 * 1024  # the grammar's text (a JSON schema, a Lark grammar, a regex)
    max_depth: int = 32  # nesting of a JSON schema's objects and arrays
    max_compile_ms: float = 5000.0  # a grammar that takes longer to compile is refused (and not cached)
    cache: int = 64  # compiled grammars kept
    max_items: int = 500_000  # llguidance: Earley items per token (bounds a mask's time)


ANNOTATIONS = ("title", "description", "examples", "$comment")  # words for readers: they constrain nothing
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")  # name -> schema


def without_annotations(schema):
    """A JSON schema without its annotations (``ANNOTATIONS``), which constrain no token. The edge sends
    this to the tier that samples: a tool's parameter descriptions are also rendered into the prompt, and the
    cloud must not receive the prompt's text. Property names stay (they are what the output holds)."""
    if isinstance(schema, list):
        return [without_annotations(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in ANNOTATIONS:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: without_annotations(sub) for name, sub in value.items()}
        elif key in ("enum", "const", "default", "required"):
            out[key] = value  # values, not schemas
        else:
            out[key] = without_annotations(value)
    return out


def schema_depth(value, depth: int = 0) -> int:
    """How deeply a JSON value nests objects and arrays."""
    if isinstance(value, dict):
        return max([schema_depth(v, depth + 1) for v in value.values()], default=depth + 1)
    if isinstance(value, list):
        return max([schema_depth(v, depth + 1) for v in value], default=depth + 1)
    return depth


class Vocabulary:
    """The model's vocabulary as llguidance sees it (built once: about a second for 150k tokens)."""

    _cache: dict[tuple[str, int], Vocabulary] = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer_json: str, vocab_size: int, eos: list[int]):
        import llguidance

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32  # int32 words of a mask
        self.tokenizer = llguidance.LLTokenizer(byte_level_decoder(tokenizer_json), n_vocab=vocab_size,
                                                eos_token=eos or None)

    @classmethod
    def load(cls, folder: str | Path, vocab_size: int) -> Vocabulary:
        """From a tier's folder: its ``tokenizer.json`` and the end-of-text ids of its ``config.json`` and
        ``generation_config.json``; GrammarError when the folder ships no tokenizer."""
        folder = Path(folder)
        key = (str(folder.resolve()), vocab_size)
        with cls._lock:
            if key in cls._cache:
                return cls._cache[key]
            path = folder / "tokenizer.json"
            if not path.is_file():
                raise GrammarError(f"this tier has no vocabulary ({path} is missing), so it cannot apply a grammar; "
                                   "export the plan again (every tier that samples ships tokenizer.json)")
            vocab = cls._cache[key] = cls(path.read_text(), vocab_size, end_of_text(folder))
            return vocab


def _has_byte_level(part) -> bool:
    """A pre-tokenizer or decoder entry that is, or holds, a ``ByteLevel`` one."""
    if not isinstance(part, dict):
        return False
    return part.get("type") == "ByteLevel" or any(_has_byte_level(p) for key in ("pretokenizers", "decoders")
                                                  for p in part.get(key) or ())


def byte_level_decoder(tokenizer_json: str) -> str:
    """``tokenizer.json`` with a plain ``ByteLevel`` decoder where its pre-tokenizer is byte-level.

    llguidance reads a token's bytes through the decoder's top-level type. Some transformers versions save a
    GGUF's byte-level BPE with a ``Sequence`` decoder (ByteFallback, Fuse, Replace, ByteLevel): llguidance
    then takes ``Ġ`` as the two bytes of its UTF-8, not as a space, and no mask allows a space.
    """
    spec = json.loads(tokenizer_json)
    decoder = spec.get("decoder")
    if not _has_byte_level(spec.get("pre_tokenizer")) or (decoder or {}).get("type") == "ByteLevel":
        return tokenizer_json
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return json.dumps(spec)


def end_of_text(folder: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, int) and v not in ids:
                    ids.append(v)
    return ids


def brief(error: str, limit: int = 300) -> str:
    """llguidance's error without its parser-state dump: the first line, cut to ``limit`` characters."""
    lines = [line.strip() for line in (error or "").strip().splitlines() if line.strip()]
    line = " ".join(lines[:3]) or "unknown error"  # (a regex error's reason is on its next lines)
    return line if len(line) <= limit else line[: limit - 1] + "…"


class Matcher:
    """One generation's grammar state (not thread-safe: a session's steps run one at a time)."""

    def __init__(self, inner, vocab: Vocabulary):
        self._m, self.vocab = inner, vocab

    def fork(self) -> Matcher:
        """An independent copy in the same state."""
        return Matcher(self._m.deep_copy(), self.vocab)

    def check(self) -> None:
        """GrammarError if the matcher is in its error state."""
        if self._m.is_error():
            raise GrammarError(f"grammar: {brief(self._m.get_error())}")

    def mask(self) -> torch.Tensor:
        """The ids allowed next: (words,) int32 bitmask (``masks_together`` computes several at once)."""
        self.check()
        raw = bytearray(self.vocab.words * 4)
        self._m.unsafe_compute_mask_ptr(
            torch.frombuffer(raw, dtype=torch.int32).data_ptr(), len(raw))  # fills ``raw`` in place
        self.check()
        return torch.frombuffer(raw, dtype=torch.int32)

    def consume(self, tokens) -> None:
        """The tokens sampled, in order; GrammarError if the grammar does not allow one."""
        for t in tokens:
            if self._m.is_stopped():
                return  # the grammar ended (the stop token came): what follows is cut anyway
            if not self._m.consume_token(int(t)):
                raise GrammarError(f"grammar: token {int(t)} is not allowed here ({brief(self._m.get_error())})")

    def masks(self, drafts=()) -> list[torch.Tensor]:
        """The allowed ids at the next position and after each draft (len(drafts) + 1 masks); the state is
        unchanged. After a draft the grammar refuses, the later masks repeat the last one: the sampled token
        there cannot equal the refused draft, so nothing after it is accepted."""
        out = [self.mask()]
        taken = 0
        for d in drafts:
            if self._m.is_stopped() or self._m.validate_tokens([int(d)]) != 1:
                break
            self._m.consume_token(int(d))
            taken += 1
            out.append(self.mask())
        if taken:
            self._m.rollback(taken)
        out.extend(out[-1] for _ in range(len(drafts) + 1 - len(out)))
        return out

    @property
    def stopped(self) -> bool:
        return self._m.is_stopped()

    def accepting(self) -> bool:
        return self._m.is_accepting()


_EXECUTOR: list = []  # llguidance's thread pool, made on first use
_EXECUTOR_LOCK = threading.Lock()


def masks_together(matchers: list[Matcher]) -> list[torch.Tensor]:
    """Each matcher's ``mask()``, computed in parallel by llguidance's executor (its own threads, outside the
    GIL): a batch of sessions' masks costs about one mask's time instead of the sum."""
    import llguidance

    if not matchers:
        return []
    if len(matchers) == 1:
        return [matchers[0].mask()]
    for m in matchers:
        m.check()
    with _EXECUTOR_LOCK:
        if not _EXECUTOR:
            _EXECUTOR.append(llguidance.LLExecutor())
    words = matchers[0].vocab.words
    table = torch.empty(len(matchers), words, dtype=torch.int32)
    _EXECUTOR[0].unsafe_compute_mask_ptr([(m._m, i) for i, m in enumerate(matchers)], table.data_ptr(), words * 4,
                                         len(matchers))
    for m in matchers:
        m.check()
    return list(table)


class Grammars:
    """Compiles grammars for one vocabulary, with limits and an LRU cache of compiled matchers."""

    def __init__(self, vocab: Vocabulary, limits: GrammarLimits = GrammarLimits()):
        self.vocab, self.limits = vocab, limits
        self._cache: OrderedDict[tuple[str, str], object] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # compiles done (cache misses), for tests and metrics
        self.last_compile_ms = 0.0

    def matcher(self, kind: str, text: str) -> Matcher:
        """A fresh matcher of the grammar (compiled now or copied from the cache); GrammarError if refused."""
        key = (kind, text)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return Matcher(cached.deep_copy(), self.vocab)
        inner = self._compile(kind, text)
        with self._lock:
            self._cache[key] = inner
            while len(self._cache) > self.limits.cache:
                self._cache.popitem(last=False)
        return Matcher(inner.deep_copy(), self.vocab)

    def _compile(self, kind: str, text: str):
        import llguidance

        limits = self.limits
        if kind not in GRAMMAR_KINDS:
            raise GrammarError(f"grammar kind {kind!r} is not one of {', '.join(GRAMMAR_KINDS)}")
        if len(text.encode()) > limits.max_bytes:
            raise GrammarError(f"the grammar is {len(text.encode())} bytes; the limit is {limits.max_bytes}")
        if kind in ("json_object", "json_schema"):
            if kind == "json_object":
                schema = {"type": "object"}
            else:
                try:
                    schema = json.loads(text)
                except ValueError as e:
                    raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
                if not isinstance(schema, (dict, bool)):
                    raise GrammarError("a JSON schema is an object (or true/false)")
            depth = schema_depth(schema)
            if depth > limits.max_depth:
                raise GrammarError(f"the JSON schema nests {depth} levels; the limit is {limits.max_depth}")
            try:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
            except ValueError as e:
                raise GrammarError(f"the JSON schema cannot be used: {e}") from None
        elif kind == "lark":
            grammar = llguidance.LLMatcher.grammar_from_lark(text)
        else:
            grammar = llguidance.LLMatcher.grammar_from_regex(text)
        parser_limits = llguidance.LLParserLimits(step_max_items=limits.max_items)
        started = time.perf_counter()
        inner = llguidance.LLMatcher(self.vocab.tokenizer, grammar, log_level=0, limits=parser_limits)
        ms = (time.perf_counter() - started) * 1e3
        self.compiled += 1
        self.last_compile_ms = ms
        if inner.is_error():
            raise GrammarError(f"the grammar cannot be used: {brief(inner.get_error())}")
        if ms > limits.max_compile_ms:
            raise GrammarError(f"the grammar took {ms:.0f} ms to compile; the limit is {limits.max_compile_ms:.0f} ms")
        return inner


def tier_grammars(folders, vocab_size: int, limits: GrammarLimits = GrammarLimits()) -> Grammars | None:
    """The grammars of a tier that samples, from the first of ``folders`` that ships a ``tokenizer.json``;
    None (logged) when none does or llguidance cannot take its tokenizer: the tier then refuses grammars."""
    folder = next((Path(f) for f in folders if (Path(f) / "tokenizer.json").is_file()), None)
    if folder is None:
        logger.warning("no tokenizer.json in %s: requests with a grammar will be refused (export the plan again to "
                       "ship the vocabulary to every tier that samples)", ", ".join(str(f) for f in folders))
        return None
    try:
        return Grammars(Vocabulary.load(folder, vocab_size), limits)
    except ValueError as e:  # (a GrammarError too)
        logger.warning("the tokenizer in %s cannot serve grammars (%s): requests with a grammar will be refused",
                       folder, e)
        return None
