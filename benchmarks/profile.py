"""Profiles behind the targets: ONNX Runtime's profiler and torch.profiler, summarised.

    python -m mdx.bench.profile MODEL.onnx [--batch 128] [--threads 2] [--torch-checkpoint W.safetensors]

- `ort_profile`: runs a session with `enable_profiling`, drops the first (warm-up) run, and
  sums the kernel time of every node by operator type; the time outside nodes (run time minus
  node time) is the framework's own overhead per run. The convolution-like kernels' GFLOP/s
  is the network's counted FLOPs (roofline.count_flops) over their time: per-node shapes in
  the profile are unreliable for this, as ORT rewrites convolutions to padded NCHWc layouts.
- `torch_profile`: torch.profiler over a few forward passes: the aten operators by self CPU
  time, how many operator calls one forward makes, and the time per forward.

`explain(records, ...)` turns these into the markdown of results.md's "Analysis" section for
every target the run missed.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from mdx.bench.memory import _inputs

CPU = "CPUExecutionProvider"
# The operators that carry the network's FLOPs (convolutions, incl. ORT's fused and NCHWc forms,
# and the small linear layers); everything else is element-wise or data movement.
FLOP_OPS = ("Conv", "ConvTranspose", "QLinearConv", "Gemm", "MatMul", "FusedConv", "NchwcConv", "MatMulInteger",
            "ConvInteger", "QGemm", "FusedGemm", "QLinearMatMul", "QLinearConvTranspose")


# --- ONNX Runtime ---------------------------------------------------------------------------------


def ort_profile(model_path, batch: int, threads: int, runs: int = 5) -> dict:
    """Per-operator-type kernel time (ms per run) and GFLOP/s of one model at one batch size."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="mdx-bench-prof-") as tmp:
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tmp, "ort")
        sess = ort.InferenceSession(str(model_path), sess_options=so, providers=[CPU])
        meta = sess.get_modelmeta().custom_metadata_map
        C = int(meta.get("mdx.channels", 3))
        H = int(meta.get("mdx.image_size", 16))
        K = len(json.loads(meta.get("mdx.classes", "[]"))) or sess.get_inputs()[2].shape[1]
        T = int(json.loads(meta.get("mdx.schedule", '{"num_train_timesteps": 500}'))["num_train_timesteps"])
        x, t, c = _inputs(batch, (C, H, H), K, T)
        feeds = {"sample": x, "timestep": t, "context": c}
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    run_events = [e for e in events if e.get("name") == "model_run"]
    if len(run_events) < 2:
        return {"error": "the profile has no model_run events"}
    first_end = run_events[0]["ts"] + run_events[0]["dur"]
    timed_runs = run_events[1:]
    run_us = float(np.median([e["dur"] for e in timed_runs]))
    by_op: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "nodes": set()})
    node_us = 0.0
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < first_end:
            continue
        args = e.get("args", {})
        op = args.get("op_name", "?")
        d = by_op[op]
        d["us"] += e["dur"]
        d["nodes"].add(e["name"])
        node_us += e["dur"]
    n = len(timed_runs)
    ops = []
    for op, d in sorted(by_op.items(), key=lambda kv: -kv[1]["us"]):
        ms = d["us"] / n / 1e3
        ops.append({"op": op, "ms_per_run": round(ms, 4), "share": d["us"] / node_us if node_us else None,
                    "nodes": len(d["nodes"])})
    return {"model": Path(model_path).name, "batch": batch, "threads": threads, "runs": n,
            "run_ms": run_us / 1e3, "node_ms": node_us / n / 1e3,
            "overhead_ms": max(run_us - node_us / n, 0.0) / 1e3, "ops": ops}


# --- torch ----------------------------------------------------------------------------------------


class _stderr_muted:
    """Point file descriptor 2 at /dev/null for a moment (C++ libraries write there directly)."""

    def __enter__(self):
        import sys

        sys.stderr.flush()
        self.saved = os.dup(2)
        self.null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(self.null, 2)
        return self

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)
        os.close(self.null)
        return False



def torch_profile(model, sample_shape, num_classes: int, T: int, batch: int, threads: int, runs: int = 5) -> dict:
    """aten operators by self CPU time over `runs` forward passes (after one warm-up)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    x, t, c = (torch.from_numpy(a) for a in _inputs(batch, sample_shape, num_classes, T))
    with torch.inference_mode():
        model(x, t, c)
        t0 = time.perf_counter()
        for _ in range(runs):
            model(x, t, c)
        plain_ms = (time.perf_counter() - t0) / runs * 1e3
        with _stderr_muted():  # kineto prints its start/stop and CUDA probing to fd 2
            prof = profile(activities=[ProfilerActivity.CPU])
            prof.__enter__()
        try:
            for _ in range(runs):
                model(x, t, c)
        finally:
            with _stderr_muted():
                prof.__exit__(None, None, None)
    rows = []
    total_self = 0.0
    calls = 0
    for ev in prof.key_averages():
        total_self += ev.self_cpu_time_total
        if ev.key.startswith("aten::"):
            calls += ev.count
        rows.append((ev.key, ev.self_cpu_time_total, ev.count))
    rows.sort(key=lambda r: -r[1])
    top = [{"op": k, "ms_per_forward": us / runs / 1e3, "share": us / total_self if total_self else None,
            "calls_per_forward": cnt / runs} for k, us, cnt in rows[:10]]
    return {"batch": batch, "threads": threads, "runs": runs, "forward_ms": plain_ms,
            "aten_calls_per_forward": calls / runs, "top": top}


# --- markdown -------------------------------------------------------------------------------------


def ort_table(p: dict, top: int = 8) -> str:
    if "error" in p:
        return f"_{p['error']}_"
    lines = [f"ORT profile of {p['model']}, batch {p['batch']}, {p['threads']} threads: run {p['run_ms']:.2f} ms, "
             f"in kernels {p['node_ms']:.2f} ms, framework overhead {p['overhead_ms']:.2f} ms.", "",
             "| op type | nodes | ms/run | share of kernel time |", "|---|---|---|---|"]
    for o in p["ops"][:top]:
        lines.append(f"| {o['op']} | {o['nodes']} | {o['ms_per_run']:.3f} | {100 * o['share']:.1f}% |")
    return "\n".join(lines)


def torch_table(p: dict, top: int = 8) -> str:
    lines = [f"torch.profiler, batch {p['batch']}, {p['threads']} threads: {p['forward_ms']:.2f} ms per forward "
             f"(unprofiled), {p['aten_calls_per_forward']:.0f} aten calls per forward.", "",
             "| operator | calls/forward | self ms/forward | share of self time |", "|---|---|---|---|"]
    for o in p["top"][:top]:
        lines.append(f"| {o['op']} | {o['calls_per_forward']:.0f} | {o['ms_per_forward']:.3f} | "
                     f"{100 * o['share']:.1f}% |")
    return "\n".join(lines)


def _op(p: dict, name: str) -> dict | None:
    return next((o for o in p.get("ops", []) if o["op"] == name), None)


def conv_share(p: dict, flops_per_run: float | None = None) -> tuple[float, float | None]:
    """(share of kernel time in conv-like ops, the network's FLOPs per run over that time in GFLOP/s)."""
    ms = sum(o["ms_per_run"] for o in p.get("ops", []) if o["op"] in FLOP_OPS)
    share = ms / p["node_ms"] if p.get("node_ms") else 0.0
    return share, (flops_per_run / 1e9 / (ms / 1e3) if flops_per_run and ms > 0 else None)


class _Profiles:
    """Profiles of the default network, each made once (they take seconds)."""

    def __init__(self, net, threads: int) -> None:
        self.net, self.threads, self.cache = net, threads, {}

    def ort(self, precision: str, batch: int) -> dict | None:
        key = ("ort", precision, batch)
        if key not in self.cache and precision in self.net.onnx:
            self.cache[key] = ort_profile(self.net.onnx[precision], batch, self.threads)
        return self.cache.get(key)

    def torch(self, batch: int) -> dict | None:
        net, key = self.net, ("torch", batch)
        if key not in self.cache and net.torch_model is not None:
            self.cache[key] = torch_profile(net.torch_model, net.sample_shape, net.num_classes,
                                            net.num_train_timesteps, batch, self.threads)
        return self.cache.get(key)


def _explain_ddim(prof: _Profiles, batch: int) -> list[str]:
    tp, op = prof.torch(batch), prof.ort("fp32", batch)
    parts = [torch_table(tp), "", ort_table(op), ""]
    if op and "error" not in op:
        parts.append(f"Per forward: torch {tp['forward_ms']:.2f} ms with {tp['aten_calls_per_forward']:.0f} "
                     f"aten calls vs ORT {op['run_ms']:.2f} ms ({op['overhead_ms']:.2f} ms outside kernels); "
                     f"ratio {tp['forward_ms'] / op['run_ms']:.2f}x.")
    return parts


def _explain_int8(prof: _Profiles, batch: int, flops: float | None) -> list[str]:
    p8, p32 = prof.ort("int8", batch), prof.ort("fp32", batch)
    parts = [ort_table(p8), "", ort_table(p32), ""]
    if p8 and p32 and "error" not in p8 and "error" not in p32:
        qdq = sum(o["ms_per_run"] for o in p8["ops"] if o["op"] in ("QuantizeLinear", "DequantizeLinear"))
        s8, g8 = conv_share(p8, flops and flops * batch)
        s32, g32 = conv_share(p32, flops and flops * batch)
        parts.append(f"int8 run {p8['run_ms']:.2f} ms vs fp32 {p32['run_ms']:.2f} ms. Conv-like kernels: "
                     f"int8 {100 * s8:.0f}% of kernel time at {g8 or 0:.0f} GOP/s, fp32 {100 * s32:.0f}% at "
                     f"{g32 or 0:.0f} GFLOP/s. Quantize/DequantizeLinear: {qdq:.2f} ms/run "
                     f"({100 * qdq / p8['node_ms']:.0f}% of int8 kernel time).")
    return parts


def _explain_peak(prof: _Profiles, batch: int, flops: float | None, peak_gflops: float | None) -> list[str]:
    p = prof.ort("fp32", batch)
    parts = [ort_table(p), ""]
    if p and "error" not in p:
        s, g = conv_share(p, flops and flops * batch)
        parts.append(f"Conv-like kernels take {100 * s:.0f}% of the kernel time at {g or 0:.0f} GFLOP/s"
                     + (f" ({100 * g / peak_gflops:.0f}% of the {peak_gflops:.0f} GFLOP/s matmul peak)"
                        if g and peak_gflops else "")
                     + "; the rest is element-wise work (GELU's Erf, normalisation, adds) that does no "
                       "counted FLOPs but costs time.")
    return parts


def explain(records: list[dict], net, threads: int, peak_gflops: float | None, budget=None, log=print) -> str:
    """Profile-based markdown for each missed target (empty when all targets were met)."""
    from mdx.bench.report import evaluate_targets

    missed = {t["key"]: t for t in evaluate_targets(records) if t["met"] is False}
    flops = getattr(net, "flops_per_image", None)
    prof, parts = _Profiles(net, threads), []
    for key, t in missed.items():
        v = t["value"]
        shown = f"{100 * v:.0f}%" if key.startswith("peak") else f"{v:.2f}x"
        parts.append(f"### Missed: {t['target']} (measured {shown})")
        batch = 1 if key == "ddim25_b1" else 32 if key == "int8_b32" else 128
        if budget is not None and not budget.allows(5 + batch * 0.05):
            parts.append(f"_profile skipped: {budget.reason('profiling', 5 + batch * 0.05)}_")
            continue
        log(f"  profiling for the missed target {key} (batch {batch})")
        if key.startswith("ddim25"):
            parts += _explain_ddim(prof, batch)
        elif key.startswith("int8"):
            parts += _explain_int8(prof, batch, flops)
        elif key.startswith("peak"):
            parts += _explain_peak(prof, batch, flops, peak_gflops)
        parts.append("")
    return "\n".join(parts)


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m mdx.bench.profile", description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--torch-checkpoint", type=Path, default=None, help="also torch.profiler this mdx checkpoint")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args(argv)
    print(ort_table(ort_profile(a.model, a.batch, a.threads, a.runs), a.top))
    if a.torch_checkpoint is not None:
        from mdx.train.checkpoint import load_checkpoint

        ck = load_checkpoint(a.torch_checkpoint)
        mc = ck.model_config
        print()
        print(torch_table(torch_profile(ck.model, (mc.in_channels, mc.image_size, mc.image_size), mc.n_classes,
                                        mc.num_train_timesteps, a.batch, a.threads, a.runs), a.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
