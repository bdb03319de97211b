"""results.json -> results.md (tables, targets, skipped items) and PNG plots (matplotlib).

    python -m mdx.bench.report benchmarks/results/<run>/results.json [--readme benchmarks/README.md]

`--readme` replaces the README's CPU table (between `<!-- mdx-bench:cpu:start -->` and
`<!-- mdx-bench:cpu:end -->`) and, when the results hold CUDA figures, its GPU table
(`<!-- mdx-bench:gpu:start/end -->`) with this run's.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from mdx.runtime.fileio import atomic_write, write_text

from mdx.bench import headline

CPU_EP, CUDA_EP, OPENVINO_EP = "CPUExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider"
TARGETS = {
    "ddim25_b1": ("ONNX Runtime CPU fp32 >= 2x torch eager, whole DDIM-25 sampling, batch 1", 2.0),
    "ddim25_b128": ("ONNX Runtime CPU fp32 >= 1.5x torch eager, whole DDIM-25 sampling, batch 128", 1.5),
    "int8_b32": ("int8 >= 1.5x ONNX Runtime fp32, forward, batch 32", 1.5),
    "int8_b128": ("int8 >= 1.5x ONNX Runtime fp32, forward, batch 128", 1.5),
    "peak_b128": ("ONNX Runtime fp32 forward at batch 128 >= 50% of the measured matmul peak", 0.5),
}


# --- small helpers ---------------------------------------------------------------------------


def is_cpu(r: dict) -> bool:
    return r.get("provider") in ("cpu", CPU_EP, OPENVINO_EP)


def is_cuda(r: dict) -> bool:
    return r.get("provider") in ("cuda", CUDA_EP)


def label(r: dict) -> str:
    """A short backend label: torch eager, torch.compile, ORT fp32, ORT int8, ORT fp16 CUDA graph ..."""
    variant = r.get("variant")
    if r["backend"] == "torch":
        name = {"eager": "torch eager", "compile": "torch.compile", "cuda_graph": "torch CUDA graph",
                "bf16_autocast": "torch bf16 autocast"}.get(variant, f"torch {variant}" if variant else "torch")
        return name if r.get("precision", "fp32") in ("fp32", "bf16") else f"{name} {r['precision']}"
    name = f"ORT {r['precision']}" if r.get("provider") != OPENVINO_EP else f"ORT+OpenVINO {r['precision']}"
    if variant == "cuda_graph":
        name += " CUDA graph"
    return name


def _ms(s) -> str:
    return "-" if s is None else (f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.2f}" if s < 1 else f"{s * 1e3:.0f}")


def _s(s) -> str:
    return "-" if s is None else f"{s:.3f}" if s < 10 else f"{s:.1f}"


def _num(v, fmt="{:.1f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def live(records, **match) -> list[dict]:
    """Non-skipped records whose fields equal `match`."""
    return [r for r in records if not r.get("skipped") and all(r.get(k) == v for k, v in match.items())]


def default_network(records) -> str | None:
    """The network of the torch forward records (the default architecture)."""
    for r in records:
        if r.get("suite") == "forward" and r.get("backend") == "torch" and r.get("network"):
            return r["network"]
    for r in records:
        if r.get("suite") == "forward" and r.get("network"):
            return r["network"]
    return None


# --- targets -----------------------------------------------------------------------------------


def _sampling_ratio(records, batch: int) -> float | None:
    torch_r = [r for r in live(records, suite="sampling", sampler="ddim", steps=25, guidance=1.0, batch=batch,
                               backend="torch") if is_cpu(r)]
    ort_r = [r for r in live(records, suite="sampling", sampler="ddim", steps=25, guidance=1.0, batch=batch,
                             backend="onnxruntime", precision="fp32") if is_cpu(r)]
    if torch_r and ort_r:
        return torch_r[0]["median_s"] / ort_r[0]["median_s"]
    return None


def _forward(records, network, precision, batch) -> dict | None:
    rs = [r for r in live(records, suite="forward", backend="onnxruntime", precision=precision, batch=batch,
                          network=network) if is_cpu(r)]
    return rs[0] if rs else None


def evaluate_targets(records: list[dict]) -> list[dict]:
    """The issue's targets as measured: value, threshold, met (None when not measured)."""
    net = default_network(records)
    values = {"ddim25_b1": _sampling_ratio(records, 1), "ddim25_b128": _sampling_ratio(records, 128)}
    for b in (32, 128):
        f32, i8 = _forward(records, net, "fp32", b), _forward(records, net, "int8", b)
        values[f"int8_b{b}"] = f32["median_s"] / i8["median_s"] if f32 and i8 else None
    f32 = _forward(records, net, "fp32", 128)
    values["peak_b128"] = f32.get("peak_share") if f32 else None
    out = []
    for key, (text, threshold) in TARGETS.items():
        v = values.get(key)
        out.append({"key": key, "target": text, "threshold": threshold, "value": v,
                    "met": None if v is None else bool(v >= threshold)})
    return out


# --- tables ------------------------------------------------------------------------------------


CONTENDED_PERCENT = 25.0  # other processes' mean CPU (% of one core) above which a run is flagged


def contention_banner(results: dict) -> str:
    """A warning when other processes used the CPU during the run (empty otherwise)."""
    during = results.get("load_during") or {}
    mean = during.get("other_cpu_percent_mean")
    if mean is None or mean < CONTENDED_PERCENT:
        return ""
    cores = results.get("machine", {}).get("cores") or "?"
    return (f"> **Contended run.** Other processes used {mean:.0f}% CPU on average during this run (median "
            f"{during.get('other_cpu_percent_p50', 0):.0f}%, max {during.get('other_cpu_percent_max', 0):.0f}%; "
            f"100% = one core, the machine has {cores}). Every side competed for the cores, and unevenly: "
            "multi-threaded torch (OpenMP barriers) degrades far more than ONNX Runtime when its threads are "
            "descheduled, so ratios here overstate ONNX Runtime's advantage. Rerun on an idle machine.")


def machine_section(results: dict) -> str:
    m = results.get("machine", {})
    v = m.get("versions", {})
    lines = [f"- host: {m.get('host')}; {m.get('platform')}",
             f"- CPU: {m.get('cpu_model')}, {m.get('cores')} cores usable "
             f"(physical {m.get('physical_cores')}), flags {', '.join(m.get('cpu_flags') or []) or '-'}, "
             f"{m.get('memory_gb')} GB RAM"]
    gpus = m.get("gpus") or []
    lines.append("- GPU: " + ("; ".join(f"{g['name']} ({g['memory_gb']} GB), driver {g['driver']}" for g in gpus)
                              if gpus else "none (no NVIDIA GPU seen by NVML)"))
    lines.append(f"- versions: torch {v.get('torch')}, onnxruntime {v.get('onnxruntime-gpu') or v.get('onnxruntime')}, "
                 f"numpy {v.get('numpy')}, onnx {v.get('onnx')}, python {v.get('python')}")
    run = results.get("run", {})
    if run:
        lines.append(f"- run: `{run.get('command')}`, {run.get('mode')} suite, threads {run.get('threads')} "
                     f"(torch = ONNX Runtime intra-op), {run.get('seconds', 0):.0f} s, started {run.get('started')}")
    during = results.get("load_during") or {}
    if during.get("other_cpu_percent_mean") is not None:
        lines.append(f"- other processes' CPU during the run: mean {during['other_cpu_percent_mean']:.0f}%, median "
                     f"{during.get('other_cpu_percent_p50', 0):.0f}%, max {during['other_cpu_percent_max']:.0f}% "
                     f"(100% = one core; sampled every {during.get('period_s', 1):g} s)")
    for key, what in (("load_start", "load at start"), ("load_end", "load at end")):
        snap = results.get(key)
        if snap:
            busy = snap.get("busy_processes") or []
            text = ", ".join(f"{b['command'][:60]} ({b['cpu_percent']:.0f}% CPU)" for b in busy) or "none"
            lines.append(f"- {what}: loadavg {snap.get('loadavg')}; other busy processes: {text}")
    rf = results.get("roofline", {})
    if rf.get("cpu_peak"):
        p = rf["cpu_peak"]
        lines.append(f"- fp32 matmul peak ({', '.join(f'{n}^3' for n in p.get('sizes', [p['n']]))}, {p['threads']} threads): "
                     + ", ".join(f"{k} {g:.0f}" for k, g in p["gflops"].items())
                     + f" GFLOP/s -> peak {p['peak_gflops']:.0f} GFLOP/s ({p['peak_backend']})")
    if rf.get("cpu_peak", {}).get("peaks"):
        p = rf["cpu_peak"]
        lines.append("- roofs per precision (each record's % of peak is against its own precision's): "
                     + ", ".join(f"{k} {v:.0f} ({p['peak_backends'][k]})" for k, v in p["peaks"].items())
                     + (f"; {p['bf16_note']}" if p.get("bf16_note") else ""))
    if rf.get("gpu_peak"):
        lines.append(f"- GPU fp32 matmul peak: {rf['gpu_peak']['peak_gflops']:.0f} GFLOP/s ({rf['gpu_peak']['dtype']})")
    for name, fl in (rf.get("flops") or {}).items():
        lines.append(f"- network {name}: {fl['gflop_per_image']:.3f} GFLOP per image per forward ({fl['method']})")
    return "\n".join(lines)


def forward_table(records: list[dict], cuda: bool = False, batches: tuple | None = None,
                  network: str | None = None) -> str:
    rows = []
    sel = [r for r in live(records, suite="forward") if (is_cuda(r) if cuda else is_cpu(r))]
    if network is not None:
        sel = [r for r in sel if r.get("network") == network]
    if batches is not None:
        sel = [r for r in sel if r["batch"] in batches]
    base = {(r.get("network"), r["batch"], r.get("precision")): r["median_s"] for r in sel
            if r["backend"] == "torch" and r.get("variant") == "eager"}
    base32 = {(r.get("network"), r["batch"]): r["median_s"] for r in sel
              if r["backend"] == "torch" and r.get("variant") == "eager" and r.get("precision") == "fp32"}
    for r in sorted(sel, key=lambda r: (r.get("network") or "", r["batch"], r["backend"] != "torch", label(r))):
        ref = base.get((r.get("network"), r["batch"], r.get("precision"))) or base32.get((r.get("network"), r["batch"]))
        speed = f"{ref / r['median_s']:.2f}x" if ref else "-"
        mem = _num(r.get("peak_mem_mb"), "{:.0f}")
        extra = f" (compile {r['compile_s']:.0f} s)" if r.get("compile_s") is not None else ""
        rows.append([r.get("network") or "-", r["batch"], label(r) + extra, _ms(r["median_s"]), _ms(r["p90_s"]),
                     _num(r["images_per_s"], "{:.0f}"), _num(r.get("gflops")), _pct(r.get("peak_share")), speed, mem])
    header = ["network", "batch", "backend", "median ms", "p90 ms", "images/s", "GFLOP/s", "% of peak",
              "vs torch eager", "peak mem MB"]
    return table(header, rows) if rows else "_no measurements_"


def sampling_table(records: list[dict], cuda: bool = False) -> str:
    # peers (torch channels_last/bf16, OpenVINO) are in the headline table, not in this one
    sel = [r for r in live(records, suite="sampling") if (is_cuda(r) if cuda else is_cpu(r)) and not r.get("peer")]
    groups: dict = {}
    for r in sel:
        key = (r["sampler"], r["steps"], r["guidance"], r["batch"])
        groups.setdefault(key, {})[(r["backend"], r["precision"])] = r
    rows = []
    order = {"ddpm": 0, "ddim": 1, "dpmpp": 2}
    for key in sorted(groups, key=lambda k: (k[3], order.get(k[0], 9), k[1], k[2])):
        g = groups[key]
        t, o, i8 = g.get(("torch", "fp32")), g.get(("onnxruntime", "fp32")), g.get(("onnxruntime", "int8"))
        sp = f"{t['median_s'] / o['median_s']:.2f}x" if t and o else "-"
        rows.append([key[0], key[1], f"{key[2]:g}", key[3], _s(t and t["median_s"]), _s(t and t["p90_s"]),
                     _s(o and o["median_s"]), _s(o and o["p90_s"]), sp,
                     (f"{_s(i8['median_s'])} ({t['median_s'] / i8['median_s']:.2f}x)" if i8 and t else "-"),
                     _num(o.get("max_abs_diff") if o else None, "{:.1e}")])
    header = ["sampler", "steps", "guidance", "batch", "torch s", "torch p90", "ORT fp32 s", "ORT p90",
              "ORT speed-up", "ORT int8 s", "max abs diff"]
    return table(header, rows) if rows else "_no measurements_"


def training_table(records: list[dict]) -> str:
    rows = []
    for r in live(records, suite="training"):
        k = r.get("steps") or 1
        extra = f"{r['ratio_vs_seed']:.2f}x vs seed" if r.get("ratio_vs_seed") else ""
        rows.append([r.get("variant", "-"), r.get("provider"), r.get("precision"), r["batch"], k, _s(r["median_s"]),
                     _s(r["p90_s"]), _ms(r["median_s"] / k), _num(r["images_per_s"], "{:.0f}"), extra])
    return table(["loop", "device", "precision", "batch", "steps/block", "median s/block", "p90 s/block",
                  "ms/step", "images/s", ""], rows) if rows else "_no measurements_"


def quality_table(records: list[dict]) -> str:
    rows = []
    sel = [r for r in records if r.get("suite") == "quality" and not r.get("skipped")]
    for r in sorted(sel, key=lambda r: (r.get("network") or "", r["precision"], r["sampler"], r["steps"])):
        rows.append([r.get("network", "-"), r["precision"], r["sampler"], r["steps"], f"{r['guidance']:g}",
                     r["batch"], _num(r.get("fd"), "{:.2f}"), _num(r.get("fd_floor"), "{:.2f}"),
                     _num(r.get("conditional_accuracy"), "{:.3f}"), _s(r.get("sampling_s"))])
    return table(["model", "precision", "sampler", "steps", "guidance", "n", "FD", "FD floor", "cond. accuracy",
                  "sampling s"], rows) if rows else "_no measurements_"


def skipped_section(records: list[dict]) -> str:
    reasons: dict[str, list[str]] = {}
    for r in records:
        if r.get("skipped"):
            what = f"{r['suite']} {label(r)} {r.get('provider')}" + (f" b{r['batch']}" if r.get("batch") else "")
            if r.get("sampler"):
                what += f" {r['sampler']}-{r.get('steps')} g{r.get('guidance')}"
            reasons.setdefault(r["skipped"], []).append(what)
    if not reasons:
        return "_nothing skipped_"
    lines = []
    for reason, items in reasons.items():
        shown = ", ".join(items[:6]) + (f", ... ({len(items)} items)" if len(items) > 6 else "")
        lines.append(f"- **{reason}**: {shown}")
    return "\n".join(lines)


def targets_section(records: list[dict]) -> str:
    rows = []
    for t in evaluate_targets(records):
        v = t["value"]
        shown = "-" if v is None else (f"{100 * v:.0f}%" if t["key"].startswith("peak") else f"{v:.2f}x")
        rows.append([t["target"], shown, "not measured" if t["met"] is None else ("met" if t["met"] else "**missed**")])
    return table(["target", "measured", "verdict"], rows)


def cpu_summary_table(results: dict) -> str:
    """The README's CPU table: forward at batch 1 and 128 for the default network."""
    recs = results.get("records", [])
    return forward_table(recs, batches=(1, 128), network=default_network(recs))


# --- plots -------------------------------------------------------------------------------------


def save_figure(fig, path: Path) -> Path:
    """A matplotlib figure to PNG, atomically (fileio.atomic_write); the figure is closed either way."""
    import matplotlib.pyplot as plt

    try:
        with atomic_write(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)
    return path


def plot_forward(records: list[dict], out: Path, cuda: bool = False) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in live(records, suite="forward") if (is_cuda(r) if cuda else is_cpu(r))]
    if not sel:
        return []
    tag = "cuda" if cuda else "cpu"
    paths = []
    for net in sorted({r.get("network") for r in sel}, key=str):
        rs = [r for r in sel if r.get("network") == net]
        series: dict[str, dict[int, float]] = {}
        for r in rs:
            series.setdefault(label(r), {})[r["batch"]] = r["median_s"]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name, pts in sorted(series.items()):
            bs = sorted(pts)
            ax1.plot(bs, [pts[b] * 1e3 for b in bs], marker="o", label=name)
        ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="median latency per forward (ms)",
                title=f"forward latency ({tag}, {net})")
        ax1.legend(fontsize=8)
        base_name = "torch eager" if "torch eager" in series else "ORT fp32"
        base = series.get(base_name, {})
        for name, pts in sorted(series.items()):
            bs = [b for b in sorted(pts) if b in base]
            if bs:
                ax2.plot(bs, [base[b] / pts[b] for b in bs], marker="o", label=name)
        ax2.axhline(1.0, color="grey", lw=0.8)
        ax2.set(xscale="log", xlabel="batch size", ylabel=f"speed-up over {base_name}",
                title=f"speed-up vs {base_name} ({tag}, {net})")
        if ax2.get_legend_handles_labels()[0]:
            ax2.legend(fontsize=8)
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() else "_" for ch in str(net))
        path = out / f"forward_{tag}_{safe}.png"
        save_figure(fig, path)
        paths.append(path)
    return paths


def plot_sampling(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in live(records, suite="sampling", backend="onnxruntime", precision="fp32")
           if is_cpu(r) and r.get("speedup_vs_torch")]
    if not sel:
        return []
    fig, ax = plt.subplots(figsize=(8, 4))
    names = [f"{r['sampler']}-{r['steps']}\ng{r['guidance']:g} b{r['batch']}" for r in sel]
    ax.bar(range(len(sel)), [r["speedup_vs_torch"] for r in sel], color="tab:blue")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(sel)), names, fontsize=7)
    ax.set(ylabel="ORT fp32 speed-up over torch", title="whole sampling runs (CPU)")
    fig.tight_layout()
    path = out / "sampling_speedup_cpu.png"
    save_figure(fig, path)
    return [path]


def plot_quality(records: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in records if r.get("suite") == "quality" and not r.get("skipped")]
    if not sel:
        return []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for (sampler, precision) in sorted({(r["sampler"], r["precision"]) for r in sel}):
        rs = sorted([r for r in sel if r["sampler"] == sampler and r["precision"] == precision],
                    key=lambda r: r["steps"])
        style = "-" if precision == "fp32" else "--"
        steps = [r["steps"] for r in rs]
        ax1.plot(steps, [r.get("fd") for r in rs], style, marker="o", label=f"{sampler} {precision}")
        ax2.plot(steps, [r.get("conditional_accuracy") for r in rs], style, marker="o", label=f"{sampler} {precision}")
    floors = [r.get("fd_floor") for r in sel if r.get("fd_floor") is not None]
    if floors:
        ax1.axhline(float(sum(floors) / len(floors)), color="grey", lw=0.8, ls=":", label="FD floor")
    ax1.set(xscale="log", xlabel="sampling steps", ylabel="FD (classifier features)", title="quality: FD")
    ax2.set(xscale="log", xlabel="sampling steps", ylabel="conditional accuracy", title="quality: accuracy")
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    path = out / "quality_vs_steps.png"
    save_figure(fig, path)
    return [path]


# --- the document -------------------------------------------------------------------------------


def render_markdown(results: dict, plots: list[Path] = ()) -> str:
    recs = results.get("records", [])
    notes = results.get("notes", [])
    banner = contention_banner(results)
    parts = ["# mdx-bench results", ""] + ([banner, ""] if banner else []) + ["## Machine", "", machine_section(results), "",
             "## Targets", "", targets_section(recs), "",
             "## Headline: mdx's best deployed configuration against torch at its best", "",
             headline.markdown(recs), ""]
    if results.get("analysis"):
        parts += ["## Analysis (profiles)", "", results["analysis"], ""]
    parts += ["## (a) Forward, CPU", "",
              "One network evaluation; median and p90 of >= 5 interleaved timed repeats (each repeat times a bunch "
              "of back-to-back calls for small batches). GFLOP/s = counted FLOPs / median; % of peak = against the "
              "fp32 matmul peak measured in this run (int8 rows count the same network FLOPs as integer operations "
              "against that fp32 peak, so their share can pass 100%). Peak mem = peak RSS of a fresh process running "
              "only that backend (ONNX Runtime processes do not import torch).", "",
              forward_table(recs), "",
              "## (a) Forward, CUDA", "", forward_table(recs, cuda=True), "",
              "## (b) Sampling, CPU", "",
              "Whole runs; each timed repeat is one run (A B A B between torch and ONNX Runtime); batch = images "
              "generated (guidance != 1 evaluates 2x that). torch side: the torch reference sampler for DDPM/DDIM; "
              "for DPM-Solver++ the runtime's numpy sampler driving the torch model (there is no torch "
              "DPM-Solver++ reference). max abs diff: torch vs ORT final samples (same noise).", "",
              sampling_table(recs), "",
              "## (b) Sampling, CUDA", "", sampling_table(recs, cuda=True), "",
              "## (c) Training throughput", "", training_table(recs), "",
              "## (d) Quality (full suite)", "", quality_table(recs), ""]
    if any(r.get("suite") == "serving" for r in recs):
        from mdx.bench import serving

        parts += ["## (e) Serving (--suites serving)", "",
                  "Concurrent clients, each sending one request after another for the load's duration, at the "
                  "model's recommended settings: the batching engine against one request at a time "
                  "(generate() behind a lock), on the same provider; latencies include queueing.", "",
                  serving.markdown(recs), ""]
    if plots:
        parts += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if notes:
        parts += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    parts += ["## Skipped", "", skipped_section(recs), ""]
    return "\n".join(parts)


def write_report(results: dict, out: Path) -> list[Path]:
    """results.md and the plots into `out`; the files written."""
    out = Path(out)
    recs = results.get("records", [])
    plots = []
    for fn in (lambda: plot_forward(recs, out), lambda: plot_forward(recs, out, cuda=True),
               lambda: plot_sampling(recs, out), lambda: plot_quality(recs, out)):
        plots += fn()
    md = out / "results.md"
    write_text(md, render_markdown(results, plots))
    return [md, *plots]


def _replace_between(text: str, tag: str, body: str) -> str:
    start, end = f"<!-- mdx-bench:{tag}:start -->", f"<!-- mdx-bench:{tag}:end -->"
    if start not in text or end not in text:
        return text
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{start}\n{body}\n{end}{tail}"


def update_readme(readme: Path, results: dict, results_dir: str = "") -> bool:
    """Put this run's CPU (and, if measured, GPU) table into the README's marked sections."""
    readme = Path(readme)
    text = readme.read_text()
    m = results.get("machine", {})
    recs = results.get("records", [])
    run = results.get("run", {})
    cpu = (f"Measured {run.get('started', '?')[:10]} on {m.get('cpu_model')} ({m.get('cores')} cores), "
           f"`{run.get('command', 'mdx-bench')}`" + (f", results in `{results_dir}`" if results_dir else "") + ".\n\n"
           + cpu_summary_table(results))
    banner = contention_banner(results)
    if banner:
        cpu = banner + "\n\n" + cpu
    new = _replace_between(text, "cpu", cpu)
    if [r for r in live(recs, suite="forward") if is_cuda(r)]:
        gpus = m.get("gpus") or [{}]
        gpu = (f"Measured on {gpus[0].get('name', '?')} (driver {gpus[0].get('driver', '?')}).\n\n"
               + forward_table(recs, cuda=True, batches=(1, 128), network=default_network(recs)))
        new = _replace_between(new, "gpu", gpu)
    if new != text:
        write_text(readme, new)
        return True
    return False


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mdx.bench.report", description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--readme", type=Path, default=None)
    a = ap.parse_args(argv)
    results = json.loads(a.results.read_text())
    for p in write_report(results, a.results.parent):
        print(p)
    if a.readme is not None:
        print(f"{a.readme}: {'updated' if update_readme(a.readme, results, str(a.results.parent)) else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
