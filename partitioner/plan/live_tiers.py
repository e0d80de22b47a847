"""The tier processes of a live run: shaped TCP links and the device / edge / cloud loops.

See ``partitioner.plan.live`` for what a live run measures and how; this module
holds the processes themselves: ``ShapedConn`` (length-prefixed messages, each
delayed by RTT/2 + bytes x 8 / bandwidth by its sender) and ``_tier_main``
(load the tier's segment on its backend, then serve frames or drive the loop).
"""

from __future__ import annotations

import functools
import logging
import queue
import socket
import struct
import threading
import time
import traceback
import uuid
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

TIER_NAMES = ("device", "edge", "cloud")
_HEADER = struct.Struct("!I")
START_TIMEOUT_S = 120.0


# ---- shaped, length-prefixed messages ------------------------------------------------------------


class ShapedConn:
    """A TCP connection whose sender pays one-way delay + serialisation for each message it sends."""

    def __init__(self, sock: socket.socket, bandwidth_mbit_s: float, rtt_ms: float):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.bandwidth_mbit_s, self.rtt_ms = sock, bandwidth_mbit_s, rtt_ms
        self.sent_bytes = 0  # bytes sent on this connection, length prefixes included
        self.recv_bytes = 0  # bytes received, length prefixes included

    def delay_s(self, nbytes: int) -> float:
        return self.rtt_ms / 2e3 + nbytes * 8 / (self.bandwidth_mbit_s * 1e6)

    def send(self, data: bytes) -> None:
        _sleep(self.delay_s(len(data)))
        self.send_now(data)

    def send_now(self, data: bytes) -> None:
        """Send without the link's delay (the caller has paid it, e.g. ``StreamSender``)."""
        self.sock.sendall(_HEADER.pack(len(data)) + data)
        self.sent_bytes += _HEADER.size + len(data)

    def recv(self) -> bytes | None:
        """The next message, or None when the peer closed."""
        head = self._exact(_HEADER.size)
        if head is None:
            return None
        n = _HEADER.unpack(head)[0]
        self.recv_bytes += _HEADER.size + n
        return self._exact(n) or b""

    def _exact(self, n: int) -> bytes | None:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                return None
            buf += chunk
        return bytes(buf)

    def close(self) -> None:
        self.sock.close()


class StreamSender:
    """Sends a stream of messages on a ``ShapedConn`` from a thread, each at its due time, so the caller
    never waits for the link: serialisation queues behind the previous message, RTT/2 overlaps."""

    def __init__(self, conn: ShapedConn):
        self.conn, self.free_at = conn, 0.0  # free_at: when the link finishes serialising what is queued
        self.queue: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True, name="splitglm-stream-sender")
        self.thread.start()

    def send(self, data: bytes) -> None:
        self.free_at = max(time.perf_counter(), self.free_at) + len(data) * 8 / (self.conn.bandwidth_mbit_s * 1e6)
        self.queue.put((self.free_at + self.conn.rtt_ms / 2e3, data))

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            due, data = item
            _sleep(due - time.perf_counter())
            try:
                self.conn.send_now(data)
            except OSError:
                return

    def close(self) -> None:
        """Send what is queued, then stop."""
        self.queue.put(None)
        self.thread.join()


def _sleep(seconds: float) -> None:
    """time.sleep, finished by a short spin for sub-millisecond accuracy."""
    end = time.perf_counter() + seconds
    if seconds > 2e-3:
        time.sleep(seconds - 1e-3)
    while time.perf_counter() < end:
        pass


def _listen() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=START_TIMEOUT_S)


# ---- the tier processes --------------------------------------------------------------------------


@dataclass
class _TierConfig:
    role: str
    model: str
    start: int
    end: int
    compression: str
    codec: str  # codec of the link this tier sends hidden states on ("" for the cloud)
    up: dict  # link towards the device: {"bandwidth_mbit_s", "rtt_ms"} (None for the device)
    down: dict | None  # link towards the cloud (None for the cloud)
    threads: int
    backend: str = "torch"  # the tier's backend: torch, or onnxruntime (exported when the process starts)
    whole: bool = False  # embedding + every layer + head (a baseline's whole model, ``_whole_main``)


def _load(cfg: _TierConfig):
    from partitioner.plan.measure import compression_entry
    from runtime.build import build_segment

    entry = compression_entry(cfg.backend, cfg.compression)
    embed, head = cfg.whole or cfg.role == "device", cfg.whole or cfg.role == "cloud"
    return build_segment(cfg.model, cfg.start, cfg.end, embed, head, entry, threads=cfg.threads)


def _accept(listener: socket.socket, link: dict) -> ShapedConn:
    """The one upstream connection of a tier process, shaped as ``link``."""
    listener.settimeout(START_TIMEOUT_S)
    sock, _ = listener.accept()
    sock.settimeout(None)
    listener.close()
    return ShapedConn(sock, **link)


def _reporting(role: str, pipe, body) -> None:
    """Run a process's ``body``; an exception goes to the parent as ("error", traceback), which raises."""
    try:
        body()
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises
        try:
            pipe.send(("error", f"{role}: {traceback.format_exc()}"))
        except OSError:
            pass


def _tier_main(cfg: _TierConfig, pipe) -> None:
    """Entry point of a tier process; reports ("port", p), ("ready",), ("error", tb) on ``pipe``."""
    torch.set_num_threads(cfg.threads)

    def body():
        listener = None
        if cfg.role != "device":
            listener = _listen()
            pipe.send(("port", listener.getsockname()[1]))
        seg = _load(cfg)
        down = None
        if cfg.role != "cloud":
            port = pipe.recv()  # the downstream tier's port, from the parent
            down = ShapedConn(_connect(port), **cfg.down)
        if cfg.role == "device":
            pipe.send(("ready",))
            _device_loop(cfg, seg, down, pipe)
            return
        up = _accept(listener, cfg.up)
        pipe.send(("ready",))
        _serve(cfg, seg, up, down)

    _reporting(cfg.role, pipe, body)


def _serve(cfg: _TierConfig, seg, up: ShapedConn, down: ShapedConn | None) -> None:
    """Edge / cloud: answer frames from upstream until it closes (the cloud samples like the cloud service)."""
    from protos import splitglm_pb2 as pb
    from protos.frames import frame_from_bytes, frame_to_bytes, make_frame
    from runtime.segment import SegmentInput
    from runtime.terminal import TailSessions

    C = seg.spec.hidden_size
    tails = TailSessions(max_tokens=1 << 20)
    while True:
        data = up.recv()
        if data is None:
            break
        t0 = time.perf_counter()
        received = frame_from_bytes(data, C)
        f = received.frame
        if f.close:
            seg.close_session(f.session_id)
            tails.close(f.session_id)
            if down is not None:
                down.send(frame_to_bytes(make_frame(f.session_id, f.seq, f.start_pos, None, close=True)))
            continue
        if cfg.role == "cloud":
            tails.accept(f)
            result = tails.answer(f, seg([tails.work(f, received.hidden)])[0])
            result.timings_ms["cloud"] = (time.perf_counter() - t0) * 1e3
            up.send(result.SerializeToString())
            continue
        out = seg([SegmentInput(f.session_id, f.start_pos, hidden=received.hidden)])[0]
        params = f.params if f.HasField("params") else None
        payload = frame_to_bytes(make_frame(f.session_id, f.seq, f.start_pos, out, cfg.codec, params=params))
        compute = time.perf_counter() - t0
        down.send(payload)
        back = down.recv()
        if back is None:
            break
        t1 = time.perf_counter()
        result = pb.StepResult()
        result.ParseFromString(back)
        result.timings_ms["edge"] = (compute + time.perf_counter() - t1) * 1e3
        up.send(result.SerializeToString())
    up.close()
    if down is not None:
        down.close()


class _ShapedDownstream:
    """The device's downstream in a live run: frames over the shaped link to the edge tier."""

    def __init__(self, conn: ShapedConn):
        self.conn = conn

    def step(self, frame):
        from protos import splitglm_pb2 as pb
        from protos.frames import frame_to_bytes

        self.conn.send(frame_to_bytes(frame))
        data = self.conn.recv()
        if data is None:
            raise ConnectionError("the edge closed the connection")
        result = pb.StepResult()
        result.ParseFromString(data)
        return result

    def close(self, frame) -> None:
        from protos.frames import frame_to_bytes

        self.conn.send(frame_to_bytes(frame))


def _device_loop(cfg: _TierConfig, seg, down: ShapedConn, pipe) -> None:
    """The session owner: runs ("run", prompt_ids, decode_steps) commands from the parent (greedy tokens)."""
    from protos import splitglm_pb2 as pb
    from runtime.owner import Generation

    downstream = _ShapedDownstream(down)
    while True:
        cmd = pipe.recv()
        if cmd[0] == "stop":
            break
        _, prompt, steps = cmd
        params = pb.GenerationParams(max_tokens=steps + 1)
        generation = Generation(seg, downstream, list(prompt), params, cfg.codec, tokenizer=None,
                                session_id=uuid.uuid4().hex)
        sent, received = down.sent_bytes, down.recv_bytes
        tokens = [event.token for event in generation]  # (exhausting it sends the close frame too)
        records = [{"wall_ms": s["owner"] + s["downstream"],
                    "compute_ms": {"device": s["owner"], "edge": s["edge"], "cloud": s["cloud"]}}
                   for s in generation.step_timings]
        # what this request put on the device's link, both ways: frames (close included) and answers
        records[0]["link_bytes"] = {"up": down.sent_bytes - sent, "down": down.recv_bytes - received}
        pipe.send(("result", tokens, records))
    down.close()


# ---- baselines: the whole model on one tier (``splitglm.bench_baselines``) --------------------------

_REQUEST = struct.Struct("!IB")  # decode steps, payload kind; then the payload
TEXT, IDS = 0, 1  # payload kinds: the prompt as UTF-8 text, or as int32 token ids (a reference run)
_TOKEN = struct.Struct("!iId")  # token id, its index, compute ms of the step that sampled it


def encode_request(decode_steps: int, text: str | None = None, ids: list[int] | None = None) -> bytes:
    """A whole-model request: the prompt's text (what a client sends) or its ids, and the decode steps."""
    if text is not None:
        return _REQUEST.pack(decode_steps, TEXT) + text.encode("utf-8")
    return _REQUEST.pack(decode_steps, IDS) + struct.pack(f"!{len(ids)}i", *ids)


def decode_token(data: bytes) -> tuple[int, int, float]:
    """(token, index, compute ms) of one streamed token message."""
    return _TOKEN.unpack(data)


def _generate_whole(seg, tokenizer, request: bytes, emit) -> None:
    """Greedy generation on the whole model; ``emit(token, index, compute_ms)`` after each step.

    Step 0's compute includes tokenizing the text; sampling is the cloud's (``SegmentInput.sample``)."""
    from runtime.sampling import SamplingParams
    from runtime.segment import SegmentInput

    t0 = time.perf_counter()
    steps, kind = _REQUEST.unpack_from(request)
    payload = request[_REQUEST.size :]
    if kind == TEXT:
        ids = tokenizer().encode(payload.decode("utf-8"), add_special_tokens=False)
    else:
        ids = list(struct.unpack(f"!{len(payload) // 4}i", payload))
    greedy, sid, pos, x = SamplingParams(), uuid.uuid4().hex, 0, torch.tensor(ids)  # x: (T,)
    try:
        for i in range(steps + 1):
            rows = tuple(greedy.rows(pos + int(x.shape[0])))
            token = int(seg([SegmentInput(sid, pos, input_ids=x, sample=rows)])[0].tokens[0])
            emit(token, i, (time.perf_counter() - t0) * 1e3)
            t0, pos, x = time.perf_counter(), pos + int(x.shape[0]), torch.tensor([token])
    finally:
        seg.close_session(sid)


def _collect(seg, tokenizer, request: bytes) -> list[tuple[int, float]]:
    """(token, compute_ms) of each step of one request, run here."""
    out = []
    _generate_whole(seg, tokenizer, request, lambda token, i, ms: out.append((token, ms)))
    return out


def _whole_main(cfg: _TierConfig, pipe) -> None:
    """A baseline's whole model on tier ``cfg.role``: requests from upstream (``cfg.up``), tokens streamed back
    (``StreamSender``: the link delays delivery, not the next step); without ``cfg.up`` (the device itself)
    ("run", request) commands from the parent, answered ("result", [(token, compute_ms)])."""
    torch.set_num_threads(cfg.threads)

    def body():
        from runtime.checkpoint import load_tokenizer

        listener = _listen() if cfg.up else None
        if listener is not None:
            pipe.send(("port", listener.getsockname()[1]))
        seg = _load(cfg)
        weight_bytes = sum(p.numel() * p.element_size() for p in seg.parameters())
        tokenizer = functools.cache(lambda: load_tokenizer(cfg.model))  # loaded by the first text request
        if listener is None:
            pipe.send(("ready", weight_bytes))
            while (cmd := pipe.recv())[0] != "stop":
                pipe.send(("result", _collect(seg, tokenizer, cmd[1])))
            return
        up = _accept(listener, cfg.up)
        pipe.send(("ready", weight_bytes))
        sender = StreamSender(up)
        while (request := up.recv()) is not None:
            _generate_whole(seg, tokenizer, request, lambda token, i, ms: sender.send(_TOKEN.pack(token, i, ms)))
        sender.close()
        up.close()

    _reporting(cfg.role, pipe, body)


def _relay_main(cfg: _TierConfig, pipe) -> None:
    """The edge in the cloud-only baseline: forwards requests downstream and streams tokens back."""

    def body():
        listener = _listen()
        pipe.send(("port", listener.getsockname()[1]))
        down = ShapedConn(_connect(pipe.recv()), **cfg.down)
        up = _accept(listener, cfg.up)
        pipe.send(("ready",))
        sender = StreamSender(up)

        def stream_back():
            while (data := down.recv()) is not None:
                sender.send(data)
            sender.close()

        back = threading.Thread(target=stream_back, daemon=True, name="splitglm-relay-back")
        back.start()
        while (request := up.recv()) is not None:
            down.send(request)
        down.sock.shutdown(socket.SHUT_WR)  # the server sees the end, finishes its stream and closes
        back.join(START_TIMEOUT_S)
        down.close()
        up.close()

    _reporting(cfg.role, pipe, body)
