"""GPU telemetry during sampling: NVML figures sampled by a background thread into a CSV.

nvidia-ml-py (the `pynvml` module) is optional and imported lazily; without it, or
without an NVIDIA GPU and driver, `start_telemetry` returns no recorder and a sentence
that says why, and nothing is written.

    recorder, why_not = start_telemetry("gpu.csv")
    ... sample ...
    if recorder: recorder.stop()    # writes the CSV (atomically; WriteError if it cannot)
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path

from mdx.runtime.fileio import atomic_write

FIELDS = ("time_s", "gpu_util_pct", "mem_util_pct", "mem_used_mib", "mem_total_mib", "power_w")


class Recorder:
    """Polls `_read()` every `interval` seconds on a daemon thread into `rows`; `stop()` writes
    them, under the header `fields`, as a CSV (atomically) unless `path` is None (the caller reads
    `rows`, as mdx-bench's bursts do). Subclasses say what one reading is."""

    fields: tuple[str, ...] = ()

    def __init__(self, path: Path | None, interval: float = 0.1) -> None:
        self.path = Path(path) if path is not None else None
        self._interval = interval
        self.rows: list[tuple] = []
        self._stop = threading.Event()
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._poll, name="mdx-telemetry", daemon=True)

    def _begin(self) -> None:
        """Start polling (subclasses call it at the end of their __init__)."""
        self._thread.start()

    def elapsed(self) -> float:
        return round(time.perf_counter() - self._start, 3)

    def _read(self) -> tuple:
        raise NotImplementedError

    def _close(self) -> None:
        """Release what the readings need (after the last one)."""

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.rows.append(self._read())
            self._stop.wait(self._interval)

    def stop(self) -> Path | None:
        """Stop polling (one last reading) and write the CSV; returns its path (WriteError if it cannot)."""
        self._stop.set()
        self._thread.join()
        self.rows.append(self._read())
        self._close()
        if self.path is None:
            return None
        with atomic_write(self.path, suffix=".csv") as tmp:
            with open(tmp, "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(self.fields)
                writer.writerows(self.rows)
        return self.path


class GpuTelemetry(Recorder):
    """Polls NVML every `interval` seconds on a daemon thread; `stop()` writes the CSV."""

    fields = FIELDS

    def __init__(self, nvml, path: Path | None, device_index: int = 0, interval: float = 0.1) -> None:
        super().__init__(path, interval)
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(device_index)
        self.device_name = _text(nvml.nvmlDeviceGetName(self._handle))
        self._begin()

    def _read(self) -> tuple:
        nvml, h = self._nvml, self._handle
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        try:
            power = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0  # mW -> W
        except nvml.NVMLError:  # some boards do not report power
            power = float("nan")
        return (self.elapsed(), util.gpu, util.memory,
                round(mem.used / 2**20, 1), round(mem.total / 2**20, 1), round(power, 1))

    def _close(self) -> None:
        self._nvml.nvmlShutdown()

    def summary(self) -> str:
        if not self.rows:
            return "no readings"
        util = [r[1] for r in self.rows]
        mem = max(r[3] for r in self.rows)
        power = [r[5] for r in self.rows if r[5] == r[5]]
        text = f"{self.device_name}: mean utilisation {sum(util) / len(util):.0f}%, peak memory {mem:.0f} MiB"
        if power:
            text += f", mean power {sum(power) / len(power):.0f} W"
        return f"{text} ({len(self.rows)} readings)"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def start_telemetry(path: str | os.PathLike | None, device_index: int = 0, interval: float = 0.1,
                    recorder: type[GpuTelemetry] = GpuTelemetry) -> tuple[GpuTelemetry | None, str]:
    """Start recording; returns (recorder, "") or (None, why telemetry is not available).

    `recorder` is GpuTelemetry or a subclass that records more per reading (mdx-train's adds
    torch.cuda's memory figures).
    """
    try:
        import pynvml  # nvidia-ml-py; optional, so imported only here
    except ImportError:
        return None, "telemetry off: nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return None, f"telemetry off: no NVIDIA GPU or driver ({_text(e)})"
    try:
        count = pynvml.nvmlDeviceGetCount()
        if device_index >= count:
            pynvml.nvmlShutdown()
            return None, f"telemetry off: no GPU {device_index} (NVML sees {count})"
        return recorder(pynvml, Path(path) if path is not None else None, device_index, interval), ""
    except pynvml.NVMLError as e:
        pynvml.nvmlShutdown()
        return None, f"telemetry off: NVML failed ({_text(e)})"
