"""From a validated request body to a ``Job`` (what to generate, and how to answer): everything checked against
the node before any model work.

``completion_job`` and ``chat_job`` turn a request (``schemas``) into the token ids of its prompt and the
``GenerationParams`` of its completions, or raise ``ApiError`` (OpenAI's error body, naming the field):
the model's name; the tokenizer; the prompt's characters, tokens and vocabulary; ``max_tokens`` and the
prompt plus ``max_tokens`` against the cloud's positions; ``n`` against ``max_n``; ``logit_bias``'s token
ids; and a ``response_format`` or the tools' grammar, compiled here (``EdgeGrammars``) so that a schema
llguidance cannot take is a 400 naming the reason before anything is sent. A chat is rendered through
``edge_node.tools.ToolRequest.render`` (with or without tools), which checks tool calls and tool messages;
an active ``tool_choice`` constrains the answer with the tools' grammar (so a JSON ``response_format``
beside it is a 400: one grammar per generation). ``tokenize`` and ``detokenize`` answer the extras.

Sampling fields map one to one onto ``GenerationParams``; the tier that samples applies them
(``runtime.sampling``). Penalties count only the generated tokens: the cloud never has the prompt's ids,
so ``repetition_penalty`` (vLLM's extension) differs from vLLM's, which also counts the prompt's.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

from fastapi.responses import JSONResponse

from protos import splitglm_pb2 as pb
from runtime.grammar import GrammarError, GrammarLimits, Grammars, Vocabulary
from runtime.owner import StepFailed

from .schemas import (
    UINT64_MAX,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    Message,
    TokenizeRequest,
    error_body,
)
from .settings import setting
from .tool_calls import ToolCallParser
from .tools import ToolError, ToolRequest, tool_request

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One validated request: what to generate, and how to answer."""

    api: str  # "completions" or "chat"
    model: str
    prompt_ids: list[int]
    params: pb.GenerationParams
    stream: bool
    include_usage: bool
    n: int = 1  # completions of the prompt (choices)
    logprobs: int | None = None  # alternatives reported per token; None: no log-probs
    started: float = field(default_factory=time.perf_counter)
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = ""
    request_id: str = ""  # the X-Request-ID of its HTTP request (``request_id``), in the logs beside ``id``
    tools: ToolRequest | None = None  # chat: the request's tools (their calls parsed from the answer)

    def __post_init__(self):
        prefix = "chatcmpl" if self.api == "chat" else "cmpl"
        self.id = self.id or f"{prefix}-{uuid.uuid4().hex}"

    @property
    def object(self) -> str:
        if self.api == "chat":
            return "chat.completion.chunk" if self.stream else "chat.completion"
        return "text_completion"

    @property
    def calls_tools(self) -> bool:
        """Whether the answer may hold tool calls (chat with tools and tool_choice not "none")."""
        return self.tools is not None and self.tools.active

    def tool_parser(self) -> ToolCallParser | None:
        """A parser of one choice's tool calls; None when the model is not asked to call (no tools, or "none")."""
        return None if self.tools is None else self.tools.parser()

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1e3

    def choice_params(self, index: int) -> pb.GenerationParams:
        """The parameters of completion ``index``: the request's, seeded seed + index (mod 2^64)."""
        if index == 0:
            return self.params
        params = pb.GenerationParams()
        params.CopyFrom(self.params)
        params.seed = (self.params.seed + index) & UINT64_MAX
        return params


# gRPC status of a failed step -> HTTP status (anything else: 503, the cloud is unavailable): INVALID_ARGUMENT
# (a tier refused the request's parameters), DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (overloaded: retry later)
HTTP_OF_GRPC = {3: 400, 4: 504, 8: 429}


class ApiError(Exception):
    """A request that gets an OpenAI-style error answer."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                 refusal: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.refusal = refusal  # a limit's reason label for http_refused_total (None: not a limit)
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def step_failed_error(e: StepFailed) -> ApiError:
    status = HTTP_OF_GRPC.get(e.status, 503)
    kind = "invalid_request_error" if status < 500 else "service_unavailable"
    what = "a tier refused the request's parameters" if status == 400 else "the cloud tier failed"
    return ApiError(status, f"{what}: {e}", kind, code=f"grpc_status_{e.status}")


def generation_params(node, req: GenerationRequest, max_tokens: int | None) -> pb.GenerationParams:
    """GenerationParams of a request (of its first completion), checking max_tokens, n and logit_bias against
    the node."""
    n = node.settings.default_max_tokens if max_tokens is None else max_tokens
    limit = node.settings.max_tokens_limit
    if not 1 <= n <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit}, got {n}", param="max_tokens")
    check_n(node, req.n or 1)
    temperature = 1.0 if req.temperature is None else req.temperature
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return pb.GenerationParams(
        top_k=max(req.top_k or 0, 0),  # (vLLM's -1 and 0: all tokens)
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=req.repetition_penalty or 0.0,  # (0: off)
        logit_bias=logit_bias(node, req.logit_bias or {}),
        top_logprobs=req.logprobs_asked() or 0,
        max_tokens=n,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        stop=req.stop,
        stop_token_ids=list(node.spec.eos_token_ids),
        policy=req.policy or getattr(node.settings, "policy", "adaptive"),
        latency_budget_ms=req.latency_budget_ms or 0,
        token_budget_ms=req.token_budget_ms or 0,
        speculate={None: pb.SPECULATE_DEFAULT, True: pb.SPECULATE_ON, False: pb.SPECULATE_OFF}[req.speculate],
    )


def check_n(node, n: int) -> None:
    limit = setting(node.settings, "max_n")
    if n > limit:
        raise ApiError(400, f"n must be at most {limit} (completions per request), got {n}", param="n")


def logit_bias(node, bias: dict[str, float]) -> dict[int, float]:
    """logit_bias with its token ids as numbers, each in the vocabulary."""
    out = {int(token): value for token, value in bias.items()}
    bad = next((t for t in out if t >= node.spec.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"logit_bias: token id {bad} is outside the vocabulary [0, {node.spec.vocab_size})",
                       param="logit_bias")
    return out


class EdgeGrammars:
    """Where the edge compiles a ``response_format`` before sending anything: the grammars its fast tail
    samples with (``node.grammars``, else ``node.router.fast.grammars``), or, where it has none, grammars
    built once from the edge's tokenizer. The compiled grammar stays in their cache for the tail's use."""

    def __init__(self, node):
        self.node = node
        self._own: Grammars | None = None
        self._failed = ""  # why the edge's tokenizer cannot serve grammars (once known)
        self._lock = threading.Lock()

    def grammars(self, param: str = "response_format") -> Grammars:
        """The grammars to check with; ApiError 400 naming ``param`` when the edge has none (the reason named)."""
        node = self.node
        fast = getattr(getattr(node, "router", None), "fast", None)
        found = getattr(node, "grammars", None) or getattr(fast, "grammars", None)
        if found is not None:
            return found
        with self._lock:
            if self._own is None and not self._failed:
                try:
                    text = node.tokenizer.backend_tokenizer.to_str()  # its tokenizer.json
                    vocab = Vocabulary(text, node.spec.vocab_size, list(node.spec.eos_token_ids))
                    limits = getattr(node.settings, "grammar_limits", GrammarLimits)()  # EdgeSettings' grammar_*
                    self._own = Grammars(vocab, limits)
                except (AttributeError, ValueError) as e:
                    self._failed = f"this edge's tokenizer cannot serve structured output ({e})"
                    log.warning("%s", self._failed)
            if self._own is None:
                raise ApiError(400, f"{param}: {self._failed}", param=param, code="structured_output_unavailable")
            return self._own

    def check(self, grammar: pb.Grammar) -> None:
        """Compile ``grammar`` (or find it compiled); ApiError 400 naming the reason when it cannot be used."""
        grammars = self.grammars()
        try:
            grammars.matcher(grammar.kind, grammar.text)
        except GrammarError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format", code="invalid_grammar") from None


def check_model(node, req: GenerationRequest | TokenizeRequest | DetokenizeRequest) -> None:
    if req.model is not None and req.model != node.model_name:
        raise ApiError(
            404,
            f"the model {req.model!r} does not exist; this edge serves {node.model_name!r}",
            param="model",
            code="model_not_found",
        )


def check_prompt_chars(node, chars: int, param: str) -> None:
    """Reject a prompt of more than max_prompt_chars characters before tokenising it."""
    limit = setting(node.settings, "max_prompt_chars")
    if chars > limit:
        raise ApiError(400, f"the prompt has {chars} characters; the limit is {limit}", param=param,
                       code="prompt_too_long", refusal="prompt_too_long")


def check_prompt(node, ids: list[int], max_tokens: int) -> list[int]:
    """Reject empty, too long or out-of-vocabulary prompts, and prompt + max_tokens beyond the cloud's positions."""
    limit, positions = setting(node.settings, "max_prompt_tokens"), setting(node.settings, "max_positions")
    if not ids:
        raise ApiError(400, "the prompt is empty (no tokens)", param="prompt")
    if len(ids) > limit:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; the limit is {limit}", param="prompt",
                       code="context_length_exceeded", refusal="too_many_tokens")
    if len(ids) + max_tokens > positions:
        raise ApiError(400, f"this model's maximum context length is {positions} tokens; you asked for "
                       f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} in the completion)",
                       param="max_tokens", code="context_length_exceeded", refusal="context_length")
    bad = [t for t in ids if not 0 <= t < node.spec.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {node.spec.vocab_size})", param="prompt")
    return ids


def check_tokenizer(node) -> None:
    if node.tokenizer is None:
        raise ApiError(
            501, "this edge has no tokenizer (its plan's edge tier has no tokenizer files): it cannot serve text",
            type_="server_error", code="no_tokenizer",
        )  # fmt: skip


def text_ids(node, prompt: str) -> list[int]:
    """The token ids of a text prompt (max_prompt_chars checked first)."""
    check_prompt_chars(node, len(prompt), "prompt")
    return node.tokenizer.encode(prompt)


NO_TOOLS = tool_request(None)  # a chat without tools (its messages may still hold earlier calls and results)


def tool_error(e: ToolError, code: str = "invalid_value") -> ApiError:
    return ApiError(400, str(e), param=e.param, code=code)


def prompt_chars(turns: list[dict]) -> int:
    """Characters of the messages' text and of their tool calls' names and arguments (as sent: not checked yet)."""
    chars = 0
    for m in turns:
        chars += len(m["content"] or "")
        for call in m.get("tool_calls") or []:
            fn = call.get("function") if isinstance(call, dict) else None
            for part in (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else ():
                chars += len(part) if isinstance(part, str) else 0
    return chars


def chat_ids(node, messages: list[Message], tools: ToolRequest = NO_TOOLS) -> list[int]:
    """The token ids of a conversation rendered by the model's chat template, through ``tools`` (tool calls and
    tool messages checked; the tools shown when active); max_prompt_chars checked first."""
    turns = [m.as_openai() for m in messages]
    check_prompt_chars(node, prompt_chars(turns), "messages")
    try:
        return tools.render(node.tokenizer, turns)
    except ToolError as e:
        raise tool_error(e) from None


def request_tools(req: ChatRequest) -> ToolRequest:
    """The request's tools and tool_choice, checked (not compiled yet); beside a JSON response_format an active
    tool_choice is a 400 (one grammar constrains a generation)."""
    try:
        tools = tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    except ToolError as e:
        raise tool_error(e) from None
    if tools.active and req.grammar() is not None:
        raise ApiError(400, 'response_format: a JSON response_format cannot be combined with tools the model may '
                       'call (tool_choice "auto", "required" or a function): one grammar constrains a generation; '
                       'send tool_choice "none" or leave response_format out', param="response_format",
                       code="conflicting_fields")
    return tools


def answer_grammar(req: ChatRequest, tools: ToolRequest, grammars: EdgeGrammars) -> pb.Grammar | None:
    """What constrains the answer, compiled (a 400 naming the reason when it cannot be): the tools' grammar when
    the model may call one, else the response_format's; None: nothing."""
    if tools.active:
        try:
            tools.compile(grammars.grammars("tools"))
        except ToolError as e:
            raise tool_error(e, "invalid_grammar") from None
        return tools.grammar()
    grammar = req.grammar()
    if grammar is not None:
        grammars.check(grammar)
    return grammar


def completion_job(node, req: CompletionRequest, rid: str = "") -> Job:
    check_model(node, req)
    check_tokenizer(node)
    params = generation_params(node, req, req.new_tokens())
    ids = text_ids(node, req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    return new_job(node, "completions", req, check_prompt(node, ids, params.max_tokens), params, rid)


def chat_job(node, req: ChatRequest, rid: str = "", grammars: EdgeGrammars | None = None) -> Job:
    check_model(node, req)
    check_tokenizer(node)
    params = generation_params(node, req, req.new_tokens())
    tools = request_tools(req)
    ids = check_prompt(node, chat_ids(node, req.messages, tools), params.max_tokens)
    grammar = answer_grammar(req, tools, grammars or EdgeGrammars(node))
    if grammar is not None:
        params.grammar.CopyFrom(grammar)
    return new_job(node, "chat", req, ids, params, rid, tools)


def new_job(node, api: str, req: GenerationRequest, ids: list[int], params: pb.GenerationParams, rid: str,
            tools: ToolRequest | None = None) -> Job:
    return Job(api, node.model_name, ids, params, bool(req.stream), req.include_usage(), n=req.n or 1,
               logprobs=req.logprobs_asked(), request_id=rid, tools=tools)


def tokenize(node, req: TokenizeRequest) -> dict:
    """``/tokenize``'s answer: the ids a completion (prompt) or a chat (messages) would be given."""
    check_model(node, req)
    check_tokenizer(node)
    ids = text_ids(node, req.prompt) if req.prompt is not None else chat_ids(node, req.messages)
    return {"tokens": ids, "count": len(ids), "max_model_len": setting(node.settings, "max_positions")}


def detokenize(node, req: DetokenizeRequest) -> dict:
    """``/detokenize``'s answer: the text of token ids of the vocabulary."""
    check_model(node, req)
    check_tokenizer(node)
    bad = [t for t in req.tokens if t >= node.spec.vocab_size]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary [0, {node.spec.vocab_size})", param="tokens")
    return {"prompt": node.tokenizer.decode(req.tokens)}


