"""Suite (b): whole sampling runs, torch against ONNX Runtime, same noise, interleaved.

Sides of every comparison (timed A B A B, one whole run per timed repeat):

- torch, DDPM and DDIM: `mdx.train.reference.sample_reference`, the torch reference sampler
  (sampler arithmetic in torch, on the torch model, in inference mode).
- torch, DPM-Solver++: the reference sampler has no DPM-Solver++, so the torch side is the
  runtime's numpy `DPMSolverSampler` driving the torch model (`torch_sampler_loop` below:
  the same loop as mdx.runtime.pipeline.generate with the model call swapped). The sampler
  arithmetic is then identical on both sides and only the network differs.
- ONNX Runtime: `mdx.runtime.pipeline.generate` on an OnnxDenoiser (CPU provider, IO binding).

Both sides draw their noise as DESIGN.md says (numpy default_rng(seed): x_T, then one draw
per noisy step), so they produce the same images up to float rounding; `max_abs_diff` of
each record is the largest difference between the two sides' final samples, a check that
the comparison is like for like. With guidance s != 1 both sides run the conditional and
unconditional halves as one batch of 2n (`model_batch`).

Warm-up: one network evaluation at the run's batch size on each side before timing, and one
right before every timed run, after the 50 ms idle gap that lets the other side's spinning
threads stop (timing.py); a whole extra run would double the suite's time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mdx.bench.records import make_record
from mdx.bench.timing import InterleavedTimer

CPU = "CPUExecutionProvider"
GUIDANCE = 3.0
SEED = 0


@dataclass(frozen=True)
class Config:
    sampler: str  # "ddpm" | "ddim" | "dpmpp"
    steps: int | None  # None = all T training timesteps (DDPM-T)
    guidance: float
    batch: int


def quick_configs() -> list[Config]:
    """Every sampler and step count at batch 1 with and without guidance, and DDIM-25 at batch 128.
    The two runs the targets are about come first, so a tight time budget never drops them."""
    out = [Config("ddim", 25, 1.0, 1), Config("ddim", 25, 1.0, 128)]
    out += [Config(s, n, g, 1) for s, n in (("ddim", 25), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20), ("ddpm", None))
            for g in (1.0, GUIDANCE) if (s, n, g) != ("ddim", 25, 1.0)]
    return out


def smoke_configs() -> list[Config]:
    """A few short runs for a developer's smoke test (with the tiny T = 20 network)."""
    return [Config("ddim", 5, 1.0, 1), Config("dpmpp", 4, GUIDANCE, 2), Config("ddpm", None, 1.0, 1)]


def full_configs() -> list[Config]:
    """quick, plus DDPM-T at batch 8, every few-step sampler at batch 32 with and without
    guidance and at batch 128 without (with guidance, batch 128 is a 256-image network call:
    the full suite's 30 minutes on 2 cores do not hold it)."""
    few = (("ddim", 25), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20))
    out = quick_configs()
    out.append(Config("ddpm", None, 1.0, 8))
    out += [Config(s, n, g, 32) for s, n in few for g in (1.0, GUIDANCE)]
    out += [Config(s, n, 1.0, 128) for s, n in few if (s, n) != ("ddim", 25)]
    return out


def context_rows(n: int, K: int) -> np.ndarray:
    """One-hot rows, image i gets class i mod K (as mdx-sample's default grid)."""
    c = np.zeros((n, K), dtype=np.float32)
    c[np.arange(n), np.arange(n) % K] = 1.0
    return c


def torch_sampler_loop(model, schedule, sampler: str, steps: int, context: np.ndarray, seed: int,
                       guidance: float, prediction_type: str = "epsilon") -> np.ndarray:
    """The runtime's sampling loop with the torch model as the network (numpy sampler, same noise)."""
    import torch

    from mdx.runtime.samplers import make_sampler

    s = make_sampler(sampler, schedule, prediction_type=prediction_type)
    s.set_timesteps(steps)
    n = len(context)
    C, H = model.config.in_channels, model.config.image_size
    shape = (n, C, H, H)
    guided = guidance != 1.0
    ctx = torch.from_numpy(np.concatenate([context, np.zeros_like(context)]) if guided else context)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape, dtype=np.float32)
    with torch.inference_mode():
        for t in s.timesteps:
            xin = torch.from_numpy(np.concatenate([x, x]) if guided else x)
            out = model(xin, torch.full((len(xin),), float(t)), ctx).numpy()
            if guided:
                out = out[n:] + np.float32(guidance) * (out[:n] - out[n:])
            z = rng.standard_normal(shape, dtype=np.float32) if s.needs_noise(int(t)) else None
            x = s.step(out, int(t), x, noise=z).prev_sample
    return np.clip(x, -1.0, 1.0)


def _torch_side(net, cfg: Config, steps: int, context: np.ndarray):
    import torch

    from mdx.train.reference import sample_reference

    model = net.torch_model
    if cfg.sampler in ("ddim", "ddpm"):
        def run():
            with torch.inference_mode():
                return sample_reference(model, net.schedule, sampler=cfg.sampler, steps=steps, context=context,
                                        seed=SEED, guidance=cfg.guidance, prediction_type="epsilon", device="cpu")
        return run, "mdx.train.reference.sample_reference"
    return (lambda: torch_sampler_loop(model, net.schedule, cfg.sampler, steps, context, SEED, cfg.guidance),
            "torch model + mdx.runtime numpy sampler (no torch DPM-Solver++ reference)")


def estimate_seconds(cfg: Config, steps: int, per_call: dict[str, callable], repeats: int) -> float:
    """Expected wall time of one comparison from the forward suite's per-call estimates."""
    mb = cfg.batch * (2 if cfg.guidance != 1.0 else 1)
    return sum(f(mb) for f in per_call.values()) * (steps + 1) * (repeats + 0.2)


def forward_cost_model(forward_records: list[dict], network: str) -> dict[str, callable]:
    """seconds per network call as a function of the batch, per side, from suite (a) (linear fit
    through the smallest and largest measured batch); a pessimistic default without them."""
    pts: dict[str, dict[int, float]] = {"torch": {}, "onnxruntime": {}}
    for r in forward_records:
        if r.get("suite") != "forward" or r.get("skipped") or r.get("network") != network:
            continue
        if r.get("provider") not in ("cpu", CPU) or r.get("precision") != "fp32":
            continue
        if r.get("variant") in ("eager", "io_binding"):
            pts[r["backend"]][r["batch"]] = r["median_s"]
    out = {}
    for side, p in pts.items():
        if len(p) >= 2:
            b0, b1 = min(p), max(p)
            slope = (p[b1] - p[b0]) / (b1 - b0)
            out[side] = (lambda b, p0=p[b0], b0=b0, s=slope: max(p0 + s * (b - b0), p0))
        else:
            out[side] = lambda b: 0.004 + 0.004 * b
    return out


def run_sampling(net, *, threads: int, configs: list[Config], repeats: int = 5, forward_records=(),
                 budget=None, log=print, int8: bool = False) -> list[dict]:
    """Records of suite (b) on the CPU for `net` (torch model + its fp32 ONNX file)."""
    import torch

    from mdx.runtime.pipeline import generate
    from mdx.runtime.session import OnnxDenoiser

    torch.set_num_threads(threads)
    T = net.num_train_timesteps
    base = {"network": net.name, "threads": threads}
    if "fp32" not in net.onnx:
        return [make_record("sampling", be, prov, "fp32", c.batch, sampler=c.sampler, steps=c.steps or T,
                            guidance=c.guidance, skipped="no fp32 ONNX export", **base)
                for c in configs for be, prov in (("torch", "cpu"), ("onnxruntime", CPU))]
    den = OnnxDenoiser.load(net.onnx["fp32"], provider=CPU, threads=threads)
    den8 = OnnxDenoiser.load(net.onnx["int8"], provider=CPU, threads=threads) if int8 and "int8" in net.onnx else None
    cost = forward_cost_model(list(forward_records), net.name)
    records = []
    for cfg in configs:
        steps = cfg.steps or T
        mb = cfg.batch * (2 if cfg.guidance != 1.0 else 1)
        fields = dict(sampler=cfg.sampler, steps=steps, guidance=cfg.guidance, model_batch=mb, **base)
        expected = estimate_seconds(cfg, steps, cost, repeats)
        if budget is not None and not budget.allows(expected):
            reason = budget.reason(f"{cfg.sampler}-{steps} at batch {cfg.batch}", expected)
            records += [make_record("sampling", "torch", "cpu", "fp32", cfg.batch, skipped=reason, **fields),
                        make_record("sampling", "onnxruntime", CPU, "fp32", cfg.batch, skipped=reason, **fields)]
            log(f"  skipped {cfg}: {reason}")
            continue
        context = context_rows(cfg.batch, net.num_classes)
        torch_run, torch_impl = _torch_side(net, cfg, steps, context)
        results: dict[str, np.ndarray] = {}

        def side(name, fn):
            def call():
                results[name] = fn()
            return call

        def ort_run(d):
            # sampler_options={}: the sampler's defaults, exactly what the torch side runs
            return lambda: generate(d, sampler=cfg.sampler, steps=steps, context=context, guidance=cfg.guidance,
                                    seed=SEED, sampler_options={}).samples
        fns = {"torch": side("torch", torch_run), "onnxruntime fp32": side("onnxruntime fp32", ort_run(den))}
        if den8 is not None:
            fns["onnxruntime int8"] = side("onnxruntime int8", ort_run(den8))
        # warm-up: one network evaluation at this batch on each side, before the first timed run
        # and again right before every timed run (after the idle gap: it wakes that side's threads)
        xs, ts_, cs = torch.zeros((mb, *net.sample_shape)), torch.zeros(mb), torch.zeros((mb, net.num_classes))

        def torch_warm():
            with torch.inference_mode():
                net.torch_model(xs, ts_, cs)
        warm = {"torch": torch_warm, "onnxruntime fp32": den.binding(mb).run}
        if den8 is not None:
            warm["onnxruntime int8"] = den8.binding(mb).run
        for w in warm.values():
            w()
        stats = InterleavedTimer(repeats=repeats, warmup=0, pause_s=0.05).run(fns, before=warm)
        diff = float(np.max(np.abs(results["torch"] - results["onnxruntime fp32"])))
        records.append(make_record("sampling", "torch", "cpu", "fp32", cfg.batch, stats=stats["torch"],
                                   implementation=torch_impl, **fields))
        records.append(make_record("sampling", "onnxruntime", CPU, "fp32", cfg.batch, stats=stats["onnxruntime fp32"],
                                   implementation="mdx.runtime.pipeline.generate (IO binding)",
                                   max_abs_diff=diff, speedup_vs_torch=stats["torch"].median_s /
                                   stats["onnxruntime fp32"].median_s, **fields))
        if den8 is not None:
            d8 = float(np.max(np.abs(results["torch"] - results["onnxruntime int8"])))
            records.append(make_record("sampling", "onnxruntime", CPU, "int8", cfg.batch,
                                       stats=stats["onnxruntime int8"],
                                       implementation="mdx.runtime.pipeline.generate (IO binding)",
                                       max_abs_diff=d8, speedup_vs_torch=stats["torch"].median_s /
                                       stats["onnxruntime int8"].median_s, **fields))
        log(f"  sampling {cfg.sampler}-{steps} batch {cfg.batch} guidance {cfg.guidance:g}: torch "
            f"{stats['torch'].median_s:.3f} s, ORT fp32 {stats['onnxruntime fp32'].median_s:.3f} s "
            f"(x{stats['torch'].median_s / stats['onnxruntime fp32'].median_s:.2f}), max |diff| {diff:.1e}")
    return records
