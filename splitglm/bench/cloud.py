"""Decode throughput of a plan's cloud tier over gRPC, at several numbers of concurrent sessions.

    splitglm bench cloud [--plan PLAN] --sessions 1 8 --steps 64 --threads 1

Starts ``python -m cloud_service`` as a process of its own, then for each
session count opens that many streams. Every session sends the same real
hidden states (the plan's edge tier run on fixed token ids, encoded with the
plan's edge->cloud codec): a prefill frame, then one position per step, all
sessions stepping at once. Reports decode steps per second over all sessions
(prefill not counted) and the mean step latency seen by a session.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
import uuid

import grpc
import torch

from protos import splitglm_pb2 as pb
from protos import splitglm_pb2_grpc as rpc
from protos.frames import make_frame
from runtime.artifacts import load_plan, load_tier
from runtime.segment import SegmentInput

from ..processes import Proc
from .options import PLAN_HELP, add_command
from .stats import mean


def edge_hidden(plan: str, positions: int) -> torch.Tensor:
    """(positions, C) hidden states at the edge/cloud cut for fixed token ids."""
    edge = load_tier(plan, "edge")
    ids = torch.tensor([(37 * i + 11) % edge.spec.vocab_size for i in range(positions)])
    return edge([SegmentInput("bench", 0, input_ids=ids)])[0]


def session(port: int, hidden: torch.Tensor, prompt: int, steps: int, codec: str, start: threading.Barrier,
            seen: list[dict]) -> None:
    """Prefill, wait for every session, then ``steps`` decode steps; appends each step's latency and timings."""
    sid, requests = uuid.uuid4().hex, queue.Queue()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        responses = rpc.SegmentServiceStub(channel).Stream(iter(requests.get, None))
        params = pb.GenerationParams(max_tokens=steps + 1)
        requests.put(make_frame(sid, 0, 0, hidden[:prompt], codec, params=params))
        next(responses)
        start.wait()
        for seq in range(1, steps + 1):
            pos = prompt + seq - 1
            frame = make_frame(sid, seq, pos, hidden[pos : pos + 1], codec)
            t0 = time.perf_counter()
            requests.put(frame)
            timings = dict(next(responses).timings_ms)
            seen.append({**timings, "step": (time.perf_counter() - t0) * 1e3})
        requests.put(None)
        list(responses)


def measure(port: int, hidden: torch.Tensor, sessions: int, prompt: int, steps: int, codec: str) -> dict:
    start, seen = threading.Barrier(sessions + 1), []
    threads = [threading.Thread(target=session, args=(port, hidden, prompt, steps, codec, start, seen))
               for _ in range(sessions)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def mean_of(key: str) -> float:
        return round(mean(s[key] for s in seen), 2)

    return {"sessions": sessions, "decode_steps_per_s": round(sessions * steps / wall, 1),
            "mean_step_ms": mean_of("step"), "mean_batch_size": mean_of("batch_size"),
            "mean_compute_ms": mean_of("compute"), "mean_queue_ms": mean_of("queue")}


def bench_cloud(plan: str, sessions=(1, 8), prompt: int = 32, steps: int = 64, threads: int = 1,
                rows=None) -> list[dict]:
    """One row per session count (decode steps/s over all sessions, mean step latency, batch sizes);
    each row is also appended to ``rows`` (a list, or anything with ``append``) as soon as it is measured."""
    torch.set_num_threads(1)
    codec = load_plan(plan)["codecs"]["edge_cloud"]
    hidden = edge_hidden(plan, prompt + max(steps, 4))  # (the warm-up takes 4 steps)
    cloud = Proc.python("cloud", "cloud_service", "--plan", plan, "--host", "127.0.0.1", "--port", "0",
                        "--threads", str(threads), "--device", "cpu")
    out = []
    try:
        port = int(cloud.ready(300).rsplit(":", 1)[1])
        measure(port, hidden, 1, prompt, 4, codec)  # warm-up
        for n in sessions:
            out.append({**measure(port, hidden, n, prompt, steps, codec), "threads": threads, "codec": codec,
                        "prompt": prompt, "steps": steps})
            if rows is not None:
                rows.append(out[-1])
    finally:
        cloud.stop()
    return out


class _Printer:
    def append(self, row: dict) -> None:
        sys.stdout.write(json.dumps(row) + "\n")
        sys.stdout.flush()


def add_parser(sub) -> None:
    p = add_command(sub, "cloud", run, "decode throughput of the cloud service at several concurrent sessions")
    p.add_argument("--plan", help=PLAN_HELP)
    p.add_argument("--sessions", type=int, nargs="+", default=[1, 8], help="concurrent sessions to measure")
    p.add_argument("--prompt", type=int, default=32, help="prefill positions per session")
    p.add_argument("--steps", type=int, default=64, help="decode steps per session")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the cloud process")


def run(args: argparse.Namespace) -> int:
    """One JSON line per session count, printed as it is measured."""
    if args.plan is None:
        from partitioner.plan.demo import demo_plan

        args.plan = str(demo_plan())
    bench_cloud(args.plan, args.sessions, args.prompt, args.steps, args.threads, rows=_Printer())
    return 0
