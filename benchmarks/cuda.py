"""The CUDA paths of suites (a) and (b), with NVML sampling; every item skips with a reason
where CUDA cannot run (no GPU, no CUDA build, onnxruntime's CUDA provider not starting).

Forward, per batch size and precision (fp32, fp16), interleaved and synchronised
(`torch.cuda.synchronize()` inside every timed repeat, before the clock stops):

    torch eager        model(x, t, c) on device tensors
    torch CUDA graph   the same call captured once in a torch.cuda.CUDAGraph, then replayed
    ORT CUDA           IO binding: inputs and output are device OrtValues bound once, so a run
                       copies nothing between host and device
    ORT CUDA graph     the same with the provider's enable_cuda_graph (captured on the first
                       run, replayed after; needs the fixed addresses that IO binding gives)

Memory and power, per backend, after the timing: the backend runs alone for a short burst
while a thread samples NVML every 20 ms (GPU utilisation, power, this process's device
memory); torch's allocator peak (`max_memory_allocated`) is recorded for the torch sides.
FLOPs and peak share use the GPU's own fp32 matmul peak (torch, TF32 off), measured here.
"""

from __future__ import annotations

import os
import time

import numpy as np

from mdx.bench.memory import _inputs
from mdx.bench.records import make_record
from mdx.bench.roofline import achieved_gflops, matmul_flops, peak_share
from mdx.bench.timing import InterleavedTimer, calibrate_number
from mdx.runtime.telemetry import FIELDS, GpuTelemetry, start_telemetry

CUDA_EP = "CUDAExecutionProvider"
PRECISIONS = ("fp32", "fp16")


# --- availability ------------------------------------------------------------------------


def torch_cuda_reason() -> str | None:
    """None when torch can use a CUDA device, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        built = torch.version.cuda
        return ("no CUDA device: torch.cuda.is_available() is False"
                + (f" (torch built for CUDA {built})" if built else " (a CPU-only torch build)"))
    return None


def ort_cuda_reason(model_path) -> str | None:
    """None when onnxruntime's CUDA provider really starts for this model, else why not."""
    import onnxruntime as ort

    if CUDA_EP not in ort.get_available_providers():
        return "onnxruntime has no CUDAExecutionProvider in this build (install onnxruntime-gpu)"
    from mdx.runtime.session import ModelError, open_session

    try:
        open_session(model_path, provider=CUDA_EP)
    except ModelError as e:
        return f"onnxruntime CUDA provider not usable: {e}"
    return None


# --- NVML sampling (mdx.runtime.telemetry's recorder) ------------------------------------


class ProcessGpuTelemetry(GpuTelemetry):
    """The runtime's NVML readings plus this process's device memory (MiB; None when NVML cannot say)."""

    fields = FIELDS + ("process_mem_mib",)

    def _process_mem_mib(self) -> float | None:
        try:
            for p in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                if p.pid == os.getpid() and p.usedGpuMemory is not None:
                    return p.usedGpuMemory / 2**20
        except self._nvml.NVMLError:
            return None
        return None

    def _read(self) -> tuple:
        return super()._read() + (self._process_mem_mib(),)


def nvml_summary(rows: list[tuple]) -> dict:
    """Mean and max utilisation and power, and the process's peak device memory, of ProcessGpuTelemetry rows."""
    def stat(i):
        vals = [r[i] for r in rows if r[i] is not None and r[i] == r[i]]  # no reading, or NaN: left out
        return (float(np.mean(vals)), float(np.max(vals))) if vals else (None, None)
    util, power, mem = stat(1), stat(5), stat(6)
    return {"nvml_samples": len(rows), "gpu_util_mean": util[0], "gpu_util_max": util[1],
            "power_w_mean": power[0], "power_w_max": power[1], "nvml_process_mem_mb_max": mem[1]}


def nvml_available(log=print) -> bool:
    """Whether NVML readings can be taken (said aloud when not: the timings stay valid)."""
    recorder, why_not = start_telemetry(None, 0, 1.0, recorder=ProcessGpuTelemetry)
    if recorder is None:
        log(f"  {why_not}; no utilisation or power figures")
        return False
    recorder.stop()
    return True


def burst(fn, sync, seconds: float, nvml: bool) -> dict:
    """Run fn back to back for ~seconds, under NVML readings every 20 ms when `nvml`; their summary."""
    recorder = start_telemetry(None, 0, 0.02, recorder=ProcessGpuTelemetry)[0] if nvml else None
    try:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            fn()
        sync()
    finally:
        if recorder is not None:
            recorder.stop()
    return nvml_summary(recorder.rows) if recorder is not None else {}


# --- backends ----------------------------------------------------------------------------


def _torch_calls(model, batch: int, net, dtype, graph: bool):
    import torch

    x, t, c = (torch.from_numpy(a).cuda() for a in _inputs(batch, net.sample_shape, net.num_classes,
                                                           net.num_train_timesteps))
    x, c = x.to(dtype), c.to(dtype)
    if not graph:
        def call():
            with torch.inference_mode():
                return model(x, t, c)
        return call
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.no_grad():
        with torch.cuda.stream(stream):  # warm up on a side stream, as torch's docs require
            for _ in range(3):
                model(x, t, c)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = model(x, t, c)  # the graph's static output

    def call():
        g.replay()
    call.keep = (g, x, t, c, out)  # the graph replays these fixed addresses: keep them alive
    return call


def _ort_cuda_call(path, batch: int, net, cuda_graph: bool):
    """An IO-bound CUDA session run for `batch`; device buffers bound once."""
    import onnxruntime as ort

    from mdx.runtime.session import cuda_provider_options, preload_cuda_libraries

    preload_cuda_libraries()
    opts = ort.SessionOptions()
    sess = ort.InferenceSession(str(path), sess_options=opts,
                                providers=[(CUDA_EP, cuda_provider_options(cuda_graph)), "CPUExecutionProvider"])
    if sess.get_providers()[0] != CUDA_EP:
        raise RuntimeError("onnxruntime fell back to the CPU provider")
    x, t, c = _inputs(batch, net.sample_shape, net.num_classes, net.num_train_timesteps)
    types = {i.name: i.type for i in sess.get_inputs()}
    feeds = {"sample": x, "timestep": t, "context": c}
    io = sess.io_binding()
    values = {}
    for name, arr in feeds.items():
        if types[name] == "tensor(float16)":
            arr = arr.astype(np.float16)
        values[name] = ort.OrtValue.ortvalue_from_numpy(arr, "cuda", 0)
        io.bind_ortvalue_input(name, values[name])
    out_type = np.float16 if sess.get_outputs()[0].type == "tensor(float16)" else np.float32
    out = ort.OrtValue.ortvalue_from_shape_and_type(x.shape, out_type, "cuda", 0)
    io.bind_ortvalue_output("model_output", out)

    def call():
        sess.run_with_iobinding(io)
    call.keep = (sess, io, values, out)
    call()  # the first run captures the CUDA graph when enabled
    return call


def gpu_matmul_peak(n: int = 8192, repeats: int = 5) -> dict:
    """torch fp32 matmul GFLOP/s on the GPU (TF32 off: true fp32), best of the repeats."""
    import torch

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        a = torch.randn((n, n), device="cuda")
        b = torch.randn((n, n), device="cuda")
        stats = InterleavedTimer(repeats=repeats, warmup=1, sync=torch.cuda.synchronize).run(
            {"torch": lambda: torch.matmul(a, b)})
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    g = matmul_flops(n) / stats["torch"].min_s / 1e9
    return {"n": n, "dtype": "float32 (TF32 off)", "peak_gflops": round(g, 1), "peak_backend": "torch"}


# --- the suites ----------------------------------------------------------------------------


def _skip_all(batches, reason: str, network: str) -> list[dict]:
    recs = []
    for b in batches:
        for precision in PRECISIONS:
            for backend, provider, variant in (("torch", "cuda", "eager"), ("torch", "cuda", "cuda_graph"),
                                               ("onnxruntime", CUDA_EP, "io_binding"),
                                               ("onnxruntime", CUDA_EP, "cuda_graph")):
                recs.append(make_record("forward", backend, provider, precision, b, skipped=reason, variant=variant,
                                        network=network))
    return recs


# (label, backend, provider, variant) of each CUDA forward variant, timed interleaved
CUDA_PLAN = [("torch eager", "torch", "cuda", "eager"), ("torch CUDA graph", "torch", "cuda", "cuda_graph"),
             ("ORT CUDA", "onnxruntime", CUDA_EP, "io_binding"), ("ORT CUDA graph", "onnxruntime", CUDA_EP, "cuda_graph")]


def _cuda_calls(net, model, precision: str, batch: int, dtype, ort_reason: str | None) -> tuple[dict, dict]:
    """The callables of the CUDA_PLAN variants that can run, and why the others cannot."""
    fns, skipped = {}, {}
    for key, backend, _, variant in CUDA_PLAN:
        try:
            if backend == "torch":
                if model is None:
                    raise RuntimeError("no torch model for this network")
                fns[key] = _torch_calls(model, batch, net, dtype, graph=(variant == "cuda_graph"))
            else:
                if ort_reason:
                    raise RuntimeError(ort_reason)
                fns[key] = _ort_cuda_call(net.onnx[precision], batch, net, cuda_graph=(variant == "cuda_graph"))
        except Exception as e:  # noqa: BLE001 -- each item skips with its own reason
            skipped[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return fns, skipped


def _forward_extra(backend: str, variant: str, network: str, nv: dict, stats, batch: int,
                   flops_per_image: float | None, peak: dict) -> dict:
    """A timed record's memory, NVML and roofline figures."""
    import torch

    extra = {"variant": variant, "network": network, "synchronised": True, **nv}
    if backend == "torch":
        extra["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        extra["peak_mem_kind"] = "torch allocator peak (max_memory_allocated)"
    elif nv.get("nvml_process_mem_mb_max") is not None:
        extra["peak_mem_mb"] = round(nv["nvml_process_mem_mb_max"], 1)
        extra["peak_mem_kind"] = "NVML device memory of this process (includes torch's cache)"
    if flops_per_image:
        g = achieved_gflops(flops_per_image, batch, stats.median_s)
        extra.update(gflops=round(g, 1), peak_share=round(peak_share(g, peak["peak_gflops"]), 4),
                     peak_kind="GPU fp32 matmul peak (TF32 off)")
    return extra


def _time_cuda_batch(net, fns: dict, precision: str, batch: int, *, nvml: bool, peak: dict,
                     flops_per_image: float | None, repeats: int, target_s: float, burst_s: float, log) -> list[dict]:
    """Time the variants interleaved, then a burst of each under NVML; their records."""
    import torch

    sync = torch.cuda.synchronize
    plan = {key: (backend, provider, variant) for key, backend, provider, variant in CUDA_PLAN}
    number = {k: calibrate_number(f, target_s, sync=sync) for k, f in fns.items()}
    stats = InterleavedTimer(repeats=repeats, warmup=1, sync=sync).run(fns, number)
    records = []
    for key, fn in fns.items():
        backend, provider, variant = plan[key]
        torch.cuda.reset_peak_memory_stats()
        nv = burst(fn, sync, burst_s, nvml)
        extra = _forward_extra(backend, variant, net.name, nv, stats[key], batch, flops_per_image, peak)
        records.append(make_record("forward", backend, provider, precision, batch, stats=stats[key], **extra))
    log(f"  CUDA forward {precision} batch {batch}: "
        + ", ".join(f"{k} {s.median_s * 1e3:.3f} ms" for k, s in stats.items()))
    return records


def run_cuda_forward(net, *, flops_per_image: float | None, batches=(1, 8, 32, 128), repeats: int = 5,
                     target_s: float = 0.05, burst_s: float = 1.0, log=print) -> tuple[list[dict], dict]:
    """CUDA forward records and the GPU's matmul peak ({} when CUDA is unavailable)."""
    reason = torch_cuda_reason()
    if reason is not None:
        log(f"  CUDA forward skipped: {reason}")
        return _skip_all(batches, reason, net.name), {}
    import torch

    peak = gpu_matmul_peak()
    ort_reason = {p: (ort_cuda_reason(net.onnx[p]) if p in net.onnx else f"no {p} export") for p in PRECISIONS}
    nvml = nvml_available(log)
    plan = {key: (backend, provider, variant) for key, backend, provider, variant in CUDA_PLAN}
    records = []
    for precision in PRECISIONS:
        dtype = torch.float16 if precision == "fp16" else torch.float32
        model = net.torch_model.to("cuda", dtype=dtype) if net.torch_model is not None else None
        for batch in batches:
            fns, skipped = _cuda_calls(net, model, precision, batch, dtype, ort_reason[precision])
            for key, why in skipped.items():
                backend, provider, variant = plan[key]
                records.append(make_record("forward", backend, provider, precision, batch, skipped=why,
                                           variant=variant, network=net.name))
            if fns:
                records += _time_cuda_batch(net, fns, precision, batch, nvml=nvml, peak=peak,
                                            flops_per_image=flops_per_image, repeats=repeats, target_s=target_s,
                                            burst_s=burst_s, log=log)
            fns = None  # free the CUDA graphs and sessions before the next batch
    if net.torch_model is not None:
        net.torch_model.to("cpu", dtype=torch.float32)
    return records, peak


def run_cuda_sampling(net, *, configs, repeats: int = 5, log=print) -> list[dict]:
    """Whole sampling runs on the GPU: torch reference sampler (device tensors) against
    mdx.runtime.pipeline.generate on the CUDA provider (IO binding), same noise, interleaved."""
    reason = torch_cuda_reason() or (ort_cuda_reason(net.onnx["fp32"]) if "fp32" in net.onnx else "no fp32 export")
    T = net.num_train_timesteps
    if reason is not None:
        log(f"  CUDA sampling skipped: {reason}")
        return [make_record("sampling", be, prov, "fp32", c.batch, sampler=c.sampler, steps=c.steps or T,
                            guidance=c.guidance, skipped=reason, network=net.name)
                for c in configs for be, prov in (("torch", "cuda"), ("onnxruntime", CUDA_EP))]
    import torch

    from mdx.bench.sampling import SEED, context_rows, torch_sampler_loop
    from mdx.runtime.pipeline import generate
    from mdx.runtime.session import OnnxDenoiser
    from mdx.train.reference import sample_reference

    den = OnnxDenoiser.load(net.onnx["fp32"], provider=CUDA_EP)
    model = net.torch_model.to("cuda")
    records = []
    try:
        for cfg in configs:
            steps = cfg.steps or T
            context = context_rows(cfg.batch, net.num_classes)
            if cfg.sampler in ("ddim", "ddpm"):
                def torch_run(cfg=cfg, steps=steps, context=context):
                    return sample_reference(model, net.schedule, sampler=cfg.sampler, steps=steps, context=context,
                                            seed=SEED, guidance=cfg.guidance, device="cuda")
                impl = "mdx.train.reference.sample_reference (cuda)"
            else:
                def torch_run(cfg=cfg, steps=steps, context=context):
                    return _cuda_loop(model, net, cfg, steps, context)
                impl = "torch model (cuda) + mdx.runtime numpy sampler"
            fns = {"torch": torch_run,
                   "onnxruntime": lambda cfg=cfg, steps=steps, context=context: generate(
                       den, sampler=cfg.sampler, steps=steps, context=context, guidance=cfg.guidance, seed=SEED)}
            stats = InterleavedTimer(repeats=repeats, warmup=1, sync=torch.cuda.synchronize).run(fns)
            fields = dict(sampler=cfg.sampler, steps=steps, guidance=cfg.guidance, network=net.name, synchronised=True)
            records.append(make_record("sampling", "torch", "cuda", "fp32", cfg.batch, stats=stats["torch"],
                                       implementation=impl, **fields))
            records.append(make_record("sampling", "onnxruntime", CUDA_EP, "fp32", cfg.batch,
                                       stats=stats["onnxruntime"], implementation="mdx.runtime.pipeline.generate",
                                       speedup_vs_torch=stats["torch"].median_s / stats["onnxruntime"].median_s,
                                       **fields))
            log(f"  CUDA sampling {cfg.sampler}-{steps} batch {cfg.batch} g {cfg.guidance:g}: torch "
                f"{stats['torch'].median_s:.3f} s, ORT {stats['onnxruntime'].median_s:.3f} s")
    finally:
        net.torch_model.to("cpu")
    return records


def _cuda_loop(model, net, cfg, steps, context):
    """torch_sampler_loop with the model on the GPU (host numpy sampler, device network)."""
    import torch

    class OnDevice(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m
            self.config = m.config

        def forward(self, x, t, c):
            return self.m(x.cuda(), t.cuda(), c.cuda()).cpu()

    from mdx.bench.sampling import SEED, torch_sampler_loop

    return torch_sampler_loop(OnDevice(model), net.schedule, cfg.sampler, steps, context, SEED, cfg.guidance)
