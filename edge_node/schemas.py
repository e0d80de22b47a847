"""Request and response bodies of the edge's OpenAI-compatible HTTP API.

Requests (pydantic models) follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions``
plus splitglm fields: ``latency_budget_ms`` (or ``token_budget_ms``, per new token), ``policy`` and
``speculate``. Every other field is named in one of the tables below (``IGNORED``: accepted and
ignored; ``REFUSED_*``: a 400 unless it holds its neutral value) or refused as unknown, never
dropped silently; ``docs/api.md`` shows the same tables (a test checks). Types are strict: ``"5"`` is
not a number and ``1`` is not a boolean. A validated request becomes a ``Job``;
responses (whole, or streamed chunks) are plain dicts shaped from a Job and
its finished ``runtime.owner.Generation``, with a ``splitglm`` object;
``error_body`` is the one error shape every failure uses.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic_core import PydanticCustomError

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


@dataclass(frozen=True)
class Refused:
    """An OpenAI field that gets a 400 unless it is null or one of its neutral values (which ask for nothing)."""

    what: str  # what the field asks for, in the 400's message
    neutral: tuple = ()  # values accepted (and ignored: they ask for the default)
    later: bool = True  # True: to be built (issue 23), "not supported yet"; False: not served


# OpenAI fields that do not apply to this server: accepted and ignored, whatever their value
IGNORED = {
    "user": "an end user's id for OpenAI's abuse monitoring",
    "safety_identifier": "an end user's id for OpenAI's abuse monitoring",
    "store": "OpenAI stores completions for its dashboard; nothing is stored here",
    "metadata": "tags of stored completions (see store)",
    "service_tier": "OpenAI's processing tiers; the latency_budget_ms and policy fields steer this server",
    "prompt_cache_key": "OpenAI's prompt-cache routing",
    "parallel_tool_calls": "only matters with tools, which are refused until built",
}
SAMPLING_LATER = {  # both endpoints
    "n": Refused("several completions (n > 1)", (1,)),
    "top_k": Refused("top-k sampling", (-1, 0)),
    "min_p": Refused("min-p sampling", (0,)),
    "presence_penalty": Refused("a presence penalty", (0,)),
    "frequency_penalty": Refused("a frequency penalty", (0,)),
    "repetition_penalty": Refused("a repetition penalty", (1,)),
    "logit_bias": Refused("a logit bias", ({},)),
}
REFUSED_COMPLETIONS = {
    **SAMPLING_LATER,
    "logprobs": Refused("log-probs"),
    "best_of": Refused("best_of (server-side candidates; use n when it is built)", (1,), later=False),
    "echo": Refused("echoing the prompt", (False,), later=False),
    "suffix": Refused("a suffix (insertion)", ("",), later=False),
}
REFUSED_CHAT = {
    **SAMPLING_LATER,
    "logprobs": Refused("log-probs", (False,)),
    "top_logprobs": Refused("top log-probs", (0,)),
    "response_format": Refused("structured output (response_format)", ({"type": "text"},)),
    "tools": Refused("tools", ([],)),
    "tool_choice": Refused("tool calls (tool_choice)", ("none", "auto")),
    "functions": Refused("functions (deprecated by OpenAI: tools)", ([],), later=False),
    "function_call": Refused("a function call (deprecated by OpenAI: tool_choice)", ("none", "auto"), later=False),
    "audio": Refused("audio output", later=False),
    "modalities": Refused("output modalities other than text", (["text"],), later=False),
    "prediction": Refused("predicted outputs", later=False),
    "web_search_options": Refused("web search", later=False),
    "reasoning_effort": Refused("a reasoning effort", later=False),
    "verbosity": Refused("a verbosity", later=False),
}
IGNORED_MESSAGE = {
    "name": "a participant's name; the chat template renders role and content only",
    "refusal": "an earlier answer's refusal text",
}
REFUSED_MESSAGE = {
    "tool_calls": Refused("an assistant's tool calls", ([],)),
    "tool_call_id": Refused("a tool result's call id"),
    "function_call": Refused("an assistant's function call (deprecated by OpenAI: tool_calls)", later=False),
    "audio": Refused("audio", later=False),
}
IGNORED_STREAM_OPTIONS = {"include_obfuscation": "random padding of streamed chunks against side channels"}


def is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def neutral(value, allowed: tuple) -> bool:
    """Whether ``value`` is null or one of ``allowed`` (numbers compare as numbers, never as booleans)."""
    def same(a) -> bool:
        return (is_number(value) if is_number(a) else type(value) is type(a)) and value == a

    return value is None or any(same(a) for a in allowed)


def field_error(param: str, message: str, code: str) -> PydanticCustomError:
    """A validation error naming ``param`` (``http_api.validation_error`` appends it to the error's location)."""
    return PydanticCustomError(code, message, {"param": param})


def check_extras(extra: dict | None, ignored: dict, refused: dict) -> None:
    """Refuse the first field of ``extra`` (fields the model does not declare) that is neither ignored nor neutral."""
    for name, value in (extra or {}).items():
        rule = refused.get(name)
        if name in ignored or (rule is not None and neutral(value, rule.neutral)):
            continue
        if rule is None:
            raise field_error(name, "unrecognized request argument (the fields served: docs/api.md)", "unknown_field")
        verdict = "not supported yet" if rule.later else "not served by splitglm"
        raise field_error(name, f"{verdict}: {rule.what}; leave it out (see docs/api.md)", "unsupported_field")


class Checked(BaseModel):
    """A request body whose undeclared fields are ignored or refused by the class's tables (see ``check_extras``)."""

    # extras are kept to be judged by name; the published schema says what a client may send: no other field
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra={"additionalProperties": False})
    ignored: ClassVar[dict] = IGNORED
    refused: ClassVar[dict] = {}

    @model_validator(mode="after")
    def _no_silent_fields(self):
        check_extras(self.model_extra, self.ignored, self.refused)
        return self


class StreamOptions(Checked):
    ignored: ClassVar[dict] = IGNORED_STREAM_OPTIONS

    include_usage: StrictBool | None = None


class GenerationRequest(Checked):
    """Fields common to both APIs; ``None`` means "not given" (OpenAI clients may send null)."""

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # new tokens; bounded by settings.max_tokens_limit
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None  # OpenAI's newer name of max_tokens
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None  # 0 = greedy; default 1
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None  # nucleus mass; default 1
    stop: StopStrings = []  # up to 4 stop strings (a string or a list in the body)
    seed: Annotated[StrictInt, Field(ge=0, le=UINT64_MAX)] | None = None  # sampler seed; random when not given
    stream: StrictBool | None = None  # Server-Sent Events
    stream_options: StreamOptions | None = None  # only with stream: true
    latency_budget_ms: Annotated[StrictInt, Field(ge=1, le=UINT32_MAX)] | None = None  # end-to-end budget, ms
    token_budget_ms: Annotated[StrictInt, Field(ge=1, le=UINT32_MAX)] | None = None  # budget per new token, ms
    policy: Literal["adaptive", "accurate", "fast"] | None = None  # router policy; default "adaptive"
    speculate: StrictBool | None = None  # speculative split decoding where it pays; default: the edge's setting

    @model_validator(mode="after")
    def _consistent(self):
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise field_error("max_completion_tokens", f"max_tokens ({a}) and max_completion_tokens ({b}) differ; "
                              "send one of them", "conflicting_fields")
        if self.stream_options is not None and self.stream is not True:
            raise field_error("stream_options", "stream_options is only allowed when stream is true",
                              "invalid_value")
        return self

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: a prompt as text or token ids (one prompt per request)."""

    refused: ClassVar[dict] = REFUSED_COMPLETIONS

    prompt: Prompt  # one prompt: text, or token ids (also as a list of one of those in the body)


class Message(Checked):
    ignored: ClassVar[dict] = IGNORED_MESSAGE
    refused: ClassVar[dict] = REFUSED_MESSAGE

    role: Literal["system", "developer", "user", "assistant"]
    content: TextContent = ""  # text (a string, null or a list of text parts in the body)

    def as_template_input(self) -> dict[str, str]:
        """The {role, content} dict a chat template expects ("developer" is OpenAI's new name for "system")."""
        return {"role": "system" if self.role == "developer" else self.role, "content": self.content}


class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``: a conversation, rendered with the model's chat template."""

    refused: ClassVar[dict] = REFUSED_CHAT

    messages: Annotated[list[Message], Field(min_length=1)]


class TokenizeRequest(Checked):
    """``POST /tokenize`` (as vLLM serves it): a prompt, or a conversation rendered as chat renders it."""

    ignored: ClassVar[dict] = {}

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise field_error("prompt", "send either prompt or messages", "invalid_value")
        return self


class DetokenizeRequest(Checked):
    """``POST /detokenize`` (as vLLM serves it): token ids back to text."""

    ignored: ClassVar[dict] = {}

    model: StrictStr | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0)]]


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
    request_id: str = ""  # the X-Request-ID of its HTTP request (``request_id``), in the logs beside ``id``

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


def field_status(model: type[Checked], name: str) -> str:
    """How ``model`` treats top-level request field ``name``, in the words of docs/api.md's table."""
    if name in model.model_fields:
        return "supported"
    if name in model.ignored:
        return "ignored"
    rule = model.refused.get(name)
    if rule is None:
        return "unknown"
    return "not yet" if rule.later else "refused"


def neutral_values(model: type[Checked], name: str) -> str:
    """The values a refused field is accepted with, as JSON (docs/api.md's table)."""
    rule = model.refused.get(name)
    return ", ".join(json.dumps(v) for v in (None, *rule.neutral)) if rule else ""
