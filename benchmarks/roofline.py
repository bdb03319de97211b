"""The roofline figures: FLOPs of one network evaluation, the machine's fp32 matmul peak, shares.

- FLOPs are counted once with `torch.utils.flop_counter.FlopCounterMode` on a batch-1
  forward pass (2 FLOPs per multiply-add; convolutions, transposed convolutions and the
  linear layers; the element-wise ops -- norms, GELU, adds -- are not counted, they are a
  few per cent of the total and do not run on the matrix units anyway). FLOPs are linear
  in the batch, so one count serves every batch size.
- The peak is measured in the same run: the best per-call time of large square fp32 matrix
  multiplies (1024^3 and 2048^3, preallocated outputs) in numpy, torch and ONNX Runtime, each
  on the same thread count, and the best of the three is "the machine's fp32 matmul peak".
  A convolution can beat it (MLAS's NCHWc conv kernels are better tuned on some CPUs than its
  SGEMM); a share above 100% says the matmul was not the machine's best fp32 kernel. On a shared machine this is the
  peak available at the time, which is the right denominator for figures taken then.
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


# --- the matmul peak --------------------------------------------------------------------


def _ort_matmul_session(n: int, threads: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])
    b = helper.make_tensor_value_info("B", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [n, n])
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["Y"])], "matmul", [a, b], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])


def measure_matmul_peak(threads: int, n: int = MATMUL_N, repeats: int = 7, sizes: tuple[int, ...] | None = None) -> dict:
    """The best fp32 GFLOP/s of numpy, torch and ONNX Runtime on square matmuls (interleaved).

    Every side writes into a preallocated output (ONNX Runtime through IO binding), so the
    figure is the multiply itself, not the allocator; the best per-call time over `repeats`
    and over `sizes` (default: n and n/2) is each library's peak.
    """
    import torch

    torch.set_num_threads(threads)
    sizes = tuple(sizes) if sizes else (n // 2, n)
    t0 = time.perf_counter()
    best: dict[str, float] = {}
    median: dict[str, float] = {}
    errors: dict[str, str] = {}
    for size in sizes:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((size, size), dtype=np.float32)
        b = rng.standard_normal((size, size), dtype=np.float32)
        out = np.empty((size, size), dtype=np.float32)
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.empty((size, size))
        fns = {"numpy": lambda: np.matmul(a, b, out=out), "torch": lambda: torch.matmul(ta, tb, out=tout)}
        try:
            fns["onnxruntime"] = _ort_matmul_call(size, threads, a, b)
        except Exception as e:  # noqa: BLE001 -- recorded; the peak is then the best of the others
            errors["onnxruntime"] = f"{type(e).__name__}: {e}"
        stats = InterleavedTimer(repeats=repeats, warmup=1, pause_s=0.05).run(fns)
        flops = matmul_flops(size)
        for k, st in stats.items():
            g = flops / st.min_s / 1e9
            if g > best.get(k, 0.0):
                best[k], median[k] = g, flops / st.median_s / 1e9
    top = max(best, key=best.get)
    return {"n": max(sizes), "sizes": list(sizes), "threads": threads, "dtype": "float32",
            "gflops": {k: round(v, 1) for k, v in best.items()},
            "median_gflops": {k: round(v, 1) for k, v in median.items()},
            "peak_gflops": round(best[top], 1), "peak_backend": top, "errors": errors,
            "seconds": round(time.perf_counter() - t0, 2),
            "method": f"best per-call time of {repeats} interleaved repeats of square fp32 matmuls "
                      f"({', '.join(f'{s}^3' for s in sizes)}), preallocated outputs"}


def _ort_matmul_call(n: int, threads: int, a: np.ndarray, b: np.ndarray):
    import onnxruntime as ort

    sess = _ort_matmul_session(n, threads)
    io = sess.io_binding()
    values = [ort.OrtValue.ortvalue_from_numpy(a), ort.OrtValue.ortvalue_from_numpy(b)]
    io.bind_ortvalue_input("A", values[0])
    io.bind_ortvalue_input("B", values[1])
    out = ort.OrtValue.ortvalue_from_numpy(np.empty((n, n), dtype=np.float32))
    io.bind_ortvalue_output("Y", out)

    def call():
        sess.run_with_iobinding(io)
    call.keep = (sess, io, values, out)
    return call
