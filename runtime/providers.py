"""Execution providers: their names, the CPU's instruction sets, the OpenVINO plugin, compute precision.

Three providers run mdx models: ONNX Runtime's own CPU provider, CUDA (onnxruntime-gpu), and
OpenVINO, which comes as a plugin library (`pip install 'microdiffusion[openvino]'`, the PyPI
package onnxruntime-ep-openvino) registered into the installed onnxruntime at run time:

    ort.register_execution_provider_library(OPENVINO, onnxruntime_ep_openvino.get_library_path())
    devices = [d for d in ort.get_ep_devices() if d.ep_name == OPENVINO and CPU device]
    options.add_provider_for_devices(devices, {"load_config": '{"CPU": {"INFERENCE_PRECISION_HINT": "bf16"}}'})

A library can be registered once per process (a second registration is an error), so
`openvino_cpu_devices` registers on first use and remembers it. The plugin ignores its own
`device_type` and `precision` options; the inference precision goes through `load_config`.
The plugin (1.8.1) offers devices of Intel's vendor id only: on an AMD CPU it registers but
lists no device, and naming it is then an error that says so.

Compute precision (`--compute-precision auto|fp32|bf16`) is the precision the provider computes
in, not the file's (`mdx.precision`): OpenVINO's inference precision hint. `auto` is bf16 where
the CPU runs bf16 natively (AMX-BF16 or AVX512-BF16) and fp32 elsewhere. bf16 asked on a CPU
without native bf16 is refused: OpenVINO would emulate it or fall back to f32, slower than or
equal to fp32 while the report said bf16. The CPU and CUDA providers compute in the file's
precision; bf16 asked of them is refused too.

`--provider auto` (see `auto_prefers_openvino`): CUDA when it really runs; then OpenVINO where it
was measured faster than the CPU provider, i.e. where the plugin offers a CPU device (Intel) and
the CPU has AVX-512 (Xeon with AVX-512 and AMX: f32 2.2-2.5 ms against 2.6-2.8 ms at batch 1,
141-180 ms against 176-216 ms at batch 128; bf16 37-60 ms); the CPU provider otherwise (AMD: the
plugin offers no device; Intel with AVX2 only: not measured, so the known provider stays).
On the AMD EPYC (Zen 3, AVX2) OpenVINO's own runtime (2026.4.1, the plugin's, called directly
since the plugin refuses the CPU) against the CPU provider, fp32, shipped model, OpenVINO/CPU time in
two interleaved runs on a loaded machine: batch 1 1.96/1.22, 8 0.84/0.66, 32 0.90/0.83, 128
0.92/1.16: no consistent win, so nothing to gain there even without the vendor check.

Threads (CPU provider): with `threads` left unset, ONNX Runtime starts one intra-op thread per
*physical* core and pins them (its threading documentation). On a VM whose vCPUs are SMT siblings
(lscpu: "Thread(s) per core: 2") two vCPUs are one physical core, so it runs on one thread: the
likely cause of the int8 kernels once seen using one of two threads. On the 2-core AMD EPYC (one
thread per core) per-thread CPU times (/proc/self/task/*/stat) were equal within 10% for both
threads in every setting tried (default, 2 threads, spinning off, torch's OpenMP pool started
first), int8 and fp32 alike. Pass `threads` (`--threads N`) to use every vCPU regardless.
"""

from __future__ import annotations

import functools
import json
import platform
from dataclasses import dataclass

import onnxruntime as ort

CPU, CUDA, OPENVINO = "CPUExecutionProvider", "CUDAExecutionProvider", "OpenVINOExecutionProvider"
# Short names accepted wherever a provider is named (the full onnxruntime names work too).
ALIASES = {"cpu": CPU, "cuda": CUDA, "openvino": OPENVINO}
COMPUTE_PRECISIONS = ("auto", "fp32", "bf16")
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16"}  # ours -> OpenVINO's INFERENCE_PRECISION_HINT
OPENVINO_INSTALL = "pip install 'microdiffusion[openvino]'"
# The flags that decide precision and provider, read from /proc/cpuinfo.
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


class ProviderError(ValueError):
    """A provider or compute precision that is unknown or cannot run here; the message says why."""


# --- the CPU ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuIsa:
    """What the CPU offers: its vendor, model name and the instruction-set flags of ISA_FLAGS."""

    vendor: str | None
    model: str | None
    flags: frozenset[str]
    source: str  # "/proc/cpuinfo", or "platform" where the flags could not be read

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix instructions (AMX tiles or AVX512-BF16): bf16 is then faster than fp32."""
        return bool({"amx_bf16", "avx512_bf16"} & self.flags)

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    def describe(self) -> str:
        flags = ", ".join(f for f in ISA_FLAGS if f in self.flags) or "none of " + "/".join(ISA_FLAGS)
        return f"{self.model or 'unknown CPU'} ({flags})"


def parse_cpuinfo(text: str) -> CpuIsa:
    """The first processor's vendor, model name and flags in /proc/cpuinfo's text."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip().lower()
        if sep and key in ("vendor_id", "model name", "flags") and key not in fields:
            fields[key] = value.strip()
    have = set(fields.get("flags", "").split())
    return CpuIsa(vendor=fields.get("vendor_id"), model=fields.get("model name"),
                  flags=frozenset(f for f in ISA_FLAGS if f in have), source="/proc/cpuinfo")


@functools.lru_cache(maxsize=1)
def cpu_isa() -> CpuIsa:
    """This machine's CpuIsa. Outside Linux the flags are unknown (empty), so `auto` never
    assumes bf16 there: fp32 is always correct, bf16 is only a speed-up where it is native."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return CpuIsa(vendor=None, model=platform.processor() or None, flags=frozenset(), source="platform")


# --- names and precision ----------------------------------------------------------------


def canonical_provider(name: str) -> str:
    """The onnxruntime name for a short name (cpu, cuda, openvino; any case); other names,
    'auto' and full provider names, pass through to be judged by the caller."""
    if not isinstance(name, str):
        raise ProviderError(f"provider must be a name, got {name!r}")
    return ALIASES.get(name.lower(), name)


def check_compute_precision(value: str) -> str:
    if value not in COMPUTE_PRECISIONS:
        raise ProviderError(f"unknown compute precision {value!r}; choose one of {', '.join(COMPUTE_PRECISIONS)}")
    return value


def resolve_openvino_precision(requested: str, isa: CpuIsa) -> str:
    """fp32 or bf16 for OpenVINO on this CPU; ProviderError for bf16 where it is not native."""
    check_compute_precision(requested)
    if requested == "auto":
        return "bf16" if isa.native_bf16 else "fp32"
    if requested == "bf16" and not isa.native_bf16:
        raise ProviderError(f"--compute-precision bf16 needs a CPU with native bf16 (amx_bf16 or avx512_bf16); "
                            f"this one is {isa.describe()}: OpenVINO would emulate it or fall back to f32, "
                            f"so use fp32 (or auto)")
    return requested


def check_other_provider_precision(requested: str, provider: str) -> None:
    """The CPU and CUDA providers compute in the file's precision: only auto or fp32 apply."""
    check_compute_precision(requested)
    if requested == "bf16":
        raise ProviderError(f"--compute-precision bf16 needs the OpenVINO provider (--provider openvino); "
                            f"{provider} computes in the model file's precision")


# --- the OpenVINO plugin ----------------------------------------------------------------

_registered = False


def _plugin_library() -> str:
    try:
        import onnxruntime_ep_openvino
    except ImportError:
        raise ProviderError(f"provider {OPENVINO} needs its plugin: {OPENVINO_INSTALL}") from None
    return onnxruntime_ep_openvino.get_library_path()


def register_openvino() -> None:
    """Register the plugin with onnxruntime once per process (ProviderError when it is missing)."""
    global _registered
    if _registered:
        return
    library = _plugin_library()
    if not hasattr(ort, "register_execution_provider_library"):
        raise ProviderError(f"provider {OPENVINO} needs onnxruntime >= 1.23 (plugin providers); "
                            f"this is {ort.__version__}")
    try:
        ort.register_execution_provider_library(OPENVINO, library)
    except Exception as e:  # noqa: BLE001 -- onnxruntime's Fail derives from Exception only
        if "already registered" not in str(e):  # someone else in this process did it: fine
            raise ProviderError(f"cannot register the OpenVINO plugin {library}: {str(e).strip()}") from None
    _registered = True


def openvino_cpu_devices() -> list:
    """The plugin's CPU devices (registering it first); [] where it offers none (non-Intel CPUs)."""
    register_openvino()
    return [d for d in ort.get_ep_devices()
            if d.ep_name == OPENVINO and str(d.device.type).endswith("CPU")]


def openvino_installed() -> bool:
    try:
        _plugin_library()
    except ProviderError:
        return False
    return True


def require_openvino_cpu_devices(isa: CpuIsa) -> list:
    """The plugin's CPU devices, or ProviderError saying why there are none."""
    devices = openvino_cpu_devices()
    if not devices:
        vendor = isa.vendor or "unknown vendor"
        raise ProviderError(f"provider {OPENVINO} offers no CPU device here ({vendor}, {isa.describe()}): "
                            f"the plugin takes Intel CPUs only; use --provider cpu")
    return devices


def add_openvino(options: ort.SessionOptions, devices: list, precision: str, threads: int | None = None) -> None:
    """Put OpenVINO on `options` for `devices`, computing in `precision` (fp32 or bf16) on
    `threads` threads (OpenVINO runs its own thread pool: intra_op_num_threads does not reach it)."""
    cpu = {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision]}
    if threads is not None:
        cpu["INFERENCE_NUM_THREADS"] = str(threads)
    options.add_provider_for_devices(devices, {"load_config": json.dumps({"CPU": cpu})})


def auto_prefers_openvino(isa: CpuIsa) -> tuple[bool, str | None]:
    """Whether `--provider auto` takes OpenVINO over the CPU provider on this CPU, and a note
    when the plugin is installed but broken (auto then stays on the CPU provider; naming
    openvino raises the error itself). The rule (module docstring): the plugin offers a CPU
    device and the CPU has AVX-512, where it was measured faster; never on AMD (no device)."""
    if not isa.avx512 or not openvino_installed():
        return False, None
    try:
        return bool(openvino_cpu_devices()), None
    except ProviderError as e:
        return False, f"OpenVINO not used: {e}"
