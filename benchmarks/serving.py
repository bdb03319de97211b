"""Suite: serving. Many concurrent clients, the batching engine against one request at a time.

    python -m mdx.bench.serving --quick             # a few seconds per load
    python -m mdx.bench.serving                     # 30 s per load: 1, 8, 32, 64 clients x 1 and 4 images
    python -m mdx.bench.serving --http --clients 32 --images 1

Each client sends a request, waits for its images, and sends the next, until the load's duration
is over (requests in flight then finish and count). A request asks for 1 or 4 images at the
model's recommended settings (the shipped emoji16: DPM-Solver++ 20 at guidance 5, so 2 rows per
image), with its own seed. Two servers run the same load on the same provider:

- `engine`: `mdx.runtime.engine.Engine` (step-level batching: every client's step shares one
  denoiser call, at most --max-rows rows), driven in process, or through mdx-serve's HTTP app
  on 127.0.0.1 with --http;
- `one-at-a-time`: `pipeline.generate` behind a lock, one request after another, which is
  what a service without batching does.

Reported per load: requests/s, images/s, p50/p90/p99 latency (submission to images, queueing
included), and the mean rows per denoiser call. The target (issue 11): at 32 clients x 1 image,
the engine reaches at least 2.5x the one-at-a-time throughput, with p99 latency at most 3x the
single-client latency (one client, one image, one at a time). Providers: the fastest that
starts here (a short forward timing at the engine's batch) and the plain CPU provider.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

CLIENTS = (1, 8, 32, 64)
IMAGES = (1, 4)
FULL_S, QUICK_S = 30.0, 3.0
MAX_ROWS = 128
CPU = "CPUExecutionProvider"
TARGET_SPEEDUP, TARGET_P99 = 2.5, 3.0


@dataclass(frozen=True)
class Load:
    clients: int
    images: int
    seconds: float


# --- the two servers ------------------------------------------------------------------


def one_class(info, class_name: str, n: int) -> np.ndarray:
    """The context of n images of one class (what a client asking for `classes: [name]` gets)."""
    from mdx.runtime.pipeline import build_context

    return build_context(info.class_names, [class_name], False, n)[0]



class EngineServer:
    """Requests through the batching engine (in process)."""

    mode = "engine"

    def __init__(self, denoiser, max_rows: int, settings) -> None:
        from mdx.runtime.engine import Engine, EngineConfig

        self.settings = settings
        self.engine = Engine(denoiser, EngineConfig(max_rows=max_rows, max_queue=4096, timeout_s=3600,
                                                    max_images=64), name="bench")

    def __call__(self, class_name: str, n: int, seed: int) -> None:
        s = self.settings
        self.engine.generate(context=one_class(self.engine.info, class_name, n), sampler=s.sampler, steps=s.steps, guidance=s.guidance, seed=seed,
                             sampler_options=s.sampler_options)

    def counters(self) -> tuple[int, int]:
        stats = self.engine.stats()
        return stats.calls, stats.rows_total

    def close(self) -> None:
        self.engine.close()


class SerialServer:
    """One request at a time: generate() behind a lock (clients queue for it)."""

    mode = "one-at-a-time"

    def __init__(self, denoiser, settings) -> None:
        self.denoiser, self.settings = denoiser, settings
        self._lock = threading.Lock()
        self._calls = self._rows = 0

    def __call__(self, class_name: str, n: int, seed: int) -> None:
        from mdx.runtime.pipeline import generate

        s, context = self.settings, one_class(self.denoiser.info, class_name, n)
        with self._lock:
            generate(self.denoiser, context=context, sampler=s.sampler, steps=s.steps, guidance=s.guidance,
                     seed=seed, sampler_options=s.sampler_options)
            rows = len(context) * (2 if s.guidance != 1.0 else 1)
            self._calls += s.steps
            self._rows += rows * s.steps

    def counters(self) -> tuple[int, int]:
        return self._calls, self._rows

    def close(self) -> None:
        pass


class HttpServer:
    """The engine behind mdx-serve's app, uvicorn on a free 127.0.0.1 port, httpx clients."""

    mode = "engine-http"

    def __init__(self, denoiser, max_rows: int, settings) -> None:
        import httpx
        import uvicorn

        from mdx.runtime import serve

        self.inner = EngineServer(denoiser, max_rows, settings)
        self.settings = settings
        app = serve.create_app(self.inner.engine, api_key="", max_images=64, close_on_shutdown=False)
        self._sock = serve.bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}/v1/generate"
        self._server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)
        self._thread.start()
        while not self._server.started:
            time.sleep(0.01)
        self._local = threading.local()
        self._httpx = httpx

    def __call__(self, class_name: str, n: int, seed: int) -> None:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = self._httpx.Client(timeout=3600)
        s = self.settings
        body = {"n": n, "classes": [class_name], "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
                "seed": seed, "format": "npz"}
        r = client.post(self.url, json=body)
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")

    def counters(self) -> tuple[int, int]:
        return self.inner.counters()

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()
        self.inner.close()


# --- one load -------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def drive(server, load: Load, class_names) -> dict:
    """`load.clients` threads, each sending one request after another until the duration ends."""
    latencies, errors, lock = [], [], threading.Lock()
    gate = threading.Barrier(load.clients + 1)
    deadline = [0.0]

    def client(k: int) -> None:
        gate.wait()
        i = 0
        while time.monotonic() < deadline[0]:
            start = time.perf_counter()
            try:
                server(class_names[(k + i) % len(class_names)], load.images, 1000 * k + i)
            except Exception as e:  # reported in the record, and the client stops
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                latencies.append(time.perf_counter() - start)
            i += 1

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(load.clients)]
    for t in threads:
        t.start()
    calls0, rows0 = server.counters()
    deadline[0] = time.monotonic() + load.seconds
    start = time.perf_counter()
    gate.wait()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    calls, rows = (a - b for a, b in zip(server.counters(), (calls0, rows0)))
    done = len(latencies)
    return {"mode": server.mode, "clients": load.clients, "request_images": load.images, "duration_s": load.seconds,
            "wall_s": wall, "requests": done, "requests_per_s": done / wall, "images_per_s": done * load.images / wall,
            "p50_s": _percentile(latencies, 50), "p90_s": _percentile(latencies, 90),
            "p99_s": _percentile(latencies, 99), "mean_rows_per_call": rows / calls if calls else None,
            "errors": errors[:3]}


def to_record(row: dict, provider: str, precision: str, settings) -> dict:
    """A results.json record (suite "serving"; median_s / p90_s are request latencies)."""
    from mdx.bench.records import make_record

    rec = make_record("serving", "onnxruntime", provider, precision, row["request_images"], sampler=settings.sampler,
                      steps=settings.steps, guidance=settings.guidance, variant=row["mode"], **row)
    if "skipped" not in row:
        rec.update(median_s=row["p50_s"], p90_s=row["p90_s"], images_per_s=row["images_per_s"])
    return rec


# --- providers ------------------------------------------------------------------------


def warm(denoiser, sizes) -> None:
    """One call at every batch size the run will use (first calls allocate and pick kernels)."""
    for size in sizes:
        denoiser.binding(size).run()


def forward_seconds(denoiser, batch: int, repeats: int = 5) -> float:
    bound = denoiser.binding(batch)
    bound.run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        bound.run()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def pick_providers(path: Path, wanted: list[str], threads: int | None, batch: int,
                   log: Callable[[str], None]) -> list[str]:
    """`fastest` becomes the provider with the shortest forward call at `batch` among those that
    start here; `cpu` the CPU provider; other names stay. Duplicates are dropped."""
    from mdx.runtime.session import ModelError, OnnxDenoiser, usable_providers

    out = []
    for name in wanted:
        if name == "fastest":
            timings = {}
            for provider in usable_providers(path):
                try:
                    timings[provider] = forward_seconds(OnnxDenoiser.load(path, provider=provider, threads=threads),
                                                        batch)
                except ModelError as e:
                    log(f"serving: {provider} skipped ({e})")
            log("serving: forward at batch " + str(batch) + ": "
                + ", ".join(f"{p} {t * 1000:.1f} ms" for p, t in sorted(timings.items(), key=lambda kv: kv[1])))
            name = min(timings, key=timings.get)
        elif name == "cpu":
            name = CPU
        if name not in out:
            out.append(name)
    return out


# --- the suite ------------------------------------------------------------------------


def _run_mode(server, loads: list[Load], class_names, budget, log) -> list[dict]:
    rows = []
    for load in loads:
        if budget is not None and not budget.allows(load.seconds + 1.0):
            rows.append({"mode": server.mode, "clients": load.clients, "request_images": load.images,
                         "skipped": budget.reason(f"{server.mode} {load.clients}x{load.images}", load.seconds)})
            continue
        row = drive(server, load, class_names)
        log(f"serving: {row['mode']:>13} {load.clients:2d} clients x {load.images} images: "
            f"{row['requests_per_s']:6.2f} req/s, {row['images_per_s']:6.1f} img/s, p50 {row['p50_s'] or 0:.3f} s, "
            f"p99 {row['p99_s'] or 0:.3f} s, {row['mean_rows_per_call'] or 0:.1f} rows/call")
        rows.append(row)
        time.sleep(0.05)  # let onnxruntime's spinning threads settle between loads
    return rows


def run_provider(path: Path, provider: str, loads: list[Load], *, threads: int | None, max_rows: int,
                 http: bool, budget=None, log: Callable[[str], None] = print) -> list[dict]:
    """Every load through the engine, then through one-at-a-time, on one session of `provider`."""
    from mdx.runtime.contract import resolve_settings
    from mdx.runtime.engine import bucket_sizes
    from mdx.runtime.session import OnnxDenoiser

    denoiser = OnnxDenoiser.load(path, provider=provider, threads=threads)
    info, settings = denoiser.info, resolve_settings(denoiser.info)
    per_image = 2 if settings.guidance != 1.0 else 1
    warm(denoiser, [*bucket_sizes(max_rows), *(per_image * n for n in sorted({ld.images for ld in loads}))])
    engine = (HttpServer if http else EngineServer)(denoiser, max_rows, settings)
    try:
        rows = _run_mode(engine, loads, info.class_names, budget, log)
    finally:
        engine.close()  # the denoiser is free again for the one-at-a-time side
    rows += _run_mode(SerialServer(denoiser, settings), loads, info.class_names, budget, log)
    return [to_record(r, provider, info.precision, settings) for r in rows]


def loads_for(clients, images, seconds: float) -> list[Load]:
    return [Load(c, n, seconds) for n in images for c in clients]


def run_serving(model: Path, *, quick: bool, providers=("fastest", "cpu"), clients=CLIENTS, images=IMAGES,
                seconds: float | None = None, threads: int | None = None, max_rows: int = MAX_ROWS,
                http: bool = False, budget=None, log: Callable[[str], None] = print) -> list[dict]:
    """The serving suite's records on each provider (see the module docstring)."""
    seconds = seconds if seconds is not None else (QUICK_S if quick else FULL_S)
    loads = loads_for(clients, images, seconds)
    records = []
    for provider in pick_providers(Path(model), list(providers), threads, min(64, max_rows), log):
        records += run_provider(Path(model), provider, loads, threads=threads, max_rows=max_rows, http=http,
                                budget=budget, log=log)
    return records


# --- the report -----------------------------------------------------------------------


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    """(engine record, one-at-a-time record) for each provider, images and clients measured on both."""
    serial = {(r["provider"], r["request_images"], r["clients"]): r for r in records
              if r.get("mode") == "one-at-a-time" and "skipped" not in r}
    return [(r, serial[key]) for r in records if r.get("mode", "").startswith("engine") and "skipped" not in r
            and (key := (r["provider"], r["request_images"], r["clients"])) in serial]


def target_line(records: list[dict], provider: str) -> str | None:
    """The issue's target at 32 clients x 1 image on `provider`, as measured."""
    single = next((s for e, s in pairs(records) if s["provider"] == provider and s["clients"] == 1
                   and s["request_images"] == 1), None)
    at32 = next(((e, s) for e, s in pairs(records) if e["provider"] == provider and e["clients"] == 32
                 and e["request_images"] == 1), None)
    if single is None or at32 is None:
        return None
    e, s = at32
    speedup, p99 = e["images_per_s"] / s["images_per_s"], e["p99_s"] / single["p50_s"]
    ok = speedup >= TARGET_SPEEDUP and p99 <= TARGET_P99
    return (f"Target on {provider}, 32 clients x 1 image: {speedup:.2f}x the one-at-a-time throughput "
            f"(target >= {TARGET_SPEEDUP}x), p99 {e['p99_s']:.3f} s = {p99:.2f}x the single-client latency "
            f"{single['p50_s']:.3f} s (target <= {TARGET_P99}x): {'met' if ok else 'not met'}")


def markdown(records: list[dict]) -> str:
    head = ("| provider | images/req | clients | engine req/s | engine img/s | engine p50 s | engine p99 s | "
            "rows/call | 1-at-a-time req/s | img/s | p50 s | p99 s | speedup |\n" + "|---" * 13 + "|\n")
    lines = []
    for e, s in pairs(records):
        lines.append(f"| {e['provider'].replace('ExecutionProvider', '')} | {e['request_images']} | {e['clients']} | "
                     f"{e['requests_per_s']:.2f} | {e['images_per_s']:.1f} | {_fmt(e['p50_s'], '.3f')} | "
                     f"{_fmt(e['p99_s'], '.3f')} | {_fmt(e['mean_rows_per_call'], '.1f')} | "
                     f"{s['requests_per_s']:.2f} | {s['images_per_s']:.1f} | {_fmt(s['p50_s'], '.3f')} | "
                     f"{_fmt(s['p99_s'], '.3f')} | {e['images_per_s'] / s['images_per_s']:.2f}x |")
    targets = [t for p in dict.fromkeys(r["provider"] for r in records) if (t := target_line(records, p))]
    skipped = [f"- skipped: {r['provider']} {r['mode']} {r['clients']}x{r['request_images']}: {r['skipped']}"
               for r in records if "skipped" in r]
    return head + "\n".join(lines) + "\n\n" + "\n".join([*targets, *skipped]) + "\n"


# --- the command ----------------------------------------------------------------------


def _int_list(option: str, text: str) -> tuple[int, ...]:
    import click

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise click.BadParameter(f"{text!r}: give comma-separated positive integers", param_hint=option)
    return values


def write_results(out: Path, records: list[dict], meta: dict) -> None:
    from mdx.runtime.fileio import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    with atomic_write(out / "serving.json", ".json") as tmp:
        tmp.write_text(json.dumps({"run": meta, "records": records}, indent=1, default=str))
    with atomic_write(out / "serving.md", ".md") as tmp:
        tmp.write_text(markdown(records))


def _command():
    import click

    from mdx.runtime.cli_common import CONTEXT_SETTINGS, one_line_command
    from mdx.runtime.contract import ModelError
    from mdx.runtime.fileio import OutputError

    @click.command(cls=one_line_command("mdx-bench-serving", (ModelError, OutputError)),
                   context_settings=CONTEXT_SETTINGS)
    @click.option("--quick", is_flag=True, help=f"{QUICK_S:g} s per load instead of {FULL_S:g} s.")
    @click.option("--model", type=click.Path(path_type=Path), default=None, help="ONNX model (default: the shipped emoji16).")
    @click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None, help="Seconds per load.")
    @click.option("--clients", default=",".join(map(str, CLIENTS)), show_default=True, help="Concurrent clients.")
    @click.option("--images", default=",".join(map(str, IMAGES)), show_default=True, help="Images per request.")
    @click.option("--providers", default="fastest,cpu", show_default=True,
                  help="fastest, cpu, or onnxruntime provider names, comma-separated.")
    @click.option("--max-rows", type=click.IntRange(1, 4096), default=MAX_ROWS, show_default=True,
                  help="The engine's rows per denoiser call.")
    @click.option("--threads", type=click.IntRange(1, 1024), default=None, help="onnxruntime intra-op threads.")
    @click.option("--http", is_flag=True, help="Drive the engine through mdx-serve's HTTP app on 127.0.0.1.")
    @click.option("--out", type=click.Path(path_type=Path), default=None, help="Also write serving.json and serving.md here.")
    def main(quick, model, duration, clients, images, providers, max_rows, threads, http, out):
        """The serving benchmark: the batching engine against one request at a time."""
        from mdx.runtime.shipped import resolve_model

        path = resolve_model(model)
        log = lambda m: click.echo(m, err=True)  # noqa: E731
        records = run_serving(path, quick=quick, providers=[p.strip() for p in providers.split(",") if p.strip()],
                              clients=_int_list("--clients", clients), images=_int_list("--images", images),
                              seconds=duration, threads=threads, max_rows=max_rows, http=http, log=log)
        click.echo(markdown(records))
        if out is not None:
            write_results(out, records, {"model": str(path), "quick": quick, "max_rows": max_rows, "http": http})

    return main


def main(argv=None) -> None:
    _command()(argv)


if __name__ == "__main__":
    main()
