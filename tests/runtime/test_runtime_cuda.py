"""The CUDA code paths: IO binding on the device, HEURISTIC conv search, CUDA graphs.

The GPU tests run only where onnxruntime really gets CUDAExecutionProvider (a session asked
for CUDA reports it in get_providers()); elsewhere they are skipped. The preload test needs
only onnxruntime-gpu.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import runtime_helpers as h
from mdx.runtime.cli import main
from mdx.runtime.pipeline import build_context, generate
from mdx.runtime.session import CPU, CUDA, OnnxDenoiser, usable_providers

CUDA_VS_CPU_ATOL = 2e-3  # cuDNN's algorithms (and TF32 where the GPU has it) differ from the CPU's


@pytest.fixture(scope="session")
def tiny():
    return h.cached_tiny()


@pytest.fixture(scope="session")
def cuda_ok(tiny):
    if CUDA not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider in this build")
    if CUDA not in usable_providers(tiny[1]):
        pytest.skip("CUDA does not start here (no GPU or no CUDA/cuDNN libraries)")
    return True


def test_preload_dlls_called_before_cuda(tiny, monkeypatch):
    if CUDA not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider in this build")
    calls = []
    monkeypatch.setattr(ort, "preload_dlls", lambda *a, **k: calls.append(1), raising=False)
    OnnxDenoiser.load(tiny[1], provider="auto")
    assert calls, "preload_dlls was not called before trying CUDA"
    calls.clear()
    OnnxDenoiser.load(tiny[1], provider=CPU)
    assert not calls  # not needed, not called


@pytest.mark.gpu
def test_auto_takes_cuda(cuda_ok, tiny):
    d = OnnxDenoiser.load(tiny[1], provider="auto")
    assert d.provider == CUDA and d.notes == []


@pytest.mark.gpu
def test_cuda_provider_options(cuda_ok, tiny):
    d = OnnxDenoiser.load(tiny[1], provider=CUDA, cuda_graph=True)
    options = d.session.get_provider_options()[CUDA]
    assert options["cudnn_conv_algo_search"] == "HEURISTIC"
    assert options["enable_cuda_graph"] == "1"
    assert d.cuda_graph


@pytest.mark.gpu
def test_cuda_matches_cpu_and_torch(cuda_ok, tiny):
    gpu = OnnxDenoiser.load(tiny[1], provider=CUDA)
    cpu = OnnxDenoiser.load(tiny[1], provider=CPU)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 16, 16), dtype=np.float32)
    t = np.array([0, 10, 20, 30, 49], np.float32)
    c = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1]]
    np.testing.assert_allclose(gpu(x, t, c), cpu(x, t, c), atol=CUDA_VS_CPU_ATOL, rtol=0)
    np.testing.assert_allclose(gpu(x, t, c), h.torch_forward(tiny[0], x, t, c), atol=CUDA_VS_CPU_ATOL, rtol=0)


@pytest.mark.gpu
def test_cuda_binding_keeps_device_buffers(cuda_ok, tiny):
    d = OnnxDenoiser.load(tiny[1], provider=CUDA)
    bound = d.binding(4)
    pointers = {k: v.data_ptr() for k, v in bound._values.items()} | {"out": bound._out.data_ptr()}
    assert all(v.device_name().lower() == "cuda" for v in bound._values.values())
    rng = np.random.default_rng(1)
    outs = []
    for step in range(3):
        bound.sample[...] = rng.standard_normal(bound.sample.shape, dtype=np.float32)
        bound.timestep.fill(10 * step)
        bound.context[...] = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
        outs.append(bound.run())
    assert outs[0] is outs[1] is outs[2]  # one preallocated host output, reused
    assert {k: v.data_ptr() for k, v in bound._values.items()} | {"out": bound._out.data_ptr()} == pointers
    np.testing.assert_allclose(outs[2], d(bound.sample, bound.timestep, bound.context), atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cuda_graph_equals_plain_cuda(cuda_ok, tiny, guidance):
    plain = OnnxDenoiser.load(tiny[1], provider=CUDA)
    graph = OnnxDenoiser.load(tiny[1], provider=CUDA, cuda_graph=True)
    context, _ = build_context(plain.info.class_names, None, False, 6)
    want = generate(plain, sampler="ddpm", steps=20, context=context, guidance=guidance, seed=4).samples
    got = generate(graph, sampler="ddpm", steps=20, context=context, guidance=guidance, seed=4).samples
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # A second run replays the captured graph with new inputs written in place.
    again = generate(graph, sampler="ddpm", steps=20, context=context, guidance=guidance, seed=5).samples
    np.testing.assert_allclose(
        again, generate(plain, sampler="ddpm", steps=20, context=context, guidance=guidance, seed=5).samples,
        atol=1e-4, rtol=0)


@pytest.mark.gpu
def test_cuda_graph_several_batch_sizes(cuda_ok, tiny):
    graph = OnnxDenoiser.load(tiny[1], provider=CUDA, cuda_graph=True)
    plain = OnnxDenoiser.load(tiny[1], provider=CUDA)
    for n in (2, 5, 2):  # each batch size has its own captured graph (gpu_graph_id)
        context, _ = build_context(graph.info.class_names, None, False, n)
        got = generate(graph, sampler="ddim", steps=10, context=context, seed=n).samples
        want = generate(plain, sampler="ddim", steps=10, context=context, seed=n).samples
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert {b.graph_id for b in graph._bindings.values()} == {1, 2}


@pytest.mark.gpu
def test_cuda_parity_with_torch_reference(cuda_ok, tiny):
    reference = pytest.importorskip("mdx.train.reference")
    d = OnnxDenoiser.load(tiny[1], provider=CUDA, cuda_graph=True)
    context, _ = build_context(d.info.class_names, None, False, 6)
    ours = generate(d, sampler="ddim", steps=25, context=context, seed=11).samples
    with h.torch_one_thread():
        theirs = reference.sample_reference(tiny[0], d.info.schedule, sampler="ddim", steps=25, context=context, seed=11)
    assert np.abs(ours - theirs).max() <= 1e-2  # TF32 / cuDNN differences accumulate over 25 steps


@pytest.mark.gpu
def test_cli_on_cuda_with_graph_and_telemetry(cuda_ok, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--model", str(tiny[1]), "--provider", CUDA, "--cuda-graph", "--steps", "10",
                                       "-n", "16", "--out", "s.npz", "--telemetry", "gpu.csv"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1].endswith("provider CUDAExecutionProvider")
    try:
        import pynvml  # noqa: F401
    except ImportError:
        assert "nvidia-ml-py is not installed" in result.stderr
    else:
        lines = (tmp_path / "gpu.csv").read_text().splitlines()
        assert lines[0].startswith("time_s,gpu_util_pct") and len(lines) >= 2
