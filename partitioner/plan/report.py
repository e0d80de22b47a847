"""``report.md`` and ``report.png``: why the planner cut where it did."""

from __future__ import annotations

from pathlib import Path

from partitioner.plan.measure import profile_for
from partitioner.plan.topology import Topology


def _plot(path: Path, plan: dict, data: dict, threads: int, num_layers: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prof = profile_for(data, "none", threads)
    layers = list(range(num_layers))
    decode = [prof.layers[i].decode_ms for i in layers]
    prefill = [prof.layers[i].prefill_ms_per_token for i in layers]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.bar([i - 0.2 for i in layers], decode, width=0.4, label="decode step (ms)")
    ax.bar([i + 0.2 for i in layers], prefill, width=0.4, label="prefill (ms / token)")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"ms on this machine, {threads} threads, fp32")
    twin = ax.twinx()
    hidden = prof.hidden_size
    codec = data["codecs"].get(plan["codecs"]["edge_cloud"], {})
    cuts = list(range(num_layers + 1))
    twin.plot(cuts, [hidden * 4] * len(cuts), "k--", label="activation per token, fp32 (bytes)")
    if codec:
        twin.plot(
            cuts,
            [hidden * codec["step_bytes_per_element"]] * len(cuts),
            "k:",
            label=f"activation per token, {plan['codecs']['edge_cloud']} (bytes)",
        )
    twin.set_ylabel("bytes per token crossing a cut")
    twin.set_ylim(0, hidden * 4 * 1.3)
    for k, name, height in zip(plan["splits"], ("k1 device|edge", "k2 edge|cloud"), (0.95, 0.87)):
        ax.axvline(k - 0.5, color="red")
        ax.text(k - 0.4, max(decode + prefill) * height, name, color="red")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower right", fontsize=8)
    ax.set_title(f"{plan['topology']}: per-layer latency, activation size and the chosen cuts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _candidates_table(plan: dict) -> list[str]:
    rows = [
        "| rank | splits | codecs (dev-edge / edge-cloud) | compression (dev / edge) | CPU decode (dev / edge) "
        "| TTFT ms | per-token ms | expected ms | bytes/token dev-edge | bytes/token edge-cloud | Δ ppl % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(plan["candidates"], 1):
        decode = c.get("cpu_decode") or {}
        rows.append(
            f"| {i} | {c['splits'][0]},{c['splits'][1]} | {c['codecs']['device_edge']} / {c['codecs']['edge_cloud']} "
            f"| {c['compression']['device']} / {c['compression']['edge']} "
            f"| {decode.get('device', 'eager')} / {decode.get('edge', 'eager')} | {c['ttft_ms']:.1f} "
            f"| {c['per_token_ms']:.2f} | {c['expected_ms']:.1f} | {c['link_bytes_per_token']['device_edge']:.0f} "
            f"| {c['link_bytes_per_token']['edge_cloud']:.0f} | {c['perplexity_delta_pct']:.2f} |"
        )
    return rows


def _ms(value: float | None) -> str:
    return "- (no compiler)" if value is None else f"{value:.3f}"


def _exactness(entry: dict) -> str:
    return "exact" if entry["name"] == "none" else "low-bit"


def cpu_decode_lines(plan: dict, data: dict) -> list[str]:
    """How each CPU tier decodes, and the draft cost speculation weighs (plan.json's ``cpu_decode``)."""
    chosen = plan.get("cpu_decode") or {}
    if not chosen:
        return []
    fast = plan["fast_tail"]
    draft = (plan.get("predicted", {}).get("paths") or {}).get("fast", {}).get("step_ms")
    lines = [
        "## CPU decode",
        "",
        f"Each CPU tier runs its decode steps on the path of the shorter measured step (`runtime/cpu_decode.py`): "
        f"device `{chosen['device']}`, edge `{chosen['edge']}`, fast tail `{chosen['fast_tail']}`. The agents "
        "take it unless `--cpu-decode eager|compiled` overrides it. The edge's layers are "
        f"`{plan['compression']['edge']['name']}` ({_exactness(plan['compression']['edge'])}), the fast tail's "
        f"`{fast['compression']['name']}` ({_exactness(fast['compression'])}).",
    ]
    if draft is not None:
        lines += [
            "",
            f"A drafted token costs the edge {draft:.2f} ms (its [0, k2) and the fast tail, on those paths): the "
            "draft cost speculation weighs. Speculation's tokens are the plain accurate path's whatever the "
            "paths and precisions: the cloud accepts only drafts equal to its own tokens.",
        ]
    measured = data.get("cpu_decode") or {}
    if measured:
        lines += ["", "One decode step of a sample of the layers, eager and compiled side by side:", "",
                  "| compression@threads | layers | eager ms | compiled ms | compiled / eager |",
                  "|---|---|---|---|---|"]
        lines += [f"| {k} | {m['layers']} | {m['eager_ms']:.3f} | {_ms(m['compiled_ms'])} "
                  f"| {'-' if m['compiled_ms'] is None else format(m['compiled_ms'] / m['eager_ms'], '.2f')} |"
                  for k, m in sorted(measured.items())]
    tail = fast.get("cpu_decode") or {}
    if tail.get("compiled_ms") is not None:
        lines += ["", f"The fast tail's whole step: eager {tail['eager_ms']:.3f} ms, compiled "
                      f"{tail['compiled_ms']:.3f} ms at {tail['threads']} threads."]
    return lines + [""]


def _measured_section(measured: dict) -> list[str]:
    from partitioner.plan.live import format_table

    s, rows = measured["summary"], measured["candidates"]
    verdict = "within" if s["within_5pct"] else "NOT within"
    return [
        "## Predicted vs measured",
        "",
        "Each candidate ran live: device, edge and cloud as three processes on 127.0.0.1 (TCP, the "
        "candidate's codecs and compression), links shaped in user space (the sender sleeps RTT/2 + "
        "bytes*8/bandwidth per message, both directions), one thread per process (they share this "
        "machine's cores), so predictions are also shown re-evaluated with the 1-thread profiles. Tier "
        "speed is applied by time dilation: measured = wall + sum over tiers of compute * (1/speed_factor - 1). "
        f"Medians over {rows[0]['repeats']} runs per workload, at most {rows[0]['max_decode_steps']} decode "
        "steps (per-token time extrapolated). Rows 1.. are the planner's ranking, then contrasting splits. "
        "Error: measured expected vs predicted@live-threads.",
        "",
        *format_table(rows),
        "",
        f"The planner's choice {s['chosen_splits']} is {verdict} 5% of the best measured candidate "
        f"{s['best_measured_splits']} (gap {s['gap_pct']:+.1f}%).",
        "",
    ]


def write_report(out: Path, plan: dict, topo: Topology, data: dict, num_layers: int) -> Path:
    threads = min(topo.tiers["edge"].threads, 2)
    _plot(out / "report.png", plan, data, threads, num_layers)
    k1, k2 = plan["splits"]
    lines = [
        f"# Plan for topology `{topo.name}`",
        "",
        topo.description,
        "",
        f"- device: embedding + layers [0, {k1}), compression `{plan['compression']['device']['name']}`",
        f"- edge: layers [{k1}, {k2}) (holds [0, {k1}) too for HTTP clients), "
        f"compression `{plan['compression']['edge']['name']}`",
        f"- cloud: layers [{k2}, {num_layers}) + norm + LM head",
        f"- codecs: device->edge `{plan['codecs']['device_edge']}`, edge->cloud `{plan['codecs']['edge_cloud']}`",
        f"- predicted: TTFT {plan['predicted']['ttft_ms']:.1f} ms, {plan['predicted']['per_token_ms']:.2f} ms/token,"
        f" expected request latency {plan['predicted']['expected_ms']:.1f} ms",
        f"- quality cost: +{plan['perplexity_delta_pct']:.2f}% perplexity (floor {topo.max_perplexity_increase_pct}%)",
        "",
        f"Minimised: {plan['objective']}.",
        "",
        "## Best candidates",
        "",
        *_candidates_table(plan),
        "",
        "![per-layer latency, activation size and cuts](report.png)",
        "",
        *cpu_decode_lines(plan, data),
        "## Measurements used",
        "",
        "Codecs (both links, at splits L/3, 2L/3; the planner charges half to each link):",
        "",
        "| codec | bytes/element | step bytes/element | Δ ppl % | agreement |",
        "|---|---|---|---|---|",
        *[
            f"| {n} | {r['bytes_per_element']} | {r['step_bytes_per_element']} | {r['perplexity_delta_pct']} "
            f"| {r['token_agreement']} |"
            for n, r in data["codecs"].items()
        ],
        "",
        "Compression (whole model; the planner charges it per compressed layer):",
        "",
        "| compression | Δ ppl % | agreement |",
        "|---|---|---|",
        *[f"| {n} | {r['perplexity_delta_pct']} | {r['token_agreement']} |" for n, r in data["compression"].items()],
        "",
    ]
    if plan.get("measured"):
        lines += _measured_section(plan["measured"])
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
