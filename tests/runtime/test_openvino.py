"""The OpenVINO provider and compute precision: ISA detection, the auto rule, every bad value,
parity with the CPU provider (where the plugin offers a device), and the CLI flags.

Parity tests need the plugin (`microdiffusion[openvino]`) and a CPU it offers a device for
(Intel); elsewhere (e.g. AMD) they skip with the reason, and the tests of how asking for it is
refused run instead.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import runtime_helpers as h
from mdx.runtime import providers, session
from mdx.runtime.cli import main as sample_main
from mdx.runtime.pipeline import generate
from mdx.runtime.providers import CPU, OPENVINO, CpuIsa, ProviderError, parse_cpuinfo
from mdx.runtime.session import ModelError, OnnxDenoiser

# bf16 bounds (relative RMS against the CPU provider's fp32): one forward pass of the tiny
# model, and the final images of a 4-step loop. The shipped model measured 3.7e-3 per forward
# pass on AMX (docs: issue 10); bf16 keeps 8 mantissa bits (~4e-3 per rounding), so 2e-2 leaves
# room for the tiny model's few, larger layers and 5e-2 for the loop's accumulation.
BF16_FORWARD_RMS = 2e-2
BF16_LOOP_RMS = 5e-2
F32_MAX_ABS = 1e-4

XEON_AMX = CpuIsa("GenuineIntel", "Intel Xeon", frozenset({"avx2", "avx512f", "avx512_vnni", "avx512_bf16",
                                                           "amx_bf16", "amx_int8"}), "/proc/cpuinfo")
XEON_AVX512 = CpuIsa("GenuineIntel", "Intel Xeon", frozenset({"avx2", "avx512f", "avx512_vnni"}), "/proc/cpuinfo")
EPYC = CpuIsa("AuthenticAMD", "AMD EPYC", frozenset({"avx2"}), "/proc/cpuinfo")


def rel_rms(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - ref) ** 2) / np.mean(ref**2)))


@pytest.fixture(scope="module")
def tiny():
    return h.cached_tiny()[1]


def openvino_reason(path) -> str | None:
    """None where OpenVINO really runs this model here, else why not (the skip reason)."""
    if not providers.openvino_installed():
        return f"the OpenVINO plugin is not installed ({providers.OPENVINO_INSTALL})"
    try:
        OnnxDenoiser.load(path, provider="openvino", compute_precision="fp32", threads=1)
    except ModelError as e:
        return str(e)
    return None


@pytest.fixture(scope="module")
def openvino_runs(tiny):
    reason = openvino_reason(tiny)
    if reason is not None:
        pytest.skip(reason)


def feeds(batch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, 16, 16), dtype=np.float32)
    t = rng.integers(0, 50, batch).astype(np.float32)
    c = np.eye(3, dtype=np.float32)[np.arange(batch) % 3]
    return x, t, c


# --- the CPU's instruction sets -------------------------------------------------------------


def test_parse_cpuinfo_reads_vendor_model_and_the_flags_that_matter():
    text = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n\n"
            "processor\t: 1\nvendor_id\t: Other\nflags\t\t: sse2\n")
    isa = parse_cpuinfo(text)
    assert (isa.vendor, isa.model) == ("GenuineIntel", "Intel(R) Xeon(R) Platinum 8480+")
    assert isa.flags == {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"}
    assert isa.native_bf16 and isa.avx512
    amd = parse_cpuinfo("vendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t: sse2 avx2 fma\n")
    assert amd.flags == {"avx2"} and not amd.native_bf16 and not amd.avx512
    # avx512_bf16 alone (Cooper Lake, Zen 4) is native bf16 too
    assert parse_cpuinfo("flags: avx512f avx512_bf16").native_bf16
    assert parse_cpuinfo("").flags == frozenset() and not parse_cpuinfo("").native_bf16


def test_cpu_isa_without_proc_cpuinfo_assumes_no_bf16(monkeypatch):
    def no_file(*args, **kwargs):
        raise FileNotFoundError("/proc/cpuinfo")

    providers.cpu_isa.cache_clear()
    monkeypatch.setattr("builtins.open", no_file)
    try:
        isa = providers.cpu_isa()
    finally:
        monkeypatch.undo()
        providers.cpu_isa.cache_clear()
    assert isa.source == "platform" and isa.flags == frozenset() and not isa.native_bf16


# --- compute precision and provider names -----------------------------------------------------


def test_auto_precision_is_bf16_only_where_native():
    assert providers.resolve_openvino_precision("auto", XEON_AMX) == "bf16"
    assert providers.resolve_openvino_precision("auto", XEON_AVX512) == "fp32"
    assert providers.resolve_openvino_precision("auto", EPYC) == "fp32"
    assert providers.resolve_openvino_precision("bf16", XEON_AMX) == "bf16"
    assert providers.resolve_openvino_precision("fp32", XEON_AMX) == "fp32"


def test_bf16_without_native_bf16_is_refused_naming_the_cpu(tiny, monkeypatch):
    with pytest.raises(ProviderError, match=r"needs a CPU with native bf16 .*AMD EPYC \(avx2\).*use fp32"):
        providers.resolve_openvino_precision("bf16", EPYC)
    monkeypatch.setattr(providers, "cpu_isa", lambda: EPYC)
    for provider in ("openvino", "auto"):  # auto with bf16 asked means OpenVINO: refused the same way
        with pytest.raises(ModelError, match=r"needs a CPU with native bf16"):
            OnnxDenoiser.load(tiny, provider=provider, compute_precision="bf16")


@pytest.mark.parametrize("bad", ["fp16", "int8", "BF16", "", None])
def test_unknown_compute_precision(tiny, bad):
    with pytest.raises(ModelError, match=r"unknown compute precision .*choose one of auto, fp32, bf16"):
        OnnxDenoiser.load(tiny, provider="cpu", compute_precision=bad)


@pytest.mark.parametrize("provider", ["cpu", CPU, "cuda"])
def test_bf16_on_a_provider_that_cannot_is_refused(tiny, provider):
    with pytest.raises(ModelError, match=r"bf16 needs the OpenVINO provider"):
        OnnxDenoiser.load(tiny, provider=provider, compute_precision="bf16")


def test_short_provider_names_and_the_reported_precision(tiny):
    assert [providers.canonical_provider(n) for n in ("cpu", "CPU", "cuda", "openvino", "OpenVINO", "auto",
                                                      CPU, "Foo")] == [CPU, CPU, providers.CUDA, OPENVINO,
                                                                       OPENVINO, "auto", CPU, "Foo"]
    d = OnnxDenoiser.load(tiny, provider="cpu", compute_precision="fp32", threads=1)
    assert d.provider == CPU and d.compute_precision == "fp32"  # the file's precision on the CPU provider


def test_plugin_missing_is_one_clear_line(tiny, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "onnxruntime_ep_openvino", None)  # import fails
    monkeypatch.setattr(providers, "_registered", False)
    assert not providers.openvino_installed()
    with pytest.raises(ModelError, match=r"needs its plugin: pip install 'microdiffusion\[openvino\]'") as e:
        OnnxDenoiser.load(tiny, provider="openvino", compute_precision="fp32")
    assert "\n" not in str(e.value)
    assert providers.auto_prefers_openvino(XEON_AMX) == (False, None)  # auto: the CPU provider, silently


def test_no_device_is_one_clear_line(tiny, monkeypatch):
    """The plugin (1.8.1) offers no device on non-Intel CPUs: naming it says so."""
    monkeypatch.setattr(providers, "openvino_cpu_devices", lambda: [])
    with pytest.raises(ProviderError, match=r"offers no CPU device here \(AuthenticAMD.*use --provider cpu"):
        providers.require_openvino_cpu_devices(EPYC)


# --- the auto rule ----------------------------------------------------------------------------


def test_auto_rule_prefers_openvino_only_on_avx512_with_a_device(monkeypatch):
    asked = []
    monkeypatch.setattr(providers, "openvino_installed", lambda: True)
    monkeypatch.setattr(providers, "openvino_cpu_devices", lambda: asked.append(1) or ["device"])
    assert providers.auto_prefers_openvino(XEON_AMX) == (True, None)
    assert providers.auto_prefers_openvino(XEON_AVX512) == (True, None)
    n = len(asked)
    assert providers.auto_prefers_openvino(EPYC) == (False, None)
    assert len(asked) == n  # on AVX2-only CPUs the plugin is not even loaded
    monkeypatch.setattr(providers, "openvino_cpu_devices", lambda: [])
    assert providers.auto_prefers_openvino(XEON_AMX) == (False, None)

    def broken():
        raise ProviderError("cannot register the OpenVINO plugin x: boom")
    monkeypatch.setattr(providers, "openvino_cpu_devices", broken)
    prefer, note = providers.auto_prefers_openvino(XEON_AMX)
    assert not prefer and "boom" in note  # auto stays on the CPU provider and says why


def test_auto_takes_openvino_where_the_rule_says(tiny, monkeypatch):
    """open_session's auto path: the rule's choice, reported in the notes (OpenVINO faked by a
    CPU session, so that this runs on every machine)."""
    monkeypatch.setattr(providers, "cpu_isa", lambda: XEON_AMX)
    monkeypatch.setattr(providers, "auto_prefers_openvino", lambda isa: (True, None))
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: [CPU])
    picked = []

    def fake(path, threads, compute_precision, isa):
        picked.append((compute_precision, isa))
        return session._create_session(path, [CPU], threads), providers.resolve_openvino_precision(compute_precision, isa)
    monkeypatch.setattr(session, "_openvino_session", fake)
    _, notes, precision = session.open_session(tiny, "auto")
    assert picked == [("auto", XEON_AMX)] and precision == "bf16" and "OpenVINO computes in bf16" in notes
    monkeypatch.setattr(providers, "auto_prefers_openvino", lambda isa: (False, None))
    _, notes, precision = session.open_session(tiny, "auto")
    assert precision is None and len(picked) == 1
    _, _, precision = session.open_session(tiny, "auto", compute_precision="bf16")  # bf16 asked: only OpenVINO
    assert precision == "bf16" and len(picked) == 2


def test_auto_on_this_machine_runs_a_provider_that_really_runs(tiny):
    d = OnnxDenoiser.load(tiny, provider="auto", threads=1)
    assert d.provider == d.session.get_providers()[0]
    prefer, _ = providers.auto_prefers_openvino(providers.cpu_isa())
    if d.provider != providers.CUDA:
        assert (d.provider == OPENVINO) == prefer


# --- parity where OpenVINO runs ---------------------------------------------------------------


def test_openvino_f32_matches_the_cpu_provider(tiny, openvino_runs):
    cpu = OnnxDenoiser.load(tiny, provider="cpu", threads=1)
    ov = OnnxDenoiser.load(tiny, provider="openvino", compute_precision="fp32", threads=1)
    assert (ov.provider, ov.compute_precision) == (OPENVINO, "fp32")
    for batch in (1, 5):
        x, t, c = feeds(batch)
        ref = cpu(x, t, c)
        assert np.abs(ov(x, t, c) - ref).max() <= F32_MAX_ABS
        bound = ov.binding(batch)  # the sampling loop's path: IO binding over numpy buffers
        bound.sample[...], bound.timestep[...], bound.context[...] = x, t, c
        assert np.abs(bound.run() - ref).max() <= F32_MAX_ABS


def test_openvino_bf16_within_its_bound(tiny, openvino_runs):
    if not providers.cpu_isa().native_bf16:
        with pytest.raises(ModelError, match="native bf16"):
            OnnxDenoiser.load(tiny, provider="openvino", compute_precision="bf16")
        return
    cpu = OnnxDenoiser.load(tiny, provider="cpu", threads=1)
    ov = OnnxDenoiser.load(tiny, provider="openvino", compute_precision="bf16", threads=1)
    assert ov.compute_precision == "bf16"
    x, t, c = feeds(8)
    assert rel_rms(ov(x, t, c), cpu(x, t, c)) <= BF16_FORWARD_RMS


def test_sampling_loop_on_openvino_equals_the_cpu_loop(tiny, openvino_runs):
    ctx = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    kwargs = dict(sampler="dpmpp", steps=4, context=ctx, guidance=2.0, seed=1)
    ref = generate(OnnxDenoiser.load(tiny, provider="cpu", threads=1), **kwargs).samples
    f32 = generate(OnnxDenoiser.load(tiny, provider="openvino", compute_precision="fp32", threads=1), **kwargs)
    assert np.abs(f32.samples - ref).max() <= 10 * F32_MAX_ABS
    if providers.cpu_isa().native_bf16:
        bf16 = generate(OnnxDenoiser.load(tiny, provider="openvino", compute_precision="bf16", threads=1), **kwargs)
        assert rel_rms(bf16.samples, ref) <= BF16_LOOP_RMS


# --- the command line -------------------------------------------------------------------------


def _sample(tmp_path, *args):
    out = tmp_path / "s.png"
    result = CliRunner().invoke(sample_main, ["--threads", "1", "--steps", "2", "-n", "2", "--out", str(out),
                                              *map(str, args)], catch_exceptions=False)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    return result, lines, out


@pytest.mark.parametrize("args, needle", [
    (["--compute-precision", "fp16"], "'fp16' is not one of 'auto', 'fp32', 'bf16'"),
    (["--provider", "cpu", "--compute-precision", "bf16"], "bf16 needs the OpenVINO provider"),
    (["--provider", "NoSuchProvider"], "unknown provider 'NoSuchProvider'"),
])
def test_cli_bad_provider_and_precision_values(tiny, tmp_path, args, needle):
    result, lines, out = _sample(tmp_path, "--model", tiny, *args)
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("mdx-sample: error:"), lines
    assert needle in lines[0] and not out.exists()


def test_cli_openvino_runs_or_says_why_in_one_line(tiny, tmp_path):
    result, lines, out = _sample(tmp_path, "--model", tiny, "--provider", "openvino", "--compute-precision", "fp32")
    reason = openvino_reason(tiny)
    if reason is None:
        assert result.exit_code == 0 and out.is_file()
        assert f"on {OPENVINO} (fp32" in result.stderr and f"provider {OPENVINO}" in result.stdout
    else:
        assert result.exit_code == 2 and len(lines) == 1 and not out.exists(), lines
        assert lines[0] == f"mdx-sample: error: {reason}"


def test_cli_reports_provider_and_precision(tiny, tmp_path):
    result, _, out = _sample(tmp_path, "--model", tiny, "--provider", "cpu", "--compute-precision", "fp32")
    assert result.exit_code == 0 and out.is_file()
    assert f"on {CPU} (fp32, loaded in" in result.stderr


def test_eval_cli_takes_the_flags(tiny, tmp_path):
    from mdx.runtime.evaluate import main as eval_main

    result = CliRunner().invoke(eval_main, ["--model", str(tiny), "--provider", "cpu", "--compute-precision", "bf16",
                                            "-n", "2"], catch_exceptions=False)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "bf16 needs the OpenVINO provider" in lines[0], lines


def test_auto_falls_back_to_the_cpu_provider_when_openvino_fails(tiny, monkeypatch):
    monkeypatch.setattr(providers, "auto_prefers_openvino", lambda isa: (True, None))
    monkeypatch.setattr(session.ort, "get_available_providers", lambda: [CPU])

    def fails(*args):
        raise ModelError("cannot load x as an ONNX model: boom")
    monkeypatch.setattr(session, "_openvino_session", fails)
    s, notes, precision = session.open_session(tiny, "auto")
    assert s.get_providers()[0] == CPU and precision is None
    assert any("OpenVINO did not start" in n and "boom" in n for n in notes)
    with pytest.raises(ModelError, match="boom"):  # named, or bf16 asked: the error itself
        session.open_session(tiny, "openvino")
