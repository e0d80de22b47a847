"""The topology ``splitglm bench fuzz`` attacks, in one process: a tiny random GLM split 2/4, its cloud over
gRPC, an edge node serving HTTP (its relay built separately, on no broker), a device agent on the embedded
broker; and the fuzz target of each receiver.

The tiny model (hidden 64, 6 layers, 96 ids: the test suite's) keeps each
input cheap, so the receivers' own code is what the run measures; the plan's
tiers get a character tokenizer so the HTTP API and the device agent take text.
"""

from __future__ import annotations

import logging
import sys
from contextlib import ExitStack
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CHARS = ["\n"] + [chr(c) for c in range(32, 127)]  # 96 tokens: id 0 is "\n", then printable ASCII
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
FRAME_LIMIT = 1 << 16  # the cloud's max_frame_bytes here: small, so that an over-size frame is cheap to send
SESSION_TTL_S = 2.0  # the cloud's idle-session TTL here, seconds (sessions kept for a retry expire quickly)
QUIET = ("device_agent", "edge_node", "cloud_service", "partitioner", "runtime", "protos", "amqtt", "transports")


def char_tokenizer():
    """A transformers fast tokenizer: one token per character of CHARS ('?' for anything else)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(CHARS)}, unk_token="?"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=CHAT_TEMPLATE)


def tiny_checkpoint(folder: Path) -> Path:
    """A random GlmForCausalLM: hidden 64, 6 layers, 4 heads (2 KV), vocabulary 96 (seed 0)."""
    from transformers import GlmConfig, GlmForCausalLM

    if (folder / "config.json").is_file():
        return folder
    config = GlmConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                       eos_token_id=None, pad_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    GlmForCausalLM(config).eval().save_pretrained(str(folder))
    return folder


def fuzz_plan(root: Path) -> Path:
    """The tiny model's plan (splits 2, 4, fp32 links) under ``root``, with a tokenizer in every tier."""
    from partitioner.plan.export import cached_plan, fixed_plan

    plan = cached_plan(tiny_checkpoint(root / "model"), fixed_plan((2, 4), ("fp32", "fp32")), root / "plans")
    for tier in ("device", "edge"):
        if not (plan / tier / "tokenizer.json").is_file():
            char_tokenizer().save_pretrained(str(plan / tier))
    return plan


class FuzzStack:
    """Everything the fuzz targets need, started once; ``target(name)`` builds one target on it."""

    def __init__(self, root: Path, threads: int = 1):
        self.root, self.threads = Path(root), threads
        self._exit = ExitStack()

    def __enter__(self) -> FuzzStack:
        from cloud_service.server import serve
        from cloud_service.settings import CloudSettings
        from edge_node.node import EdgeNode
        from edge_node.settings import EdgeSettings

        for name in QUIET:  # a refusal per input logs a warning: millions of lines otherwise
            logging.getLogger(name).setLevel(logging.CRITICAL)
        try:
            self.broker = self._open_broker()  # first: forking a child once gRPC's threads run is unsafe
            self.plan = fuzz_plan(self.root)
            self.cloud = serve(CloudSettings(plan=self.plan, host="127.0.0.1", port=0, threads=self.threads,
                                             dtype="float32", session_ttl_s=SESSION_TTL_S, max_frame_bytes=FRAME_LIMIT))
            self._exit.callback(self.cloud.stop, 0)
            self.node = EdgeNode(EdgeSettings(
                plan=self.plan, broker="", cloud=f"127.0.0.1:{self.cloud.port}", edge_id="fuzz-edge",
                http_host="127.0.0.1", http_port=0, threads=self.threads, speculate=False, connect_timeout_s=120,
                rate_per_key_per_min=0, max_concurrent_per_key=0, default_max_tokens=4, max_tokens_limit=8,
            ))  # fmt: skip
            self._exit.callback(self.node.close)
            self.http_url = self.node.start()
        except BaseException:
            self._exit.close()
            raise
        return self

    def _open_broker(self) -> str:
        from splitglm.processes import Proc, free_port

        proc = Proc("broker", [sys.executable, "-m", "splitglm.broker", "--host", "127.0.0.1", "--port",
                               str(free_port())])
        self._exit.callback(proc.stop)
        return proc.ready(120)

    def target(self, name: str):
        """A new fuzz target of this stack (closed with the stack)."""
        target = getattr(self, f"_{name}")()
        self._exit.callback(target.close)
        return target

    def _frames(self):
        from .frames import FrameDecoderTarget

        return FrameDecoderTarget()

    def _relay(self):
        from edge_node.relay import FrameRelay

        from .relay import RelayTarget

        node = self.node
        relay = FrameRelay(node.settings, node.device_segment, node.segment_lock, node.codec,
                           lambda: node.tail("mqtt"), node.metrics)
        return RelayTarget(relay)

    def _readings(self):
        from device_agent.agent import DeviceAgent
        from device_agent.settings import DeviceSettings

        from .readings import ReadingsTarget

        agent = DeviceAgent(DeviceSettings(plan=self.plan, device_id="fuzz-device", broker=self.broker,
                                           step_timeout_s=0.2, max_attempts=1, max_tokens=2, max_reading_bytes=16384,
                                           max_queued_readings=64, max_readings_per_s=0))  # (the parser's fuzz)
        agent.start()
        self._exit.callback(agent.stop)
        if not agent.ready.wait(60):
            raise RuntimeError("the fuzzed device agent did not subscribe within 60 s")
        return ReadingsTarget(agent, self.broker)

    def _broker(self):
        """Hostile clients at a secured embedded broker of its own (``splitglm secrets``: TLS, logins, client ids
        bound to them, the size cap), MQTT 3.1.1."""
        from protos.mqtt import V311
        from splitglm.mqtt_access import max_packet_bytes
        from splitglm.processes import Proc, free_port

        from .broker import BrokerTarget, secrets_for

        folder = secrets_for(self.root / "broker-secrets", free_port(), FRAME_LIMIT)
        proc = Proc.python("broker-secure", "splitglm.broker", "--secrets", str(folder), "--port", str(free_port()))
        self._exit.callback(proc.stop)
        return BrokerTarget(proc.ready(120), V311, folder, proc.popen.pid, max_packet_bytes(FRAME_LIMIT))

    def _grpc(self):
        from .cloud import GrpcTarget

        return GrpcTarget(f"127.0.0.1:{self.cloud.port}", self.node.spec.hidden_size, self.cloud.batcher.stats,
                          FRAME_LIMIT, SESSION_TTL_S)

    def _http(self):
        from .gateway import HttpTarget

        return HttpTarget(self.http_url)

    def __exit__(self, *exc) -> None:
        self._exit.close()
