"""Suite (a), CPU: one network evaluation per batch size, every backend interleaved.

Backends (each a `Backend`: a name, how to build a callable for a batch, record fields):

    torch eager        model(x, t, c) under torch.inference_mode()
    torch.compile      torch.compile(model, dynamic=False): one compile per batch size, whose
                       time (the first call minus an eager call, inductor's on-disk caches
                       off, so it is a cold compile every run) is reported as compile_s
    torch channels_last  eager fp32 with weights and inputs in NHWC memory (oneDNN's layout)
    torch bf16 autocast  channels_last under torch.autocast("cpu", bfloat16); only where the CPU
                       has native bf16 (amx_bf16 / avx512_bf16), else skipped with the reason
    onnxruntime fp32 / fp16 / int8   the exported files in an OnnxDenoiser session on the CPU
                       provider, called through its reused IO binding (`binding(batch).run()`,
                       no copies): exactly what the runtime's sampling loop does
    openvino fp32 / bf16 / int8   the same files on ONNX Runtime's OpenVINO plugin (compute
                       precision f32 / bf16 / auto), same IO binding; skipped with the runtime's
                       reason where the plugin is missing, offers no device (AMD) or bf16 is not native

All backends of one batch size take turns (A B C ... A B C ...): a warm-up call each, three
calibration calls that size a timed repeat (~`target_s` of back-to-back calls, from the fastest
of the three), then the timed repeats, each after a 50 ms idle gap and one untimed call of the
same side (timing.py says why: the gap stops the other side's spinning threads, the call wakes
this side's own). Batch
sizes run 1, 128, 32, 8 so that a tight budget drops the size no target needs. torch and ONNX
Runtime both get `threads` threads (= the machine's cores).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mdx.bench.memory import _inputs, measure_peak_rss
from mdx.bench.records import make_record
from mdx.bench.roofline import achieved_gflops, peak_for, peak_share
from mdx.bench.timing import InterleavedTimer, calibrate_number

BATCHES = (1, 8, 32, 128)
# The order the batch sizes run in: the targets' sizes first, so a tight time budget (a busy
# machine) drops batch 8 rather than 128.
RUN_ORDER = (1, 128, 32, 8)
CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
PAUSE_S = 0.05  # idle gap before each timed repeat: lets the other side's spinning threads sleep (timing.py)


@dataclass
class Backend:
    key: str  # unique label, e.g. "onnxruntime fp32"
    backend: str  # "torch" | "onnxruntime"
    provider: str
    precision: str
    variant: str
    network: str
    make: Callable[[int], Callable[[], object]]  # batch -> zero-argument call
    extra: dict = field(default_factory=dict)
    per_batch: dict = field(default_factory=dict)  # batch -> extra fields (compile_s ...)
    skipped: str | None = None


# --- backends ----------------------------------------------------------------------------


def torch_eager_backend(net) -> Backend:
    import torch

    model = net.torch_model

    def make(batch: int):
        x, t, c = (torch.from_numpy(a) for a in _inputs(batch, net.sample_shape, net.num_classes,
                                                         net.num_train_timesteps))

        def call():
            with torch.inference_mode():
                return model(x, t, c)
        return call

    return Backend("torch eager", "torch", "cpu", "fp32", "eager", net.name, make)


def torch_channels_last_backend(net) -> Backend:
    """torch eager fp32 with the weights and inputs in channels_last (NHWC) memory: oneDNN's
    preferred layout for CPU convolutions."""
    import copy

    import torch

    model = copy.deepcopy(net.torch_model).to(memory_format=torch.channels_last)

    def make(batch: int):
        x, t, c = (torch.from_numpy(a) for a in _inputs(batch, net.sample_shape, net.num_classes,
                                                         net.num_train_timesteps))
        x = x.contiguous(memory_format=torch.channels_last)

        def call():
            with torch.inference_mode():
                return model(x, t, c)
        return call

    return Backend("torch channels_last", "torch", "cpu", "fp32", "channels_last", net.name, make)


def bf16_skip_reason() -> str | None:
    """None where the CPU computes bf16 natively (AMX-BF16 or AVX512-BF16), else why bf16 rows skip."""
    from mdx.runtime.providers import cpu_isa

    isa = cpu_isa()
    if isa.native_bf16:
        return None
    return (f"the CPU has no native bf16 (amx_bf16 or avx512_bf16; {isa.describe()}): bf16 would be emulated "
            f"or fall back to fp32, so it is not a configuration anyone would deploy here")


def torch_bf16_backend(net) -> Backend:
    """torch eager under bf16 autocast (oneDNN's AMX / AVX512-BF16 kernels), channels_last."""
    import torch

    cl = torch_channels_last_backend(net)
    be = Backend("torch bf16 autocast", "torch", "cpu", "bf16", "bf16_autocast", net.name, make=None)  # type: ignore[arg-type]
    be.skipped = bf16_skip_reason()

    def make(batch: int):
        inner = cl.make(batch)

        def call():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return inner()
        return call

    be.make = make
    return be


def torch_compile_backend(net, compile_batches, budget=None, log=print) -> Backend:
    """torch.compile (inductor, default mode); compile time per batch size in per_batch[b]["compile_s"]."""
    import torch

    be = Backend("torch.compile", "torch", "cpu", "fp32", "compile", net.name, make=None)  # type: ignore[arg-type]
    try:
        compiled = torch.compile(net.torch_model, dynamic=False)
    except Exception as e:  # noqa: BLE001 -- e.g. an unsupported Python; the record says why
        be.skipped = f"torch.compile unavailable: {type(e).__name__}: {e}"
        return be
    model = net.torch_model

    def make(batch: int):
        if batch not in compile_batches:
            raise SkipItem("quick suite: torch.compile is measured at batch "
                           f"{', '.join(map(str, sorted(compile_batches)))} only (each batch size is a "
                           "fresh ~35 s compile on 2 cores)")
        if budget is not None and not budget.allows(90):
            raise SkipItem(budget.reason(f"compiling for batch {batch}", 90))
        x, t, c = (torch.from_numpy(a) for a in _inputs(batch, net.sample_shape, net.num_classes,
                                                         net.num_train_timesteps))
        with torch.inference_mode():
            model(x, t, c)
            t0 = time.perf_counter()
            model(x, t, c)
            eager_s = time.perf_counter() - t0
            log(f"  torch.compile: compiling for batch {batch} ...")
            t0 = time.perf_counter()
            try:
                # Inductor's on-disk caches off: the figure is a cold compile, the same on every
                # run, not a cache load left behind by an earlier run.
                with _inductor_caches_off(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "dynamo_pgo force disabled by force_disable_caches"
                    compiled(x, t, c)
            except Exception as e:  # noqa: BLE001 -- no C++ compiler, inductor bug ...: recorded
                raise SkipItem(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
            first_s = time.perf_counter() - t0
        be.per_batch[batch] = {"compile_s": round(max(first_s - eager_s, 0.0), 2),
                               "compile_note": "cold compile (inductor caches disabled), first call minus an eager call"}
        log(f"  torch.compile: batch {batch} compiled in {be.per_batch[batch]['compile_s']:.1f} s")

        def call():
            with torch.inference_mode():
                return compiled(x, t, c)
        return call

    be.make = make
    return be


def _inductor_caches_off():
    import contextlib

    try:
        import torch._inductor.config as inductor_config

        return inductor_config.patch(force_disable_caches=True)
    except (ImportError, AttributeError, RuntimeError):  # an older torch: compile with its defaults
        return contextlib.nullcontext()


def onnx_backend(net, precision: str, threads: int, label: str | None = None, provider: str = CPU,
                 compute_precision: str = "auto") -> Backend:
    """The `precision` file in an OnnxDenoiser session on `provider` (the CPU provider, or OpenVINO
    computing in `compute_precision`), called through its reused IO binding. A provider that
    cannot run here gives a skipped Backend with the runtime's own one-line reason."""
    from mdx.runtime.session import ModelError, OnnxDenoiser

    path = net.onnx[precision]
    openvino = provider == OPENVINO
    shown = ("bf16" if compute_precision == "bf16" else precision) if openvino else precision
    key = label or (f"openvino {shown}" if openvino else f"onnxruntime {precision}")
    be = Backend(key, "onnxruntime", provider, shown, "io_binding", net.name, make=None,  # type: ignore[arg-type]
                 extra={"model_file": path.name})
    try:
        den = OnnxDenoiser.load(path, provider=provider, threads=threads, compute_precision=compute_precision)
    except ModelError as e:
        be.skipped = str(e)
        return be
    be.extra["compute_precision"] = den.compute_precision

    def make(batch: int):
        bound = den.binding(batch)
        x, t, c = _inputs(batch, net.sample_shape, net.num_classes, net.num_train_timesteps)
        bound.sample[...] = x
        bound.timestep[...] = t
        bound.context[...] = c
        return bound.run

    be.make = make
    return be


def openvino_backends(net, threads: int) -> list[Backend]:
    """OpenVINO f32 and bf16 on the fp32 file, and the int8 file at OpenVINO's auto precision
    (skipped, with the reason, where the plugin or native bf16 is missing)."""
    out = []
    if "fp32" in net.onnx:
        out += [onnx_backend(net, "fp32", threads, provider=OPENVINO, compute_precision=p) for p in ("fp32", "bf16")]
    if "int8" in net.onnx:
        out.append(onnx_backend(net, "int8", threads, provider=OPENVINO, compute_precision="auto"))
    return out


class SkipItem(Exception):
    """A backend cannot run one batch size; the message is the record's `skipped` reason."""


# --- the suite ---------------------------------------------------------------------------


def _estimate_call(last: tuple[int, float] | None, batch: int, flops_per_image: float | None,
                   peak_gflops: float | None) -> float:
    """Seconds one call at `batch` should take, from the last batch measured on that backend:
    the extra images at the rate achieved there, but at least a quarter of the matmul peak
    (small batches are overhead-bound, so their rate understates large ones)."""
    if last is None:
        return 0.002 * batch  # ~0.3 GFLOP per image at 150 GFLOP/s
    b0, t0 = last
    if batch <= b0 or not flops_per_image:
        return t0 * max(batch / b0, 1.0) if batch > b0 else t0
    rate = flops_per_image * b0 / t0  # FLOP/s achieved at b0
    if peak_gflops:
        rate = max(rate, 0.25 * peak_gflops * 1e9)
    return t0 + flops_per_image * (batch - b0) / rate



def memory_specs(net, threads: int, batches, include_compile: bool) -> dict[str, dict]:
    """Fresh-process peak-RSS specs, keyed like the backends."""
    specs = {}
    if net.torch_model is not None and getattr(net, "checkpoint", None) is not None:
        specs["torch eager"] = {"kind": "torch", "checkpoint": str(net.checkpoint), "threads": threads,
                                "batches": list(batches)}
        if include_compile:
            specs["torch.compile"] = {**specs["torch eager"], "kind": "torch.compile"}
    for precision, path in net.onnx.items():
        specs[f"onnxruntime {precision}"] = {"kind": "onnxruntime", "model": str(path), "threads": threads,
                                             "batches": list(batches)}
    return specs


def _forward_backends(net, shipped, *, threads: int, batches, with_compile: bool, compile_batches, budget,
                      log) -> tuple[list[Backend], list[dict], float | None]:
    """Every backend of suite (a): torch at its best, ORT CPU per precision, the shipped files and
    OpenVINO; plus the records of precisions with no export, and the shipped network's FLOP/image."""
    backends: list[Backend] = []
    skipped: list[dict] = []
    if net.torch_model is not None:
        backends += [torch_eager_backend(net), torch_channels_last_backend(net), torch_bf16_backend(net)]
        if with_compile:
            backends.append(torch_compile_backend(net, set(compile_batches), budget, log))
    for precision in ("fp32", "fp16", "int8"):
        if precision in net.onnx:
            backends.append(onnx_backend(net, precision, threads))
        else:
            reason = next((n for n in net.notes if n.startswith(precision) or precision in n),
                          f"no {precision} export")
            skipped += [make_record("forward", "onnxruntime", CPU, precision, b, skipped=reason, variant="io_binding",
                                    network=net.name) for b in batches]
    shipped_flops = None
    if shipped is not None:
        for precision in shipped.onnx:
            backends.append(onnx_backend(shipped, precision, threads, label=f"shipped {precision}"))
        shipped_flops = getattr(shipped, "flops_per_image", None)
    backends += openvino_backends(net, threads)  # the torch side's network: the headline compares like with like
    return backends, skipped, shipped_flops


def _forward_memory(net, shipped, *, threads: int, batches, budget, log) -> dict[str, dict]:
    """Peak RSS of a fresh process per backend (skipped, with the reason, past the budget)."""
    specs = memory_specs(net, threads, batches, include_compile=False)
    if shipped is not None:
        specs.update({f"shipped {p}": {"kind": "onnxruntime", "model": str(f), "threads": threads,
                                       "batches": list(batches)} for p, f in shipped.onnx.items()})
    mem = {}
    for key, spec in specs.items():
        if budget is not None and not budget.allows(30):
            mem[key] = {"error": budget.reason("peak-RSS child", 30)}
            continue
        mem[key] = measure_peak_rss(spec)
        log(f"  peak RSS {key}: " + (mem[key].get("error") or
                                     ", ".join(f"b{b} {v:.0f} MB" for b, v in mem[key]["peak_rss_mb"].items())))
    return mem


def _forward_record(be: Backend, batch: int, st, *, threads: int, fpi: float | None, peaks, mem: dict) -> dict:
    """One measured forward record: timing, GFLOP/s against the roof of its precision, memory."""
    extra = {"variant": be.variant, "network": be.network, "threads": threads, **be.extra,
             **be.per_batch.get(batch, {})}
    if fpi:
        g = achieved_gflops(fpi, batch, st.median_s)
        roof = peak_for(peaks, be.precision)
        extra.update(gflops=round(g, 2), peak_share=(round(peak_share(g, roof), 4) if roof else None),
                     roof_gflops=roof, flops_per_image=fpi)
    m = mem.get(be.key)
    if m is not None:
        if "error" in m:
            extra["peak_mem_note"] = m["error"]
        else:
            extra["peak_mem_mb"] = round(m["peak_rss_mb"][str(batch)], 1)
            extra["peak_mem_kind"] = "peak RSS (VmHWM) of a fresh process running only this backend"
            extra["import_rss_mb"] = round(m.get("import_rss_mb", 0.0), 1)
    elif be.variant == "compile":
        extra["peak_mem_note"] = "not measured (a fresh process would recompile for every batch size)"
    return make_record("forward", be.backend, be.provider, be.precision, batch, stats=st, **extra)


def _skip_records(backends, batch: int, reason: str) -> list[dict]:
    return [make_record("forward", be.backend, be.provider, be.precision, batch, skipped=reason,
                        variant=be.variant, network=be.network) for be in backends]


def _time_batch(live: list[Backend], batch: int, *, repeats: int, target_s: float) -> tuple[dict, list[dict]]:
    """Interleaved medians of every live backend at `batch`; records for those that cannot run it."""
    fns, number, records = {}, {}, []
    for be in live:
        try:
            fns[be.key] = be.make(batch)
        except SkipItem as e:
            records += _skip_records([be], batch, str(e))
    for fn in fns.values():
        fn()  # warm-up (the first call of a session or a shape allocates and picks kernels)
    for key, fn in fns.items():
        number[key] = calibrate_number(fn, target_s)
    # before: one untimed call right before each timed repeat (after the pause), see timing.py
    stats = InterleavedTimer(repeats=repeats, warmup=0, pause_s=PAUSE_S).run(fns, number, before=fns)
    return stats, records


def run_forward(net, *, threads: int, flops_per_image: float | None, peak_gflops: dict | float | None,
                batches=BATCHES, repeats: int = 5, target_s: float = 0.1, compile_batches=BATCHES,
                with_compile: bool = True, measure_memory: bool = True, budget=None, log=print,
                shipped=None) -> list[dict]:
    """Records of suite (a) on the CPU for `net` (and the `shipped` network's ONNX files, if given).

    peak_gflops: the matmul roofs per precision (roofline.measure_matmul_peak's `peaks`), or one
    fp32 figure; each record's peak_share is against the roof of the precision that ran."""
    peaks = peak_gflops
    fp32_peak = peak_for(peaks, "fp32")
    import torch

    torch.set_num_threads(threads)
    backends, records, shipped_flops = _forward_backends(
        net, shipped, threads=threads, batches=batches, with_compile=with_compile,
        compile_batches=compile_batches, budget=budget, log=log)
    mem = _forward_memory(net, shipped, threads=threads, batches=batches, budget=budget, log=log) \
        if measure_memory else {}
    for be in backends:
        if be.skipped:
            records += [make_record("forward", be.backend, be.provider, be.precision, b, skipped=be.skipped,
                                    variant=be.variant, network=be.network) for b in batches]
    live = [be for be in backends if not be.skipped]
    measured: dict[str, tuple[int, float]] = {}  # backend -> (batch, median) of the last batch measured
    order = [b for b in RUN_ORDER if b in batches] + [b for b in batches if b not in RUN_ORDER]
    for batch in order:
        expected = sum((repeats + 4) * max(target_s, _estimate_call(measured.get(be.key), batch,
                                                                    flops_per_image, fp32_peak))
                       for be in live)
        if budget is not None and not budget.allows(expected):
            records += _skip_records(live, batch, budget.reason(f"forward batch {batch}", expected))
            continue
        stats, skipped_here = _time_batch(live, batch, repeats=repeats, target_s=target_s)
        records += skipped_here
        for be in live:
            if be.key in stats:
                measured[be.key] = (batch, stats[be.key].median_s)
                fpi = shipped_flops if be.key.startswith("shipped") else flops_per_image
                records.append(_forward_record(be, batch, stats[be.key], threads=threads, fpi=fpi, peaks=peaks,
                                               mem=mem))
        log(f"  forward batch {batch}: " + ", ".join(f"{k} {stats[k].median_s * 1e3:.2f} ms" for k in stats))
    return records
