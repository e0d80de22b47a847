"""OpenAI's response shapes at the edge: whole answers, streamed chunks, usage and log-probs.

Each is a plain dict shaped from a ``jobs.Job`` and its ``runtime.owner.Generation`` objects (one per
choice, ``n`` of them), with a ``splitglm`` object: the generated ids, the latency budget and the
generation's report (``runtime.report``). It describes choice 0; with ``n`` > 1, ``splitglm.choices[i]``
describes choice i (a streamed choice's last chunk carries its own).

Log-probs take vLLM's OpenAI server's shapes:

- chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}``,
  the ``top_logprobs`` alternatives most likely first;
- completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``, each dict
  the most likely alternatives plus the sampled token (up to logprobs + 1 entries, as OpenAI says).

With tools (``jobs.Job.calls_tools``), a chat answer's text is read by ``edge_node.tool_calls``: the message
carries ``tool_calls`` and its ``content`` is the text before them (None when there is none); its
``finish_reason`` is "tool_calls" when the model stopped after calling. Streamed, each choice's parser turns
the text deltas into OpenAI's: content deltas, a call's first delta (index, id, type, name, arguments ""),
then its arguments' deltas. The log-probs are those of every token, the calls' included.

A token's string is the edge tokenizer's decoding of its id alone (special tokens included), ``bytes`` its
UTF-8 (a piece of a multi-byte character reads U+FFFD, as in vLLM); ``text_offset`` counts those strings'
characters from the completion's start. A log-prob below -9999 reads -9999 (JSON has no -infinity).
"""

from __future__ import annotations

import json

from protos import splitglm_pb2 as pb
from runtime.report import ms, report

from .jobs import Job
from .policy import total_budget_ms
from .tool_calls import ToolCallParser, finish_reason, parse_tool_calls

MIN_LOGPROB = -9999.0  # the floor of a reported log-prob (vLLM's)


def request_budget_ms(params: pb.GenerationParams) -> float | None:
    """The whole completion's budget, ms: latency_budget_ms and/or token_budget_ms * max_tokens (None: none)."""
    p = params
    return total_budget_ms(p.max_tokens, p.latency_budget_ms or None, p.token_budget_ms or None)


def splitglm_info(job: Job, gen, ttft_ms: float) -> dict:
    """The ``splitglm`` object of one choice: the generated token ids, the latency budget (ms) and the
    generation's report (``runtime.report``), its times counted from the request's arrival."""
    budget = request_budget_ms(job.params)
    return {
        "tokens": list(gen.tokens),  # the generated token ids (the text is their decoding, cut at a stop string)
        **report(gen, budget, total_ms=job.elapsed_ms(), ttft_ms=ttft_ms),
        "latency_budget_ms": ms(budget),
    }


def response_info(job: Job, gens: list, ttft_ms: float) -> dict:
    """The ``splitglm`` object of a whole answer: choice 0's, plus every choice's when there are several."""
    info = splitglm_info(job, gens[0], ttft_ms)
    if len(gens) > 1:
        info["choices"] = [splitglm_info(job, gen, ttft_ms) for gen in gens]
    return info


def usage(job: Job, gens: list) -> dict:
    """The prompt counted once, the tokens of every completion."""
    n = sum(len(gen.tokens) for gen in gens)
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n, "total_tokens": len(job.prompt_ids) + n}


def floor(logprob: float) -> float:
    return max(float(logprob), MIN_LOGPROB)


class Logprobs:
    """One response's log-probs in its API's shape; token strings decoded once per id."""

    def __init__(self, job: Job, tokenizer):
        self.chat, self.top = job.api == "chat", job.logprobs or 0
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def text(self, token: int) -> str:
        """A token's string: its id decoded alone."""
        text = self._texts.get(token)
        if text is None:
            text = self._texts[token] = self.tokenizer.decode([token], skip_special_tokens=False)
        return text

    def width(self, tokens) -> int:
        """Characters of the tokens' strings (``text_offset`` moves on by that much)."""
        return sum(len(self.text(t)) for t in tokens)

    def alternatives(self, top: list[tuple[int, float]]) -> list[tuple[int, float]]:
        """The ``top`` most likely of a position's alternatives, most likely first."""
        return sorted(top, key=lambda pair: -pair[1])[: self.top]

    def of(self, tokens, logprobs, tops, offset: int = 0) -> dict:
        """The log-probs of ``tokens`` (with their ``logprobs`` and alternatives ``tops``), the first one at
        character ``offset`` of the completion (completions' ``text_offset``)."""
        if self.chat:
            return {"content": [self._entry(t, lp, top) for t, lp, top in zip(tokens, logprobs, tops)]}
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, logprob, top in zip(tokens, logprobs, tops):
            best = {self.text(t): floor(lp) for t, lp in self.alternatives(top)}
            best.setdefault(self.text(token), floor(logprob))
            out["tokens"].append(self.text(token))
            out["token_logprobs"].append(floor(logprob))
            out["top_logprobs"].append(best)
            out["text_offset"].append(offset)
            offset += len(self.text(token))
        return out

    def _entry(self, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
        return {**self._one(token, logprob), "top_logprobs": [self._one(t, lp) for t, lp in self.alternatives(top)]}

    def _one(self, token: int, logprob: float) -> dict:
        text = self.text(token)
        return {"token": text, "logprob": floor(logprob), "bytes": list(text.encode("utf-8", errors="replace"))}


def chat_message(job: Job, gen) -> tuple[dict, str]:
    """A chat choice's message and finish_reason; with tools, its calls read from its text."""
    if not job.calls_tools:
        return {"role": "assistant", "content": gen.text}, gen.finish_reason
    answer = parse_tool_calls(gen.text)
    message = {"role": "assistant", "content": answer.content}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
    return message, finish_reason(gen.finish_reason, answer)


def response_body(job: Job, gens: list, ttft_ms: float, logprobs: Logprobs | None) -> dict:
    """The whole (non-streamed) answer: a choice per generation."""
    choices = []
    for index, gen in enumerate(gens):
        lp = None if logprobs is None else logprobs.of(gen.tokens, gen.logprobs, gen.top_logprobs)
        choice = {"index": index, "finish_reason": gen.finish_reason, "logprobs": lp}
        if job.api == "chat":
            choice["message"], choice["finish_reason"] = chat_message(job, gen)
        else:
            choice["text"] = gen.text
        choices.append(choice)
    return {
        "id": job.id,
        "object": job.object,
        "created": job.created,
        "model": job.model,
        "choices": choices,
        "usage": usage(job, gens),
        "splitglm": response_info(job, gens, ttft_ms),
    }


def chunk(job: Job, text: str | None, finish_reason: str | None = None, role: bool = False, index: int = 0,
          logprobs: dict | None = None, tool_calls: list[dict] | None = None, **extra) -> dict:
    """One streamed chunk of choice ``index`` with a text delta (``text`` None: an empty delta) or a delta of
    its ``tool_calls``, and the log-probs of its tokens."""
    choice: dict = {"index": index, "finish_reason": finish_reason, "logprobs": logprobs}
    if job.api == "chat":
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        if tool_calls is not None:
            delta["tool_calls"] = tool_calls
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": job.id, "object": job.object, "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return {**body, **extra}


def token_chunks(job: Job, index: int, text: str, logprobs: dict | None, parser: ToolCallParser | None) -> list[dict]:
    """The chunks of one token of choice ``index``: its text (with tools: the deltas it completes); with
    log-probs, one chunk at least, the first carrying them."""
    if parser is None:
        return [chunk(job, text, index=index, logprobs=logprobs)] if text or logprobs is not None else []
    deltas = parser.feed(text) or ([{}] if logprobs is not None else [])
    return [chunk(job, d.get("content"), index=index, logprobs=logprobs if k == 0 else None,
                  tool_calls=d.get("tool_calls")) for k, d in enumerate(deltas)]


def end_chunks(job: Job, index: int, gen, parser: ToolCallParser | None, info: dict) -> list[dict]:
    """The last chunks of choice ``index``: what its tool-call parser held back, then its finish_reason with
    its ``splitglm`` object ``info``."""
    if parser is None:
        return [chunk(job, None, gen.finish_reason, index=index, splitglm=info)]
    held = [chunk(job, d.get("content"), index=index, tool_calls=d.get("tool_calls")) for d in parser.finish()]
    return [*held, chunk(job, None, finish_reason(gen.finish_reason, parser.answer()), index=index, splitglm=info)]


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"
