"""mdx-bench smoke tests: statistics, interleaving, schema, roofline arithmetic, report, CLI errors.

No real benchmarking happens here: clocks are fake, networks tiny, and the whole file runs in
a few seconds.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mdx.bench import report
from mdx.bench.cli import main as bench_main
from mdx.bench.records import REQUIRED, check_record, make_record
from mdx.bench.roofline import achieved_gflops, matmul_flops, peak_share
from mdx.bench.sampling import GUIDANCE, full_configs, quick_configs
from mdx.bench.timing import Budget, InterleavedTimer, calibrate_number, peak_rss_mb, summarize
from runtime_helpers import fail_temporary_file


class FakeClock:
    """A clock that advances only when a fake workload says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> None:
        self.now += dt


# --- statistics ------------------------------------------------------------------------------


def test_summarize_median_p90_on_known_samples():
    s = summarize([5.0, 1.0, 4.0, 2.0, 3.0])
    assert s.median_s == 3.0
    assert s.p90_s == pytest.approx(4.6)  # linear interpolation between 4 and 5
    assert (s.min_s, s.max_s, s.mean_s, s.repeats) == (1.0, 5.0, 3.0, 5)
    even = summarize([1.0, 2.0, 3.0, 10.0])
    assert even.median_s == 2.5
    assert even.p90_s == pytest.approx(3.0 + 0.7 * 7.0)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [-1.0, 2.0]])
def test_summarize_rejects_bad_samples(bad):
    with pytest.raises(ValueError):
        summarize(bad)


def test_interleaved_timer_order_and_per_call_times():
    clock = FakeClock()
    calls = []

    def work(name, dt):
        def fn():
            calls.append(name)
            clock.advance(dt)
        return fn

    timer = InterleavedTimer(repeats=5, warmup=2, clock=clock)
    stats = timer.run({"A": work("A", 0.010), "B": work("B", 0.002)}, number={"A": 1, "B": 4})
    # A B A B ...: warm-up rounds first, then the timed rounds, never two timed repeats of one side in a row
    assert [n for p, n in timer.order if p == "warmup"] == ["A", "B", "A", "B"]
    timed = [n for p, n in timer.order if p == "timed"]
    assert timed == ["A", "B"] * 5
    assert calls == ["A", "B"] * 2 + (["A"] + ["B"] * 4) * 5
    assert stats["A"].median_s == pytest.approx(0.010)
    assert stats["B"].median_s == pytest.approx(0.002)  # 4 calls per repeat, divided by 4
    assert stats["B"].number == 4 and stats["A"].repeats == 5


def test_interleaved_timer_sync_inside_the_timed_region_and_pause_outside():
    clock = FakeClock()
    events = []
    timer = InterleavedTimer(repeats=3, warmup=0, clock=clock, sync=lambda: (events.append("sync"), clock.advance(1.0)),
                             pause_s=0.5, sleep=lambda s: (events.append("pause"), clock.advance(100.0)))
    stats = timer.run({"A": lambda: clock.advance(1.0)},
                      before={"A": lambda: (events.append("warm"), clock.advance(50.0))})
    assert stats["A"].median_s == pytest.approx(2.0)  # the call and the sync, never the pause or the warm call
    assert events == ["pause", "warm", "sync"] * 3  # the warm-up call comes after the idle gap


def test_interleaved_timer_three_sides_round_robin():
    clock = FakeClock()
    timer = InterleavedTimer(repeats=5, warmup=0, clock=clock)
    timer.run({k: (lambda: clock.advance(0.001)) for k in "ABC"})
    assert [n for _, n in timer.order] == list("ABC") * 5


def test_calibrate_number_targets_the_repeat_length():
    clock = FakeClock()
    assert calibrate_number(lambda: clock.advance(0.002), 0.05, clock=clock) == 25
    assert calibrate_number(lambda: clock.advance(1.0), 0.05, clock=clock) == 1


def test_budget_with_a_fake_clock():
    clock = FakeClock()
    b = Budget(100.0, clock=clock)
    clock.advance(30.0)
    assert b.left() == pytest.approx(70.0)
    assert b.allows(70.0) and not b.allows(70.1)
    assert "70 s" in b.reason("x", 80.0)
    assert Budget(None).allows(1e9)


def test_peak_rss_is_at_least_the_current_rss():
    from mdx.bench.timing import current_rss_mb

    assert peak_rss_mb() >= current_rss_mb() * 0.99 > 0


# --- records ---------------------------------------------------------------------------------


def test_make_record_has_the_schema_fields():
    rec = make_record("forward", "onnxruntime", "CPUExecutionProvider", "fp32", 32,
                      stats=summarize([0.1, 0.2, 0.3, 0.4, 0.5]), gflops=10.0, peak_share=0.1, peak_mem_mb=80.0)
    for key in REQUIRED:
        assert key in rec
    assert rec["images_per_s"] == pytest.approx(32 / 0.3)
    assert check_record(rec) == []
    skipped = make_record("forward", "torch", "cuda", "fp16", 8, skipped="no CUDA device")
    assert check_record(skipped) == [] and skipped["median_s"] is None
    sampling = make_record("sampling", "torch", "cpu", "fp32", 4, stats=summarize([2.0] * 5), sampler="ddim",
                           steps=25, guidance=3.0)
    assert sampling["images_per_s"] == pytest.approx(2.0) and check_record(sampling) == []


def test_check_record_names_the_problems():
    bad = make_record("forward", "tensorflow", "tpu", "fp8", 1, stats=summarize([0.1] * 5))
    problems = " ".join(check_record(bad))
    assert "backend" in problems and "provider" in problems and "precision" in problems
    assert check_record({"suite": "forward"})  # missing fields
    rec = make_record("forward", "torch", "cpu", "fp32", 1, stats=summarize([0.1] * 5))
    rec["p90_s"] = 0.01
    assert "p90_s < median_s" in check_record(rec)


# --- roofline arithmetic ------------------------------------------------------------------------


def test_roofline_math():
    assert matmul_flops(2048) == 2 * 2048**3
    assert matmul_flops(2, 3, 4) == 48
    # 0.3 GFLOP per image, batch 128, 0.192 s -> 200 GFLOP/s; against a 400 GFLOP/s peak: 50 %
    g = achieved_gflops(0.3e9, 128, 0.192)
    assert g == pytest.approx(200.0)
    assert peak_share(g, 400.0) == pytest.approx(0.5)
    assert peak_share(g, None) is None
    with pytest.raises(ValueError):
        achieved_gflops(1.0, 1, 0.0)


def test_flop_count_of_the_default_network_matches_the_design():
    torch = pytest.importorskip("torch")
    from mdx.bench.roofline import count_flops
    from mdx.train.model import ContextUnet, ModelConfig

    torch.manual_seed(0)
    counted = count_flops(ContextUnet(ModelConfig(n_feat=64, n_classes=5)).eval(), (3, 16, 16), 5)
    assert counted["gflop_per_image"] == pytest.approx(0.30, abs=0.005)  # docs/contract.md: 0.30 GFLOP per image
    assert counted["by_op"]["aten.convolution"] > 0.99 * counted["flops_per_image"]


# --- the suites' configuration ------------------------------------------------------------------


def test_sampling_configs_cover_the_issue():
    quick = {(c.sampler, c.steps, c.guidance, c.batch) for c in quick_configs()}
    for sampler, steps in (("ddpm", None), ("ddim", 25), ("ddim", 50), ("dpmpp", 10), ("dpmpp", 20)):
        for g in (1.0, GUIDANCE):
            assert (sampler, steps, g, 1) in quick
    assert ("ddim", 25, 1.0, 128) in quick  # the batch-128 target
    assert quick_configs()[:2] == [c for c in quick_configs() if c.sampler == "ddim" and c.steps == 25
                                   and c.guidance == 1.0]  # the targets' runs come first
    full = {(c.sampler, c.steps, c.guidance, c.batch) for c in full_configs()}
    assert quick <= full and len(full) == len(full_configs())


def test_torch_sampler_loop_matches_the_reference_sampler():
    """The torch side of DPM-Solver++ uses the same loop and noise as the reference sampler uses
    for DDIM; check the loop on DDIM against the reference itself (tiny network)."""
    torch = pytest.importorskip("torch")
    from mdx.bench.sampling import context_rows, torch_sampler_loop
    from mdx.runtime.schedules import make_schedule
    from mdx.train.model import ContextUnet, ModelConfig
    from mdx.train.reference import sample_reference

    torch.manual_seed(0)
    model = ContextUnet(ModelConfig(n_feat=8, n_classes=3, num_train_timesteps=20)).eval()
    sched = make_schedule("linear", 20)
    ctx = context_rows(2, 3)
    for g in (1.0, 2.0):
        ours = torch_sampler_loop(model, sched, "ddim", 5, ctx, seed=3, guidance=g)
        ref = sample_reference(model, sched, sampler="ddim", steps=5, context=ctx, seed=3, guidance=g)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_cuda_suite_skips_with_a_reason_without_cuda():
    pytest.importorskip("torch")
    from mdx.bench import cuda

    reason = cuda.torch_cuda_reason()
    if reason is None:
        pytest.skip("this machine has CUDA")

    class Net:
        name = "fake"

    records, peak = cuda.run_cuda_forward(Net(), flops_per_image=1.0, batches=(1, 8), log=lambda m: None)
    assert peak == {} and records
    assert all(r["skipped"] == reason and check_record(r) == [] for r in records)
    assert {r["variant"] for r in records} == {"eager", "cuda_graph", "io_binding"}
    assert {r["provider"] for r in records} == {"cuda", "CUDAExecutionProvider"}


# --- the report ----------------------------------------------------------------------------------


def _fake_results() -> dict:
    def rec(suite, backend, provider, precision, batch, median, **kw):
        return make_record(suite, backend, provider, precision, batch,
                           stats=summarize([median * f for f in (0.98, 1.0, 1.0, 1.02, 1.1)]), **kw)

    fpi = 0.3e9
    records = []
    for b in (1, 8, 32, 128):
        for backend, precision, variant, per_image in (("torch", "fp32", "eager", 3e-3), ("onnxruntime", "fp32",
                                                        "io_binding", 1e-3), ("onnxruntime", "int8", "io_binding", 4e-4)):
            median = per_image * b + 1e-3
            g = achieved_gflops(fpi, b, median)
            prov = "cpu" if backend == "torch" else "CPUExecutionProvider"
            records.append(rec("forward", backend, prov, precision, b, median, variant=variant, network="default",
                               gflops=g, peak_share=g / 400.0, peak_mem_mb=100.0))
    records.append(make_record("forward", "torch", "cuda", "fp32", 1, skipped="no CUDA device", variant="eager",
                               network="default"))
    for b, (t, o) in {1: (0.10, 0.04), 128: (10.0, 8.0)}.items():
        records.append(rec("sampling", "torch", "cpu", "fp32", b, t, sampler="ddim", steps=25, guidance=1.0))
        records.append(rec("sampling", "onnxruntime", "CPUExecutionProvider", "fp32", b, o, sampler="ddim", steps=25,
                           guidance=1.0, max_abs_diff=1e-6, speedup_vs_torch=t / o))
    records.append(rec("training", "torch", "cpu", "fp32", 128, 2.0, variant="mdx", steps=2, ratio_vs_seed=1.1))
    records.append(make_record("quality", "onnxruntime", "CPUExecutionProvider", "fp32", 90, sampler="ddim", steps=10,
                               guidance=2.0, fd=5.0, fd_floor=1.0, conditional_accuracy=0.8, network="emoji16.onnx"))
    records.append(make_record("quality", "onnxruntime", "CPUExecutionProvider", "int8", 90, sampler="ddim", steps=20,
                               guidance=2.0, fd=4.0, fd_floor=1.0, conditional_accuracy=0.85, network="emoji16.onnx"))
    machine = {"host": "h", "cpu_model": "Fake CPU", "cores": 2, "gpus": [], "versions": {"torch": "x"}}
    return {"machine": machine, "run": {"command": "mdx-bench --quick", "mode": "quick", "started": "2026-01-01T00:00",
                                        "seconds": 100, "threads": 2},
            "roofline": {"cpu_peak": {"n": 2048, "threads": 2, "gflops": {"numpy": 250.0, "onnxruntime": 400.0},
                                      "peak_gflops": 400.0, "peak_backend": "onnxruntime"},
                         "flops": {"default": {"gflop_per_image": 0.3, "method": "counted"}}},
            "notes": ["a note"], "records": records}


def test_every_fake_record_follows_the_schema():
    for r in _fake_results()["records"]:
        assert check_record(r) == [], r


def test_targets_are_evaluated_from_the_records():
    targets = {t["key"]: t for t in report.evaluate_targets(_fake_results()["records"])}
    assert targets["ddim25_b1"]["value"] == pytest.approx(2.5) and targets["ddim25_b1"]["met"] is True
    assert targets["ddim25_b128"]["value"] == pytest.approx(1.25) and targets["ddim25_b128"]["met"] is False
    assert targets["int8_b128"]["value"] == pytest.approx((1e-3 * 128 + 1e-3) / (4e-4 * 128 + 1e-3))
    assert targets["int8_b32"]["met"] is True
    share = 0.3e9 * 128 / (1e-3 * 128 + 1e-3) / 1e9 / 400.0
    assert targets["peak_b128"]["value"] == pytest.approx(share)
    assert report.evaluate_targets([])[0]["met"] is None


def test_report_from_a_fake_results_json(tmp_path):
    results = _fake_results()
    (tmp_path / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- mdx-bench:cpu:start -->\nold\n<!-- mdx-bench:cpu:end -->\ntail\n")
    assert report.main([str(tmp_path / "results.json"), "--readme", str(readme)]) == 0
    md = (tmp_path / "results.md").read_text()
    for heading in ("## Machine", "## Targets", "## (a) Forward, CPU", "## (b) Sampling, CPU", "## (c) Training",
                    "## (d) Quality", "## Skipped"):
        assert heading in md
    assert "| default | 128 | ORT int8 |" in md
    assert "**missed**" in md and "no CUDA device" in md
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["forward_cpu_default.png", "quality_vs_steps.png", "sampling_speedup_cpu.png"]
    for p in tmp_path.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old" not in text and "Fake CPU" in text and text.endswith("tail\n")
    assert "| default | 1 | torch eager |" in text and "| default | 8 |" not in text  # batch 1 and 128 only


# --- the command line -----------------------------------------------------------------------------


def _invoke(args):
    result = CliRunner().invoke(bench_main, args)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    return result, lines


@pytest.mark.parametrize("args, needle", [
    (["--device", "bogus"], "bogus"),
    (["--suites", "forward,nope"], "--suites"),
    (["--threads", "0"], "--threads 0"),
    (["--time-budget", "-5"], "--time-budget"),
    (["--quality-n", "1"], "--quality-n"),
    (["--model", "/nonexistent/model.onnx"], "--model"),
])
def test_cli_bad_inputs_exit_2_with_one_line(args, needle):
    result, lines = _invoke(args)
    assert result.exit_code == 2
    assert len(lines) == 1 and lines[0].startswith("mdx-bench: error:") and needle in lines[0], lines
    assert "Traceback" not in result.output


def test_cli_unwritable_out_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result, lines = _invoke(["--out", str(blocker / "sub"), "--suites", "forward"])
    assert result.exit_code == 2 and len(lines) == 1 and "is a file" in lines[0], lines
    if Path("/proc").is_dir():
        result, lines = _invoke(["--out", "/proc/mdx-bench-cannot-write-here"])
        assert result.exit_code == 2 and len(lines) == 1 and "cannot write" in lines[0], lines


def test_cli_help_lists_the_options():
    result = CliRunner().invoke(bench_main, ["--help"])
    assert result.exit_code == 0
    for opt in ("--quick", "--device", "--model", "--out", "[cpu|cuda|all]"):
        assert opt in result.output
    assert "--smoke" not in result.output  # a hidden developer option


def test_peak_rss_child_reports_errors_in_one_line(tmp_path):
    """The fresh-process memory probe: a bad spec comes back as {"error": ...}, not an exception."""
    from mdx.bench.memory import measure_peak_rss

    out = measure_peak_rss({"kind": "onnxruntime", "model": str(tmp_path / "missing.onnx"), "threads": 1,
                            "batches": [1]}, timeout_s=120)
    assert "error" in out and "missing.onnx" in out["error"] and "\n" not in out["error"]


def test_contention_is_flagged_in_the_report(tmp_path):
    results = _fake_results()
    assert report.contention_banner(results) == ""
    results["load_during"] = {"other_cpu_percent_mean": 120.0, "other_cpu_percent_p50": 110.0,
                              "other_cpu_percent_max": 199.0, "period_s": 1.0}
    banner = report.contention_banner(results)
    assert "Contended run" in banner and "120%" in banner
    report.write_report(results, tmp_path)
    assert "Contended run" in (tmp_path / "results.md").read_text()


def test_forward_cost_estimate_from_the_last_batch():
    from mdx.bench.forward import _estimate_call

    # batch 1 took 10 ms at 30 GFLOP/s (0.3 GFLOP/image): batch 128 at max(30, 0.25 * 400) GFLOP/s
    est = _estimate_call((1, 0.010), 128, 0.3e9, 400.0)
    assert est == pytest.approx(0.010 + 0.3e9 * 127 / 100e9)
    assert _estimate_call((128, 0.4), 32, 0.3e9, 400.0) == pytest.approx(0.4)  # a smaller batch: an upper bound
    assert _estimate_call(None, 8, 0.3e9, 400.0) > 0


def test_load_monitor_reports_a_summary():
    from mdx.bench.machine import LoadMonitor

    mon = LoadMonitor(period_s=0.05).start()
    import time

    time.sleep(0.2)
    out = mon.stop()
    assert out["samples"] >= 1 and out["other_cpu_percent_mean"] >= 0


def test_calibrate_number_sizes_from_the_fastest_of_three_calls():
    clock = FakeClock()
    times = iter([0.040, 0.002, 0.003])
    assert calibrate_number(lambda: clock.advance(next(times)), 0.05, clock=clock) == 25


# --- writing fails (issue 17) ------------------------------------------------------------------


def test_cli_results_file_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """results.json is written first thing (and after every suite): a full disk ends the run in one line."""
    fail_temporary_file(monkeypatch, "results.json", errno.ENOSPC)
    out = tmp_path / "run"
    result, lines = _invoke(["--out", str(out), "--suites", "forward", "--device", "cpu"])
    assert result.exit_code == 2, (result.output, repr(result.exception))
    assert lines == [f"mdx-bench: error: cannot write {out / 'results.json'}: No space left on device"], lines
    assert "Traceback" not in result.output and [p.name for p in out.iterdir()] == []


@pytest.mark.parametrize("name", ["results.md", "quality_vs_steps.png"])
def test_report_writers_fail_cleanly(name, tmp_path, monkeypatch):
    from mdx.runtime.fileio import WriteError

    fail_temporary_file(monkeypatch, name, errno.ENOSPC)
    with pytest.raises(WriteError, match=f"cannot write {tmp_path / name}: No space left on device"):
        report.write_report(_fake_results(), tmp_path)
    assert not (tmp_path / name).exists() and not list(tmp_path.glob(".*"))


# --- NVML readings (one recorder: mdx.runtime.telemetry's), with a fake NVML ---------------------------


class FakeNvml:
    """Just enough of pynvml for the recorder: one GPU at 40% then 60%, 250 W, this process at 512 MiB."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.util, self.inits, self.shutdowns = iter([40, 60] * 1000), 0, 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return 1

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU"

    def nvmlDeviceGetUtilizationRates(self, h):
        return type("U", (), {"gpu": next(self.util), "memory": 10})()

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 2**30, "total": 2**32})()

    def nvmlDeviceGetPowerUsage(self, h):
        return 250_000

    def nvmlDeviceGetComputeRunningProcesses(self, h):
        import os

        return [type("P", (), {"pid": os.getpid(), "usedGpuMemory": 512 * 2**20})()]


def test_burst_summarises_the_recorders_nvml_readings(monkeypatch, tmp_path):
    import sys

    from mdx.bench import cuda
    from mdx.runtime.telemetry import FIELDS, start_telemetry

    fake = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    calls = []
    summary = cuda.burst(lambda: calls.append(1), lambda: None, 0.1, nvml=True)
    assert calls and fake.inits == fake.shutdowns == 1
    assert summary["nvml_samples"] >= 2 and 40 <= summary["gpu_util_mean"] <= 60 and summary["gpu_util_max"] == 60
    assert summary["power_w_mean"] == summary["power_w_max"] == 250.0
    assert summary["nvml_process_mem_mb_max"] == 512.0
    assert cuda.burst(lambda: None, lambda: None, 0.01, nvml=False) == {}
    assert cuda.nvml_available(log=lambda m: None) is True
    # The same recorder writes mdx-sample's --telemetry CSV.
    recorder, why_not = start_telemetry(tmp_path / "gpu.csv", interval=0.01)
    assert why_not == "" and recorder.stop() == tmp_path / "gpu.csv"
    rows = (tmp_path / "gpu.csv").read_text().splitlines()
    assert rows[0].split(",") == list(FIELDS) and len(rows) >= 3
