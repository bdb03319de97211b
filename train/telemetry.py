"""Resource telemetry during training: NVML and torch.cuda on a GPU, RSS and CPU use without.

A daemon thread samples every `interval` seconds into a CSV; `plot()` draws the
columns over time to a PNG, like the seed's GPU-performance chart.
"""

from __future__ import annotations

import csv
import os
import threading
import time
from pathlib import Path


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


class Telemetry:
    """Samples resource figures into `csv_path` until `stop()`; use as a context manager."""

    def __init__(self, csv_path: Path, device: str = "cpu", interval: float = 1.0, log=print) -> None:
        self.csv_path, self.interval, self.log = Path(csv_path), interval, log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._gpu = device.startswith("cuda")
        if self._gpu:
            try:
                import pynvml  # provided by nvidia-ml-py

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByIndex(_cuda_index(device))
            except Exception as e:  # NVML missing or no driver: keep the torch figures
                self.log(f"telemetry: NVML unavailable ({e}); recording torch.cuda memory only")
        else:
            self.log("telemetry: no GPU in use; recording process RSS and CPU use instead")

    def _columns(self) -> list[str]:
        if self._gpu:
            return ["time_s", "gpu_util_pct", "gpu_mem_used_mb", "gpu_temp_c", "gpu_power_w",
                    "torch_mem_current_mb", "torch_mem_peak_mb"]
        return ["time_s", "rss_mb", "cpu_pct"]

    def _sample(self, t0: float, last: list[float]) -> list[float]:
        now = time.perf_counter()
        if not self._gpu:
            cpu = _cpu_times()
            pct = 100.0 * (cpu - last[1]) / max(now - last[0], 1e-9)
            last[:] = [now, cpu]
            return [now - t0, _rss_mb(), pct]
        import torch

        row = [now - t0, float("nan"), float("nan"), float("nan"), float("nan")]
        if self._nvml is not None:
            n, h = self._nvml, self._handle
            row[1] = n.nvmlDeviceGetUtilizationRates(h).gpu
            row[2] = n.nvmlDeviceGetMemoryInfo(h).used / 2**20
            row[3] = n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)
            row[4] = n.nvmlDeviceGetPowerUsage(h) / 1000.0
        stats = torch.cuda.memory_stats()
        row += [stats.get("allocated_bytes.all.current", 0) / 2**20, stats.get("allocated_bytes.all.peak", 0) / 2**20]
        return row

    def _run(self) -> None:
        t0 = time.perf_counter()
        last = [t0, _cpu_times()]
        with open(self.csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(self._columns())
            while True:
                w.writerow([f"{v:.3f}" for v in self._sample(t0, last)])
                f.flush()
                if self._stop.wait(self.interval):
                    break

    def start(self) -> "Telemetry":
        self._thread = threading.Thread(target=self._run, name="mdx-telemetry", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()


def _cuda_index(device: str) -> int:
    return int(device.split(":")[1]) if ":" in device else 0


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
    tmp = Path(png_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return Path(png_path)
