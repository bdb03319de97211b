"""mdx-bench's peers: torch at its best (channels_last, bf16 autocast), OpenVINO, the roofs per
precision and the headline. Tiny network, few repeats: the wiring, not a measurement."""

from __future__ import annotations

import numpy as np
import pytest

import runtime_helpers as h
from mdx.bench import headline
from mdx.bench.records import check_record, make_record
from mdx.bench.timing import summarize
from mdx.runtime import providers
from mdx.runtime.providers import CpuIsa

torch = pytest.importorskip("torch")

OPENVINO = providers.OPENVINO
EPYC = CpuIsa("AuthenticAMD", "AMD EPYC", frozenset({"avx2"}), "/proc/cpuinfo")


@pytest.fixture(scope="module")
def net():
    from mdx.bench.networks import Network
    from mdx.runtime.schedules import make_schedule

    model, path = h.cached_tiny()
    cfg = model.config
    return Network(name="tiny", torch_model=model.eval(), schedule=make_schedule("linear", cfg.num_train_timesteps),
                   class_names=[str(i) for i in range(cfg.n_classes)],
                   sample_shape=(cfg.in_channels, cfg.image_size, cfg.image_size), onnx={"fp32": path})


def _openvino_reason(path) -> str | None:
    from mdx.runtime.session import ModelError, OnnxDenoiser

    try:
        OnnxDenoiser.load(path, provider="openvino", compute_precision="fp32", threads=1)
    except ModelError as e:
        return str(e)
    return None


def test_forward_runs_every_peer_or_says_why(net):
    from mdx.bench.forward import bf16_skip_reason, run_forward

    with h.torch_one_thread():
        recs = run_forward(net, threads=1, flops_per_image=1e6, peak_gflops={"fp32": 10.0, "int8": 20.0},
                           batches=(1,), repeats=5, target_s=0.001, with_compile=False, measure_memory=False,
                           log=lambda m: None)
    assert all(check_record(r) == [] for r in recs), [check_record(r) for r in recs]
    by = {(r["backend"], r["provider"], r.get("variant"), r["precision"]): r for r in recs}
    for key in (("torch", "cpu", "eager", "fp32"), ("torch", "cpu", "channels_last", "fp32"),
                ("onnxruntime", "CPUExecutionProvider", "io_binding", "fp32")):
        assert by[key]["median_s"] > 0 and not by[key].get("skipped")
    assert by[("onnxruntime", "CPUExecutionProvider", "io_binding", "fp32")]["roof_gflops"] == 10.0
    bf16 = by[("torch", "cpu", "bf16_autocast", "bf16")]
    assert bf16.get("skipped") == bf16_skip_reason()  # None where the CPU has native bf16: then it ran
    ov = by[("onnxruntime", OPENVINO, "io_binding", "fp32")]
    reason = _openvino_reason(net.onnx["fp32"])
    assert ov.get("skipped") == reason
    assert ("onnxruntime", OPENVINO, "io_binding", "bf16") in by
    assert not [r for r in recs if r["provider"] == OPENVINO and r["precision"] == "int8"]  # no int8 file here


def test_sampling_peers_and_the_headline(net):
    from mdx.bench.sampling import Config, run_sampling

    cfg = Config("dpmpp", 3, 2.0, 2, peers=True)
    with h.torch_one_thread():
        recs = run_sampling(net, threads=1, configs=[cfg, Config("ddim", 2, 1.0, 1)], repeats=5, log=lambda m: None)
    assert all(check_record(r) == [] for r in recs)
    live = [r for r in recs if not r.get("skipped")]
    peers = {(r["backend"], r.get("variant")) for r in live if r["batch"] == 2}
    assert {("torch", "eager"), ("torch", "channels_last"), ("onnxruntime", "io_binding")} <= peers
    assert not [r for r in recs if r["batch"] == 1 and r.get("peer")]  # plain configs: no peers
    for r in live:
        if r["backend"] == "onnxruntime" or r.get("variant") == "channels_last":
            assert r["max_abs_diff"] < 1e-3 if r["precision"] == "fp32" else True  # same noise, same images
    rows = headline.compute(recs)
    assert [(r["suite"], r["batch"]) for r in rows] == [("sampling", 2)]
    best_torch = min(r["median_s"] for r in live if r["batch"] == 2 and r["backend"] == "torch")
    assert rows[0]["torch_s"] == best_torch and rows[0]["ratio"] == pytest.approx(best_torch / rows[0]["mdx_s"])


def _rec(backend, provider, precision, batch, median, **kw):
    return make_record("forward", backend, provider, precision, batch, stats=summarize([median] * 5),
                       network="n", **kw)


def test_headline_takes_the_best_live_config_of_each_side():
    recs = [_rec("torch", "cpu", "fp32", 8, 0.30, variant="eager"),
            _rec("torch", "cpu", "bf16", 8, 0.10, variant="bf16_autocast"),
            _rec("onnxruntime", "CPUExecutionProvider", "fp32", 8, 0.20, variant="io_binding"),
            _rec("onnxruntime", OPENVINO, "bf16", 8, 0.04, variant="io_binding"),
            _rec("onnxruntime", "CPUExecutionProvider", "fp16", 8, 0.01, variant="io_binding"),  # not deployed
            make_record("forward", "onnxruntime", OPENVINO, "int8", 8, skipped="no device", network="n"),
            _rec("torch", "cpu", "fp32", 1, 0.01, variant="eager")]  # batch 1: no mdx side, no row
    (row,) = headline.compute(recs)
    assert (row["batch"], row["mdx"], row["torch"]) == (8, "ORT+OpenVINO bf16", "torch bf16 autocast")
    assert row["ratio"] == pytest.approx(2.5)
    assert "| forward | one forward pass (n) | 8 | ORT+OpenVINO bf16 |" in headline.markdown(recs)
    assert "no headline" in headline.markdown([])


def test_matmul_roofs_per_precision_without_numpy(monkeypatch):
    from mdx.bench import roofline

    out = roofline.measure_matmul_peak(1, sizes=(64,), repeats=5)
    assert "numpy" not in " ".join(out["gflops"])
    assert out["peaks"]["fp32"] == out["peak_gflops"] > 0 and out["peaks"]["int8"] > 0
    assert ("bf16" in out["peaks"]) == providers.cpu_isa().native_bf16
    assert roofline.peak_for(out["peaks"], "int8") == out["peaks"]["int8"]
    assert roofline.peak_for({"fp32": 5.0}, "bf16") == 5.0 and roofline.peak_for(7.0, "int8") == 7.0
    monkeypatch.setattr(providers, "cpu_isa", lambda: EPYC)
    assert "bf16" not in roofline.measure_matmul_peak(1, sizes=(32,), repeats=5)["peaks"]


def test_bf16_rows_skip_naming_the_cpu(monkeypatch):
    from mdx.bench.forward import bf16_skip_reason

    monkeypatch.setattr(providers, "cpu_isa", lambda: EPYC)
    assert "no native bf16" in bf16_skip_reason() and "AMD EPYC (avx2)" in bf16_skip_reason()


def test_machine_info_names_the_isa_and_openvino():
    from mdx.bench.machine import machine_info

    info = machine_info()
    isa = providers.cpu_isa()
    assert info["isa"]["native_bf16"] == isa.native_bf16 and info["isa"]["flags"] == sorted(isa.flags)
    assert info["openvino"]["installed"] == providers.openvino_installed()
    assert np.isfinite(len(info["cpu_flags"]))


def test_a_tight_budget_drops_the_peers_before_the_plain_comparison():
    from mdx.bench.sampling import Config, Side, _fit_budget
    from mdx.bench.timing import Budget

    def side(key, backend, peer):
        return Side(key, backend, "cpu", "fp32", "eager", "", None, None, peer=peer)
    sides = [side("torch", "torch", False), side("onnxruntime fp32", "onnxruntime", False),
             side("torch channels_last", "torch", True), side("torch x", "torch", True)]
    cost = {"torch": lambda b: 1.0, "onnxruntime": lambda b: 1.0}  # 2 s per step and repeat, per side pair
    cfg = Config("ddim", 4, 1.0, 1, peers=True)  # plain: 2 * 5 * 5.2 = 52 s; with 3 torch sides: 156 s
    assert _fit_budget(sides, cfg, 4, cost, 5, Budget(1000.0)) == (sides, None, {})
    chosen, skip, dropped = _fit_budget(sides, cfg, 4, cost, 5, Budget(100.0))
    assert skip is None and set(dropped) == set(sides[2:]) and "with its peers" in dropped[sides[2]]
    chosen, skip, dropped = _fit_budget(sides, cfg, 4, cost, 5, Budget(10.0))
    assert skip and not dropped
    assert _fit_budget(sides, Config("ddim", 4, 1.0, 1), 4, cost, 5, None)[0] == sides[:2]
