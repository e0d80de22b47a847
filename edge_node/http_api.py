"""The edge's OpenAI-compatible HTTP gateway: completions and chat (plain or streamed), /tokenize and /detokenize,
probes (``health``), metrics; every response carries X-Request-ID (``request_id``).

The edge is the session owner of an HTTP request: ``node.generation`` runs
the edge's layers and drives the cloud step by step (``runtime.owner``).
The endpoints only adapt: validate the body (``schemas``), check it against
the node and build ``GenerationParams`` (``jobs``), iterate the blocking
Generations in worker threads and shape OpenAI responses plus a ``splitglm``
object (``openai_format``: which path made each token, the router's switches,
predicted and actual latency, whether the latency budget was met, whether the
answer is degraded). Every failure answers with OpenAI's error body; an
invalid request is a 4xx, never a 500.

A request for ``n`` completions runs ``n`` Generations of its prompt, choice i
seeded seed + i; the others fork choice 0's prefill where the tiers can
(``runtime.owner.share_prefill``): choice 0 runs to its first token first, then
the others together. Streamed, their chunks interleave, each with its index.
With tools, each choice's text is read for tool calls (``edge_node.tool_calls``), whole or streamed as
OpenAI streams them.

What ``create_app(node)`` uses of the node: ``model_name``, ``tokenizer``
(with a chat template; None: text cannot be served), ``spec`` (eos ids,
vocabulary size), ``metrics`` (``EdgeMetrics``), ``settings``
(``default_max_tokens``, ``max_tokens_limit``; where present the limits, ``policy``,
``max_n`` and ``api_keys_file``, else EdgeSettings' defaults), ``generation(prompt_ids, params) -> Generation``
and ``health() -> {name: ok}`` (``health.readiness`` reads it); where present, ``grammars`` (``jobs.EdgeGrammars``).

``guard.Guard`` stands in front of the app (API keys, body size, request rate
and open requests per client); the prompt limits are checked before any
model work (``jobs``). Each refusal is counted in ``splitglm_edge_http_refused_total``, and so
is a streaming client dropped for not reading (``slow_client``).
Each generation (each of the ``n``) holds a session and its prompt + max_tokens KV positions of
its client's fair share (``shares``: per API key, or address without keys)
until its response ends, however it ends; past the share it is a 429 naming
the limit (``splitglm_edge_quota_refusals_total{kind="key"}``).
A 500 names no exception: its details go to the log under the id the answer gives.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from protos import splitglm_pb2 as pb
from runtime import logs
from runtime.owner import Generation, StepFailed, TokenEvent, share_prefill

from .guard import CLIENT, RETRY_CONCURRENT_S, Guard, GuardLimits, setting
from .health import readiness
from .jobs import ApiError, EdgeGrammars, Job, chat_job, completion_job, detokenize, step_failed_error, tokenize
from .metrics import CONTENT_TYPE, path_name
from .openai_format import Logprobs, chunk, end_chunks, response_body, splitglm_info, sse, token_chunks, usage
from .request_id import RequestId, request_id
from .schemas import ChatRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest, error_body
from .shares import QuotaExceeded, session_shares
from .streaming import BoundedStream, close_shielded, merged, next_event, next_events

log = logging.getLogger(__name__)


def observe(metrics, event: TokenEvent, first: bool = False) -> None:
    """Metrics of one token (the ``first`` of its choice, or a later one): its step and the path that made it."""
    metrics.observe_step(pb.StepResult(path=event.path, timings_ms=event.timings_ms), event.step_ms / 1e3, "http")
    metrics.token(path_name(event.path), event.step_ms / 1e3, first)


def drain(it: Iterator[TokenEvent], event: TokenEvent | None, metrics, stop: threading.Event) -> StepFailed | None:
    """Run a generation to its end (in a worker thread) from its ``event`` pulled already, or until ``stop``
    (then close it); its failure, which sets ``stop`` for the others (so does any other exception, raised)."""
    try:
        first = True
        while event is not None:
            observe(metrics, event, first)
            first = False
            if stop.is_set():  # the client went away, or another choice failed: close the session
                break
            event = next(it, None)
    except StepFailed as e:
        stop.set()
        return e
    except BaseException:
        stop.set()
        raise
    finally:
        it.close()
    return None


async def watch_disconnect(request: Request, stop: threading.Event) -> None:
    """Set ``stop`` when the client disconnects."""
    while not stop.is_set():
        if await request.is_disconnected():
            stop.set()
            return
        await anyio.sleep(0.2)


async def close_all(its: list[Iterator[TokenEvent]]) -> None:
    """Close the generations not closed yet (each frees its session on every tier)."""
    for it in its:
        if getattr(it, "gi_frame", None) is not None:
            await close_shielded(it)


class Gateway:
    """The endpoints' logic around one node."""

    def __init__(self, node):
        self.node = node
        self.metrics = node.metrics
        self.shares = session_shares("key", node.settings, node.metrics)  # sessions + KV positions per API key
        self.grammars = EdgeGrammars(node)  # compiles a response_format before anything is sent

    async def generate(self, request: Request, job: Job) -> Response:
        """Answer a validated job, plain or streamed, within its client's share (429 past it)."""
        self.hold(request, job)
        streamed, its = False, []
        try:
            gens = self.generations(job)
            its = [iter(gen) for gen in gens]
            if job.stream:
                response = await self.stream(job, gens, its)
                streamed = True  # the stream gives the share back when it ends
                return response
            return await self.answer(request, job, gens, its)
        finally:
            if not streamed:
                await close_all(its)
                self.release(job)

    def generations(self, job: Job) -> list[Generation]:
        """The job's n generations, the others forking choice 0's prefill where the tiers can; their session ids
        bound for the request's log lines (comma-separated when n > 1), and one line linking the ids."""
        # latency_budget_ms travels in the params as a soft target (the router's input, reported as budget_met);
        # no frame deadline is derived from it: the cloud drops late frames, which would fail the request.
        gens = [self.node.generation(job.prompt_ids, job.choice_params(i)) for i in range(job.n)]
        share_prefill(gens)
        sessions = ",".join(gen.session_id for gen in gens)
        logs.session_id.set(sessions)  # (in the request's task: ``RequestId`` restores the value after it)
        log.info("%s: request %s, session %s, %d prompt tokens, max_tokens %d, n %d", job.id, job.request_id,
                 sessions, len(job.prompt_ids), job.params.max_tokens, job.n)
        return gens

    def hold(self, request: Request, job: Job) -> None:
        """Count the job's sessions and their KV positions (prompt + max_tokens each) in its client's share,
        or 429."""
        client = request.scope.get(CLIENT) or f"addr:{request.client.host if request.client else '?'}"
        try:
            for i in range(job.n):
                self.shares.acquire(client, (job.id, i), len(job.prompt_ids) + job.params.max_tokens)
        except QuotaExceeded as e:
            self.release(job)
            raise ApiError(429, str(e), "requests", code="quota_exceeded",
                           headers={"Retry-After": str(RETRY_CONCURRENT_S)}) from None

    def release(self, job: Job) -> None:
        for i in range(job.n):
            self.shares.release((job.id, i))

    async def start(self, job: Job, its: list[Iterator[TokenEvent]]) -> tuple[list[TokenEvent | None], float]:
        """The first event of each generation: choice 0's first (its prefill, which the others may fork),
        then the others' together; and the time to the first token, ms."""
        first = await next_event(its[0])
        ttft_ms = job.elapsed_ms()
        return [first, *await next_events(its[1:])], ttft_ms

    def logprobs(self, job: Job) -> Logprobs | None:
        return None if job.logprobs is None else Logprobs(job, self.node.tokenizer)

    async def answer(self, request: Request, job: Job, gens: list[Generation], its) -> Response:
        """The whole answer of a plain (not streamed) job."""
        stop, failures, ttft_ms = threading.Event(), [], 0.0

        async def run(i: int, first: TokenEvent | None) -> None:
            failures.append(await anyio.to_thread.run_sync(drain, its[i], first, self.metrics, stop))

        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_disconnect, request, stop)
            try:
                firsts, ttft_ms = await self.start(job, its)
                async with anyio.create_task_group() as runs:
                    for i, first in enumerate(firsts):
                        runs.start_soon(run, i, first)
            except StepFailed as e:
                failures.append(e)
            client_gone = stop.is_set()
            stop.set()
            tg.cancel_scope.cancel()
        failed = next((f for f in failures if f is not None), None)
        if failed is not None:
            raise step_failed_error(failed)
        if client_gone:
            self.metrics.http_request(job.api, 499)  # the client went away: nobody reads this answer
            return Response(status_code=499)
        self.finish_metrics(job, ttft_ms, "200")
        return JSONResponse(response_body(job, gens, ttft_ms, self.logprobs(job)))

    async def stream(self, job: Job, gens: list[Generation], its) -> BoundedStream:
        """SSE answer; the first tokens are computed first, so a failing cloud still gets a plain 503. A client
        that takes no event for ``stream_send_timeout_s`` is dropped (``edge_node.streaming``)."""
        try:
            firsts, ttft_ms = await self.start(job, its)
        except StepFailed as e:
            raise step_failed_error(e) from None

        async def end() -> None:  # however the stream ends: its sessions closed, its share given back
            try:
                await close_all(its)  # (``events`` closes them when it runs)
            finally:
                self.release(job)

        return BoundedStream(
            self.events(job, gens, its, firsts, ttft_ms),
            setting(self.node.settings, "stream_send_timeout_s"),
            on_drop=lambda: self.metrics.http_refused("slow_client"),
            on_end=end,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def events(self, job: Job, gens: list[Generation], its, firsts, ttft_ms: float) -> AsyncIterator[str]:
        """The SSE events: each choice's text deltas (with tools: its content and tool-call deltas; with their
        tokens' log-probs when asked) as they come, its last chunk (finish_reason, its ``splitglm`` object) when
        it ends, then the usage if asked."""
        outcome, logprobs, offsets = "error", self.logprobs(job), [0] * job.n
        seen = [False] * job.n  # a choice's first token came (the later ones are inter-token latencies)
        parsers = [job.tool_parser() for _ in range(job.n)]  # a choice's tool calls (None: no tools)
        try:
            if job.api == "chat":
                for i in range(job.n):
                    yield sse(chunk(job, "", role=True, index=i))
            async with aclosing(merged(its, firsts)) as events:
                async for i, event in events:
                    if event is None:  # choice i ended
                        for body in end_chunks(job, i, gens[i], parsers[i], splitglm_info(job, gens[i], ttft_ms)):
                            yield sse(body)
                        continue
                    observe(self.metrics, event, not seen[i])
                    seen[i] = True
                    lp = None
                    if logprobs is not None:  # a chunk per token at least: its log-probs
                        lp = logprobs.of([event.token], [event.logprob], [event.top_logprobs], offsets[i])
                        offsets[i] += logprobs.width([event.token])
                    for body in token_chunks(job, i, event.text, lp, parsers[i]):
                        yield sse(body)
            if job.include_usage:
                yield sse({**chunk(job, None), "choices": [], "usage": usage(job, gens)})
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
            await close_all(its)  # frees the sessions when the client went away
            if outcome == "200":
                self.finish_metrics(job, ttft_ms, outcome)
            else:
                self.metrics.http_request(job.api, outcome)
        yield sse("[DONE]")

    def finish_metrics(self, job: Job, ttft_ms: float, status: str) -> None:
        self.metrics.http_request(job.api, status)
        self.metrics.http_answered(ttft_ms / 1e3, job.elapsed_ms() / 1e3)


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
            metrics.http_request(api, status)

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
        job = await run_in_threadpool(chat_job, node, body, request_id(request.scope), gateway.grammars)
        return await gateway.generate(request, job)

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

    @app.get("/livez")
    async def livez():
        return {"status": "alive"}  # answered by the event loop: the process works

    @app.get("/readyz")
    async def readyz():
        status, body = readiness(await run_in_threadpool(node.health))
        return JSONResponse(body, status_code=status)

    app.add_api_route("/healthz", readyz, methods=["GET"], deprecated=True)  # the old name of /readyz

    @app.get("/metrics")
    async def metrics():
        return Response(node.metrics.exposition(), media_type=CONTENT_TYPE)

    return app


def model_card(node, created: int) -> dict:
    """One ``/v1/models`` entry; ``max_model_len``: the positions (prompt + completion) a request may take."""
    return {"id": node.model_name, "object": "model", "created": created, "owned_by": "splitglm",
            "max_model_len": setting(node.settings, "max_positions")}
