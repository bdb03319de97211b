"""The record schema of results.json, in one place.

Every record holds at least

    suite       "forward" | "sampling" | "training" | "quality" | "roofline"
    backend     "torch" | "onnxruntime"
    provider    "CPUExecutionProvider" | "CUDAExecutionProvider" | "OpenVINOExecutionProvider" | "cpu" | "cuda"
    precision   "fp32" | "fp16" | "int8" (training: the training precision)
    sampler, steps, guidance    sampling and quality runs (None elsewhere)
    batch       images per network evaluation (sampling: images generated per run)
    median_s, p90_s, images_per_s   (None for a skipped record)

plus `gflops`, `peak_share`, `peak_mem_mb` where they apply, a `variant` naming what was
measured ("eager", "compile", "io_binding", "cuda_graph", ...), the `network`, and
`skipped: "<reason>"` for an item that could not or did not run.
"""

from __future__ import annotations

import math

from mdx.bench.timing import Stats

SUITES = ("forward", "sampling", "training", "quality", "serving")
BACKENDS = ("torch", "onnxruntime")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider", "cpu", "cuda")
PRECISIONS = ("fp32", "fp16", "int8", "bf16", "amp")
REQUIRED = ("suite", "backend", "provider", "precision", "sampler", "steps", "guidance", "batch",
            "median_s", "p90_s", "images_per_s")


def make_record(suite: str, backend: str, provider: str, precision: str, batch: int | None, *,
                stats: Stats | None = None, sampler: str | None = None, steps: int | None = None,
                guidance: float | None = None, skipped: str | None = None, images: int | None = None,
                **extra) -> dict:
    """One record; `images` is how many images one timed call produces (default: batch)."""
    rec = {"suite": suite, "backend": backend, "provider": provider, "precision": precision, "sampler": sampler,
           "steps": steps, "guidance": guidance, "batch": batch, "median_s": None, "p90_s": None,
           "images_per_s": None}
    if stats is not None:
        per_call = images if images is not None else batch
        rec.update(median_s=stats.median_s, p90_s=stats.p90_s,
                   images_per_s=(per_call / stats.median_s if per_call and stats.median_s > 0 else None),
                   repeats=stats.repeats, number=stats.number, samples_s=list(stats.samples_s))
    if skipped is not None:
        rec["skipped"] = skipped
    rec.update(extra)
    return rec


def check_record(rec: dict) -> list[str]:
    """Problems with a record (empty when it follows the schema)."""
    problems = [f"missing {k}" for k in REQUIRED if k not in rec]
    if problems:
        return problems
    if rec["suite"] not in SUITES:
        problems.append(f"suite {rec['suite']!r} not in {SUITES}")
    if rec["backend"] not in BACKENDS:
        problems.append(f"backend {rec['backend']!r} not in {BACKENDS}")
    if rec["provider"] not in PROVIDERS:
        problems.append(f"provider {rec['provider']!r} not in {PROVIDERS}")
    if rec["precision"] not in PRECISIONS:
        problems.append(f"precision {rec['precision']!r} not in {PRECISIONS}")
    if rec.get("skipped"):
        if not isinstance(rec["skipped"], str):
            problems.append("skipped must be a reason string")
        return problems
    if rec["suite"] == "quality":  # scores, one sampling run each: no repeat statistics
        for k in ("fd", "conditional_accuracy"):
            if k not in rec:
                problems.append(f"quality record lacks {k}")
        return problems
    for k in ("median_s", "p90_s"):
        v = rec[k]
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            problems.append(f"{k} must be a positive number, got {v!r}")
    if not problems and rec["p90_s"] < rec["median_s"]:
        problems.append("p90_s < median_s")
    return problems
