"""The roofline figures: FLOPs of one network evaluation, the machine's matmul roofs, shares.

- FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` on a batch-1
  forward pass (2 FLOPs per multiply-add; convolutions, transposed convolutions and the
  linear layers; the element-wise ops -- norms, GELU, adds -- are not counted, they are a
  few per cent of the total and do not run on the matrix units anyway). FLOPs are linear
  in the batch, so one count serves every batch size.
- The roofs are measured in the same run, one per precision: the best per-call time of large
  square matrix multiplies (1024^3 and 2048^3, preallocated outputs) on the same thread count.
  fp32: torch, ONNX Runtime's CPU provider and OpenVINO f32; bf16 (only where the CPU has
  native bf16): torch and OpenVINO bf16; int8: ONNX Runtime's MatMulInteger. numpy is not a
  candidate (its OpenBLAS is slowed on purpose on some of these machines). Each record is held
  to the roof of the precision it ran in (`peak_for`). A convolution can beat its roof
  (MLAS's NCHWc conv kernels are better tuned on some CPUs than its SGEMM); a share above 100%
  says the matmul was not the machine's best kernel. On a shared machine this is the peak
  available at the time, which is the right denominator for figures taken then.
- achieved GFLOP/s = FLOPs per image x batch / median seconds per call;
  peak share = achieved / peak.
"""

from __future__ import annotations

import time

import numpy as np

from mdx.bench.timing import InterleavedTimer

MATMUL_N = 2048


# --- arithmetic (pure, unit-tested) -----------------------------------------------------


def matmul_flops(n: int, m: int | None = None, k: int | None = None) -> int:
    """FLOPs of an (n x k) @ (k x m) product: 2 n m k."""
    m = n if m is None else m
    k = n if k is None else k
    return 2 * n * m * k


def achieved_gflops(flops_per_image: float, batch: int, seconds: float) -> float:
    """GFLOP/s of one network evaluation on `batch` images that took `seconds`."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return flops_per_image * batch / seconds / 1e9


def peak_share(gflops: float, peak_gflops: float | None) -> float | None:
    """Fraction of the measured peak (None without a peak)."""
    if not peak_gflops:
        return None
    return gflops / peak_gflops


# --- FLOP counting ----------------------------------------------------------------------


def count_flops(model, sample_shape: tuple[int, int, int], num_classes: int, batch: int = 1) -> dict:
    """FLOPs per image of one forward pass, with the per-operator breakdown."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros((batch, *sample_shape))
    t = torch.zeros((batch,))
    c = torch.zeros((batch, num_classes))
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x, t, c)
    by_op = {str(op): int(n) // batch for op, n in counter.get_flop_counts().get("Global", {}).items()}
    total = counter.get_total_flops() // batch
    return {"flops_per_image": int(total), "gflop_per_image": total / 1e9, "by_op": by_op,
            "method": "torch.utils.flop_counter.FlopCounterMode, batch 1 (2 FLOPs per multiply-add)"}


# --- the matmul peaks -------------------------------------------------------------------
#
# One roof per precision, measured in the same run: fp32 (torch, ONNX Runtime's CPU provider,
# OpenVINO f32), bf16 (torch, OpenVINO bf16; only where the CPU has native bf16 -- elsewhere
# both would emulate it and the figure is no roof of anything mdx runs) and int8 (ONNX
# Runtime's MatMulInteger, u8 x s8, the kernel family of the int8 file's quantized convs).
# numpy is not a candidate: its OpenBLAS is slowed on purpose on some of these machines.


def _matmul_model(n: int, kind: str) -> bytes:
    """A one-node ONNX model: Y = A @ B (float32), or MatMulInteger(A u8, B s8) -> int32."""
    from onnx import TensorProto, helper

    if kind == "int8":
        a = helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])
        b = helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])
        y = helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])
        node = helper.make_node("MatMulInteger", ["A", "B"], ["Y"])
    else:
        a, b, y = (helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in "ABY")
        node = helper.make_node("MatMul", ["A", "B"], ["Y"])
    model = helper.make_model(helper.make_graph([node], "matmul", [a, b], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return model.SerializeToString()


def _ort_matmul_session(n: int, threads: int, kind: str = "fp32", openvino: str | None = None):
    """An InferenceSession on the CPU provider, or on OpenVINO computing in `openvino` (fp32/bf16)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    data = _matmul_model(n, kind)
    if openvino is None:
        return ort.InferenceSession(data, sess_options=options, providers=["CPUExecutionProvider"])
    from mdx.runtime import providers

    providers.add_openvino(options, providers.require_openvino_cpu_devices(providers.cpu_isa()), openvino, threads)
    return ort.InferenceSession(data, sess_options=options)


def _ort_matmul_call(n: int, threads: int, a: np.ndarray, b: np.ndarray, kind: str = "fp32",
                     openvino: str | None = None):
    import onnxruntime as ort

    sess = _ort_matmul_session(n, threads, kind, openvino)
    io = sess.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(a), ort.OrtValue.ortvalue_from_numpy(b)]
    io.bind_ortvalue_input("A", values[0])
    io.bind_ortvalue_input("B", values[1])
    out = ort.OrtValue.ortvalue_from_numpy(np.empty((n, n), dtype=np.int32 if kind == "int8" else np.float32))
    io.bind_ortvalue_output("Y", out)

    def call():
        sess.run_with_iobinding(io)
    call.keep = (sess, io, values, out)
    return call


def _candidates(size: int, threads: int, native_bf16: bool, openvino: bool, errors: dict) -> dict[str, tuple]:
    """{name: (precision, call)} of every matmul that can run here at `size`; failures go to errors."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.empty((size, size))
    out = {"torch fp32": ("fp32", lambda: torch.matmul(ta, tb, out=tout))}
    if native_bf16:
        ha, hb, hout = ta.bfloat16(), tb.bfloat16(), torch.empty((size, size), dtype=torch.bfloat16)
        out["torch bf16"] = ("bf16", lambda: torch.matmul(ha, hb, out=hout))
    a8 = rng.integers(0, 255, (size, size), dtype=np.uint8)
    b8 = rng.integers(-127, 127, (size, size), dtype=np.int8)
    specs = [("onnxruntime fp32", "fp32", (a, b, "fp32", None)), ("onnxruntime int8", "int8", (a8, b8, "int8", None))]
    if openvino:
        specs.append(("openvino f32", "fp32", (a, b, "fp32", "fp32")))
        if native_bf16:
            specs.append(("openvino bf16", "bf16", (a, b, "fp32", "bf16")))
    for name, precision, (x, y, kind, ov) in specs:
        try:
            out[name] = (precision, _ort_matmul_call(size, threads, x, y, kind, ov))
        except Exception as e:  # noqa: BLE001 -- recorded; the roof is then the best of the others
            errors[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return out


def _openvino_usable() -> tuple[bool, str | None]:
    from mdx.runtime import providers

    if not providers.openvino_installed():
        return False, f"the OpenVINO plugin is not installed ({providers.OPENVINO_INSTALL})"
    try:
        providers.require_openvino_cpu_devices(providers.cpu_isa())
    except providers.ProviderError as e:
        return False, str(e)
    return True, None


def measure_matmul_peak(threads: int, n: int = MATMUL_N, repeats: int = 7, sizes: tuple[int, ...] | None = None) -> dict:
    """The fp32, bf16 and int8 matmul roofs (GFLOP/s; int8: GOP/s) of torch, ONNX Runtime and
    OpenVINO on square matmuls, interleaved; `peak_gflops` (the fp32 roof) and `peaks` per precision.

    Every side writes into a preallocated output (ONNX Runtime through IO binding), so the
    figure is the multiply itself, not the allocator; the best per-call time over `repeats`
    and over `sizes` (default: n and n/2) is each library's peak.
    """
    import torch

    from mdx.runtime.providers import cpu_isa

    torch.set_num_threads(threads)
    sizes = tuple(sizes) if sizes else (n // 2, n)
    isa = cpu_isa()
    openvino, openvino_why = _openvino_usable()
    t0 = time.perf_counter()
    best: dict[str, float] = {}
    median: dict[str, float] = {}
    errors: dict[str, str] = {} if openvino else {"openvino": openvino_why}
    precision_of: dict[str, str] = {}
    for size in sizes:
        cands = _candidates(size, threads, isa.native_bf16, openvino, errors)
        precision_of.update({k: p for k, (p, _) in cands.items()})
        stats = InterleavedTimer(repeats=repeats, warmup=1, pause_s=0.05).run({k: f for k, (_, f) in cands.items()})
        flops = matmul_flops(size)
        for k, st in stats.items():
            g = flops / st.min_s / 1e9
            if g > best.get(k, 0.0):
                best[k], median[k] = g, flops / st.median_s / 1e9
    peaks, backends = {}, {}
    for precision in ("fp32", "bf16", "int8"):
        mine = {k: v for k, v in best.items() if precision_of[k] == precision}
        if mine:
            top = max(mine, key=mine.get)
            peaks[precision], backends[precision] = round(mine[top], 1), top
    bf16_note = None if isa.native_bf16 else (f"no bf16 roof: the CPU has no native bf16 (amx_bf16/avx512_bf16; "
                                              f"{isa.describe()}), so nothing mdx runs computes in bf16 here")
    return {"n": max(sizes), "sizes": list(sizes), "threads": threads, "dtype": "float32",
            "gflops": {k: round(v, 1) for k, v in best.items()},
            "median_gflops": {k: round(v, 1) for k, v in median.items()},
            "peak_gflops": peaks["fp32"], "peak_backend": backends["fp32"], "peaks": peaks, "peak_backends": backends,
            "bf16_note": bf16_note, "errors": errors, "seconds": round(time.perf_counter() - t0, 2),
            "method": f"best per-call time of {repeats} interleaved repeats of square matmuls "
                      f"({', '.join(f'{s}^3' for s in sizes)}), preallocated outputs; fp32: torch, ORT CPU, "
                      f"OpenVINO f32; bf16: torch, OpenVINO bf16 (native bf16 only); int8: ORT MatMulInteger "
                      f"(GOP/s); numpy excluded (its OpenBLAS is slowed on some machines)"}


def peak_for(peaks: dict | float | None, precision: str) -> float | None:
    """The roof a record of `precision` is held to: its own precision's peak where measured,
    else the fp32 peak (fp16 on the CPU runs in float32 kernels)."""
    if peaks is None or isinstance(peaks, (int, float)):
        return peaks
    return peaks.get(precision) or peaks.get("fp32")
