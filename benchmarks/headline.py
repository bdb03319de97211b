"""The headline: mdx's best deployed configuration against the best torch configuration.

At each batch size (forward passes, and whole sampling runs at the headline's settings) the
fastest live record of each side is taken:

- mdx: ONNX Runtime through mdx.runtime (the CPU provider or the OpenVINO plugin; fp32, bf16
  compute, or the int8 file, whose FD the model card holds within 5% of fp32);
- torch: eager, channels_last, bf16 autocast (native bf16 only) and torch.compile.

ratio = best torch median / best mdx median (> 1: mdx is faster). Skipped records never count,
so a configuration that cannot run on this machine cannot win or lose here.
"""

from __future__ import annotations

CPU_PROVIDERS = ("cpu", "CPUExecutionProvider", "OpenVINOExecutionProvider")
DEPLOYED_PRECISIONS = ("fp32", "bf16", "int8")


def label(r: dict) -> str:
    """torch eager / torch channels_last / torch bf16 autocast / torch.compile / ORT CPU fp32 /
    ORT+OpenVINO bf16 ..."""
    if r["backend"] == "torch":
        variant = r.get("variant") or "eager"
        return {"compile": "torch.compile", "bf16_autocast": "torch bf16 autocast"}.get(variant, f"torch {variant}")
    where = "ORT+OpenVINO" if r.get("provider") == "OpenVINOExecutionProvider" else "ORT CPU"
    return f"{where} {r['precision']}"


def _live(records: list[dict], suite: str) -> list[dict]:
    return [r for r in records if r.get("suite") == suite and not r.get("skipped") and r.get("median_s")
            and r.get("provider") in CPU_PROVIDERS]


def _best(rows: list[dict]) -> dict | None:
    return min(rows, key=lambda r: r["median_s"], default=None)


def _row(suite: str, setting: str, batch: int, group: list[dict]) -> dict | None:
    mdx = _best([r for r in group if r["backend"] == "onnxruntime" and r["precision"] in DEPLOYED_PRECISIONS])
    torch = _best([r for r in group if r["backend"] == "torch"])
    if mdx is None or torch is None:
        return None
    return {"suite": suite, "setting": setting, "batch": batch, "mdx": label(mdx), "mdx_s": mdx["median_s"],
            "torch": label(torch), "torch_s": torch["median_s"], "ratio": torch["median_s"] / mdx["median_s"],
            "candidates": sorted({label(r) for r in group})}


def compute(records: list[dict]) -> list[dict]:
    """One row per forward batch (networks with a torch side) and per sampling setting and batch
    that ran with its peers."""
    rows = []
    forward: dict = {}
    for r in _live(records, "forward"):
        forward.setdefault((r.get("network"), r["batch"]), []).append(r)
    for (network, batch), group in sorted(forward.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        row = _row("forward", f"one forward pass ({network})", batch, group)
        rows += [row] if row else []
    sampling: dict = {}
    for r in _live(records, "sampling"):
        sampling.setdefault((r["sampler"], r["steps"], r["guidance"], r["batch"]), []).append(r)
    for (sampler, steps, guidance, batch), group in sorted(sampling.items()):
        if not any(r.get("peer") for r in group):
            continue  # a plain torch-vs-ORT comparison: not the headline's
        row = _row("sampling", f"{sampler}-{steps}, guidance {guidance:g}", batch, group)
        rows += [row] if row else []
    return rows


def markdown(records: list[dict]) -> str:
    rows = compute(records)
    if not rows:
        return "_no headline: no batch has both an mdx and a torch measurement_"
    lines = ["| suite | setting | batch | best mdx | median | best torch | median | mdx speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['setting']} | {r['batch']} | {r['mdx']} | {_t(r['mdx_s'])} | "
                     f"{r['torch']} | {_t(r['torch_s'])} | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def _t(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"
