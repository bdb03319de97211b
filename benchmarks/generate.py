"""mdx-generate's throughput: the plain local run against 1 and 2 local Ray workers, side by side.

    python -m mdx.bench.generate                                  # the shipped model, 256 images
    python -m mdx.bench.generate -n 1024 --shard-size 128 --repeats 3 --json gen.json
    python -m mdx.bench.generate --model M.onnx -n 16 --shard-size 4 --steps 3 --repeats 1   # a check

Every side writes the same shards (same seed and settings) into a fresh temporary folder
through mdx.runtime.generate, so they do identical work. The sides take turns (local, ray-1,
ray-2, local, ...) so a drift of the machine hits all alike; images/s = images / median wall
time of a side's runs ("first shard s": until its first shard was written). A side's time
counts everything after Ray is connected: the Ray sides include Ray Data's planning and
starting their actors (each loads the model), which a real run pays too. Ray's own start-up
(the local cluster on 127.0.0.1, with --workers-max x --worker-cpus CPUs) is measured once and
reported separately; the local side runs while that cluster idles. The local side uses ONNX
Runtime's default threads (all cores); a Ray worker has --worker-cpus CPUs and as many
threads. On a machine with C cores the scaling ceiling is C / --worker-cpus workers, and one
local process using all C cores is the bar the Ray sides must reach.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import click

from mdx.bench.machine import machine_info
from mdx.bench.timing import summarize
from mdx.runtime import generate as gen
from mdx.runtime import ray_cluster
from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
from mdx.runtime.session import OnnxDenoiser

PROG = "python -m mdx.bench.generate"


def one_run(model: Path, denoiser: OnnxDenoiser, settings: dict, workers: int, worker_cpus: int) -> gen.RunReport:
    """One whole mdx-generate run into a fresh folder (workers 0: the local run)."""
    folder = Path(tempfile.mkdtemp(prefix="mdx-bench-generate-"))
    try:
        run = gen.open_run(model, folder / "out", denoiser, settings)
        return gen.run_shards(run, use_ray=workers > 0, workers=workers or None, worker_cpus=worker_cpus)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def side_name(workers: int) -> str:
    return "local" if workers == 0 else f"ray-{workers}"


def measure(model: Path, settings: dict, sides: list[int], worker_cpus: int, repeats: int) -> dict:
    """Time every side `repeats` times, interleaved, on one local Ray cluster; returns the results."""
    denoiser = OnnxDenoiser.load(model)
    times: dict[int, list[float]] = {w: [] for w in sides}
    firsts: dict[int, list[float]] = {w: [] for w in sides}
    cpus = max(sides) * worker_cpus
    with ray_cluster.connect(None, num_cpus=cpus) as (ray, startup):
        for _ in range(repeats):
            for workers in sides:
                report = one_run(model, denoiser, settings, workers, worker_cpus)
                if report.images != settings["n"]:
                    raise RuntimeError(f"{side_name(workers)} wrote {report.images} of {settings['n']} images")
                times[workers].append(report.seconds)
                firsts[workers].append(report.first_seconds)
                click.echo(f"{side_name(workers)}: {report.images} images in {report.seconds:.2f} s", err=True)
    rows = []
    for workers in sides:
        stats = summarize(times[workers])
        rows.append({"side": side_name(workers), "workers": workers, "worker_cpus": worker_cpus if workers else None,
                     "images": settings["n"], "median_s": stats.median_s, "p90_s": stats.p90_s,
                     "images_per_s": settings["n"] / stats.median_s, "samples_s": list(stats.samples_s),
                     "first_shard_s": summarize(firsts[workers]).median_s})
    base = rows[0]["images_per_s"]
    for row in rows:
        row["speedup_vs_local"] = row["images_per_s"] / base
    return {"settings": settings, "provider": denoiser.provider, "ray_startup_s": startup,
            "ray_cluster_cpus": cpus, "rows": rows, "machine": machine_info()}


def table(results: dict) -> str:
    """The results as a markdown table, Ray's start-up below it."""
    s = results["settings"]
    lines = [f"mdx-generate, {s['n']} images in shards of {s['shard_size']}, {s['sampler']} {s['steps']} steps, "
             f"guidance {s['guidance']:g}, {results['provider']}", "",
             "| side | workers x CPUs | median s | p90 s | first shard s | images/s | vs local |",
             "|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        shape = "1 process" if not r["workers"] else f"{r['workers']} x {r['worker_cpus']}"
        lines.append(f"| {r['side']} | {shape} | {r['median_s']:.2f} | {r['p90_s']:.2f} | {r['first_shard_s']:.2f} | "
                     f"{r['images_per_s']:.1f} | {r['speedup_vs_local']:.2f}x |")
    lines += ["", f"Ray start-up (local cluster, {results['ray_cluster_cpus']} CPUs, once): "
              f"{results['ray_startup_s']:.1f} s, not in the times above."]
    return "\n".join(lines)


@click.command(cls=one_line_command(PROG, gen._user_errors), context_settings=CONTEXT_SETTINGS)
@click.option("--model", default=None, metavar="FILE", help="ONNX model (default: as mdx-sample).")
@click.option("-n", "n", type=int, default=256, show_default=True, help="Images per run.")
@click.option("--shard-size", type=int, default=32, show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the model's recommendation).")
@click.option("--workers-max", type=int, default=2, show_default=True, help="Ray sides: 1 .. this many workers.")
@click.option("--worker-cpus", type=int, default=1, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--json", "json_out", default=None, metavar="FILE", help="Also write the results as JSON.")
def main(model, n, shard_size, steps, workers_max, worker_cpus, repeats, json_out):
    """Time mdx-generate locally and on 1..--workers-max local Ray workers."""
    from mdx.runtime.cli import find_model

    gen.check_options(n, None, shard_size, steps, None, 0, None, None, True, None, workers_max, worker_cpus)
    if repeats < 1:
        raise gen.GenerateError(f"--repeats {repeats}: must be at least 1")
    path = find_model(model)
    info = OnnxDenoiser.load(path).info
    settings, _ = gen.resolve_settings(info, n=n, per_class=None, classes=None, unconditional=False, sampler=None,
                                       steps=steps, guidance=None, eta=0.0, seed=0, shard_size=shard_size)
    results = measure(path, settings, [0, *range(1, workers_max + 1)], worker_cpus, repeats)
    click.echo(table(results))
    if json_out is not None:
        from mdx.runtime.fileio import write_text

        write_text(json_out, json.dumps(results, indent=1) + "\n")
        click.echo(f"wrote {json_out}", err=True)


if __name__ == "__main__":
    main()
