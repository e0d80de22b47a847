"""The tier processes of a live run: shaped TCP links and the device / edge / cloud loops.

See ``partitioner.plan.live`` for what a live run measures and how; this module
holds the processes themselves: ``ShapedConn`` (length-prefixed messages, each
delayed by RTT/2 + bytes x 8 / bandwidth by its sender) and ``_tier_main``
(load the tier's segment on its backend, then serve frames or drive the loop).
"""

from __future__ import annotations

import logging
import socket
import struct
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

    def delay_s(self, nbytes: int) -> float:
        return self.rtt_ms / 2e3 + nbytes * 8 / (self.bandwidth_mbit_s * 1e6)

    def send(self, data: bytes) -> None:
        _sleep(self.delay_s(len(data)))
        self.sock.sendall(_HEADER.pack(len(data)) + data)

    def recv(self) -> bytes | None:
        """The next message, or None when the peer closed."""
        head = self._exact(_HEADER.size)
        if head is None:
            return None
        return self._exact(_HEADER.unpack(head)[0]) or b""

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


def _load(cfg: _TierConfig):
    from partitioner.plan.measure import compression_entry
    from partitioner.runtime.build import build_segment

    entry = compression_entry(cfg.backend, cfg.compression)
    return build_segment(
        cfg.model, cfg.start, cfg.end, cfg.role == "device", cfg.role == "cloud", entry, threads=cfg.threads
    )


def _tier_main(cfg: _TierConfig, pipe) -> None:
    """Entry point of a tier process; reports ("port", p), ("ready",), ("error", tb) on ``pipe``."""
    torch.set_num_threads(cfg.threads)
    try:
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
        listener.settimeout(START_TIMEOUT_S)
        sock, _ = listener.accept()
        sock.settimeout(None)
        listener.close()
        up = ShapedConn(sock, **cfg.up)
        pipe.send(("ready",))
        _serve(cfg, seg, up, down)
    except BaseException:  # noqa: BLE001 -- reported to the parent, which raises
        try:
            pipe.send(("error", f"{cfg.role}: {traceback.format_exc()}"))
        except OSError:
            pass


def _serve(cfg: _TierConfig, seg, up: ShapedConn, down: ShapedConn | None) -> None:
    """Edge / cloud: answer frames from upstream until it closes (the cloud samples like the cloud service)."""
    from partitioner.runtime.segment import SegmentInput
    from partitioner.session.terminal import TailSessions
    from protos import splitglm_pb2 as pb
    from protos.frames import frame_from_bytes, frame_to_bytes, make_frame

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
    from partitioner.session.owner import Generation
    from protos import splitglm_pb2 as pb

    downstream = _ShapedDownstream(down)
    while True:
        cmd = pipe.recv()
        if cmd[0] == "stop":
            break
        _, prompt, steps = cmd
        params = pb.GenerationParams(max_tokens=steps + 1)
        generation = Generation(seg, downstream, list(prompt), params, cfg.codec, tokenizer=None,
                                session_id=uuid.uuid4().hex)
        tokens = [event.token for event in generation]
        records = [{"wall_ms": s["owner"] + s["downstream"],
                    "compute_ms": {"device": s["owner"], "edge": s["edge"], "cloud": s["cloud"]}}
                   for s in generation.step_timings]
        pipe.send(("result", tokens, records))
    down.close()


# ---- the parent side -----------------------------------------------------------------------------
