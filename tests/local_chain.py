"""A split model in one process for gateway tests: real segments, real frames, a real (tiny) tokenizer.

``LocalDownstream`` answers frames the way the cloud does (edge layers +
cloud tail in a ``Terminal``) without a network; ``TestNode`` offers what
``edge_node.http_api.create_app`` needs from an edge node, built from those
real parts; ``char_tokenizer`` (``splitglm.fuzz.stack``'s, which ``splitglm
bench fuzz`` uses too) is a character-level tokenizer over the tiny model's 96
ids (``tiny_glm`` has no tokenizer files).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

from protos import splitglm_pb2 as pb
from protos.frames import frame_from_bytes, frame_to_bytes
from runtime.local import Chain, LocalTail, split_segments
from runtime.owner import Generation
from splitglm.fuzz.stack import CHARS, CHAT_TEMPLATE, char_tokenizer  # noqa: F401 -- one definition, re-exported


class LocalDownstream(LocalTail):
    """Edge + cloud segments behind real serialized frames, answering like the cloud does; it can be told
    to fail or to be slow."""

    def __init__(self, edge, cloud):
        super().__init__([edge, cloud])
        self.edge, self.cloud = edge, cloud
        self.closed: list[str] = []
        self.fail: tuple[int, str] | None = None  # (gRPC status, message): answer every step with this error
        self.fail_after = 0  # ... from this seq on
        self.delay_s = 0.0  # each step takes at least this long (a long generation to walk away from)

    def step(self, frame: pb.Frame) -> pb.StepResult:
        time.sleep(self.delay_s)
        if self.fail is not None and frame.seq >= self.fail_after:
            return pb.StepResult(session_id=frame.session_id, seq=frame.seq, error=self.fail[1], status=self.fail[0])
        return super().step(frame_from_bytes(frame_to_bytes(frame), self.edge.spec.hidden_size).frame)

    def close(self, frame: pb.Frame) -> None:
        self.closed.append(frame.session_id)
        super().close(frame)


class TestNode:
    """What the HTTP gateway needs from an edge node, from real segments of a checkpoint."""

    __test__ = False  # not a pytest test class

    def __init__(self, checkpoint, tokenizer, k1: int = 1, k2: int = 3, model_name: str = "tiny", **settings):
        from edge_node.metrics import EdgeMetrics

        self.checkpoint = checkpoint
        self.owner, edge, cloud = split_segments(checkpoint, k1, k2)
        self.downstream = LocalDownstream(edge, cloud)
        self.spec = self.owner.spec
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = EdgeMetrics()
        self.settings = SimpleNamespace(**{"default_max_tokens": 16, "max_tokens_limit": 64, **settings})
        self.checks = {"broker": True, "cloud": True}
        self.lock = threading.Lock()
        self.generations: list[Generation] = []

    def with_eos(self, *ids: int) -> TestNode:
        self.spec = dataclasses.replace(self.spec, eos_token_ids=tuple(ids))
        return self

    def generation(self, prompt_ids: list[int], params: pb.GenerationParams, deadline_unix_ms: int = 0) -> Generation:
        gen = Generation(
            self.owner, self.downstream, prompt_ids, params, "fp32", self.tokenizer,
            deadline_unix_ms=deadline_unix_ms, lock=self.lock,
        )  # fmt: skip
        self.generations.append(gen)
        return gen

    def health(self) -> dict[str, bool]:
        return dict(self.checks)

    def open_sessions(self) -> int:
        """Sessions any tier still holds."""
        tails = self.downstream.terminal.stats()["sessions"]
        return len(self.owner.sessions) + tails + len(self.downstream.cloud.sessions)


def greedy_tokens(checkpoint, k1: int, k2: int, prompt_ids: list[int], n: int, stop_ids=()) -> list[int]:
    """The reference: the chained segments' greedy tokens (``runtime.local.Chain``)."""
    return [t for t, _ in Chain(split_segments(checkpoint, k1, k2)).generate(prompt_ids, n, stop_ids=tuple(stop_ids))]


@contextmanager
def serve(app) -> Iterator[str]:
    """Run an ASGI app with a real uvicorn server on a free loopback port (in a thread); yield its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test HTTP server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
