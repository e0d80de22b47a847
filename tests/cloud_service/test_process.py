"""``python -m cloud_service`` as a real process: ready line, health, a generation, SIGTERM; settings and exit codes."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cloud_service.__main__ import main
from cloud_service.server import SERVICE
from cloud_service.settings import CloudSettings, SettingsError
from tests.procs import Proc

from .conftest import Run, Stream, reference


def test_the_process_serves_then_stops_cleanly_on_sigterm(tiny_plan, edge, tiny_glm):
    proc = Proc.python("cloud", "cloud_service", "--plan", tiny_plan, "--host", "127.0.0.1", "--port", "0",
                       "--threads", "1", "--grace-s", "1")
    try:
        url = proc.ready(60)
        assert url.startswith("grpc://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", SERVICE):
                reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING

        run = Run(edge, port, [4, 8, 15, 16, 23, 42], 5)()
        assert run.tokens == reference(tiny_glm, run.prompt, 5)[0]

        hanging = Stream(port)  # a stream still open at SIGTERM must not keep the process alive
        other = Run(edge, port, [1, 2, 3], 5)
        hanging.step(other.frame(0, 0, other.prompt))
        started = time.monotonic()
        code = proc.stop(timeout=20)
        assert code == 0, proc.output
        assert time.monotonic() - started < 10
        assert "NOT_SERVING" in proc.output and "stopped: grpc://127.0.0.1" in proc.output
        with pytest.raises(grpc.RpcError):
            hanging.end()
    finally:
        proc.stop()


def test_bad_settings_exit_2_with_a_clear_message(tiny_plan, caplog):
    assert main(["--plan", tiny_plan, "--port", "70000"]) == 2
    assert "port" in caplog.text and "65535" in caplog.text
    assert main(["--plan", tiny_plan, "--device", "tpu"]) == 2
    assert "device" in caplog.text
    assert main(["--plan", tiny_plan, "--config", "/no/such.yaml"]) == 2
    with pytest.raises(SystemExit) as info:
        main(["--plan", tiny_plan, "--no-such-flag", "1"])
    assert info.value.code == 2


def test_plan_folder_problems_and_a_taken_port_exit_1(tmp_path, tiny_plan, cloud, caplog):
    assert main(["--plan", str(tmp_path / "missing"), "--port", "0"]) == 1
    assert "no plan.json" in caplog.text
    assert main(["--plan", tiny_plan, "--host", "127.0.0.1", "--port", str(cloud.port)]) == 1
    assert f"cannot listen on 127.0.0.1:{cloud.port}" in caplog.text


def test_flags_override_env_which_overrides_yaml(tiny_plan, tmp_path, monkeypatch):
    config = tmp_path / "cloud.yaml"
    config.write_text(f"plan: {tiny_plan}\nmax_batch: 4\nmax_sessions: 10\nsession_ttl_s: 2.5\n")
    monkeypatch.setenv("SPLITGLM_CLOUD_MAX_SESSIONS", "20")
    settings = CloudSettings.load(["--config", str(config), "--max-batch", "8", "--max-frame-bytes", "4096"])
    assert (settings.max_batch, settings.max_sessions, settings.session_ttl_s) == (8, 20, 2.5)
    assert settings.max_frame_bytes == 4096 and settings.port == 50051 and settings.device == "auto"
    with pytest.raises(SettingsError, match="max-batch"):
        CloudSettings.load(["--config", str(config), "--max-batch", "0"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without CUDA")
def test_an_fp8_plan_without_a_gpu_exits_2_and_says_why(tiny_glm, tiny_plan, tmp_path, caplog):
    from partitioner.plan.export import cached_plan, fixed_plan
    from partitioner.plan.measure import compression_entry

    fp8_plan = fixed_plan((2, 4), ("fp32", "fp32"),
                          compression={"cloud": {**compression_entry("torch", "none"), "gpu_weights": "fp8"}})
    folder = str(cached_plan(tiny_glm, fp8_plan, tmp_path))
    assert main(["--plan", folder, "--port", "0"]) == 2
    assert "the plan's cloud tier" in caplog.text and "fp8 weights" in caplog.text
    assert "--dtype bfloat16" in caplog.text
    caplog.clear()
    assert main(["--plan", tiny_plan, "--port", "0", "--dtype", "fp8"]) == 2
    assert "dtype asks for fp8 weights, but it runs on cuda only" in caplog.text
