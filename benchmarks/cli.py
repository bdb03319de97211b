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
from dataclasses import dataclass
from pathlib import Path

import click

from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.fileio import WriteError, write_text

PROG = "mdx-bench"
QUICK_BUDGET_S = 280.0  # the promise is 5 minutes; keep 20 s for writing the report
FULL_BUDGET_S = 1740.0  # 29 minutes
SUITES = ("forward", "sampling", "training", "quality", "serving")  # serving only when asked: 30 s per load
# Share of the remaining budget each suite may use; they run forward, training (its own fixed
# length), sampling, quality, so sampling and quality adapt to what is left.
SHARES = {"quick": {"forward": 0.45, "sampling": 1.0, "quality": 1.0, "serving": 1.0},
          "full": {"forward": 0.3, "sampling": 0.6, "quality": 1.0, "serving": 1.0}}


class BenchError(ValueError):
    """A bad command-line value; one line."""


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
        return SUITES[:3] if quick else SUITES[:4]
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in chosen if s not in SUITES]
    if bad or not chosen:
        raise BenchError(f"--suites {text!r}: choose from {', '.join(SUITES)} (comma-separated)")
    return chosen


def check_model(model: str | None) -> Path | None:
    """--model FILE must exist and load; without --model, the shipped emoji16.onnx if present."""
    from mdx.runtime.session import ModelError, OnnxDenoiser

    if model is None:
        from mdx.runtime.shipped import models_dir

        default = models_dir() / "emoji16.onnx"
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
        """Write results.json whole (atomically); WriteError when the disk is full or --out vanished."""
        write_text(self.path, json.dumps(self.doc, indent=1, default=_jsonable) + "\n")


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


@dataclass
class Bench:
    """One mdx-bench run: its settings, its budget, the results document and the networks measured.
    `run_all` calls the steps in order; each suite adds its records (and saves) as it finishes."""

    quick: bool
    device: str
    model: Path | None
    out: Path
    suites: tuple[str, ...]
    threads: int
    budget_s: float
    quality_n: int
    command: str
    smoke: bool = False
    total: object = None  # timing.Budget of the whole run
    res: Results | None = None
    net: object = None  # networks.Network: the default network
    shipped: object = None  # networks.Network of --model, or None

    @property
    def mode(self) -> str:
        return "quick" if self.quick else "full"

    @property
    def cpu_on(self) -> bool:
        return self.device in ("cpu", "all")

    @property
    def cuda_on(self) -> bool:
        return self.device in ("cuda", "all")

    @property
    def batches(self) -> tuple[int, ...]:
        from mdx.bench.forward import BATCHES

        return (1, 2) if self.smoke else BATCHES

    def sub_budget(self, suite: str):
        from mdx.bench.timing import Budget

        return Budget(max(self.total.left(), 0) * SHARES[self.mode][suite])

    def start(self, machine_mod) -> None:
        """The results document with the machine, the run's settings and the load before it."""
        started = _dt.datetime.now().isoformat(timespec="seconds")
        self.res = Results(self.out, machine_mod.machine_info(),
                           {"command": self.command, "mode": self.mode, "device": self.device,
                            "threads": self.threads, "started": started, "budget_s": self.budget_s,
                            "suites": list(self.suites)})
        self.res.doc["load_start"] = machine_mod.load_snapshot()
        self.res.save()
        _log(f"{PROG}: {self.mode} suite on {self.res.doc['machine']['cpu_model']} ({self.threads} threads), "
             f"device {self.device}, budget {self.budget_s:.0f} s -> {self.out}")

    def setup_networks(self) -> None:
        """The default network (built and exported, or from the cache), --model's, and their FLOPs."""
        from mdx.bench.networks import SMOKE_NETWORK, build_default_network, shipped_network
        from mdx.bench.roofline import count_flops

        doc, t0 = self.res.doc, time.perf_counter()
        net = self.net = build_default_network(log=_log, budget=self.total, arch=SMOKE_NETWORK if self.smoke else None)
        doc["setup"] = {"default_network": net.description, "export_seconds": net.export_seconds,
                        "setup_seconds": round(time.perf_counter() - t0, 1), "notes": net.notes,
                        "onnx_files": {k: str(v) for k, v in net.onnx.items()}}
        doc["notes"] += net.notes
        flops = count_flops(net.torch_model, net.sample_shape, net.num_classes)
        net.flops_per_image = flops["flops_per_image"]
        doc["roofline"]["flops"] = {net.name: flops}
        if self.model is None:
            doc["notes"].append("no shipped model (models/emoji16.onnx absent and no --model): only the default "
                                "network is measured")
            return
        shipped = self.shipped = shipped_network(self.model)
        sf = shipped_flops(self.model)
        if sf:
            shipped.flops_per_image = sf["flops_per_image"]
            doc["roofline"]["flops"][shipped.name] = sf
        doc["setup"]["shipped"] = {"description": shipped.description,
                                   "files": {k: str(v) for k, v in shipped.onnx.items()}}

    def roofline(self) -> None:
        from mdx.bench.roofline import measure_matmul_peak

        if self.cpu_on:
            _log("roofline: matmul peaks (fp32, bf16 where native, int8) ...")
            self.res.doc["roofline"]["cpu_peak"] = peak = measure_matmul_peak(self.threads,
                                                                              n=512 if self.smoke else 2048)
            _log(f"  peak {peak['peak_gflops']:.0f} GFLOP/s ({peak['peak_backend']}); " +
                 ", ".join(f"{k} {v:.0f}" for k, v in peak["gflops"].items()))
        self.res.save()

    def forward(self) -> None:
        """(a) forward latency and throughput, CPU and CUDA."""
        from mdx.bench.cuda import run_cuda_forward
        from mdx.bench.forward import run_forward

        net, quick, res, b = self.net, self.quick, self.res, self.sub_budget("forward")
        if self.cpu_on:
            _log(f"(a) forward, CPU (budget {b.seconds:.0f} s)")
            res.add(run_forward(net, threads=self.threads, flops_per_image=net.flops_per_image,
                                peak_gflops=res.doc["roofline"]["cpu_peak"]["peaks"], batches=self.batches,
                                repeats=5 if quick else 7, target_s=0.05 if quick else 0.2,
                                compile_batches=(1,) if quick else self.batches, with_compile=not self.smoke,
                                budget=b, log=_log, shipped=self.shipped))
        if self.cuda_on:
            _log("(a) forward, CUDA")
            recs, gpu_peak = run_cuda_forward(net, flops_per_image=net.flops_per_image, batches=self.batches,
                                              repeats=5 if quick else 7, burst_s=0.5 if quick else 2.0, log=_log)
            if gpu_peak:
                res.doc["roofline"]["gpu_peak"] = gpu_peak
            res.add(recs)

    def training(self) -> None:
        """(c) training throughput per device; a device that cannot run it is recorded as skipped."""
        from mdx.bench.cuda import torch_cuda_reason
        from mdx.bench.records import make_record

        devices = (["cpu"] if self.cpu_on else []) + (["cuda"] if self.cuda_on else [])
        for dev in devices:
            _log(f"(c) training throughput, {dev} ({self.total.left():.0f} s of the budget left)")
            reason = torch_cuda_reason() if dev == "cuda" else None
            if reason is None and self.quick and not self.total.allows(60):
                reason = self.total.reason("the training benchmark", 60)
            if reason is not None:
                self.res.add([make_record("training", "torch", dev, "fp32", 128, skipped=reason)])
                continue
            try:
                self.res.add(training_records(self.quick, self.threads, dev, smoke=self.smoke))
            except Exception as e:  # noqa: BLE001 -- another module's failure is recorded, not fatal
                self.res.add([make_record("training", "torch", dev, "fp32", 128,
                                          skipped=f"train_throughput.run failed: {type(e).__name__}: {e}")])

    def sampling(self) -> None:
        """(b) whole sampling runs, CPU and CUDA."""
        from mdx.bench.cuda import run_cuda_sampling
        from mdx.bench.sampling import full_configs, quick_configs, run_sampling, smoke_configs

        b = self.sub_budget("sampling")
        configs = smoke_configs() if self.smoke else quick_configs() if self.quick else full_configs()
        if self.cpu_on:
            _log(f"(b) sampling, CPU (budget {b.seconds:.0f} s)")
            self.res.add(run_sampling(self.net, threads=self.threads, configs=configs, repeats=5,
                                      forward_records=self.res.doc["records"], budget=b, log=_log,
                                      int8=not self.quick))
        if self.cuda_on:
            _log("(b) sampling, CUDA")
            self.res.add(run_cuda_sampling(self.net, configs=configs, repeats=5, log=_log))

    def quality(self) -> None:
        """(d) FD and accuracy of the shipped model's fp32 and int8 files (needs --model)."""
        from mdx.bench.quality import run_quality
        from mdx.bench.records import make_record

        _log("(d) quality")
        n = self.quality_n
        if self.shipped is None:
            self.res.add([make_record("quality", "onnxruntime", "CPUExecutionProvider", p, n,
                                      skipped="needs a trained model: pass --model (models/emoji16.onnx absent)")
                          for p in ("fp32", "int8")])
            return
        files = {p: f for p, f in self.shipped.onnx.items() if p in ("fp32", "int8")}
        self.res.add(run_quality(files, threads=self.threads, n=n, budget=self.sub_budget("quality"), log=_log,
                                 network=self.shipped.name))
        if "int8" not in files:
            self.res.add([make_record("quality", "onnxruntime", "CPUExecutionProvider", "int8", n,
                                      skipped=f"no int8 sibling of {self.model.name} found")])

    def serving(self) -> None:
        """(e) the batching engine against one request at a time, 1-64 clients (benchmarks/serving.py)."""
        from mdx.bench.records import make_record
        from mdx.bench.serving import run_serving

        _log("(e) serving")
        if self.model is None:
            self.res.add([make_record("serving", "onnxruntime", "CPUExecutionProvider", "fp32", None,
                                      skipped="needs a trained model: pass --model (models/emoji16.onnx absent)")])
            return
        self.res.add(run_serving(self.model, quick=self.quick, threads=self.threads,
                                 budget=self.sub_budget("serving"), log=_log))

    def profiles(self) -> None:
        """Profiles that explain the missed targets (a profiler failure must not lose the measurements)."""
        from mdx.bench.profile import explain
        from mdx.bench.timing import Budget

        if not (self.cpu_on and {"forward", "sampling"} & set(self.suites)):
            return
        _log("profiles for missed targets")
        doc = self.res.doc
        try:
            doc["analysis"] = explain(doc["records"], self.net, self.threads, doc["roofline"]["cpu_peak"]["peak_gflops"],
                                      budget=Budget(max(self.total.left(), 0)), log=_log)
        except Exception as e:  # noqa: BLE001
            doc["analysis"] = f"_profiling failed: {type(e).__name__}: {e}_"

    def finish(self, machine_mod, monitor) -> None:
        """The headline figures, the load during and after, results.json and the report."""
        from mdx.bench import headline
        from mdx.bench.report import write_report

        doc = self.res.doc
        doc["headline"] = headline.compute(doc["records"])
        doc["load_during"] = monitor.stop()
        doc["load_end"] = machine_mod.load_snapshot()
        doc["run"]["seconds"] = round(self.total.elapsed(), 1)
        self.res.save()
        written = write_report(doc, self.out)
        _log(f"{PROG}: done in {self.total.elapsed():.0f} s; wrote {self.res.path}"
             + "".join(f", {p.name}" for p in written))


def run_all(*, quick: bool, device: str, model: Path | None, out: Path, suites: tuple[str, ...], threads: int,
            budget_s: float, quality_n: int, command: str, smoke: bool = False) -> dict:
    """Every chosen suite in order (forward, training, sampling, quality, then profiles); the results document."""
    import torch

    from mdx.bench import machine as machine_mod
    from mdx.bench.timing import Budget

    bench = Bench(quick, device, model, out, suites, threads, budget_s, quality_n, command, smoke,
                  total=Budget(budget_s))
    torch.set_num_threads(threads)
    bench.start(machine_mod)
    monitor = machine_mod.LoadMonitor().start()
    bench.setup_networks()
    bench.roofline()
    for suite in ("forward", "training", "sampling", "quality", "serving"):  # training has its own fixed length
        if suite in suites:
            getattr(bench, suite)()
    bench.profiles()
    bench.finish(machine_mod, monitor)
    return bench.res.doc


# --- the command --------------------------------------------------------------------------------


@click.command(cls=one_line_command(PROG, (BenchError, WriteError)), context_settings=CONTEXT_SETTINGS)
@click.option("--quick", is_flag=True, help="The quick suite (< 5 minutes on 2 cores): fewer sizes and configurations.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "all"]), default="all", show_default=True,
              help="Which device's suites to run (CUDA items skip with a reason where CUDA cannot run).")
@click.option("--model", metavar="FILE", default=None,
              help="The shipped ONNX model to record too (its -fp16/-int8 siblings are found) "
                   "[default: models/emoji16.onnx if present].")
@click.option("--out", metavar="DIR", default=None, help="Output folder [default: benchmarks/results/<date>-<host>/].")
@click.option("--suites", metavar="LIST", default=None,
              help="Comma-separated subset of forward,sampling,training,quality,serving [default: all but serving; "
                   "quick: no quality].")
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
