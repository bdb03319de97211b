"""mdx-bench: torch against ONNX Runtime, CPU and CUDA: forward, sampling, training, quality.

    mdx-bench --quick --device cpu          # < 5 minutes on 2 cores
    mdx-bench                               # the full suite, < 30 minutes on 2 cores
    mdx-bench --device cuda --out /tmp/gpu-run

Writes results.json (machine + records), results.md (tables, targets) and PNG plots into
--out (default benchmarks/results/<date>-<host>/). Items that cannot run here (no GPU, a
provider that does not start, the time budget) are recorded with `skipped: "<reason>"`.
Errors a user can cause end in one line `mdx-bench: error: ...` and exit code 2.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import time
from pathlib import Path

import click
from typing import NoReturn

from mdx.runtime.cli_common import CONTEXT_SETTINGS, fail, one_line_command

PROG = "mdx-bench"
QUICK_BUDGET_S = 280.0  # the promise is 5 minutes; keep 20 s for writing the report
FULL_BUDGET_S = 1740.0  # 29 minutes
SUITES = ("forward", "sampling", "training", "quality")
# Share of the remaining budget each suite may use; they run forward, training (its own fixed
# length), sampling, quality, so sampling and quality adapt to what is left.
SHARES = {"quick": {"forward": 0.45, "sampling": 1.0, "quality": 1.0},
          "full": {"forward": 0.3, "sampling": 0.6, "quality": 1.0}}


class BenchError(ValueError):
    """A bad command-line value; one line."""


def _fail(message: str, code: int = 2) -> NoReturn:
    fail(PROG, message, code)


def _log(message: str) -> None:
    click.echo(message, err=True)


# --- checks before anything runs ----------------------------------------------------------------


def default_out() -> Path:
    import mdx.bench

    stamp = _dt.datetime.now().strftime("%Y-%m-%d-%H%M")
    return Path(mdx.bench.__file__).resolve().parent / "results" / f"{stamp}-{socket.gethostname()}"


def prepare_out(out: Path) -> Path:
    """Create --out and prove it writable; BenchError naming the problem otherwise."""
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise BenchError(f"--out {out}: {existing} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".mdx-bench-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BenchError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    return out


def parse_suites(text: str | None, quick: bool) -> tuple[str, ...]:
    if text is None:
        return SUITES[:3] if quick else SUITES
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in chosen if s not in SUITES]
    if bad or not chosen:
        raise BenchError(f"--suites {text!r}: choose from {', '.join(SUITES)} (comma-separated)")
    return chosen


def check_model(model: str | None) -> Path | None:
    """--model FILE must exist and load; without --model, models/emoji16.onnx if present."""
    from mdx.runtime.session import ModelError, OnnxDenoiser

    if model is None:
        import mdx.bench

        default = Path(mdx.bench.__file__).resolve().parents[1] / "models" / "emoji16.onnx"
        return default if default.is_file() else None
    path = Path(model)
    if not path.is_file():
        raise BenchError(f"--model {model}: no such file")
    try:
        OnnxDenoiser.load(path, provider="CPUExecutionProvider")
    except ModelError as e:
        raise BenchError(f"--model {model}: {e}") from None
    return path


# --- results.json -------------------------------------------------------------------------------


class Results:
    """The results document, written to disk after every suite so an interrupted run keeps its data."""

    def __init__(self, out: Path, machine: dict, run: dict) -> None:
        self.path = out / "results.json"
        self.doc = {"machine": machine, "run": run, "roofline": {}, "setup": {}, "notes": [], "records": []}

    def add(self, records: list[dict]) -> None:
        self.doc["records"].extend(records)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.doc, indent=1, default=_jsonable) + "\n")
        os.replace(tmp, self.path)


def _jsonable(o):
    if isinstance(o, Path):
        return str(o)
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
    except ImportError:
        pass
    return str(o)


# --- suites -------------------------------------------------------------------------------------


def shipped_flops(path: Path) -> dict | None:
    """FLOPs of the shipped model's architecture (rebuilt from its mdx.train_config metadata)."""
    import onnxruntime as ort

    from mdx.bench.roofline import count_flops
    from mdx.train.model import ContextUnet, ModelConfig

    try:
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        cfg = json.loads(sess.get_modelmeta().custom_metadata_map["mdx.train_config"])["model"]
        mc = ModelConfig.from_dict(cfg)
    except (KeyError, ValueError, TypeError):
        return None
    return {**count_flops(ContextUnet(mc).eval(), (mc.in_channels, mc.image_size, mc.image_size), mc.n_classes),
            "n_feat": mc.n_feat}


def training_records(quick: bool, threads: int, device: str, smoke: bool = False) -> list[dict]:
    """Suite (c): `mdx.bench.train_throughput.run` (mdx's training loop against the seed's, same
    batch, interleaved) on `device` ("cpu" or "cuda"); its records as they come."""
    from mdx.bench.records import make_record

    try:
        from mdx.bench import train_throughput
    except ImportError as e:
        return [make_record("training", "torch", device, "fp32", 128, skipped=f"train_throughput unavailable: {e}")]
    if smoke:  # a developer's check that the wiring works, not a measurement
        rows = train_throughput.run(batch=8, steps=1, repeats=2, threads=threads, n_feat=8, device=device, log=_log)
    else:
        rows = train_throughput.run(batch=128, threads=threads, quick=quick, device=device, log=_log)
    out = []
    for row in rows or []:
        rec = dict(row)
        rec["suite"] = "training"
        for key, default in (("backend", "torch"), ("provider", device), ("precision", "fp32"), ("sampler", None),
                             ("steps", None), ("guidance", None), ("batch", 128), ("median_s", None),
                             ("p90_s", None), ("images_per_s", None)):
            rec.setdefault(key, default)
        out.append(rec)
    return out


def run_all(*, quick: bool, device: str, model: Path | None, out: Path, suites: tuple[str, ...], threads: int,
            budget_s: float, quality_n: int, command: str, smoke: bool = False) -> dict:
    import torch

    from mdx.bench import machine as machine_mod
    from mdx.bench.cuda import run_cuda_forward, run_cuda_sampling
    from mdx.bench.forward import BATCHES, run_forward
    from mdx.bench.networks import SMOKE_NETWORK, build_default_network, shipped_network
    from mdx.bench.quality import run_quality
    from mdx.bench.report import write_report
    from mdx.bench.roofline import count_flops, measure_matmul_peak
    from mdx.bench.sampling import full_configs, quick_configs, run_sampling, smoke_configs
    from mdx.bench.timing import Budget

    mode = "quick" if quick else "full"
    total = Budget(budget_s)
    torch.set_num_threads(threads)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    res = Results(out, machine_mod.machine_info(),
                  {"command": command, "mode": mode, "device": device, "threads": threads, "started": started,
                   "budget_s": budget_s, "suites": list(suites)})
    res.doc["load_start"] = machine_mod.load_snapshot()
    res.save()
    monitor = machine_mod.LoadMonitor().start()
    cpu_on, cuda_on = device in ("cpu", "all"), device in ("cuda", "all")

    _log(f"{PROG}: {mode} suite on {res.doc['machine']['cpu_model']} ({threads} threads), device {device}, "
         f"budget {budget_s:.0f} s -> {out}")
    t0 = time.perf_counter()
    net = build_default_network(log=_log, budget=total, arch=SMOKE_NETWORK if smoke else None)
    batches = (1, 2) if smoke else BATCHES
    res.doc["setup"] = {"default_network": net.description, "export_seconds": net.export_seconds,
                        "setup_seconds": round(time.perf_counter() - t0, 1), "notes": net.notes,
                        "onnx_files": {k: str(v) for k, v in net.onnx.items()}}
    res.doc["notes"] += net.notes
    flops = count_flops(net.torch_model, net.sample_shape, net.num_classes)
    net.flops_per_image = flops["flops_per_image"]
    res.doc["roofline"]["flops"] = {net.name: flops}
    shipped = None
    if model is not None:
        shipped = shipped_network(model)
        sf = shipped_flops(model)
        if sf:
            shipped.flops_per_image = sf["flops_per_image"]
            res.doc["roofline"]["flops"][shipped.name] = sf
        res.doc["setup"]["shipped"] = {"description": shipped.description,
                                       "files": {k: str(v) for k, v in shipped.onnx.items()}}
    else:
        res.doc["notes"].append("no shipped model (models/emoji16.onnx absent and no --model): only the default "
                                "network is measured")
    if cpu_on:
        _log("roofline: fp32 matmul peak ...")
        res.doc["roofline"]["cpu_peak"] = peak = measure_matmul_peak(threads, n=512 if smoke else 2048)
        _log(f"  peak {peak['peak_gflops']:.0f} GFLOP/s ({peak['peak_backend']}); " +
             ", ".join(f"{k} {v:.0f}" for k, v in peak["gflops"].items()))
    res.save()

    def sub_budget(suite: str) -> Budget:
        return Budget(max(total.left(), 0) * SHARES[mode][suite])

    if "forward" in suites:
        b = sub_budget("forward")
        if cpu_on:
            _log(f"(a) forward, CPU (budget {b.seconds:.0f} s)")
            res.add(run_forward(net, threads=threads, flops_per_image=net.flops_per_image,
                                peak_gflops=res.doc["roofline"]["cpu_peak"]["peak_gflops"], batches=batches,
                                repeats=5 if quick else 7, target_s=0.05 if quick else 0.2,
                                compile_batches=(1,) if quick else batches, with_compile=not smoke, budget=b,
                                log=_log, shipped=shipped))
        if cuda_on:
            _log("(a) forward, CUDA")
            recs, gpu_peak = run_cuda_forward(net, flops_per_image=net.flops_per_image, batches=batches,
                                              repeats=5 if quick else 7,
                                              burst_s=0.5 if quick else 2.0, log=_log)
            if gpu_peak:
                res.doc["roofline"]["gpu_peak"] = gpu_peak
            res.add(recs)
    if "training" in suites:
        from mdx.bench.cuda import torch_cuda_reason
        from mdx.bench.records import make_record

        devices = (["cpu"] if cpu_on else []) + (["cuda"] if cuda_on else [])
        for dev in devices:
            _log(f"(c) training throughput, {dev} ({total.left():.0f} s of the budget left)")
            reason = torch_cuda_reason() if dev == "cuda" else None
            if reason is None and quick and not total.allows(60):
                reason = total.reason("the training benchmark", 60)
            if reason is not None:
                res.add([make_record("training", "torch", dev, "fp32", 128, skipped=reason)])
                continue
            try:
                res.add(training_records(quick, threads, dev, smoke=smoke))
            except Exception as e:  # noqa: BLE001 -- another module's failure is recorded, not fatal
                res.add([make_record("training", "torch", dev, "fp32", 128,
                                     skipped=f"train_throughput.run failed: {type(e).__name__}: {e}")])
    if "sampling" in suites:
        b = sub_budget("sampling")
        configs = smoke_configs() if smoke else quick_configs() if quick else full_configs()
        if cpu_on:
            _log(f"(b) sampling, CPU (budget {b.seconds:.0f} s)")
            res.add(run_sampling(net, threads=threads, configs=configs, repeats=5, forward_records=res.doc["records"],
                                 budget=b, log=_log, int8=not quick))
        if cuda_on:
            _log("(b) sampling, CUDA")
            res.add(run_cuda_sampling(net, configs=configs, repeats=5, log=_log))
    if "quality" in suites:
        from mdx.bench.records import make_record

        _log("(d) quality")
        if shipped is None:
            res.add([make_record("quality", "onnxruntime", "CPUExecutionProvider", p, quality_n,
                                 skipped="needs a trained model: pass --model (models/emoji16.onnx absent)")
                     for p in ("fp32", "int8")])
        else:
            files = {p: f for p, f in shipped.onnx.items() if p in ("fp32", "int8")}
            res.add(run_quality(files, threads=threads, n=quality_n, budget=sub_budget("quality"), log=_log,
                                network=shipped.name))
            if "int8" not in files:
                res.add([make_record("quality", "onnxruntime", "CPUExecutionProvider", "int8", quality_n,
                                     skipped=f"no int8 sibling of {model.name} found")])
    if cpu_on and {"forward", "sampling"} & set(suites):
        from mdx.bench.profile import explain

        _log("profiles for missed targets")
        try:
            res.doc["analysis"] = explain(res.doc["records"], net, threads,
                                          res.doc["roofline"]["cpu_peak"]["peak_gflops"],
                                          budget=Budget(max(total.left(), 0)), log=_log)
        except Exception as e:  # noqa: BLE001 -- a profiler failure must not lose the measurements
            res.doc["analysis"] = f"_profiling failed: {type(e).__name__}: {e}_"
    res.doc["load_during"] = monitor.stop()
    res.doc["load_end"] = machine_mod.load_snapshot()
    res.doc["run"]["seconds"] = round(total.elapsed(), 1)
    res.save()
    written = write_report(res.doc, out)
    _log(f"{PROG}: done in {total.elapsed():.0f} s; wrote {res.path}" + "".join(f", {p.name}" for p in written))
    return res.doc


# --- the command --------------------------------------------------------------------------------


@click.command(cls=one_line_command(PROG, (BenchError,)), context_settings=CONTEXT_SETTINGS)
@click.option("--quick", is_flag=True, help="The quick suite (< 5 minutes on 2 cores): fewer sizes and configurations.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "all"]), default="all", show_default=True,
              help="Which device's suites to run (CUDA items skip with a reason where CUDA cannot run).")
@click.option("--model", metavar="FILE", default=None,
              help="The shipped ONNX model to record too (its -fp16/-int8 siblings are found) "
                   "[default: models/emoji16.onnx if present].")
@click.option("--out", metavar="DIR", default=None, help="Output folder [default: benchmarks/results/<date>-<host>/].")
@click.option("--suites", metavar="LIST", default=None,
              help="Comma-separated subset of forward,sampling,training,quality [default: all; quick: no quality].")
@click.option("--threads", type=int, default=None,
              help="torch threads = ONNX Runtime intra-op threads [default: the machine's cores].")
@click.option("--time-budget", type=float, default=None, metavar="SECONDS",
              help=f"Wall-clock budget; items that would overrun it are skipped with a reason "
                   f"[default: {QUICK_BUDGET_S:.0f} quick, {FULL_BUDGET_S:.0f} full].")
@click.option("--quality-n", type=int, default=270, show_default=True, help="Images per quality measurement.")
@click.option("--smoke", is_flag=True, hidden=True,
              help="Developers: a tiny network (n_feat 8, T 20), batches 1 and 2, a few short sampling runs.")
def main(quick, device, model, out, suites, threads, time_budget, quality_n, smoke):
    """Benchmark torch against ONNX Runtime: forward, sampling, training, quality."""
    from mdx.bench.machine import cores

    if threads is not None and threads < 1:
        raise BenchError(f"--threads {threads}: need at least 1 thread")
    if time_budget is not None and not time_budget > 0:
        raise BenchError(f"--time-budget {time_budget}: must be > 0 seconds")
    if quality_n < 2:
        raise BenchError(f"--quality-n {quality_n}: need at least 2 images for an FD")
    chosen = parse_suites(suites, quick)
    model_path = check_model(model)
    out_dir = prepare_out(Path(out) if out is not None else default_out())
    command = "mdx-bench " + " ".join(sys.argv[1:]) if sys.argv and Path(sys.argv[0]).name == PROG else "mdx-bench"
    run_all(quick=quick, device=device, model=model_path, out=out_dir, suites=chosen,
            threads=threads or cores(), budget_s=time_budget or (QUICK_BUDGET_S if quick else FULL_BUDGET_S),
            quality_n=quality_n, command=command, smoke=smoke)
    return 0


if __name__ == "__main__":
    main()
