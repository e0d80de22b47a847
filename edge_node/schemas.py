"""Request bodies of the edge's OpenAI-compatible HTTP API, and the ``Job`` a validated request becomes.

Requests (pydantic models) follow OpenAI's ``/v1/completions`` and ``/v1/chat/completions`` (with vLLM's
``top_k``, ``min_p`` and ``repetition_penalty``) plus splitglm fields: ``latency_budget_ms`` (or
``token_budget_ms``, per new token), ``policy`` and ``speculate``. Every other field is named in one of
the tables below (``IGNORED``: accepted and ignored; ``REFUSED_*``: a 400 unless it holds its neutral
value) or refused as unknown, never dropped silently; ``docs/api.md`` shows the same tables (a test
checks). Types are strict: ``"5"`` is not a number and ``1`` is not a boolean. Ranges are checked here
(a 400 naming the field); what needs the node (the vocabulary, the limits, compiling a
``response_format`` or the tools) is checked by ``edge_node.jobs``, which makes a request a ``Job``; the
tools, tool calls and tool messages by ``edge_node.tools``. Responses are
shaped by ``edge_node.openai_format``; ``error_body`` is the one error shape every failure uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from protos import splitglm_pb2 as pb
from runtime.grammar import without_annotations

from .tools import FIRST_NOT_A_TOOL_RESULT, MESSAGE_RULES, TOOL_CALL_SCHEMA, TOOL_CHOICE_SCHEMA, TOOLS_SCHEMA

MAX_STOP = 4  # stop strings per request, as OpenAI allows
MAX_LOGIT_BIAS = 300  # logit_bias entries per request
MAX_TOP_LOGPROBS = 20  # chat: top_logprobs (OpenAI's range)
MAX_COMPLETION_LOGPROBS = 5  # completions: logprobs (OpenAI's range)
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
    """Message content as text: a string, null (kept: a tool message needs content), or a list of text parts."""
    if content is None or isinstance(content, str):
        return content
    parts = content if isinstance(content, list) else [None]
    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        raise ValueError('must be a string or a list of {"type": "text", "text": ...} parts (only text is served)')
    return "".join(p["text"] for p in parts)


def token_biases(bias: dict[str, float]) -> dict[str, float]:
    """logit_bias's keys are token ids written as decimal strings (OpenAI's form)."""
    bad = next((k for k in bias if not (k.isascii() and k.isdigit()) or len(k) > 10), None)
    if bad is not None:
        raise ValueError(f"keys must be token ids (decimal strings such as \"50256\"), got {bad!r}")
    return bias


Prompt = Annotated[str | list[int], BeforeValidator(one_prompt)]
StopStrings = Annotated[list[str], BeforeValidator(stop_list)]
TextContent = Annotated[str | None, BeforeValidator(text_content)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]
Bias = Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]
TOKEN_ID_KEYS = {"propertyNames": {"pattern": "^[0-9]{1,10}$"}}  # logit_bias's keys, in the published schema
LogitBias = Annotated[dict[str, Bias], Field(max_length=MAX_LOGIT_BIAS, json_schema_extra=TOKEN_ID_KEYS),
                      AfterValidator(token_biases)]


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
}
REFUSED_COMPLETIONS = {
    "best_of": Refused("best_of (server-side candidates; n gives several completions)", (1,), later=False),
    "echo": Refused("echoing the prompt", (False,), later=False),
    "suffix": Refused("a suffix (insertion)", ("",), later=False),
}
REFUSED_CHAT = {
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
    n: Annotated[StrictInt, Field(ge=1)] | None = None  # completions of the prompt; at most the edge's max_n
    top_k: Annotated[StrictInt, Field(ge=-1, le=UINT32_MAX)] | None = None  # vLLM: the k most likely; -1, 0 = all
    min_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None  # vLLM: p >= min_p * the top p
    presence_penalty: Penalty | None = None  # over the generated tokens: logit -= penalty * (count > 0)
    frequency_penalty: Penalty | None = None  # over the generated tokens: logit -= penalty * count
    # vLLM's, over the generated tokens only (the cloud never has the prompt's ids): a seen token's logit / r if > 0
    repetition_penalty: Annotated[float, Field(gt=0, le=2, allow_inf_nan=False)] | None = None
    logit_bias: LogitBias | None = None  # {"token id": bias in [-100, 100]} added to the logits

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

    def logprobs_asked(self) -> int | None:
        """The alternatives to report per token (0: only the sampled token's log-prob); None: no log-probs."""
        return None

    def grammar(self) -> pb.Grammar | None:
        """What constrains the tokens (``response_format``); None: nothing."""
        return None


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``: a prompt as text or token ids (one prompt per request)."""

    refused: ClassVar[dict] = REFUSED_COMPLETIONS

    prompt: Prompt  # one prompt: text, or token ids (also as a list of one of those in the body)
    # the log-probs of each token and of the most likely alternatives, 0-5 (the sampled token's always)
    logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None

    def logprobs_asked(self) -> int | None:
        return self.logprobs


def string_or_object(value):
    """``tool_choice``'s shape (its values are checked by ``edge_node.tools``, which names the wrong part)."""
    if not isinstance(value, str | dict):
        raise ValueError('must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}')
    return value


ToolChoiceField = Annotated[str | dict, BeforeValidator(string_or_object), WithJsonSchema(TOOL_CHOICE_SCHEMA)]


class Message(Checked):
    """One message of a conversation; its tool calls and tool results are checked by ``edge_node.tools``."""

    model_config = ConfigDict(json_schema_extra={**Checked.model_config["json_schema_extra"], **MESSAGE_RULES})
    ignored: ClassVar[dict] = IGNORED_MESSAGE
    refused: ClassVar[dict] = REFUSED_MESSAGE

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: TextContent = ""  # text (a string, null or a list of text parts in the body)
    # an assistant's calls: {"id", "type": "function", "function": {"name", "arguments": a JSON string}}
    tool_calls: list[Annotated[dict, WithJsonSchema(TOOL_CALL_SCHEMA)]] | None = None
    tool_call_id: StrictStr | None = None  # a tool message: the id of the call it answers

    @model_validator(mode="after")
    def _call_id_on_tool_messages(self):
        if self.tool_call_id is not None and self.role != "tool":
            raise field_error("tool_call_id", "only tool messages answer a call", "invalid_value")
        return self

    def as_openai(self) -> dict:
        """The message as OpenAI's dict, content as text or None ("developer" is OpenAI's new name for
        "system"), what ``edge_node.tools.ToolRequest.render`` takes."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.content}
        if self.tool_calls is not None:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


Conversation = Annotated[list[Message], Field(min_length=1, json_schema_extra=FIRST_NOT_A_TOOL_RESULT)]


class JsonSchemaFormat(Checked):
    """``response_format.json_schema``: a named JSON schema the answer must follow."""

    ignored: ClassVar[dict] = {}

    name: Annotated[StrictStr, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    description: StrictStr | None = None  # (for the model in OpenAI's API; not shown to this model)
    schema_: dict | None = Field(default=None, alias="schema")  # the JSON schema; absent: any JSON value
    strict: StrictBool | None = None  # accepted either way: the schema is always enforced


class ResponseFormat(Checked):
    """``response_format``: free text, any JSON object, or JSON following a schema (constrained decoding)."""

    ignored: ClassVar[dict] = {}

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # with type "json_schema" (only)

    @model_validator(mode="after")
    def _schema_with_its_type(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise field_error("json_schema", 'json_schema is required with type "json_schema" and only then',
                              "invalid_value")
        return self

    def grammar(self) -> pb.Grammar | None:
        if self.type == "json_object":
            return pb.Grammar(kind="json_object")
        if self.type == "json_schema":
            schema = {} if self.json_schema.schema_ is None else self.json_schema.schema_
            return pb.Grammar(kind="json_schema", text=json.dumps(without_annotations(schema), separators=(",", ":")))
        return None


class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``: a conversation, rendered with the model's chat template."""

    refused: ClassVar[dict] = REFUSED_CHAT

    messages: Conversation
    logprobs: StrictBool | None = None  # the log-prob of each token (choices[i].logprobs.content)
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None  # alternatives per token
    response_format: ResponseFormat | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    # functions the model may call (checked by edge_node.tools: names, schemas, at most 128)
    tools: Annotated[list[dict], WithJsonSchema(TOOLS_SCHEMA)] | None = None
    tool_choice: ToolChoiceField | None = None  # "none", "auto", "required" or a named function
    parallel_tool_calls: StrictBool | None = None  # several calls in one answer; default true

    @model_validator(mode="after")
    def _top_logprobs_with_logprobs(self):
        if self.top_logprobs and self.logprobs is not True:
            raise field_error("top_logprobs", "top_logprobs needs logprobs: true", "invalid_value")
        return self

    def logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def grammar(self) -> pb.Grammar | None:
        return None if self.response_format is None else self.response_format.grammar()


class TokenizeRequest(Checked):
    """``POST /tokenize`` (as vLLM serves it): a prompt, or a conversation rendered as chat renders it."""

    ignored: ClassVar[dict] = {}

    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Conversation | None = None

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
