"""The machine an engine runs on, as `auto` keys its measurements: the CPU's model and flags
(py-cpuinfo) or the GPU's name, cores, threads and the versions of the libraries that run the
network. py-cpuinfo takes about two seconds, so its answer is kept in featx's cache until the
machine reboots."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from typing import TYPE_CHECKING, Any

from featx.runtime import atomic_write, cache_root

if TYPE_CHECKING:
    import torch

__all__ = [
    "LOW_PRECISION_FLAGS",
    "cpu_class",
    "cpu_description",
    "cpu_features",
    "machine_identity",
    "precisions_with_units",
]

# The flags that give a CPU low-precision units: bf16 (avx512_bf16, AMX) and int8 (VNNI, AMX).
LOW_PRECISION_FLAGS = {
    "bf16": ("avx512_bf16", "amx_bf16"),
    "int8": ("avx512_vnni", "avx_vnni", "amx_int8"),
}


def _cpu_info() -> dict[str, Any]:
    """{model, flags, cores}: py-cpuinfo's answer, cached until this machine reboots."""
    import psutil

    boot = f"{platform.node()}:{int(psutil.boot_time())}"
    path = cache_root() / "engines" / "cpu.json"
    try:
        cached = json.loads(path.read_text())
        if cached.get("boot") == boot:
            return cached
    except (OSError, ValueError):
        pass
    import cpuinfo

    info = cpuinfo.get_cpu_info()
    found = {
        "boot": boot,
        "model": info.get("brand_raw") or platform.processor() or platform.machine(),
        "flags": sorted(info.get("flags", [])),
        "cores": psutil.cpu_count(logical=False) or psutil.cpu_count() or 1,
        "logical": psutil.cpu_count() or 1,
    }
    try:
        atomic_write(path, (json.dumps(found) + "\n").encode())
    except Exception:  # noqa: BLE001 - an unwritable cache only costs the next run 2 s
        pass
    return found


def cpu_description() -> dict[str, Any]:
    """The CPU: model, flags, physical and logical cores."""
    return {k: v for k, v in _cpu_info().items() if k != "boot"}


def cpu_features() -> frozenset[str]:
    """The CPU's flags (py-cpuinfo)."""
    return frozenset(_cpu_info()["flags"])


def cpu_class(flags: frozenset[str] | None = None) -> str:
    """A short label of the CPU's widest units, for benchmark headers (amx, avx512_bf16,
    avx512, avx2 or other); `auto` does not decide by it."""
    flags = cpu_features() if flags is None else flags
    for label, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"),
                        ("avx512", "avx512f"), ("avx2", "avx2")):  # fmt: skip
        if flag in flags:
            return label
    return "other"


def precisions_with_units() -> list[str]:
    """The low precisions this CPU has units for (bf16, int8), by its flags."""
    flags = set(_cpu_info()["flags"])
    return [p for p, names in LOW_PRECISION_FLAGS.items() if flags & set(names)]


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_identity(device: torch.device, workers: int) -> dict[str, Any]:
    """What about this machine changes which engine is fastest: the CPU (model, flags, cores)
    or the GPU's name, torch's threads, the decoding processes beside it, and the versions of
    torch and OpenVINO."""
    import torch

    cpu = cpu_description()
    identity: dict[str, Any] = {
        "device": device.type,
        "cpu": cpu["model"],
        "flags": " ".join(cpu["flags"]),
        "cores": cpu["logical"],
        "threads": torch.get_num_threads(),
        "workers": workers,
        "torch": torch.__version__,
        "openvino": _version("openvino"),
    }
    if device.type == "cuda":
        identity["gpu"] = torch.cuda.get_device_name(device)
    return identity
