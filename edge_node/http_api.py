"""The edge's OpenAI-compatible HTTP gateway: completions and chat (plain or streamed), /tokenize and /detokenize,
health, metrics; every response carries X-Request-ID (``request_id``).

The edge is the session owner of an HTTP request: ``node.generation`` runs
the edge's layers and drives the cloud step by step (``runtime.owner``).
The endpoints only adapt: validate the body (``schemas``), build
``GenerationParams``, iterate the blocking Generation in a worker thread and
shape OpenAI responses plus a ``splitglm`` object (which path made each token,
the router's switches, predicted and actual latency, whether the latency
budget was met, whether the answer is degraded). Every failure answers with
OpenAI's error body; an invalid request is a 4xx, never a 500.

What ``create_app(node)`` uses of the node: ``model_name``, ``tokenizer``
(with a chat template; None: text cannot be served), ``spec`` (eos ids,
vocabulary size), ``metrics`` (``EdgeMetrics``), ``settings``
(``default_max_tokens``, ``max_tokens_limit``; where present the limits, ``policy``
and ``api_keys_file``, else EdgeSettings' defaults), ``generation(prompt_ids, params) -> Generation``
and ``health() -> {name: ok}``.

``guard.Guard`` stands in front of the app (API keys, body size, request rate
and open requests per client); the prompt limits are checked here, before any
model work: characters before tokenising (``max_prompt_chars``), tokens
(``max_prompt_tokens``), and prompt + max_tokens against the cloud's
``max_positions``. Each refusal is counted in ``splitglm_edge_http_refused_total``, and so
is a streaming client dropped for not reading (``slow_client``).
Each generation holds a session and its prompt + max_tokens KV positions of
its client's fair share (``shares``: per API key, or address without keys)
until its response ends, however it ends; past the share it is a 429 naming
the limit (``splitglm_edge_quota_refusals_total{kind="key"}``).
A 500 names no exception: its details go to the log under the id the answer gives.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from protos import splitglm_pb2 as pb
from runtime.owner import StepFailed, TokenEvent

from .guard import CLIENT, RETRY_CONCURRENT_S, Guard, GuardLimits, setting
from .metrics import CONTENT_TYPE, path_name
from .request_id import RequestId, request_id
from .schemas import (
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    GenerationRequest,
    Job,
    Message,
    TokenizeRequest,
    chunk,
    error_body,
    response_body,
    splitglm_info,
    sse,
    usage,
)
from .shares import QuotaExceeded, session_shares
from .streaming import BoundedStream

log = logging.getLogger(__name__)

# gRPC status of a failed step -> HTTP status (anything else: 503, the cloud is unavailable)
HTTP_OF_GRPC = {4: 504, 8: 429}  # DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED (overloaded: retry later)


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
    return ApiError(status, f"the cloud tier failed: {e}", kind, code=f"grpc_status_{e.status}")


def generation_params(node, req: GenerationRequest, max_tokens: int | None) -> pb.GenerationParams:
    """GenerationParams of a request, checking max_tokens against the settings."""
    n = node.settings.default_max_tokens if max_tokens is None else max_tokens
    limit = node.settings.max_tokens_limit
    if not 1 <= n <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit}, got {n}", param="max_tokens")
    temperature = 1.0 if req.temperature is None else req.temperature
    seed = req.seed if req.seed is not None else secrets.randbits(63)
    return pb.GenerationParams(
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


def chat_ids(node, messages: list[Message]) -> list[int]:
    """The token ids of a conversation rendered by the model's chat template (max_prompt_chars checked first)."""
    turns = [m.as_template_input() for m in messages]
    check_prompt_chars(node, sum(len(m["content"]) for m in turns), "messages")
    try:
        ids = node.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True, return_dict=False)
    except Exception as e:  # noqa: BLE001 -- a template that rejects the conversation (e.g. role order)
        raise ApiError(400, f"the chat template rejected the messages: {e}", param="messages") from None
    return list(ids)


def completion_job(node, req: CompletionRequest, rid: str = "") -> Job:
    check_model(node, req)
    check_tokenizer(node)
    params = generation_params(node, req, req.new_tokens())
    ids = text_ids(node, req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    return new_job(node, "completions", req, check_prompt(node, ids, params.max_tokens), params, rid)


def chat_job(node, req: ChatRequest, rid: str = "") -> Job:
    check_model(node, req)
    check_tokenizer(node)
    params = generation_params(node, req, req.new_tokens())
    return new_job(node, "chat", req, check_prompt(node, chat_ids(node, req.messages), params.max_tokens), params, rid)


def new_job(node, api: str, req: GenerationRequest, ids: list[int], params: pb.GenerationParams, rid: str) -> Job:
    job = Job(api, node.model_name, ids, params, bool(req.stream), req.include_usage(), request_id=rid)
    log.info("%s: request %s, %d prompt tokens, max_tokens %d", job.id, rid, len(ids), params.max_tokens)
    return job


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


def observe(metrics, event: TokenEvent) -> None:
    """Metrics of one token: its step and the path that made it."""
    metrics.observe_step(pb.StepResult(path=event.path, timings_ms=event.timings_ms), event.step_ms / 1e3, "http")
    metrics.tokens(path_name(event.path), 1)


def consume(gen, metrics, stop: threading.Event, started: float) -> float:
    """Run a whole generation (in a worker thread); return the time to its first token, ms."""
    ttft_ms = 0.0
    it = iter(gen)
    try:
        for event in it:
            ttft_ms = ttft_ms or (time.perf_counter() - started) * 1e3
            observe(metrics, event)
            if stop.is_set():  # the client went away: close the session
                break
    finally:
        it.close()
    return ttft_ms


async def watch_disconnect(request: Request, stop: threading.Event) -> None:
    """Set ``stop`` when the client disconnects."""
    while not stop.is_set():
        if await request.is_disconnected():
            stop.set()
            return
        await anyio.sleep(0.2)


async def close_shielded(it: Iterator[TokenEvent]) -> None:
    """Close a generation's iterator in a worker thread, even while being cancelled."""
    with anyio.CancelScope(shield=True):
        await anyio.to_thread.run_sync(it.close)


async def next_event(it: Iterator[TokenEvent]) -> TokenEvent | None:
    return await anyio.to_thread.run_sync(next, it, None)


class Gateway:
    """The endpoints' logic around one node."""

    def __init__(self, node):
        self.node = node
        self.metrics = node.metrics
        self.shares = session_shares("key", node.settings, node.metrics)  # sessions + KV positions per API key

    async def generate(self, request: Request, job: Job) -> Response:
        """Answer a validated job, plain or streamed, within its client's share (429 past it)."""
        self.hold(request, job)
        streamed = False
        try:
            # latency_budget_ms travels in the params as a soft target (the router's input, reported as budget_met);
            # no frame deadline is derived from it: the cloud drops late frames, which would fail the request.
            gen = self.node.generation(job.prompt_ids, job.params)
            if job.stream:
                response = await self.stream(job, gen)
                streamed = True  # the stream gives the share back when it ends
                return response
            return await self.answer(request, job, gen)
        finally:
            if not streamed:
                self.shares.release(job.id)

    def hold(self, request: Request, job: Job) -> None:
        """Count the job's session and its KV positions (prompt + max_tokens) in its client's share, or 429."""
        client = request.scope.get(CLIENT) or f"addr:{request.client.host if request.client else '?'}"
        try:
            self.shares.acquire(client, job.id, len(job.prompt_ids) + job.params.max_tokens)
        except QuotaExceeded as e:
            raise ApiError(429, str(e), "requests", code="quota_exceeded",
                           headers={"Retry-After": str(RETRY_CONCURRENT_S)}) from None

    async def answer(self, request: Request, job: Job, gen) -> Response:
        """The whole answer of a plain (not streamed) job."""
        stop, failed, ttft_ms = threading.Event(), None, 0.0
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_disconnect, request, stop)
            try:
                ttft_ms = await anyio.to_thread.run_sync(consume, gen, self.metrics, stop, job.started)
            except StepFailed as e:
                failed = e
            client_gone = stop.is_set()
            stop.set()
            tg.cancel_scope.cancel()
        if failed is not None:
            raise step_failed_error(failed)
        if client_gone:
            self.metrics.request(job.api, "499")  # the client went away: nobody reads this answer
            return Response(status_code=499)
        self.finish_metrics(job, ttft_ms, "200")
        return JSONResponse(response_body(job, gen, ttft_ms))

    async def stream(self, job: Job, gen) -> BoundedStream:
        """SSE answer; the first token is computed first, so a failing cloud still gets a plain 503. A client
        that takes no event for ``stream_send_timeout_s`` is dropped (``edge_node.streaming``)."""
        it = iter(gen)
        try:
            first = await next_event(it)
        except StepFailed as e:
            raise step_failed_error(e) from None
        except BaseException:
            await close_shielded(it)
            raise
        ttft_ms = job.elapsed_ms()

        async def end() -> None:  # however the stream ends: its session closed, its share given back
            try:
                if getattr(it, "gi_frame", None) is not None:  # not closed yet (``events`` closes it when it runs)
                    await close_shielded(it)
            finally:
                self.shares.release(job.id)

        return BoundedStream(
            self.events(job, gen, it, first, ttft_ms),
            setting(self.node.settings, "stream_send_timeout_s"),
            on_drop=lambda: self.metrics.http_refused("slow_client"),
            on_end=end,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def events(self, job: Job, gen, it, event: TokenEvent | None, ttft_ms: float) -> AsyncIterator[str]:
        outcome = "error"
        try:
            if job.api == "chat":
                yield sse(chunk(job, "", role=True))
            while event is not None:
                observe(self.metrics, event)
                if event.text:
                    yield sse(chunk(job, event.text))
                event = await next_event(it)
            final = chunk(job, None, gen.finish_reason, splitglm=splitglm_info(job, gen, ttft_ms))
            yield sse(final)
            if job.include_usage:
                yield sse({**chunk(job, None), "choices": [], "usage": usage(job, gen)})
            outcome = "200"
        except StepFailed as e:
            err = step_failed_error(e)
            log.warning("stream %s (request %s): %s", job.id, job.request_id, err.message)
            outcome = str(err.status)
            yield sse(error_body(err.message, err.type, code=err.code))
        except (anyio.get_cancelled_exc_class(), GeneratorExit):
            outcome = "499"
            raise
        finally:
            await close_shielded(it)  # frees the session when the client went away
            if outcome == "200":
                self.finish_metrics(job, ttft_ms, outcome)
            else:
                self.metrics.request(job.api, outcome)
        yield sse("[DONE]")

    def finish_metrics(self, job: Job, ttft_ms: float, status: str) -> None:
        self.metrics.request(job.api, status)
        self.metrics.stage("ttft", ttft_ms / 1e3)
        self.metrics.stage("request", job.elapsed_ms() / 1e3)


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first problem of an invalid body, naming its field (``messages.0.role``)."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    loc = [p for p in loc if not p.startswith(("function-", "list[", "constrained-"))]  # union branch names
    loc += [first["ctx"]["param"]] if "param" in (first.get("ctx") or {}) else []  # schemas.field_error
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json")
    msg = str(first.get("msg")).removeprefix("Value error, ")
    if not param and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
        msg = "the body must be a JSON object"
    message = f"{param}: {msg}" if param else msg
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    return ApiError(400, message + more, param=param, code=first.get("type") or None)


def install_error_handlers(app: FastAPI, metrics) -> None:
    def count(request: Request, status: int) -> None:
        if api := api_of(request):
            metrics.request(api, str(status))

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        count(request, exc.status)
        if exc.refusal:
            metrics.http_refused(exc.refusal)
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        error_id = request_id(request.scope) or uuid.uuid4().hex
        log.exception("unexpected error serving %s (request %s)", request.url.path, error_id)
        count(request, 500)
        message = f"internal error of request {error_id} (the edge's log has the details)"
        return JSONResponse(error_body(message, "server_error", code="internal_error"), status_code=500,
                            headers={"X-Request-ID": error_id})  # answered outside the RequestId middleware


def api_of(request: Request) -> str | None:
    """The API a request was for, as the request counter names it (None: not a generation endpoint)."""
    return {"/v1/completions": "completions", "/v1/chat/completions": "chat"}.get(request.url.path)


def create_app(node) -> FastAPI:
    """The FastAPI app of an edge node (see the module docstring for what ``node`` provides)."""
    app = FastAPI(title="splitglm edge", summary="OpenAI-compatible API of a split GLM model")
    gateway = Gateway(node)
    app.state.shares = gateway.shares  # what each API key holds now (tests, operators' debugging)
    install_error_handlers(app, node.metrics)
    app.add_middleware(Guard, limits=GuardLimits.from_settings(node.settings), metrics=node.metrics)
    app.add_middleware(RequestId)  # the outermost: the guard's refusals carry X-Request-ID too
    started = int(time.time())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        job = await run_in_threadpool(completion_job, node, body, request_id(request.scope))
        return await gateway.generate(request, job)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        return await gateway.generate(request, await run_in_threadpool(chat_job, node, body, request_id(request.scope)))

    @app.post("/tokenize")
    async def tokenize_(body: TokenizeRequest):
        return await run_in_threadpool(tokenize, node, body)

    @app.post("/detokenize")
    async def detokenize_(body: DetokenizeRequest):
        return await run_in_threadpool(detokenize, node, body)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(node, started)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str):
        if model_id != node.model_name:
            raise ApiError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card(node, started)

    @app.get("/healthz")
    async def healthz():
        checks = {name: bool(ok) for name, ok in (await run_in_threadpool(node.health)).items()}
        healthy = all(checks.values())
        body = {"status": "ok" if healthy else "unavailable", **checks}
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def model_card(node, created: int) -> dict:
    """One ``/v1/models`` entry; ``max_model_len``: the positions (prompt + completion) a request may take."""
    return {"id": node.model_name, "object": "model", "created": created, "owned_by": "splitglm",
            "max_model_len": setting(node.settings, "max_positions")}
