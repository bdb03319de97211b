"""Peak RSS per backend, each measured in a fresh Python process.

A process's peak RSS only ever grows, so measuring several backends in one
process would charge each with the peaks of the ones before it. Instead every backend runs
in its own interpreter (`python -m mdx.bench.memory SPEC`): it imports only what that
backend needs (ONNX Runtime children never import torch, as in a runtime-only deployment),
records its RSS after the imports and after loading the model, then runs two forward passes
per batch size in increasing order and reads its peak RSS (VmHWM) after each. The figure for batch b
is therefore the process's peak while serving batches up to b, which is the peak at b since
memory grows with the batch. The child prints one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from mdx.bench.timing import current_rss_mb, peak_rss_mb


def _inputs(batch: int, sample_shape, num_classes: int, T: int):
    import numpy as np

    rng = np.random.default_rng(batch)
    x = rng.standard_normal((batch, *sample_shape), dtype=np.float32)
    t = rng.integers(0, T, size=batch).astype(np.float32)
    c = np.zeros((batch, num_classes), dtype=np.float32)
    c[np.arange(batch), np.arange(batch) % num_classes] = 1.0
    return x, t, c


def child_main(spec: dict) -> dict:
    """Run in the fresh process: spec = {kind: "torch"|"torch.compile"|"onnxruntime", ...}."""
    threads = int(spec["threads"])
    batches = sorted(int(b) for b in spec["batches"])  # increasing: the peak after b is the peak at b
    out = {"kind": spec["kind"], "baseline_rss_mb": current_rss_mb()}
    if spec["kind"] in ("torch", "torch.compile"):
        import torch

        from mdx.train.checkpoint import load_checkpoint

        torch.set_num_threads(threads)
        out["import_rss_mb"] = current_rss_mb()
        ckpt = load_checkpoint(spec["checkpoint"])
        model = ckpt.model.eval()
        fn = torch.compile(model, dynamic=False) if spec["kind"] == "torch.compile" else model
        shape = (ckpt.model_config.in_channels, ckpt.model_config.image_size, ckpt.model_config.image_size)
        K, T = ckpt.model_config.n_classes, ckpt.model_config.num_train_timesteps
        out["loaded_rss_mb"] = current_rss_mb()
        peaks = {}
        with torch.inference_mode():
            for b in batches:
                x, t, c = _inputs(b, shape, K, T)
                fn(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c))
                fn(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(c))
                peaks[b] = peak_rss_mb()
    else:
        from mdx.runtime.session import OnnxDenoiser

        out["import_rss_mb"] = current_rss_mb()
        den = OnnxDenoiser.load(spec["model"], provider="CPUExecutionProvider", threads=threads)
        out["loaded_rss_mb"] = current_rss_mb()
        peaks = {}
        for b in batches:
            x, t, c = _inputs(b, den.info.sample_shape, den.info.num_classes, den.info.schedule.num_train_timesteps)
            bound = den.binding(b)
            bound.sample[...] = x
            bound.timestep[...] = t
            bound.context[...] = c
            bound.run()
            bound.run()
            peaks[b] = peak_rss_mb()
        out["torch_imported"] = "torch" in sys.modules
    out["peak_rss_mb"] = {str(b): v for b, v in peaks.items()}
    return out


def measure_peak_rss(spec: dict, timeout_s: float = 300.0) -> dict:
    """Run `child_main(spec)` in a fresh interpreter; its result, or {"error": ...}."""
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "mdx.bench.memory", json.dumps(spec)], capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s:.0f} s"}
    seconds = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    result = json.loads(lines[-1])
    result["seconds"] = round(seconds, 2)
    return result


if __name__ == "__main__":
    print(json.dumps(child_main(json.loads(sys.argv[1]))), flush=True)
