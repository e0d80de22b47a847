"""Request and response bodies of the edge's OpenAI-compatible HTTP API.

Requests (pydantic models) follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions``
(fields OpenAI has and we do not serve, like ``logit_bias``, are ignored the
way OpenAI ignores unknown ones) plus two splitglm fields:
``latency_budget_ms`` (or ``token_budget_ms``, per new token) and ``policy``. Types are strict: ``"5"`` is not a
number and ``1`` is not a boolean. A validated request becomes a ``Job``;
responses (whole, or streamed chunks) are plain dicts shaped from a Job and
its finished ``runtime.owner.Generation``, with a ``splitglm`` object;
``error_body`` is the one error shape every failure uses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from protos import splitglm_pb2 as pb
from runtime.report import ms, report

from .policy import total_budget_ms

MAX_STOP = 4  # stop strings per request, as OpenAI allows
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def one_prompt(prompt):
    """A prompt as one ``str`` or one ``list[int]`` from any shape OpenAI accepts (one prompt only)."""
    if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
        if len(prompt) != 1:
            raise ValueError(f"exactly one prompt per request is served, got {len(prompt)}")
        prompt = prompt[0]
    if isinstance(prompt, list) and all(is_int(t) for t in prompt):
        if any(t < 0 for t in prompt):
            raise ValueError("token ids must be >= 0")
    elif not isinstance(prompt, str):
        raise ValueError("must be a string, a list of token ids, or a list holding one of those")
    if len(prompt) == 0:
        raise ValueError("the prompt is empty")
    return prompt


def stop_list(stop):
    """Stop strings as a list: a string or a list of up to MAX_STOP strings."""
    if stop is None or isinstance(stop, str):
        return [] if stop is None else [stop]
    if isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        return stop
    raise ValueError(f"must be a string or a list of up to {MAX_STOP} strings")


def text_content(content):
    """Message content as text: a string, null, or a list of text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    parts = content if isinstance(content, list) else [None]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts (only text is served)')
    return "".join(p["text"] for p in parts)


Prompt = Annotated[str | list[int], BeforeValidator(one_prompt)]
StopStrings = Annotated[list[str], BeforeValidator(stop_list)]
TextContent = Annotated[str, BeforeValidator(text_content)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    include_usage: StrictBool | None = None


class GenerationRequest(BaseModel):
    """Fields common to both APIs; ``None`` means "not given" (OpenAI clients may send null)."""

    model_config = ConfigDict(extra="ignore", strict=True)

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # new tokens; bounded by settings.max_tokens_limit
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None  # 0 = greedy; default 1
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None  # nucleus mass; default 1
    stop: StopStrings = []  # up to 4 stop strings (a string or a list in the body)
    seed: Annotated[StrictInt, Field(ge=0, le=UINT64_MAX)] | None = None  # sampler seed; random when not given
    stream: StrictBool | None = None  # Server-Sent Events
    stream_options: StreamOptions | None = None
    n: Annotated[StrictInt, Field(ge=1, le=1)] | None = None  # choices per request: only 1
    latency_budget_ms: Annotated[StrictInt, Field(ge=1, le=UINT32_MAX)] | None = None  # end-to-end budget, ms
    token_budget_ms: Annotated[StrictInt, Field(ge=1, le=UINT32_MAX)] | None = None  # budget per new token, ms
    policy: Literal["adaptive", "accurate", "fast"] | None = None  # router policy; default "adaptive"
    speculate: StrictBool | None = None  # speculative split decoding where it pays; default: the edge's setting

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: a prompt as text or token ids (one prompt per request)."""

    prompt: Prompt  # one prompt: text, or token ids (also as a list of one of those in the body)


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: TextContent = ""  # text (a string, null or a list of text parts in the body)

    def as_template_input(self) -> dict[str, str]:
        """The {role, content} dict a chat template expects ("developer" is OpenAI's new name for "system")."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``: a conversation, rendered with the model's chat template."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # OpenAI's newer name of max_tokens

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass
class Job:
    """One validated request: what to generate, and how to answer."""

    api: str  # "completions" or "chat"
    model: str
    prompt_ids: list[int]
    params: pb.GenerationParams
    stream: bool
    include_usage: bool
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""

    def __post_init__(self):
        prefix = "chatcmpl" if self.api == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        if self.api == "chat":
            return "chat.completion.chunk" if self.stream else "chat.completion"
        return "text_completion"

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1e3


def request_budget_ms(params: pb.GenerationParams) -> float | None:
    """The whole completion's budget, ms: latency_budget_ms and/or token_budget_ms * max_tokens (None: none)."""
    p = params
    return total_budget_ms(p.max_tokens, p.latency_budget_ms or None, p.token_budget_ms or None)


def splitglm_info(job: Job, gen, ttft_ms: float) -> dict:
    """The ``splitglm`` object of a response: the generated token ids, the latency budget (ms) and the
    generation's report (``runtime.report``), its times counted from the request's arrival."""
    budget = request_budget_ms(job.params)
    return {
        "tokens": list(gen.tokens),  # the generated token ids (the text is their decoding, cut at a stop string)
        **report(gen, budget, total_ms=job.elapsed_ms(), ttft_ms=ttft_ms),
        "latency_budget_ms": ms(budget),
    }


def usage(job: Job, gen) -> dict:
    n = len(gen.tokens)
    return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": n, "total_tokens": len(job.prompt_ids) + n}


def response_body(job: Job, gen, ttft_ms: float) -> dict:
    """The whole (non-streamed) answer."""
    choice = {"index": 0, "finish_reason": gen.finish_reason, "logprobs": None}
    if job.api == "chat":
        choice["message"] = {"role": "assistant", "content": gen.text}
    else:
        choice["text"] = gen.text
    return {
        "id": job.id,
        "object": job.object,
        "created": job.created,
        "model": job.model,
        "choices": [choice],
        "usage": usage(job, gen),
        "splitglm": splitglm_info(job, gen, ttft_ms),
    }


def chunk(job: Job, text: str | None, finish_reason: str | None = None, role: bool = False, **extra) -> dict:
    """One streamed chunk with a text delta (``text`` None: an empty delta)."""
    choice: dict = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
    if job.api == "chat":
        delta = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    body = {"id": job.id, "object": job.object, "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        body["usage"] = None
    return {**body, **extra}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, separators=(',', ':'))}\n\n"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
