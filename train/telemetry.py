"""Resource telemetry during training, on mdx.runtime.telemetry's recorder: NVML figures and
torch.cuda memory on a GPU, RSS and CPU use without.

A daemon thread samples every `interval` seconds; `stop()` writes the CSV (atomically) and
`plot()` draws its columns over time to a PNG, like the seed's GPU-performance chart.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Callable

from mdx.runtime.fileio import atomic_write
from mdx.runtime.telemetry import FIELDS, GpuTelemetry, Recorder, start_telemetry


def _cpu_times() -> float:
    t = os.times()
    return t.user + t.system


def _rss_mb() -> float:
    # /proc is always there on Linux; psutil would be a dependency for one number.
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class CpuTelemetry(Recorder):
    """Process RSS and CPU use (100% = one core busy) between readings."""

    fields = ("time_s", "rss_mb", "cpu_pct")

    def __init__(self, path: Path, interval: float = 1.0) -> None:
        super().__init__(path, interval)
        self._last = (self._start, _cpu_times())
        self._begin()

    def _read(self) -> tuple:
        now, cpu = self._start + self.elapsed(), _cpu_times()
        pct = 100.0 * (cpu - self._last[1]) / max(now - self._last[0], 1e-9)
        self._last = (now, cpu)
        return (self.elapsed(), round(_rss_mb(), 3), round(pct, 3))


class TorchGpuTelemetry(GpuTelemetry):
    """The runtime's NVML readings plus torch.cuda's allocated memory (current and peak)."""

    fields = FIELDS + ("torch_mem_current_mb", "torch_mem_peak_mb")

    def _read(self) -> tuple:
        import torch

        stats = torch.cuda.memory_stats()
        return super()._read() + (round(stats.get("allocated_bytes.all.current", 0) / 2**20, 1),
                                  round(stats.get("allocated_bytes.all.peak", 0) / 2**20, 1))


def start_training_telemetry(csv_path: Path, device: str = "cpu", interval: float = 1.0,
                             log: Callable[[str], None] = print) -> Recorder:
    """A started recorder for `device`: NVML and torch.cuda figures on a GPU; the process's RSS
    and CPU use on the CPU, or where NVML is not available (said aloud)."""
    if not device.startswith("cuda"):
        log("telemetry: no GPU in use; recording process RSS and CPU use instead")
        return CpuTelemetry(csv_path, interval)
    index = int(device.split(":")[1]) if ":" in device else 0
    recorder, why_not = start_telemetry(csv_path, index, interval, recorder=TorchGpuTelemetry)
    if recorder is None:
        log(f"telemetry: {why_not}; recording process RSS and CPU use instead")
        return CpuTelemetry(csv_path, interval)
    return recorder


def plot(csv_path: Path, png_path: Path) -> Path:
    """Draw every column of a telemetry CSV against time, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path) as f:
        rows = list(csv.reader(f))
    header, data = rows[0], [[float(v) for v in r] for r in rows[1:]]
    cols = header[1:]
    fig, axes = plt.subplots(len(cols), 1, figsize=(7, 1.8 * len(cols)), sharex=True, squeeze=False)
    t = [r[0] for r in data]
    for i, (ax, name) in enumerate(zip(axes[:, 0], cols)):
        ax.plot(t, [r[i + 1] for r in data], lw=1.2)
        ax.set_ylabel(name, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle("mdx-train telemetry")
    fig.tight_layout()
    try:
        with atomic_write(png_path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return Path(png_path)
