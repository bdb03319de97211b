"""Suite (b): whole sampling runs, torch against ONNX Runtime, same noise, interleaved.

Sides of every comparison (timed A B A B, one whole run per timed repeat):

- torch, DDPM and DDIM: `mdx.train.reference.sample_reference`, the torch reference sampler
  (sampler arithmetic in torch, on the torch model, in inference mode).
- torch, DPM-Solver++: the reference sampler has no DPM-Solver++, so the torch side is the
  runtime's numpy `DPMSolverSampler` driving the torch model (`torch_sampler_loop` below:
  the same loop as mdx.runtime.pipeline.generate with the model call swapped). The sampler
  arithmetic is then identical on both sides and only the network differs.
- ONNX Runtime: `mdx.runtime.pipeline.generate` on an OnnxDenoiser (CPU provider, IO binding).

Both sides draw their noise as docs/contract.md says (numpy default_rng(seed): x_T, then one draw
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
OPENVINO = "OpenVINOExecutionProvider"
GUIDANCE = 3.0
SEED = 0


@dataclass(frozen=True)
class Config:
    sampler: str  # "ddpm" | "ddim" | "dpmpp"
    steps: int | None  # None = all T training timesteps (DDPM-T)
    guidance: float
    batch: int
    peers: bool = False  # also every deployed mdx config and torch at its best (the headline)


# The headline's settings: the shipped model's recommendation and the fast default.
HEADLINE = (("dpmpp", 20, 5.0), ("ddim", 25, 1.0))
HEADLINE_BATCHES = (1, 8, 32, 128)


def headline_configs(batches=HEADLINE_BATCHES) -> list[Config]:
    """DPM-Solver++ 20 at guidance 5 and DDIM 25, at each batch, with every peer."""
    return [Config(s, n, g, b, peers=True) for b in batches for s, n, g in HEADLINE]


def quick_configs() -> list[Config]:
    """Every sampler and step count at batch 1 with and without guidance, and DDIM-25 at batch 128.
    The two runs the targets are about come first, so a tight time budget never drops them."""
    out = [Config("ddim", 25, 1.0, 1, peers=True), Config("ddim", 25, 1.0, 128, peers=True),
           Config("dpmpp", 20, 5.0, 1, peers=True)]
    out += [Config(s, n, g, 1) for s, n in (("ddim", 25), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20), ("ddpm", None))
            for g in (1.0, GUIDANCE) if (s, n, g) != ("ddim", 25, 1.0)]
    return out


def smoke_configs() -> list[Config]:
    """A few short runs for a developer's smoke test (with the tiny T = 20 network)."""
    return [Config("ddim", 5, 1.0, 1), Config("dpmpp", 4, GUIDANCE, 2), Config("ddpm", None, 1.0, 1)]


def full_configs() -> list[Config]:
    """quick, the headline's runs at every batch, plus DDPM-T at batch 8, every few-step sampler at batch 32 with and without
    guidance and at batch 128 without (with guidance, batch 128 is a 256-image network call:
    the full suite's 30 minutes on 2 cores do not hold it)."""
    few = (("ddim", 25), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20))
    out = quick_configs() + headline_configs()
    out.append(Config("ddpm", None, 1.0, 8))
    out += [Config(s, n, g, 32) for s, n in few for g in (1.0, GUIDANCE)]
    out += [Config(s, n, 1.0, 128) for s, n in few if (s, n) != ("ddim", 25)]
    seen: set = set()  # the first of two equal settings wins (the headline's, with its peers)
    return [c for c in out if not ((c.sampler, c.steps, c.guidance, c.batch) in seen
                                   or seen.add((c.sampler, c.steps, c.guidance, c.batch)))]


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


@dataclass(eq=False)  # identity: sides are dict keys
class Side:
    """One side of a sampling comparison: how to run it, and what its record says it was."""

    key: str
    backend: str  # "torch" | "onnxruntime"
    provider: str
    precision: str
    variant: str
    implementation: str
    run: object  # (cfg, steps, context) -> samples
    warm: object  # model batch -> a zero-argument call (one network evaluation)
    peer: bool = False  # runs only in Config.peers comparisons
    skipped: str | None = None


class TorchVariant:
    """The torch model as oneDNN likes it: channels_last weights and inputs, optionally under
    bf16 autocast (the output back in float32 for the numpy sampler)."""

    def __init__(self, model, bf16: bool) -> None:
        import copy

        import torch

        self.config = model.config
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)
        self.bf16 = bf16

    def __call__(self, x, t, c):
        import torch

        x = x.contiguous(memory_format=torch.channels_last)
        if not self.bf16:
            return self.model(x, t, c).contiguous()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.model(x, t, c).float().contiguous()


def _torch_warm(model, net):
    import torch

    def make(mb: int):
        xs, ts_, cs = torch.zeros((mb, *net.sample_shape)), torch.zeros(mb), torch.zeros((mb, net.num_classes))

        def call():
            with torch.inference_mode():
                model(xs, ts_, cs)
        return call
    return make


def torch_sides(net) -> list[Side]:
    """torch eager (the reference sampler where it has one), and the peers: channels_last and
    bf16 autocast (native bf16 only) driven by the runtime's numpy sampler."""
    import torch

    from mdx.bench.forward import bf16_skip_reason

    def eager(cfg, steps, context):
        return _torch_side(net, cfg, steps, context)[0]()

    sides = [Side("torch", "torch", "cpu", "fp32", "eager", "see implementation", eager, _torch_warm(net.torch_model, net))]
    for key, precision, bf16 in (("torch channels_last", "fp32", False), ("torch bf16 autocast", "bf16", True)):
        model = TorchVariant(net.torch_model, bf16)

        def run(cfg, steps, context, model=model):
            with torch.inference_mode():
                return torch_sampler_loop(model, net.schedule, cfg.sampler, steps, context, SEED, cfg.guidance)
        sides.append(Side(key, "torch", "cpu", precision, key.split(" ", 1)[1].replace(" ", "_"),
                          "torch model (channels_last" + (", bf16 autocast" if bf16 else "") + ") + mdx.runtime "
                          "numpy sampler", run, _torch_warm(model, net), peer=True,
                          skipped=bf16_skip_reason() if bf16 else None))
    return sides


def onnx_sides(net, threads: int, int8: bool) -> list[Side]:
    """ORT CPU fp32 (always), int8 (when asked), and the peers: OpenVINO f32, bf16 and int8
    where they run (skipped with the runtime's reason elsewhere)."""
    from mdx.runtime.pipeline import generate
    from mdx.runtime.session import ModelError, OnnxDenoiser

    specs = [("onnxruntime fp32", "fp32", CPU, "auto", "fp32", False)]
    if int8 and "int8" in net.onnx:
        specs.append(("onnxruntime int8", "int8", CPU, "auto", "int8", False))
    specs += [("openvino fp32", "fp32", OPENVINO, "fp32", "fp32", True), ("openvino bf16", "fp32", OPENVINO, "bf16",
              "bf16", True)]
    if "int8" in net.onnx:
        specs.append(("openvino int8", "int8", OPENVINO, "auto", "int8", True))
    sides = []
    for key, file, provider, compute, precision, peer in specs:
        side = Side(key, "onnxruntime", provider, precision, "io_binding",
                    "mdx.runtime.pipeline.generate (IO binding)", None, None, peer=peer)
        try:
            den = OnnxDenoiser.load(net.onnx[file], provider=provider, threads=threads, compute_precision=compute)
        except ModelError as e:
            side.skipped = str(e)
            sides.append(side)
            continue

        def run(cfg, steps, context, den=den):
            # sampler_options={}: the sampler's defaults, exactly what the torch side runs
            return generate(den, sampler=cfg.sampler, steps=steps, context=context, guidance=cfg.guidance,
                            seed=SEED, sampler_options={}).samples
        side.run, side.warm = run, (lambda mb, den=den: den.binding(mb).run)
        side.implementation += f", compute precision {den.compute_precision}"
        sides.append(side)
    return sides


def _compare(sides: list[Side], cfg: Config, steps: int, context: np.ndarray, mb: int, repeats: int):
    """Time the sides interleaved (warm-up call first and after each pause); (stats, samples)."""
    results: dict[str, np.ndarray] = {}

    def call(side):
        def fn():
            results[side.key] = side.run(cfg, steps, context)
        return fn
    fns = {s.key: call(s) for s in sides}
    warm = {s.key: s.warm(mb) for s in sides}
    for w in warm.values():
        w()
    stats = InterleavedTimer(repeats=repeats, warmup=0, pause_s=0.05).run(fns, before=warm)
    return stats, results


def _fit_budget(all_sides: list[Side], cfg: Config, steps: int, cost, repeats: int, budget):
    """(sides of this config, a reason to skip it all or None, {peer side: reason} dropped so that
    the plain torch-vs-ORT comparison still fits the budget when its peers do not)."""
    chosen = [s for s in all_sides if cfg.peers or not s.peer]

    def expected(sides):
        live = [s for s in sides if not s.skipped]
        n_torch = sum(s.backend == "torch" for s in live)
        return estimate_seconds(cfg, steps, cost, repeats) * max(n_torch, len(live) - n_torch, 1)
    what = f"{cfg.sampler}-{steps} at batch {cfg.batch}"
    if budget is None or budget.allows(expected(chosen)):
        return chosen, None, {}
    plain = [s for s in chosen if not s.peer]
    if cfg.peers and budget.allows(expected(plain)):
        reason = budget.reason(f"{what} with its peers", expected(chosen))
        return chosen, None, {s: reason for s in chosen if s.peer and not s.skipped}
    return chosen, budget.reason(what, expected(plain)), {}


def run_sampling(net, *, threads: int, configs: list[Config], repeats: int = 5, forward_records=(),
                 budget=None, log=print, int8: bool = False) -> list[dict]:
    """Records of suite (b) on the CPU for `net`: torch eager against ORT fp32 (and int8) on every
    config; with Config.peers also torch channels_last / bf16 autocast and OpenVINO f32 / bf16 /
    int8 (records marked `peer`), for the headline (mdx.bench.headline)."""
    import torch

    torch.set_num_threads(threads)
    T = net.num_train_timesteps
    base = {"network": net.name, "threads": threads}
    if "fp32" not in net.onnx:
        return [make_record("sampling", be, prov, "fp32", c.batch, sampler=c.sampler, steps=c.steps or T,
                            guidance=c.guidance, skipped="no fp32 ONNX export", **base)
                for c in configs for be, prov in (("torch", "cpu"), ("onnxruntime", CPU))]
    all_sides = torch_sides(net) + onnx_sides(net, threads, int8)
    cost = forward_cost_model(list(forward_records), net.name)
    records = []
    for cfg in configs:
        steps = cfg.steps or T
        mb = cfg.batch * (2 if cfg.guidance != 1.0 else 1)
        fields = dict(sampler=cfg.sampler, steps=steps, guidance=cfg.guidance, model_batch=mb, **base)
        chosen, skip, dropped = _fit_budget(all_sides, cfg, steps, cost, repeats, budget)
        for s in chosen:
            if s.skipped or skip or s in dropped:
                records.append(make_record("sampling", s.backend, s.provider, s.precision, cfg.batch,
                                           skipped=s.skipped or skip or dropped[s], variant=s.variant, peer=s.peer,
                                           **fields))
        if skip:
            log(f"  skipped {cfg}: {skip}")
            continue
        live_sides = [s for s in chosen if not s.skipped and s not in dropped]
        stats, results = _compare(live_sides, cfg, steps, _context(cfg, net), mb, repeats)
        t_med = stats["torch"].median_s
        for s in live_sides:
            extra = {"implementation": s.implementation if s.key != "torch" else _torch_side(
                net, cfg, steps, _context(cfg, net))[1], "variant": s.variant, "peer": s.peer}
            if s.key != "torch":
                extra.update(max_abs_diff=float(np.max(np.abs(results["torch"] - results[s.key]))),
                             speedup_vs_torch=t_med / stats[s.key].median_s)
            records.append(make_record("sampling", s.backend, s.provider, s.precision, cfg.batch,
                                       stats=stats[s.key], **extra, **fields))
        log(f"  sampling {cfg.sampler}-{steps} batch {cfg.batch} guidance {cfg.guidance:g}: "
            + ", ".join(f"{k} {st.median_s:.3f} s" for k, st in stats.items()))
    return records


def _context(cfg: Config, net) -> np.ndarray:
    return context_rows(cfg.batch, net.num_classes)
