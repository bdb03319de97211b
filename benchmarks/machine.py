"""What the benchmark ran on: CPU model and cores, GPU and driver, library versions, load.

Everything here is best effort and never raises: a figure that cannot be read is None.
The load average and the busiest other processes at the start and the end are recorded
because a benchmark on a shared machine is only honest with its contention written down.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
from importlib import metadata

LIBRARIES = ("torch", "onnxruntime", "onnxruntime-gpu", "onnxruntime-ep-openvino", "numpy", "onnx", "onnxscript", "onnxsim", "matplotlib",
             "nvidia-ml-py", "psutil", "microdiffusion")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_int8",
             "amx_bf16", "avx_vnni")


def cpu_model() -> str | None:
    """The `model name` line of /proc/cpuinfo, else platform.processor()."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def cpu_flags() -> list[str]:
    """The SIMD features that matter for fp32 / int8 kernels (AVX-512, VNNI, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in CPU_FLAGS if flag in have]
    except OSError:
        pass
    return []


def cores() -> int:
    """The cores this process may use (the affinity mask), which is what threads should match."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def physical_cores() -> int | None:
    try:
        import psutil

        return psutil.cpu_count(logical=False)
    except Exception:  # noqa: BLE001 -- optional figure
        return None


def memory_gb() -> float | None:
    try:
        import psutil

        return round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001
        return None


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def gpu_info() -> list[dict]:
    """One entry per NVIDIA GPU seen by NVML (name, driver, memory), or [] without NVML / a GPU."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 -- NVMLError_LibraryNotFound and friends: no GPU here
        return []
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(h)
            mem = pynvml.nvmlDeviceGetMemoryInfo(h)
            gpus.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                         "driver": driver, "memory_gb": round(mem.total / 2**30, 1)})
        return gpus
    except Exception:  # noqa: BLE001
        return []
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def load_snapshot(top: int = 3) -> dict:
    """Load average and the busiest other processes (name, CPU %) over a short window."""
    snap: dict = {"time": _dt.datetime.now().isoformat(timespec="seconds")}
    try:
        snap["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        snap["loadavg"] = None
    try:
        import time

        import psutil

        me = os.getpid()
        procs = [p for p in psutil.process_iter(["pid", "name", "cmdline"]) if p.pid != me]
        for p in procs:
            try:
                p.cpu_percent(None)
            except psutil.Error:
                pass
        time.sleep(0.5)
        busy = []
        for p in procs:
            try:
                pct = p.cpu_percent(None)
            except psutil.Error:
                continue
            if pct >= 5.0:
                cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])
                busy.append({"pid": p.pid, "cpu_percent": round(pct, 1), "command": cmd[:120]})
        busy.sort(key=lambda d: -d["cpu_percent"])
        snap["busy_processes"] = busy[:top]
    except Exception:  # noqa: BLE001
        snap["busy_processes"] = None
    return snap


def isa_info() -> dict:
    """The ISA flags that decide mdx's compute precision and provider (mdx.runtime.providers)."""
    from mdx.runtime.providers import cpu_isa

    isa = cpu_isa()
    return {"vendor": isa.vendor, "flags": sorted(isa.flags), "native_bf16": isa.native_bf16,
            "avx512": isa.avx512, "source": isa.source}


def openvino_info() -> dict:
    """Whether the OpenVINO plugin is installed and offers a CPU device here (and why not)."""
    from mdx.runtime import providers

    out = {"installed": providers.openvino_installed(), "cpu_device": False, "why_not": None,
           "auto_prefers": providers.auto_prefers_openvino(providers.cpu_isa())[0]}
    if not out["installed"]:
        out["why_not"] = f"not installed ({providers.OPENVINO_INSTALL})"
        return out
    try:
        out["cpu_device"] = bool(providers.require_openvino_cpu_devices(providers.cpu_isa()))
    except providers.ProviderError as e:
        out["why_not"] = str(e)
    return out


def machine_info() -> dict:
    """The `machine` section of results.json."""
    info = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "cpu_model": cpu_model(),
        "cores": cores(),
        "cpu_count": os.cpu_count(),
        "physical_cores": physical_cores(),
        "cpu_flags": cpu_flags(),
        "isa": isa_info(),
        "openvino": openvino_info(),
        "memory_gb": memory_gb(),
        "gpus": gpu_info(),
        "versions": versions(),
    }
    try:
        import onnxruntime as ort

        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime_providers"] = []
    try:
        import torch

        info["torch_cuda"] = torch.version.cuda
        info["torch_cuda_available"] = bool(torch.cuda.is_available())
    except ImportError:
        info["torch_cuda"], info["torch_cuda_available"] = None, False
    return info


class LoadMonitor:
    """Samples, once a second in a background thread, how much CPU *other* processes use while
    the benchmark runs (machine-wide busy time minus this process and its children), in per cent
    of one core (200 = both cores of a 2-core machine). A figure taken while others competed
    for the cores is reported with that number beside it."""

    def __init__(self, period_s: float = 1.0) -> None:
        self.period_s = period_s
        self.samples: list[float] = []
        self._stop = None
        self._thread = None

    @staticmethod
    def _ours() -> float:
        import psutil

        me = psutil.Process()
        t = me.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system  # exited children included
        for child in me.children(recursive=True):
            try:
                ct = child.cpu_times()
                total += ct.user + ct.system
            except psutil.Error:
                pass
        return total

    @staticmethod
    def _machine() -> float:
        import psutil

        t = psutil.cpu_times()
        return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)

    def _loop(self) -> None:
        import time

        last_m, last_o, last_t = self._machine(), self._ours(), time.monotonic()
        while not self._stop.wait(self.period_s):
            m, o, t = self._machine(), self._ours(), time.monotonic()
            dt = t - last_t
            if dt > 0:
                self.samples.append(max(0.0, ((m - last_m) - (o - last_o)) / dt * 100.0))
            last_m, last_o, last_t = m, o, t

    def start(self) -> "LoadMonitor":
        import threading

        try:
            import psutil  # noqa: F401
        except ImportError:
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if not self.samples:
            return {"other_cpu_percent_mean": None, "other_cpu_percent_max": None, "samples": 0}
        import numpy as np

        a = np.asarray(self.samples)
        return {"other_cpu_percent_mean": round(float(a.mean()), 1), "other_cpu_percent_p50": round(float(np.median(a)), 1),
                "other_cpu_percent_max": round(float(a.max()), 1), "samples": int(a.size), "period_s": self.period_s,
                "method": "machine busy time minus this process tree's, per second (psutil), % of one core"}
