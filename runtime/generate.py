"""mdx-generate: many images to disk in shards, deterministic and resumable, locally or on Ray Data.

    mdx-generate -n 10000 --shard-size 500 --out gen/                     # the shipped model
    mdx-generate --model m.onnx --per-class 1000 --classes food,animal --out gen/
    mdx-generate -n 100000 --out gen/ --ray --workers 8                   # a local Ray cluster
    mdx-generate -n 100000 --out gen/ --ray --address auto                # a running cluster

The run writes DIR/shard-00000.npz, DIR/shard-00001.npz ... (the npz keys of mdx-sample:
`images` uint8 (N, H, W, C), `labels` int64 (N,), `samples` float32 (N, C, H, W)) and
DIR/manifest.json: the model's sha256, the settings, and per shard its index, file, first image,
count, seed, classes and whether it is done.

Determinism: image i of the run belongs to shard i // S and has class classes[i mod m] (the
chosen classes, all of the model's by default). Shard k is sampled as one batch with the seed

    numpy.random.SeedSequence(seed, spawn_key=(k,)).generate_state(1, numpy.uint64)[0] >> 1

(the k-th child of SeedSequence(seed), cut to 63 bits), so its images depend on the run's
settings and k only: the same command gives the same images with one process or any number of
Ray workers, in any order.

Resuming: each shard and the manifest are written atomically (a temporary file renamed into
place), and the manifest is rewritten after every shard. A rerun into the same folder checks that
the manifest has the same model and settings (or refuses, naming what differs; --force starts
over) and skips every shard whose file is complete (the right count and labels), so a killed run
picks up where it stopped.

With --ray the pending shards become a Ray Data dataset mapped by a pool of `--workers` actors
(`map_batches` with `ActorPoolStrategy`), each holding one ONNX Runtime session whose intra-op
threads are the actor's CPUs (ONNX Runtime does not read OMP_NUM_THREADS). The model's bytes
travel with the actors and the results come back to this process, which writes every file, so
a cluster needs no shared file system.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import click
import numpy as np

from mdx.runtime import contract
from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.fileio import OutputError, sha256_file, write_text
from mdx.runtime.images import save_npz
from mdx.runtime.pipeline import PipelineError, generate, prepare_sampler, resolve_class
from mdx.runtime.providers import COMPUTE_PRECISIONS
from mdx.runtime.samplers import SAMPLERS, SamplerError
from mdx.runtime.schedules import ScheduleError
from mdx.runtime.session import ModelError, OnnxDenoiser

PROG = "mdx-generate"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


class GenerateError(ValueError):
    """A bad request, or an output folder that holds another run; the message says which."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from mdx.runtime.ray_cluster import RayClusterError

    return (GenerateError, ModelError, PipelineError, OutputError, SamplerError, ScheduleError, RayClusterError)


# --- the plan: which image gets which class and seed ----------------------------------


def shard_seed(seed: int, index: int) -> int:
    """The seed of shard `index`: the index-th child of SeedSequence(seed), as a 63-bit integer."""
    child = np.random.SeedSequence(seed, spawn_key=(index,))
    return int(child.generate_state(1, np.uint64)[0] >> np.uint64(1))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def run_labels(settings: dict, class_names: tuple[str, ...]) -> np.ndarray:
    """The class index of every image of the run (n,), -1 when unconditional."""
    n = settings["n"]
    if settings["unconditional"]:
        return np.full(n, -1, dtype=np.int64)
    chosen = np.array([class_names.index(c) for c in settings["classes"]], dtype=np.int64)
    return chosen[np.arange(n) % len(chosen)]


def shard_context(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """One-hot rows (N, K) for the labels; a -1 label is an all-zero (unconditional) row."""
    context = np.zeros((len(labels), num_classes), dtype=np.float32)
    rows = np.flatnonzero(labels >= 0)
    context[rows, labels[rows]] = 1.0
    return context


def plan_shards(settings: dict, class_names: tuple[str, ...]) -> list[dict]:
    """The manifest's shard records, all not done yet."""
    n, size = settings["n"], settings["shard_size"]
    labels = run_labels(settings, class_names)
    shards = []
    for index, start in enumerate(range(0, n, size)):
        count = min(size, n - start)
        names, counts = np.unique(labels[start:start + count], return_counts=True)
        classes = {(class_names[k] if k >= 0 else "unconditional"): int(c) for k, c in zip(names, counts)}
        shards.append({"index": index, "file": shard_name(index), "start": start, "count": count,
                       "seed": shard_seed(settings["seed"], index), "classes": classes, "done": False})
    return shards


def sample_shard(denoiser, settings: dict, labels: np.ndarray, seed: int) -> np.ndarray:
    """The shard's samples (N, C, H, W) float32 in [-1, 1], in one batch: the same code for the local
    run and the Ray actors, so both give the same images."""
    context = shard_context(labels, denoiser.info.num_classes)
    result = generate(denoiser, sampler=settings["sampler"], steps=settings["steps"], context=context,
                      guidance=settings["guidance"], eta=settings["eta"], seed=seed,
                      sampler_options=settings["sampler_options"])
    return result.samples


# --- settings -------------------------------------------------------------------------


def chosen_classes(class_names: tuple[str, ...], classes: str | None) -> list[str]:
    """--classes "food,animal" or "0,3" -> the class names, in the order given; None: all classes."""
    if classes is None:
        return list(class_names)
    parts = [part.strip() for part in classes.split(",")]
    if not all(parts):
        raise GenerateError(f"--classes {classes!r}: give comma-separated class names or indices, "
                            f"without empty entries (the model's classes: {', '.join(class_names)})")
    names = [class_names[resolve_class(class_names, part)] for part in parts]
    if len(set(names)) != len(names):
        raise GenerateError(f"--classes {classes!r} names a class twice")
    return names


def resolve_settings(info, *, n, per_class, classes, unconditional, sampler, steps, guidance, eta, seed,
                     shard_size) -> tuple[dict, tuple[str, ...]]:
    """The run's settings, as written to the manifest, and notes for the user. Sampler, steps,
    guidance and options resolve as mdx-sample's (contract.resolve_settings): the command line,
    else the model's recommendation (mdx.recommended), else the fallback."""
    if unconditional and (classes is not None or per_class is not None):
        raise GenerateError("--unconditional excludes --classes and --per-class")
    names = [] if unconditional else chosen_classes(info.class_names, classes)
    if per_class is not None:
        n = per_class * len(names)
    chosen = contract.resolve_settings(info, sampler, steps, guidance)
    T = info.schedule.num_train_timesteps
    if chosen.steps > T:
        raise GenerateError(f"--steps {chosen.steps} is more than the model's {T} training timesteps")
    prepare_sampler(info, chosen.sampler, chosen.steps, eta, chosen.sampler_options)  # a bad option fails here
    settings = {"n": int(n), "shard_size": int(shard_size), "classes": names, "unconditional": bool(unconditional),
                "sampler": chosen.sampler, "steps": int(chosen.steps), "eta": float(eta),
                "guidance": float(chosen.guidance), "seed": int(seed), "sampler_options": dict(chosen.sampler_options)}
    return settings, chosen.notes


# --- the manifest and the shard files -------------------------------------------------


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` atomically (fileio: a temporary file renamed over `path`; WriteError names it)."""
    write_text(path, json.dumps(data, indent=1) + "\n")


def new_manifest(model: Path, sha256: str, info, settings: dict, runtime: dict | None = None) -> dict:
    """The manifest of a run not started yet; `runtime` says where it runs (provider, compute
    precision): informative, since it may change between a run and its resumption."""
    return {"format": MANIFEST_FORMAT, "tool": PROG,
            "model": {"file": model.name, "sha256": sha256, "precision": info.precision,
                      "classes": list(info.class_names), "image_shape": list(info.sample_shape)},
            "settings": settings, "runtime": runtime, "shards": plan_shards(settings, info.class_names)}


def _differences(old: dict, new: dict) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "; ".join(f"{k} {json.dumps(old.get(k))} there, {json.dumps(new.get(k))} now" for k in keys)


def read_manifest(out: Path, expected: dict) -> dict | None:
    """The folder's manifest, when it describes the same run as `expected`; None when there is
    none. Refuses (GenerateError) a manifest of another model or other settings."""
    path = out / MANIFEST
    if not path.exists():
        if any(out.glob("shard-*.npz")):
            raise GenerateError(f"{out} holds shard files but no {MANIFEST}; use a new --out folder, or "
                                "--force to replace them")
        return None
    try:
        manifest = json.loads(path.read_text())
        sha, settings = manifest["model"]["sha256"], manifest["settings"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GenerateError(f"{path} is not an {PROG} manifest ({type(e).__name__}: {e}); use a new --out "
                            "folder, or --force to start over") from None
    if sha != expected["model"]["sha256"]:
        raise GenerateError(f"{out} holds a run of another model (sha256 {sha[:12]}... there, "
                            f"{expected['model']['sha256'][:12]}... now); use a new --out folder, or --force")
    if settings != expected["settings"]:
        raise GenerateError(f"{out} holds a run with other settings ({_differences(settings, expected['settings'])}); "
                            "use a new --out folder, or --force to start over")
    return manifest


def shard_problem(path: Path, labels: np.ndarray, image_shape: tuple[int, int, int]) -> str | None:
    """None when `path` is a whole shard (the three arrays, with the shard's count and labels),
    else what is wrong with it: the shard is then sampled again."""
    C, H, W = image_shape
    try:
        with np.load(path) as data:
            whole = (data["images"].shape == (len(labels), H, W, C) and data["samples"].shape == (len(labels), C, H, W)
                     and np.array_equal(data["labels"], labels))
        return None if whole else "other shapes or labels than this run's"
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # a torn or foreign file
        return f"damaged ({type(e).__name__})"


def clear_run(out: Path) -> None:
    """--force: remove the run's files (the manifest and shard-*.npz only)."""
    for path in [out / MANIFEST, *sorted(out.glob("shard-*.npz"))]:
        try:
            path.unlink(missing_ok=True)
        except OSError as e:
            raise GenerateError(f"cannot remove {path}: {e.strerror or e}") from None


def prepare_out(out: Path) -> None:
    """The output folder exists (created, its parent must exist) and is a writable folder."""
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out {out}: it exists and is not a folder")
    if not out.exists():
        try:
            out.mkdir()
        except OSError as e:
            raise GenerateError(f"cannot create {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise GenerateError(f"cannot write into {out}: the folder is not writable")


# --- progress -------------------------------------------------------------------------


class RateProgress:
    """`generating [####....] 600/1000 images, 123.4 img/s, 3 s left` on one line of a terminal
    (stderr); silent when stderr is not a terminal."""

    def __init__(self, total: int, stream=None, enabled: bool | None = None, width: int = 30) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.total, self.width, self.done = max(total, 1), width, 0
        self.start = time.perf_counter()

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, images: int) -> None:
        self.done += images
        if not self.enabled:
            return
        rate = self.rate()
        left = f"{(self.total - self.done) / rate:.0f} s left" if rate > 0 else "..."
        filled = self.width * self.done // self.total
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\rgenerating [{bar}] {self.done}/{self.total} images, {rate:.1f} img/s, {left}  ")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


# --- a run ----------------------------------------------------------------------------


@dataclass
class Run:
    """An opened run: the model, its manifest, and the shards still to sample."""

    out: Path
    model: Path
    sha256: str
    denoiser: OnnxDenoiser
    manifest: dict
    labels: np.ndarray  # (n,) every image's class, -1 unconditional
    pending: list[dict] = field(default_factory=list)
    skipped: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]


@dataclass(frozen=True)
class RunReport:
    """What `run_shards` did; `seconds` counts the sampling, `startup_seconds` Ray's start-up."""

    images: int
    shards_written: int
    shards_skipped: int
    shards_left: int
    seconds: float
    startup_seconds: float
    workers: int  # 0: the local run
    first_seconds: float | None = None  # until the first shard was written (Ray: includes starting the actors)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def open_run(model: Path, out: Path, denoiser: OnnxDenoiser, settings: dict, force: bool = False) -> Run:
    """Check or start the manifest in `out` and find the shards still to sample."""
    prepare_out(out)
    sha256 = sha256_file(model)
    expected = new_manifest(model, sha256, denoiser.info, settings,
                            {"provider": denoiser.provider, "compute_precision": denoiser.compute_precision})
    if force:
        clear_run(out)
    existing = read_manifest(out, expected)  # refuses another run's folder
    # The same settings give the same shards, so their records are rebuilt and only the files
    # decide what is done (a shard written just before a kill, its manifest update lost, counts).
    run = Run(out, model, sha256, denoiser, expected, run_labels(settings, denoiser.info.class_names))
    before = (existing or {}).get("runtime")
    if before and before != expected["runtime"]:
        earlier = f"{before.get('provider')} ({before.get('compute_precision')})"
        run.notes.append(f"earlier shards were sampled on {earlier}, these on {denoiser.provider} ({denoiser.compute_precision}): their rounding may differ")
    for shard in expected["shards"]:
        labels = run.labels[shard["start"]:shard["start"] + shard["count"]]
        problem = shard_problem(out / shard["file"], labels, denoiser.info.sample_shape)
        shard["done"] = problem is None
        if shard["done"]:
            run.skipped += 1
        else:
            run.pending.append(shard)
            if problem != "missing":
                run.notes.append(f"{shard['file']} is {problem}: sampling it again")
    write_json_atomic(out / MANIFEST, expected)
    return run


def write_shard(run: Run, shard: dict, samples: np.ndarray) -> None:
    """The shard's npz (atomically), then the manifest with the shard marked done."""
    labels = run.labels[shard["start"]:shard["start"] + shard["count"]]
    expected = (shard["count"], *run.denoiser.info.sample_shape)
    if samples.shape != expected:
        raise RuntimeError(f"shard {shard['index']}: got samples of shape {samples.shape}, expected {expected}")
    save_npz(samples, labels, run.out / shard["file"])
    shard["done"] = True
    write_json_atomic(run.out / MANIFEST, run.manifest)


def run_local(run: Run, shards: list[dict]) -> Iterator[tuple[dict, np.ndarray]]:
    """Sample the shards one after another in this process."""
    for shard in shards:
        labels = run.labels[shard["start"]:shard["start"] + shard["count"]]
        yield shard, sample_shard(run.denoiser, run.settings, labels, shard["seed"])


def run_shards(run: Run, *, use_ray: bool = False, address: str | None = None, workers: int | None = None,
               worker_cpus: int = 1, max_shards: int | None = None,
               progress: RateProgress | None = None) -> RunReport:
    """Sample the pending shards (at most `max_shards` of them), locally or on Ray, writing each.
    Ray's actors run the provider and compute precision this process's session resolved, so that
    every shard is made the same way whichever node samples it."""
    shards = run.pending if max_shards is None else run.pending[:max_shards]
    progress = progress or RateProgress(sum(s["count"] for s in shards), enabled=False)
    startup, used, first, written, images = 0.0, 0, None, 0, 0
    start = time.perf_counter()

    def write_all(results: Iterator[tuple[dict, np.ndarray]]) -> None:
        nonlocal first, written, images
        for shard, samples in results:
            write_shard(run, shard, samples)
            first = time.perf_counter() - start if first is None else first
            written, images = written + 1, images + shard["count"]
            progress.update(shard["count"])

    if shards and use_ray:
        from mdx.runtime.ray_cluster import connect

        with connect(address, num_cpus=None if workers is None else workers * worker_cpus) as (ray, startup):
            start = progress.start = time.perf_counter()
            used = ray_workers(ray, workers, worker_cpus, len(shards))
            write_all(run_ray(ray, run, shards, used, worker_cpus))
    elif shards:
        write_all(run_local(run, shards))
    return RunReport(images=images, shards_written=written, shards_skipped=run.skipped,
                     shards_left=len(run.pending) - written, seconds=time.perf_counter() - start,
                     startup_seconds=startup, workers=used, first_seconds=first)


# --- Ray Data -------------------------------------------------------------------------


class ShardActor:
    """One Ray Data actor: one ONNX Runtime session (intra-op threads = the actor's CPUs); maps a
    batch of shard records (index, start, count, seed) to their samples."""

    def __init__(self, model_bytes: bytes, sha256: str, settings: dict, class_names: list[str],
                 provider: str, compute_precision: str, threads: int) -> None:
        if hashlib.sha256(model_bytes).hexdigest() != sha256:
            raise RuntimeError("the model's bytes changed on the way to the Ray actor")
        # OnnxDenoiser reads a file; the bytes travel with the actor so nodes need no shared disk.
        with tempfile.TemporaryDirectory(prefix="mdx-generate-") as folder:
            path = Path(folder) / "model.onnx"
            path.write_bytes(model_bytes)
            self.denoiser = OnnxDenoiser.load(path, provider=provider, threads=threads,
                                              compute_precision=compute_precision)
        self.settings = settings
        self.labels = run_labels(settings, tuple(class_names))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        samples = []
        for start, count, seed in zip(batch["start"], batch["count"], batch["seed"]):
            labels = self.labels[int(start):int(start) + int(count)]
            samples.append(sample_shard(self.denoiser, self.settings, labels, int(seed)))
        return {"index": np.asarray(batch["index"]), "samples": np.stack(samples)}  # (B, N, C, H, W)


def ray_workers(ray, workers: int | None, worker_cpus: int, shards: int) -> int:
    """The actor pool's size: --workers, else as many as the cluster's CPUs hold; never more than
    the shards. Refuses a pool the cluster cannot hold (it would wait for CPUs forever)."""
    from mdx.runtime.ray_cluster import cluster_cpus

    cpus = cluster_cpus(ray)
    if workers is None:
        workers = max(1, cpus // worker_cpus)
    if workers * worker_cpus > cpus:
        raise GenerateError(f"--workers {workers} x --worker-cpus {worker_cpus} needs {workers * worker_cpus} CPUs; "
                            f"the Ray cluster has {cpus}")
    return min(workers, shards)


def run_ray(ray, run: Run, shards: list[dict], workers: int, worker_cpus: int) -> Iterator[tuple[dict, np.ndarray]]:
    """Sample the shards on a Ray Data actor pool; yields each shard as it finishes (any order)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # this command draws its own
    context.print_on_execution_start = False
    items = [{k: shard[k] for k in ("index", "start", "count", "seed")} for shard in shards]
    dataset = ray.data.from_items(items, override_num_blocks=len(items))  # one block per shard
    constructor = dict(model_bytes=run.model.read_bytes(), sha256=run.sha256, settings=run.settings,
                       class_names=list(run.denoiser.info.class_names), provider=run.denoiser.provider,
                       compute_precision=run.denoiser.compute_precision, threads=worker_cpus)
    mapped = dataset.map_batches(ShardActor, batch_size=1, batch_format="numpy", num_cpus=worker_cpus,
                                 compute=ray.data.ActorPoolStrategy(size=workers),
                                 fn_constructor_kwargs=constructor)
    by_index = {shard["index"]: shard for shard in shards}
    # Ray Data logs each execution and that its progress bars are off; this command reports itself.
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    data_logger.setLevel(logging.ERROR)
    try:
        for row in mapped.iter_rows():
            yield by_index[int(row["index"])], np.asarray(row["samples"], dtype=np.float32)
    finally:
        data_logger.setLevel(level)


# --- the command ----------------------------------------------------------------------


def check_options(n, per_class, shard_size, steps, guidance, seed, threads, max_shards, use_ray, address,
                  workers, worker_cpus) -> None:
    """Everything that can be checked before the model is loaded."""
    if (n is None) == (per_class is None):
        raise GenerateError("give the number of images with -n, or --per-class K (K images of every class), "
                            "one of the two")
    for option, value, least in (("-n", n, 1), ("--per-class", per_class, 1), ("--shard-size", shard_size, 1),
                                 ("--steps", steps, 1), ("--seed", seed, 0), ("--threads", threads, 1),
                                 ("--max-shards", max_shards, 1), ("--workers", workers, 1),
                                 ("--worker-cpus", worker_cpus, 1)):
        if value is not None and value < least:
            raise GenerateError(f"{option} {value}: must be at least {least}")
    if guidance is not None and not (np.isfinite(guidance) and guidance >= 0):
        raise GenerateError(f"--guidance {guidance}: the guidance scale must be a number >= 0")
    if not use_ray:
        given = [o for o, v in (("--address", address), ("--workers", workers), ("--worker-cpus", worker_cpus))
                 if v is not None]
        if given:
            raise GenerateError(f"{', '.join(given)} apply to --ray runs only")
    elif threads is not None:
        raise GenerateError("--threads applies to the local run; with --ray each worker runs --worker-cpus threads")


def describe(run: Run, provider: str) -> str:
    s = run.settings
    shards = len(run.manifest["shards"])
    what = ("unconditional" if s["unconditional"] else
            f"all {len(s['classes'])} classes" if len(s["classes"]) == run.denoiser.info.num_classes and
            s["classes"] == list(run.denoiser.info.class_names) else f"classes {','.join(s['classes'])}")
    done = f"; {run.skipped} of {shards} shards already complete" if run.skipped else ""
    return (f"{run.model.name}: {s['n']} images in {shards} shards of {s['shard_size']}, {what}, {s['sampler']} "
            f"{s['steps']} steps, guidance {s['guidance']:g}, seed {s['seed']}, on {provider}{done}")


def summary(report: RunReport, out: Path) -> str:
    if not report.shards_written and not report.shards_left:
        return f"nothing to do: all {report.shards_skipped} shards in {out} are complete"
    text = (f"wrote {report.shards_written} shards ({report.images} images) to {out} in {report.seconds:.2f} s "
            f"({report.images_per_second:.1f} img/s)")
    if report.shards_skipped:
        text += f", {report.shards_skipped} already complete"
    if report.workers:
        text += f"; Ray: {report.workers} workers, start-up {report.startup_seconds:.1f} s (not in the rate)"
    if report.shards_left:
        text += f"; {report.shards_left} shards left: run the same command again to continue"
    return text


@click.command(cls=one_line_command(PROG, _user_errors), context_settings=CONTEXT_SETTINGS)
@click.option("--model", metavar="FILE", default=None,
              help="ONNX model (default: as mdx-sample: $MDX_MODEL, ./models/emoji16.onnx, the repository's).")
@click.option("-n", "--num-images", "n", type=int, default=None, help="Number of images in all.")
@click.option("--per-class", type=int, default=None, metavar="K",
              help="K images of every chosen class (instead of -n).")
@click.option("--classes", default=None, metavar="NAMES",
              help="Comma-separated class names or indices; image i gets the (i mod m)-th. Default: all classes.")
@click.option("--unconditional", is_flag=True, help="Sample without a class (all-zero context).")
@click.option("--sampler", type=click.Choice(SAMPLERS), default=None,
              help="Sampler (default: the model's recommendation, else ddim).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's recommendation, else 25).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale >= 0 (default: the model's recommendation, else 1).")
@click.option("--eta", type=float, default=0.0, show_default=True, help="DDIM noise scale (ddim only).")
@click.option("--seed", type=int, default=0, show_default=True, help="The run's seed; shard k's derives from it.")
@click.option("--shard-size", type=int, default=1000, show_default=True, help="Images per shard file (one batch).")
@click.option("--out", required=True, metavar="DIR", help="Output folder (created; its parent must exist).")
@click.option("--force", is_flag=True, help="Replace another run's manifest and shards in DIR instead of refusing.")
@click.option("--max-shards", type=int, default=None, help="Write at most this many shards now (resume later).")
@click.option("--provider", default="auto", show_default=True,
              help="auto, cpu, cuda, openvino or an onnxruntime provider name (resolved here; Ray workers "
                   "run the same).")
@click.option("--compute-precision", type=click.Choice(COMPUTE_PRECISIONS), default="auto", show_default=True,
              help="What OpenVINO computes in (as mdx-sample).")
@click.option("--threads", type=int, default=None, help="Local run: ONNX Runtime threads (default: its choice).")
@click.option("--ray", "use_ray", is_flag=True, help="Run the shards on Ray Data (pip install 'microdiffusion[ray]').")
@click.option("--address", default=None, help="--ray: join this cluster (auto, HOST:6379); default: a local one.")
@click.option("--workers", type=int, default=None, help="--ray: actors (default: the cluster's CPUs / --worker-cpus).")
@click.option("--worker-cpus", type=int, default=None, help="--ray: CPUs (and ONNX Runtime threads) per actor [1].")
def main(model, n, per_class, classes, unconditional, sampler, steps, guidance, eta, seed, shard_size, out, force,
         max_shards, provider, compute_precision, threads, use_ray, address, workers, worker_cpus):
    """Generate many images into shard files, deterministic and resumable, locally or on Ray."""
    from mdx.runtime.cli import find_model

    check_options(n, per_class, shard_size, steps, guidance, seed, threads, max_shards, use_ray, address,
                  workers, worker_cpus)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GenerateError(f"--out {out}: it exists and is not a folder")
    path = find_model(model)
    denoiser = OnnxDenoiser.load(path, provider=provider, threads=threads, compute_precision=compute_precision)
    settings, notes = resolve_settings(denoiser.info, n=n, per_class=per_class, classes=classes,
                                unconditional=unconditional, sampler=sampler, steps=steps, guidance=guidance,
                                eta=eta, seed=seed, shard_size=shard_size)
    run = open_run(path, out, denoiser, settings, force=force)
    click.echo(f"{PROG}: {describe(run, denoiser.provider)}"
               + "".join(f"; {note}" for note in (*denoiser.notes, *notes)), err=True)
    for note in run.notes:
        click.echo(f"{PROG}: {note}", err=True)
    todo = run.pending if max_shards is None else run.pending[:max_shards]
    report = run_shards(run, use_ray=use_ray, address=address, workers=workers, worker_cpus=worker_cpus or 1,
                        max_shards=max_shards,
                        progress=RateProgress(sum(s["count"] for s in todo)))
    click.echo(summary(report, out))


if __name__ == "__main__":
    main()
