"""``splitglm bench all``'s report: REPORT.md and its plots, from results.json alone.

``write_report(out, results)`` can be rerun on a saved ``results.json`` (``python -m
splitglm.bench.report OUT``); a section that is missing or failed is said to be so.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

SYSTEMS = ("cloud-only", "edge-only", "device-only", "split-accurate", "split-speculative", "split-fast")


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _header(r: dict) -> list[str]:
    m, mod = r["machine"], r["model"]
    lines = [
        "# splitglm: split inference against the alternatives",
        "",
        f"Made {r['date']} by `{r['command']}`.",
        "",
        f"- **machine:** {m['cpu']}, {m['cores']} cores, {m['memory_mib']} MiB; Python {m['python']}, torch "
        f"{m['torch']}; no GPU (the GPU figures are a saved result, dated below)",
        f"- **model:** `{mod['name']}` ({mod['layers']} layers, hidden {mod['hidden']}); the agents' plan: "
        f"`{r['plan']}`",
        f"- **scale:** {'quick' if r['quick'] else 'full'} (`results.json` → `scale`); wall time per section: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in r["wall_s"].items()),
    ]
    for name, error in r.get("errors", {}).items():
        lines.append(f"- **section {name} failed:** `{error.splitlines()[0]}` (traceback in results.json)")
    return lines + [""]


# ---- sections ----------------------------------------------------------------------------------------


def codecs_md(rows: list[dict]) -> list[str]:
    texts = list(dict.fromkeys(r["text"] for r in rows))
    by = {(r["codec"], r["text"]): r for r in rows}
    out = [
        "## 1. Codecs",
        "",
        f"The hidden states at splits {rows[0]['splits'][0]},{rows[0]['splits'][1]} of the real model, each codec on "
        f"both links, on {' and '.join(f'`{t}`' for t in texts)} ({rows[0]['tokens']} tokens each). Cells read "
        f"{' / '.join(texts)}; a codec's figure on the text its constants were tuned on is marked *(tuned)*.",
        "",
        "| codec | tuned on | B/element prefill | B/element step | Δ perplexity | agreement |",
        "|---|---|---|---|---|---|",
    ]
    for codec in dict.fromkeys(r["codec"] for r in rows):
        cells = [by.get((codec, t)) for t in texts]

        def join(key, fmt, cells=cells):
            return " / ".join(("-" if c is None else fmt(c[key]) + ("" if c["held_out"] else " *(tuned)*"))
                              for c in cells)

        tuned = next((c["tuned_on"] for c in cells if c), None) or "—"
        out.append(f"| `{codec}` | {tuned} | {join('bytes_per_element', lambda v: f'{v:.4f}')} "
                   f"| {join('step_bytes_per_element', lambda v: f'{v:.4f}')} "
                   f"| {join('perplexity_delta_pct', lambda v: f'{v:+.3f}%')} "
                   f"| {join('token_agreement', lambda v: f'{v:.4f}')} |")
    return out + ["", "![codecs](codecs.png)", ""]


def splits_md(rows: list[dict]) -> list[str]:
    from partitioner.plan.live import format_table

    out = ["## 2. Splits: predicted against measured", "",
           "Each topology's best candidates and contrasting splits, run live on the real processes: the broker, "
           "the cloud and the edge on loopback, the plan's device tier in the bench's process over the device "
           "agent's MQTT link; each link (device to broker, edge to cloud) goes through the link proxy, which "
           "delays every chunk by RTT/2 and serialises it at the link's bandwidth; each tier's compute is "
           "time-dilated to its `speed_factor`; medians of the runs stated.", "",
           "| topology | links (set → measured) | chosen | chosen / best measured |", "|---|---|---|---|"]
    for r in rows:
        links = "; ".join(f"{n}: {m['rtt_ms']:g} ms, {m['bandwidth_mbit_s']:g} Mbit/s → {m['measured_rtt_ms']} ms, "
                          f"{m['measured_mbit_s']:g} Mbit/s" for n, m in r["links"].items())
        c = r["chosen"]
        out.append(f"| {r['topology']} | {links} | {c['splits'][0]},{c['splits'][1]}; {c['codecs']['device_edge']} / "
                   f"{c['codecs']['edge_cloud']}; device {c['compression']['device']} | "
                   f"**{r['chosen_over_best']:.3f}** |")
    for r in rows:
        reps = r["candidates"][0]["repeats"]
        out += ["", f"**{r['topology']}** ({reps} runs per workload, at most "
                f"{r['candidates'][0]['max_decode_steps']} decode steps each):", "", *format_table(r["candidates"])]
    return out + ["", "![splits](splits.png)", ""]


def baselines_md(rows: list[dict]) -> list[str]:
    out = ["## 3. Baselines on the same topology", "",
           "Cloud-only sends the prompt's text over both links (through the link proxy) to one process running "
           "the whole model, which streams the tokens back over HTTP; edge-only does the same over the "
           "device-edge link alone; device-only runs everything on the device. The split rows are the "
           "topology's plan, finished by the cloud (accurate) or by the edge's fast tail (fast). All but "
           "`split-speculative` run on the live rig of section 2 (same processes, links and time dilation); "
           "`split-speculative` runs on the real agents (HTTP edge, gRPC cloud behind a delaying "
           "proxy of the topology's edge-cloud RTT, the demo plan, this machine's speed): its per-token figures "
           "are beside the same run without speculation, not beside the live rig's rows.", ""]
    for topo in dict.fromkeys(r["topology"] for r in rows):
        out += [f"**{topo}**", "",
                "| system | TTFT ms (median [min, max]) | per token p50 / p99 ms | uplink B/request | what leaves the "
                "device | quality vs the full model |", "|---|---|---|---|---|---|"]
        mine = sorted((r for r in rows if r["topology"] == topo), key=lambda r: SYSTEMS.index(r["system"])
                      if r["system"] in SYSTEMS else 99)
        for r in mine:
            ttft = "-" if r.get("ttft_ms") is None else (
                f"{r['ttft_ms']:.1f} [{r['ttft_spread_ms'][0]:.0f}, {r['ttft_spread_ms'][1]:.0f}]"
                if r.get("ttft_spread_ms") else f"{r['ttft_ms']:.1f}")
            q = r.get("quality") or {}
            if "tokens_equal_accurate" in q:
                quality = f"tokens equal the accurate path's in {_pct(q['tokens_equal_accurate'])} of requests"
            else:
                quality = (f"Δppl {_f(q.get('perplexity_delta_pct'), 2)}%"
                           + (f", agreement {q['agreement']:.3f}" if q.get("agreement") is not None else ""))
            per = f"{_f(r.get('per_token_p50_ms'))} / {_f(r.get('per_token_p99_ms'))}"
            if r["system"] == "split-speculative":  # tokens come in bursts: the mean per token says more
                without = _f(r.get("per_token_mean_ms_without"))
                per = (f"mean {_f(r.get('per_token_mean_ms'))} (without speculation {without}; gaps {per}; "
                       f"{r.get('tokens_per_round_trip')} tokens per round trip)")
            fits = "" if r.get("fits", True) else " (does not fit the device's memory)"
            uplink = "-" if r.get("uplink_bytes") is None else f"{r['uplink_bytes']:,}"
            out.append(f"| {r['system']}{fits} | {ttft} | {per} | {uplink} | {r['leaves_device']} | {quality} |")
        out += ["", *verdict(mine), ""]
    return out + ["![baselines](baselines.png)", ""]


def verdict(rows: list[dict]) -> list[str]:
    """Where the split loses and where it wins, in words, from the numbers."""
    by = {r["system"]: r for r in rows}
    split, lines = by.get("split-accurate"), []
    if split is None:
        return lines
    for other in ("cloud-only", "edge-only", "device-only"):
        o = by.get(other)
        if o is None or o.get("per_token_p50_ms") is None:
            continue
        for key, what in (("ttft_ms", "TTFT"), ("per_token_p50_ms", "per token")):
            a, b = split.get(key), o.get(key)
            if a is None or b is None or b == 0:
                continue
            word = "wins" if a < b else "loses"
            lines.append(f"- {what}: the accurate split {word} against {other} ({a:.1f} vs {b:.1f} ms, "
                         f"{100 * (a - b) / b:+.0f}%).")
        if o.get("leaves_device", "").startswith("raw text"):
            lines.append(f"- Privacy: {other} sends the raw prompt off the device; the split sends hidden states "
                         f"({split['uplink_bytes']:,} B against {o['uplink_bytes']:,} B uplink).")
    return lines


def router_md(rows: list[dict]) -> list[str]:
    t = rows[0]["trace"]
    phases = " → ".join(f"{p['rtt_ms']:g} ms x{p['requests']}" for p in t["phases"])
    measured = ", ".join(f"{m['rtt_ms']:g} → {m['measured_rtt_ms']} ms" for m in rows[0]["links"])
    out = ["## 4. Router", "",
           f"A trace of edge-cloud RTT {phases} (the delaying proxy; measured {measured}), "
           f"{t['requests_per_policy']} greedy chat requests per policy, max_tokens {t['max_tokens']}, each with a "
           "latency budget; the agents on this machine.", "",
           "| speculation | policy | budget met | accurate tokens | accurate (calm) | p50 ms | p99 ms | agreement "
           "| degraded | errors |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {'on' if r['speculate'] else 'off'} | {r['policy']} | {_pct(r['budget_met_frac'])} | "
                   f"{_pct(r['accurate_token_frac'])} | {_pct(r['accurate_token_frac_calm'])} | {r['p50_ms']:.0f} | "
                   f"{r['p99_ms']:.0f} | {_pct(r['token_agreement'])} | {r['degraded']} | {r['errors']} |")
    return out + [""]


def batching_md(b: dict) -> list[str]:
    out = ["## 5. Batching", "", "The cloud tier over gRPC, every session stepping at once (`bench cloud`):", "",
           "| cloud | sessions | decode tokens/s (all sessions) | mean step ms | mean batch |", "|---|---|---|---|---|"]
    for r in b["cpu"]:
        out.append(f"| CPU, {r['threads']} thread(s), this machine | {r['sessions']} | {r['decode_steps_per_s']} | "
                   f"{r['mean_step_ms']} | {r['mean_batch_size']} |")
    if g := b.get("gpu"):
        for r in g["rows"]:
            out.append(f"| {g['card']} ({g['shape']}{', random weights' if g['random_weights'] else ''}; saved "
                       f"{g['date']}) | {r['sessions']} | {r['tokens_per_s']} | {r['step_ms']} | {r['sessions']} |")
        out += ["", f"The GPU rows are the saved result `{Path(g['file']).name}` (`{g['command']}`), made on "
                f"{g['date']} on an {g['card']}."]
    return out + ["", "![batching](batching.png)", ""]


def fanin_md(rows: list[dict]) -> list[str]:
    out = ["## 6. MQTT fan-in", "",
           f"Simulated devices in one process, each with its own MQTT login, on {rows[0].get('broker', 'Mosquitto')}; "
           f"{rows[0].get('readings_per_device')} readings per device, {rows[0].get('interval_s')} s apart; "
           f"each answer {rows[0].get('max_tokens')} token(s) through device, edge and cloud.", "",
           "| devices | readings | answers | delivered | lost | duplicated | reading → answer p50 / p99 ms "
           "| broker CPU | edge CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['devices']} | {r['readings']} | {r['answers']} | {r['delivered']} | {r['lost']} | "
                   f"{r['duplicated']} | {_f(r['p50_ms'], 0)} / {_f(r['p99_ms'], 0)} | {_f(r['broker_cpu_pct'])}% | "
                   f"{_f(r['edge_cpu_pct'])}% |")
    return out + [""]


TITLES = {"codecs": "1. Codecs", "splits": "2. Splits: predicted against measured",
          "baselines": "3. Baselines on the same topology", "router": "4. Router", "batching": "5. Batching",
          "fanin": "6. MQTT fan-in"}
MD = {"codecs": codecs_md, "splits": splits_md, "baselines": baselines_md, "router": router_md,
      "batching": batching_md, "fanin": fanin_md}


# ---- plots -------------------------------------------------------------------------------------------


def plots(out: Path, r: dict) -> list[str]:
    """The PNGs that the sections' data allow; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    if rows := r.get("codecs"):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for text, marker in zip(dict.fromkeys(x["text"] for x in rows), "os^"):
            mine = [x for x in rows if x["text"] == text]
            ax.scatter([x["bytes_per_element"] for x in mine], [x["perplexity_delta_pct"] for x in mine],
                       marker=marker, label=f"{text}, prefill")
            ax.scatter([x["step_bytes_per_element"] for x in mine], [x["perplexity_delta_pct"] for x in mine],
                       marker=marker, facecolors="none", edgecolors="k", label=f"{text}, decode step")
            for x in mine:
                ax.annotate(x["codec"], (x["bytes_per_element"], x["perplexity_delta_pct"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("bytes per element on the wire")
        ax.set_ylabel("perplexity change, %")
        ax.legend(fontsize=7)
        save(fig, "codecs.png")
    if rows := r.get("splits"):
        fig, ax = plt.subplots(figsize=(6, 4.2))
        for s in rows:
            c = s["candidates"]
            ax.scatter([(x["predicted_live"] or x["predicted"])["expected_ms"] for x in c],
                       [x["measured"]["expected_ms"] for x in c], label=s["topology"])
        lim = ax.get_xlim()
        ax.plot(lim, lim, "k:", linewidth=0.8)
        ax.set_xlabel("predicted expected latency per request, ms")
        ax.set_ylabel("measured, ms")
        ax.legend(fontsize=7)
        save(fig, "splits.png")
    if rows := [x for x in r.get("baselines") or [] if x.get("per_token_p50_ms") is not None]:
        topos = list(dict.fromkeys(x["topology"] for x in rows))
        systems = [s for s in SYSTEMS if any(x["system"] == s for x in rows)]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        width = 0.8 / len(systems)
        for i, system in enumerate(systems):
            for ax, key in zip(axes, ("ttft_ms", "per_token_p50_ms")):
                values = [next((x.get(key) or 0 for x in rows if x["topology"] == t and x["system"] == system), 0)
                          for t in topos]
                ax.bar([j + i * width for j in range(len(topos))], values, width, label=system)
        for ax, title in zip(axes, ("TTFT, ms", "per token p50, ms")):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(topos))], topos)
            ax.set_title(title)
        axes[0].legend(fontsize=7)
        save(fig, "baselines.png")
    if b := r.get("batching"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([x["sessions"] for x in b["cpu"]], [x["decode_steps_per_s"] for x in b["cpu"]], "o-",
                label="CPU cloud (this machine)")
        if g := b.get("gpu"):
            ax.plot([x["sessions"] for x in g["rows"]], [x["tokens_per_s"] for x in g["rows"]], "s-",
                    label=f"{g['card']}, {g['shape']} (saved {g['date']})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent sessions")
        ax.set_ylabel("decode tokens/s, all sessions")
        ax.legend(fontsize=7)
        save(fig, "batching.png")
    return made


def write_report(out: str | Path, results: dict) -> Path:
    """Write OUT/REPORT.md (and the plots) from ``results``; return its path."""
    out = Path(out)
    lines = _header(results)
    for name, render in MD.items():
        if results.get(name):
            lines += render(results[name])
        elif name in results.get("sections", []):
            lines += [f"## {TITLES[name]}", "", "Not measured: the section failed (see above).", ""]
    results["plots"] = plots(out, results)
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    saved = json.loads((folder / "results.json").read_text())
    sys.stdout.write(f"{write_report(folder, saved)}\n")
