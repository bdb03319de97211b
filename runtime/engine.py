"""A step-level batching engine: many sampling requests share every denoiser call.

The model contract takes one timestep per row (`timestep` is [batch], docs/contract.md), so
requests at different steps of different samplers can run in one network call. A background
thread repeats one *tick*:

    1. drop the requests that were cancelled or ran past their deadline (their rows are freed);
    2. admit queued requests in FIFO order while their rows fit in `max_rows`;
    3. gather x_t of every active request (and its unconditional copy when guidance != 1) into
       one bucketed batch with per-row timesteps and contexts; ONE denoiser call;
    4. step every request's own sampler with its own random generator.

Each request keeps the random-number order of `pipeline.generate` (x_T first, then the noise
draws per step that its sampler needs), and its rows are evaluated by the same network, so its
images equal `generate()` alone for the same settings and seed, whatever shares its batches
(up to the provider's rounding for a different batch size; see tests/runtime/test_engine.py).

    engine = Engine(OnnxDenoiser.load("models/emoji16.onnx"), EngineConfig(max_rows=64))
    ticket = engine.submit(SampleRequest(context=ctx, sampler="dpmpp", steps=20, guidance=5.0, seed=1))
    result = ticket.result(progress=print)          # blocking; or `await ticket.wait()` in asyncio
    engine.close()

Rows per call are rounded up to a bucket (powers of two up to `max_rows`), so the denoiser's
reused buffers (`binding(bucket)`) serve every tick without reallocation; pad rows get a zero
sample, timestep 0 and a zero context, and their outputs are ignored. A request with more rows
than `max_rows` (2n rows with guidance) runs alone and spreads each of its steps over several
calls; `max_images` caps n per request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from mdx.runtime.contract import recommended_sampler_options
from mdx.runtime.pipeline import Generation, PipelineError, check_request, guide, prepare_sampler


class EngineError(ValueError):
    """A request the engine cannot take; the message says why and what is allowed."""


class QueueFull(EngineError):
    """Too many requests wait already; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class RequestTooLarge(EngineError):
    """More images in one request than the engine's `max_images`."""


class RequestTimeout(TimeoutError):
    """A request ran past its deadline (queue time included); its rows were freed."""


class EngineClosed(RuntimeError):
    """The engine is shutting down or shut down and takes no more requests."""


# --- configuration and requests -------------------------------------------------------


def _positive_int(name: str, value, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        raise EngineError(f"{name} must be an integer >= {lo}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class EngineConfig:
    """Bounds of one engine. max_rows: rows per denoiser call (a guided image takes 2);
    max_queue: requests waiting beyond the active ones (0: none wait; a request that fits at once
    is still taken); timeout_s: per request, from submission;
    max_images: images per request."""

    max_rows: int = 64
    max_queue: int = 64
    timeout_s: float = 300.0
    max_images: int = 256

    def __post_init__(self) -> None:
        _positive_int("max_rows", self.max_rows)
        _positive_int("max_queue", self.max_queue, 0)
        _positive_int("max_images", self.max_images)
        t = self.timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
            raise EngineError(f"timeout_s must be a number of seconds > 0, got {t!r}")


@dataclass(frozen=True)
class SampleRequest:
    """What to sample: the arguments of `pipeline.generate` (context (n, K) float32, one row per
    image). sampler_options None means the model's recommended options for this sampler."""

    context: np.ndarray
    sampler: str = "ddim"
    steps: int = 25
    guidance: float = 1.0
    eta: float = 0.0
    seed: int = 0
    sampler_options: dict | None = None
    record_x0: bool = False


def bucket_sizes(max_rows: int) -> tuple[int, ...]:
    """1, 2, 4, ... below max_rows, then max_rows: the batch sizes the engine ever runs."""
    sizes = [1 << k for k in range(max_rows.bit_length()) if 1 << k < max_rows]
    return (*sizes, max_rows)


# --- one request inside the engine ----------------------------------------------------


class _Job:
    """A request's sampling state: its x_t, sampler, random generator and row layout.

    Rows 0..n-1 are the conditional images, rows n..2n-1 (with guidance) their unconditional
    copies with an all-zero context, as `generate` lays out its batch of 2n.
    """

    def __init__(self, info, request: SampleRequest, context: np.ndarray, sampler) -> None:
        n = context.shape[0]
        self.n, self.shape = n, (n, *info.sample_shape)  # (n, C, H, W)
        self.guidance = float(request.guidance)
        self.guided = self.guidance != 1.0
        self.rows = 2 * n if self.guided else n
        self.context_rows = np.zeros((self.rows, info.num_classes), dtype=np.float32)  # (rows, K)
        self.context_rows[:n] = context
        self.sampler = sampler
        self.timesteps = sampler.timesteps
        self.rng = np.random.default_rng(request.seed)
        self.x = self.rng.standard_normal(self.shape, dtype=np.float32)  # x_T, the first draw
        self.noise = np.empty(self.shape, dtype=np.float32)
        self.eps = np.empty(self.shape, dtype=np.float32) if self.guided else None
        self.out: np.ndarray | None = None  # (rows, C, H, W), only for a step split over calls
        self.model_out: np.ndarray | None = None
        self.frames: list[np.ndarray] | None = [] if request.record_x0 else None
        self.i = 0  # steps done
        self.filled = 0  # rows of the current step already evaluated
        self.model_seconds = 0.0

    def fill(self, bound, row: int, start: int, take: int) -> None:
        """Write job rows start..start+take into the batch at `row`."""
        n, stop = self.n, start + take
        bound.timestep[row:row + take] = self.timesteps[self.i]
        bound.context[row:row + take] = self.context_rows[start:stop]
        if start < n:  # conditional rows
            c = min(stop, n)
            bound.sample[row:row + c - start] = self.x[start:c]
        if stop > n:  # unconditional copies of x
            u = max(start, n)
            bound.sample[row + u - start:row + take] = self.x[u - n:stop - n]

    def collect(self, out: np.ndarray, row: int, start: int, take: int) -> bool:
        """Take this job's outputs from the batch; True when the whole step is evaluated."""
        if start == 0 and take == self.rows:
            self.model_out = out[row:row + take]  # a view, used before the next call overwrites it
        else:
            if self.out is None:
                self.out = np.empty((self.rows, *self.shape[1:]), dtype=np.float32)
            self.out[start:start + take] = out[row:row + take]
            self.model_out = self.out
        self.filled = start + take
        return self.filled == self.rows

    def advance(self) -> bool:
        """One sampler step, exactly as `generate` does it; True when the last step is done."""
        out, n = self.model_out, self.n
        model_output = guide(out, n, self.guidance, self.eps) if self.guided else out
        t = self.timesteps[self.i]
        z = None
        if self.sampler.needs_noise(t):
            z = self.rng.standard_normal(self.shape, dtype=np.float32, out=self.noise)
        result = self.sampler.step(model_output, t, self.x, noise=z)
        self.x = result.prev_sample
        if self.frames is not None:
            self.frames.append(result.pred_original_sample)
        self.i += 1
        self.filled, self.model_out = 0, None
        return self.i == len(self.timesteps)


class Ticket:
    """The caller's handle on a submitted request: progress, result, cancellation."""

    def __init__(self, request_id: int, n: int, rows: int, total_steps: int, deadline: float) -> None:
        self.id, self.n, self.rows, self.total_steps = request_id, n, rows, total_steps
        self.deadline = deadline
        self.future: concurrent.futures.Future = concurrent.futures.Future()
        self.submitted = time.monotonic()
        self.started: float | None = None
        self._done_steps = 0
        self._changed = threading.Condition()
        self.future.add_done_callback(lambda _: self._notify())

    @property
    def done_steps(self) -> int:
        return self._done_steps

    def _notify(self, steps: int | None = None) -> None:
        with self._changed:
            if steps is not None:
                self._done_steps = steps
            self._changed.notify_all()

    def cancel(self) -> bool:
        """Withdraw the request; the engine frees its rows before the next call."""
        return self.future.cancel()

    def result(self, timeout: float | None = None,
               progress: Callable[[int, int], None] | None = None) -> Generation:
        """Wait for the images; `progress(done, total)` runs in the caller's thread after each step.

        Raises RequestTimeout, EngineClosed, concurrent.futures.CancelledError, or the error of
        the model call; TimeoutError when `timeout` passes first (the request keeps running).
        """
        if progress is None:  # no wake-up per step: the engine thread runs undisturbed
            try:
                return self.future.result(timeout)
            except concurrent.futures.TimeoutError:
                if self.future.done():  # the request itself timed out, or was cancelled
                    raise
                raise TimeoutError(f"request {self.id} not finished after {timeout} s") from None
        end = None if timeout is None else time.monotonic() + timeout
        reported = 0
        while not self.future.done():
            with self._changed:
                if self._done_steps == reported and not self.future.done():
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        raise TimeoutError(f"request {self.id} not finished after {timeout} s")
                    self._changed.wait(left)
                steps = self._done_steps
            reported = self._report(progress, reported, steps)
        self._report(progress, reported, self._done_steps)
        return self.future.result()

    def _report(self, progress: Callable[[int, int], None], reported: int, steps: int) -> int:
        """Call `progress` once for every step from `reported` + 1 to `steps`, in order: a fast
        provider can finish several steps before this thread wakes, and each step is reported."""
        for done in range(reported + 1, steps + 1):
            progress(done, self.total_steps)
        return max(reported, steps)

    async def wait(self) -> Generation:
        """The result, awaited in an asyncio loop; cancelling the awaiting task cancels the request."""
        return await asyncio.wrap_future(self.future)


def _settle(future: concurrent.futures.Future, result=None, error: BaseException | None = None) -> None:
    """Deliver a result or an error unless the client cancelled the future meanwhile."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled: no one to tell
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


# --- counters for /metrics ------------------------------------------------------------

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)
OUTCOMES = ("ok", "cancelled", "timeout", "error", "closed", "rejected")


@dataclass
class EngineStats:
    """A snapshot of an engine's counters (cumulative since start, except the gauges)."""

    queue_depth: int = 0
    active_requests: int = 0
    active_rows: int = 0
    calls: int = 0
    rows_total: int = 0  # rows of real requests over all calls
    pad_rows_total: int = 0
    model_seconds_total: float = 0.0
    rows_per_call: dict[int, int] = field(default_factory=dict)  # bucket -> calls that used it
    rows_buckets: tuple[int, ...] = ()
    requests: dict[str, int] = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    latency_counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    images_total: int = 0

    @property
    def mean_rows_per_call(self) -> float:
        return self.rows_total / self.calls if self.calls else 0.0


# --- the engine -----------------------------------------------------------------------


class Engine:
    """One denoiser, one background thread, every request's steps batched into shared calls.

    The engine owns the denoiser: nothing else may run it while the engine is open. Use it
    as a context manager, or call `close()`.
    """

    def __init__(self, denoiser, config: EngineConfig | None = None, name: str = "") -> None:
        self.denoiser = denoiser
        self.info = denoiser.info
        self.config = config or EngineConfig()
        self.name = name or getattr(self.info.path, "stem", "model")
        self.buckets = bucket_sizes(self.config.max_rows)
        # Keep every bucket's buffers bound at once (OnnxDenoiser evicts beyond MAX_BINDINGS).
        if getattr(denoiser, "MAX_BINDINGS", len(self.buckets)) < len(self.buckets):
            denoiser.MAX_BINDINGS = len(self.buckets)
        self._cv = threading.Condition()
        self._queue: collections.deque[tuple[Ticket, _Job]] = collections.deque()
        self._active: list[tuple[Ticket, _Job]] = []
        self._ids = itertools.count(1)
        self._closing = False
        self._stats = EngineStats(rows_per_call=dict.fromkeys(self.buckets, 0), rows_buckets=self.buckets)
        self._recent_latency = collections.deque(maxlen=32)
        self._thread = threading.Thread(target=self._run, name=f"mdx-engine-{self.name}", daemon=True)
        self._thread.start()

    # -- the caller's side --

    def _check(self, request: SampleRequest) -> tuple[np.ndarray, object]:
        """The request's context and prepared sampler; EngineError / PipelineError / SamplerError."""
        info = self.info
        context, n = check_request(info, request.context, None, request.guidance, request.seed)
        if n > self.config.max_images:
            raise RequestTooLarge(f"{n} images in one request; this engine takes at most "
                                  f"{self.config.max_images} (max_images)")
        options = request.sampler_options
        if options is None:
            options = recommended_sampler_options(info, request.sampler)
        return context, prepare_sampler(info, request.sampler, request.steps, request.eta, options)

    def submit(self, request: SampleRequest) -> Ticket:
        """Queue a request; returns at once. Raises the request's error (a bad value), QueueFull,
        or EngineClosed, before anything is queued."""
        context, sampler = self._check(request)
        job = _Job(self.info, request, context, sampler)
        with self._cv:
            if self._closing:
                raise EngineClosed(f"engine {self.name} is shutting down")
            used = sum(j.rows for _, j in self._active)
            fits_now = not self._queue and (not self._active or used + job.rows <= self.config.max_rows)
            if len(self._queue) >= self.config.max_queue and not fits_now:
                self._stats.requests["rejected"] += 1
                raise QueueFull(f"engine {self.name}: {len(self._queue)} requests wait already "
                                f"(max_queue {self.config.max_queue}); retry later", self._retry_after())
            ticket = Ticket(next(self._ids), job.n, job.rows, len(job.timesteps),
                            time.monotonic() + self.config.timeout_s)
            ticket.future.add_done_callback(self._wake)
            self._queue.append((ticket, job))
            self._cv.notify_all()
        return ticket

    def generate(self, *, context: np.ndarray, progress: Callable[[int, int], None] | None = None,
                 timeout: float | None = None, **settings) -> Generation:
        """`pipeline.generate` through the engine: submit, wait (relaying progress), return.
        settings: sampler, steps, guidance, eta, seed, sampler_options, record_x0."""
        ticket = self.submit(SampleRequest(context=context, **settings))
        try:
            return ticket.result(timeout=timeout, progress=progress)
        except BaseException:
            ticket.cancel()  # a caller that stops waiting (Ctrl-C, a timeout) frees its rows
            raise

    def _retry_after(self) -> float:
        """Seconds until a queue slot is likely free: the recent mean request latency, >= 1."""
        recent = list(self._recent_latency)
        return max(1.0, round(sum(recent) / len(recent), 1)) if recent else 1.0

    def _wake(self, _future=None) -> None:
        with self._cv:
            self._cv.notify_all()

    def stats(self) -> EngineStats:
        """A consistent copy of the counters."""
        with self._cv:
            s = self._stats
            return EngineStats(
                queue_depth=len(self._queue), active_requests=len(self._active),
                active_rows=sum(job.rows for _, job in self._active), calls=s.calls, rows_total=s.rows_total,
                pad_rows_total=s.pad_rows_total, model_seconds_total=s.model_seconds_total,
                rows_per_call=dict(s.rows_per_call), rows_buckets=self.buckets, requests=dict(s.requests),
                latency_counts=list(s.latency_counts), latency_sum=s.latency_sum, images_total=s.images_total)

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the queued and active ones first, else fail
        them with EngineClosed. Waits for the thread (at most `timeout` seconds)."""
        with self._cv:
            self._closing = True
            if not drain:
                for ticket, _ in [*self._queue, *self._active]:
                    _settle(ticket.future, error=EngineClosed(f"engine {self.name} was closed"))
            self._cv.notify_all()
        self._thread.join(timeout)

    @property
    def closed(self) -> bool:
        return self._closing

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Engine({self.name!r}, max_rows={self.config.max_rows}, provider={self.denoiser.provider})"

    # -- the engine thread --

    def _run(self) -> None:
        """The loop; should it ever fail outside a model call, no request is left waiting."""
        try:
            self._loop()
        except BaseException as e:
            with self._cv:
                self._closing = True
                for ticket, _ in [*self._queue, *self._active]:
                    _settle(ticket.future, error=EngineClosed(f"engine {self.name} stopped: {e!r}"))
            raise

    def _loop(self) -> None:
        while True:
            with self._cv:
                now = time.monotonic()
                self._reap(now)
                self._admit(now)
                if not self._active:
                    if self._closing and not self._queue:
                        return
                    self._cv.wait(1.0)  # woken by submit, cancel and close
                    continue
                plan = self._plan()
            self._tick(plan)

    def _reap(self, now: float) -> None:
        """Drop cancelled, already settled (closed) and expired requests; their rows are freed."""
        for group in (self._queue, self._active):
            keep = []
            for ticket, job in group:
                if ticket.future.cancelled():
                    self._stats.requests["cancelled"] += 1
                elif ticket.future.done():
                    self._stats.requests["closed"] += 1
                elif now > ticket.deadline:
                    waited = (ticket.started or now) - ticket.submitted
                    _settle(ticket.future, error=RequestTimeout(
                        f"request {ticket.id} timed out after {self.config.timeout_s:g} s ({waited:.1f} s queued, "
                        f"{job.i}/{ticket.total_steps} steps done)"))
                    self._stats.requests["timeout"] += 1
                else:
                    keep.append((ticket, job))
            group.clear()
            group.extend(keep)

    def _admit(self, now: float) -> None:
        """FIFO: the head of the queue joins when its rows fit beside the active requests; a
        request larger than max_rows joins an empty engine and runs alone."""
        used = sum(job.rows for _, job in self._active)
        while self._queue:
            ticket, job = self._queue[0]
            if self._active and used + job.rows > self.config.max_rows:
                break
            self._queue.popleft()
            ticket.started = now
            self._active.append((ticket, job))
            used += job.rows

    def _plan(self) -> list[tuple[Ticket, _Job, int, int]]:
        """(ticket, job, first row, rows) for this call: every active request's remaining rows of
        its current step, in admission order, up to max_rows."""
        budget, plan = self.config.max_rows, []
        for ticket, job in self._active:
            take = min(job.rows - job.filled, budget)
            if take <= 0:
                break
            plan.append((ticket, job, job.filled, take))
            budget -= take
        return plan

    def _run_batch(self, plan) -> tuple[np.ndarray, float, int, int]:
        """Fill the bucket's buffers, zero the pad rows, call the denoiser once."""
        rows = sum(take for *_, take in plan)
        bucket = next(b for b in self.buckets if b >= rows)
        bound = self.denoiser.binding(bucket)
        row = 0
        for _, job, start, take in plan:
            job.fill(bound, row, start, take)
            row += take
        bound.sample[rows:] = 0.0  # pad rows: harmless inputs, outputs ignored
        bound.timestep[rows:] = 0
        bound.context[rows:] = 0.0
        tick = time.perf_counter()
        out = bound.run()  # (bucket, C, H, W)
        return out, time.perf_counter() - tick, rows, bucket

    def _tick(self, plan) -> None:
        try:
            out, seconds, rows, bucket = self._run_batch(plan)
        except Exception as e:  # the provider failed: every request in this call gets its error
            with self._cv:
                for ticket, *_ in plan:
                    _settle(ticket.future, error=e)
                self._finish([(ticket, "error") for ticket, *_ in plan])
            return
        finished, row = [], 0
        for ticket, job, start, take in plan:
            job.model_seconds += seconds
            ready = job.collect(out, row, start, take)
            row += take
            if not ready or ticket.future.done():
                continue
            try:
                done = job.advance()
            except Exception as e:  # a sampler error belongs to its request alone
                _settle(ticket.future, error=e)
                finished.append((ticket, "error"))
                continue
            ticket._notify(job.i)
            if done:
                _settle(ticket.future, self._generation(ticket, job))
                finished.append((ticket, "ok"))
        with self._cv:
            s = self._stats
            s.calls += 1
            s.rows_total += rows
            s.pad_rows_total += bucket - rows
            s.model_seconds_total += seconds
            s.rows_per_call[bucket] += 1
            self._finish(finished)

    def _generation(self, ticket: Ticket, job: _Job) -> Generation:
        samples = np.clip(job.x, -1.0, 1.0, out=job.x)
        return Generation(samples=samples, x0_frames=job.frames, model_seconds=job.model_seconds,
                          total_seconds=time.monotonic() - (ticket.started or ticket.submitted),
                          timesteps=np.array(job.timesteps))

    def _finish(self, finished: list[tuple[Ticket, str]]) -> None:
        """Remove finished requests from the active set and count them (under the lock)."""
        if not finished:
            return
        gone = {id(ticket) for ticket, _ in finished}
        self._active = [(t, j) for t, j in self._active if id(t) not in gone]
        now = time.monotonic()
        for ticket, outcome in finished:
            self._stats.requests[outcome] += 1
            if outcome == "ok":
                latency = now - ticket.submitted
                self._recent_latency.append(latency)
                self._stats.latency_sum += latency
                self._stats.latency_counts[_bucket_index(latency)] += 1
                self._stats.images_total += ticket.n


def _bucket_index(seconds: float) -> int:
    """The first LATENCY_BUCKETS bound >= seconds (len(LATENCY_BUCKETS) for +inf)."""
    for i, bound in enumerate(LATENCY_BUCKETS):
        if seconds <= bound:
            return i
    return len(LATENCY_BUCKETS)
