"""Timing primitives: an interleaved timer, median / p90 statistics, peak RSS, a time budget.

Method (the issue's rules, in one place):

- warm-up: every function runs `warmup` times (interleaved like the timed calls) before timing;
- at least 5 timed repeats; a repeat runs the function `number` times back to back and its
  time is divided by `number` (short calls are timed in bunches, so that a repeat lasts
  tens of milliseconds and the clock's resolution does not matter);
- interleaving: the functions of one comparison take turns, A B A B ... (A B C A B C for
  more), so a slow drift of the machine (another process, thermal limits) hits every side
  alike instead of whichever happened to run last;
- `sync` (e.g. torch.cuda.synchronize) runs inside every timed repeat, before the clock
  stops, so asynchronous devices are timed to completion.

The statistics are the median and the 90th percentile (numpy's linear interpolation) of the
per-call times of the repeats.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import numpy as np

MIN_REPEATS = 5


# --- statistics -----------------------------------------------------------------------


@dataclass(frozen=True)
class Stats:
    """Summary of per-call times in seconds."""

    median_s: float
    p90_s: float
    mean_s: float
    min_s: float
    max_s: float
    repeats: int
    number: int  # calls per timed repeat
    samples_s: tuple[float, ...] = field(repr=False, default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["samples_s"] = list(self.samples_s)
        return d


def summarize(samples: list[float] | np.ndarray, number: int = 1) -> Stats:
    """Median, p90, mean, min and max of per-call times (each sample already divided by `number`)."""
    a = np.asarray(samples, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("summarize needs at least one timing sample")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError(f"timing samples must be finite and >= 0, got {a.tolist()}")
    return Stats(median_s=float(np.median(a)), p90_s=float(np.percentile(a, 90)), mean_s=float(a.mean()),
                 min_s=float(a.min()), max_s=float(a.max()), repeats=int(a.size), number=int(number),
                 samples_s=tuple(float(x) for x in a))


# --- the interleaved timer ------------------------------------------------------------


def calibrate_number(fn: Callable[[], object], target_s: float, clock: Callable[[], float] = time.perf_counter,
                     sync: Callable[[], object] | None = None, max_number: int = 1000, trials: int = 3) -> int:
    """How many back-to-back calls make one repeat last about `target_s` (at least 1).

    Runs `fn` `trials` times back to back and sizes the repeat from the fastest call (the first
    call after another library ran can be several times slower; sizing from it would leave a
    repeat too short to amortise that). These calls double as extra warm-up.
    """
    best = math.inf
    for _ in range(max(1, trials)):
        t0 = clock()
        fn()
        if sync is not None:
            sync()
        best = min(best, clock() - t0)
        if best >= target_s:  # one call fills a repeat: number = 1 whatever the others take
            break
    if best <= 0:
        return max_number
    return int(min(max_number, max(1, math.ceil(target_s / best))))


class InterleavedTimer:
    """Time several functions in turns: warm-up rounds, then `repeats` rounds of A B C ...

    `order` records every call made, as (phase, name) with phase "warmup" or "timed", so the
    interleaving can be checked. `clock` and `sync` are injectable for tests.
    """

    def __init__(self, repeats: int = MIN_REPEATS, warmup: int = 1, clock: Callable[[], float] = time.perf_counter,
                 sync: Callable[[], object] | None = None, pause_s: float = 0.0,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.repeats = repeats
        self.warmup = warmup
        self.clock = clock
        self.sync = sync
        self.pause_s = pause_s  # untimed idle gap before each timed repeat (see run)
        self.sleep = sleep
        self.order: list[tuple[str, str]] = []

    def run(self, fns: Mapping[str, Callable[[], object]], number: Mapping[str, int] | int = 1,
            before: Mapping[str, Callable[[], object]] | None = None) -> dict[str, Stats]:
        """Per-call Stats for each function. `before[name]`, if given, runs untimed right before
        each timed repeat of `name`, after the pause (a warm-up call, or resetting a buffer)."""
        names = list(fns)
        if not names:
            return {}
        counts = {k: (number if isinstance(number, int) else int(number[k])) for k in names}
        if any(c < 1 for c in counts.values()):
            raise ValueError(f"number must be >= 1 for every function, got {counts}")
        before = before or {}
        for _ in range(self.warmup):
            for name in names:
                if name in before:
                    before[name]()
                fns[name]()
                if self.sync is not None:
                    self.sync()
                self.order.append(("warmup", name))
        samples: dict[str, list[float]] = {k: [] for k in names}
        for _ in range(self.repeats):
            for name in names:
                fn, n = fns[name], counts[name]
                if self.pause_s > 0:
                    # Worker threads keep spinning for a while after a call (ONNX Runtime's
                    # intra-op pool for 10-50 ms on these machines); an idle gap lets the
                    # previous side's spinners go to sleep, so they do not steal the cores
                    # from the side being timed (on 2 cores torch's next batch-1 forward took
                    # ~4x longer after a 10 ms gap than after 50 ms).
                    self.sleep(self.pause_s)
                if name in before:
                    # ...and then this side's own threads are asleep too: an untimed call wakes
                    # them, so the timed calls see the library as a loop of calls sees it
                    # (after the gap, an int8 forward at batch 32 took ~40 ms instead of ~24).
                    before[name]()
                t0 = self.clock()
                for _ in range(n):
                    fn()
                if self.sync is not None:
                    self.sync()
                dt = self.clock() - t0
                samples[name].append(dt / n)
                self.order.append(("timed", name))
        return {k: summarize(samples[k], counts[k]) for k in names}


# --- memory ---------------------------------------------------------------------------


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB.

    Linux: VmHWM of /proc/self/status, the high-water mark of this address space. Not
    ru_maxrss: Linux carries ru_maxrss across fork and exec, so a child started by a large
    parent would report the parent's size. Elsewhere ru_maxrss (bytes on macOS).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


def current_rss_mb() -> float:
    """This process's resident set size now, in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / (1024.0 * 1024.0)
    except (OSError, ValueError, IndexError):
        return float("nan")


# --- a time budget --------------------------------------------------------------------


class Budget:
    """A wall-clock budget for the whole suite: `left()` seconds remain; `allows(s)` says whether an
    item expected to take `s` seconds still fits. Items that do not fit are skipped with a reason
    rather than overrunning the promised duration."""

    def __init__(self, seconds: float | None, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def left(self) -> float:
        return math.inf if self.seconds is None else self.seconds - self.elapsed()

    def allows(self, expected_s: float) -> bool:
        return expected_s <= self.left()

    def reason(self, what: str, expected_s: float) -> str:
        return (f"time budget: {what} needs about {expected_s:.0f} s, {max(self.left(), 0):.0f} s of the "
                f"{self.seconds:.0f} s budget left")
