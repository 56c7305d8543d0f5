"""What every stage shares about the machine it runs on: the device and compute precision,
decoding workers, library versions, sizes, and atomic file writes.

Importing this module is cheap: torch is imported inside the functions that need it.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from featx.errors import DiskFull, Interrupted, UsageError, check_choice

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEVICES",
    "INFERENCE_PRECISIONS",
    "PRECISIONS",
    "atomic_output",
    "atomic_write",
    "deferred_interrupts",
    "remove_stale_temps",
    "check_output_file",
    "disk_errors",
    "autocast",
    "cache_root",
    "check_precision",
    "available_memory",
    "default_workers",
    "human_size",
    "inference_device",
    "library_versions",
    "now",
    "parse_size",
    "resolve_device",
    "to_json",
    "write_json",
]

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")  # what a network computes in, training included
# Inference adds int8: OpenVINO's post-training quantization (NNCF), calibrated on the dataset.
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")


def cache_root() -> Path:
    """featx's cache on this machine (engine conversions, weights hashes): `$FEATX_CACHE`, or
    the platform's cache folder for featx (~/.cache/featx on Linux, ~/Library/Caches/featx on
    macOS, %LOCALAPPDATA%\\featx\\Cache on Windows)."""
    import platformdirs

    env = os.environ.get("FEATX_CACHE")
    return Path(env) if env else Path(platformdirs.user_cache_dir("featx", appauthor=False))


# ---- device and precision -------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU."""
    import torch

    check_choice("device", device, DEVICES)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA device is available.")
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps was asked for but MPS is not available.")
    return torch.device(device)


def check_precision(device: torch.device, precision: str, engine: str | None = None) -> None:
    """UsageError unless `precision` is known and runs on `device` (fp16 needs CUDA or MPS).

    `engine` (auto, eager, compile or openvino) is given by inference, which alone takes int8:
    only OpenVINO's quantized model on the CPU runs it."""
    check_choice("precision", precision, PRECISIONS if engine is None else INFERENCE_PRECISIONS)
    if precision == "fp16" and device.type == "cpu":
        raise UsageError("--precision fp16 needs a CUDA or MPS device; use bf16 on a CPU.")
    if precision == "int8":
        if engine not in ("auto", "openvino"):
            raise UsageError(
                f"--precision int8 runs only on the openvino engine (post-training "
                f"quantization), not on {engine}; use --engine openvino or auto."
            )
        if device.type != "cpu":
            raise UsageError("--precision int8 runs on the CPU (OpenVINO); use --device cpu.")


def inference_device(device: str, precision: str, engine: str) -> torch.device:
    """The device a network runs `precision` on with `engine`, checked: `device` resolved as
    `resolve_device` does, except that int8 (OpenVINO, CPU only) resolves `auto` to the CPU."""
    resolved = resolve_device("cpu" if precision == "int8" and device == "auto" else device)
    check_precision(resolved, precision, engine)
    return resolved


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for a precision: fp32 (none), bf16, or fp16 (CUDA/MPS only)."""
    import torch

    check_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def default_workers() -> int:
    """Decoding processes: leave most cores to the network."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


# ---- provenance -----------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    """Versions of featx, Python and the libraries that shape features and models."""
    from featx import __version__

    versions = {"featx": __version__, "python": platform.python_version()}
    for name in ("torch", "torchvision"):
        versions[name] = _build_version(name)
    for name in ("timm", "h5py", "numpy", "scikit-learn", "pillow"):
        versions[name] = _package_version(name)
    return versions


def _package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _build_version(module: str) -> str:
    """`module.__version__` with its build tag (2.14.1+cu128, which the package metadata lacks),
    read from its version.py so that recording it does not import the library."""
    if module in sys.modules:
        return str(sys.modules[module].__version__)
    spec = importlib.util.find_spec(module)
    folder = spec.submodule_search_locations if spec is not None else None
    if not folder:
        return _package_version(module)
    try:
        text = (Path(next(iter(folder))) / "version.py").read_text(encoding="utf-8")
    except OSError:
        return _package_version(module)
    found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return found.group(1) if found else _package_version(module)


def now() -> str:
    """The local time as ISO 8601 with its UTC offset."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---- sizes ----------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kKMGT]?i?B?)\s*$")
_UNITS = {"": 1, "B": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def human_size(n: float) -> str:
    """Bytes in decimal units: 3.2 MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000, '2GiB' -> 2 * 2**30, '1e9' -> 10**9 bytes."""
    match = _SIZE.match(text)
    if not match:
        try:
            return int(float(text))
        except ValueError:
            raise UsageError(f"{text!r} is not a size such as 500MB or 4GB.") from None
    number, unit = float(match[1]), match[2].upper()
    if "I" in unit:
        return int(number * 1024 ** " KMGT".index(unit[0]))
    return int(number * _UNITS[unit.rstrip("B")[:1] or ""])


def available_memory() -> int:
    """Bytes of memory available to new allocations (MemAvailable on Linux)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


# ---- files ----------------------------------------------------------------------------------
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# as OSError's text, and as HDF5 names a failed write (h5py raises it as RuntimeError)
_NO_SPACE_TEXT = (
    *(os.strerror(code) for code in _NO_SPACE),
    *(f"errno = {code}," for code in _NO_SPACE),
)


def _is_disk_full(error: BaseException | None) -> bool:
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    return isinstance(error, OSError | RuntimeError) and any(
        text in str(error) for text in _NO_SPACE_TEXT
    )


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk or quota while writing `path` into DiskFull, and a path that cannot be
    written (a folder, a file where a folder should be, no permission, an immutable file) into
    UsageError, each one sentence."""
    try:
        yield
    except (OSError, RuntimeError) as error:
        if _is_disk_full(error) or _is_disk_full(error.__cause__ or error.__context__):
            raise DiskFull(
                f"disk full while writing {path}; free some space and run the same command "
                "again (finished work is kept)."
            ) from None
        if isinstance(
            error, IsADirectoryError | NotADirectoryError | PermissionError | FileExistsError
        ) or getattr(error, "errno", None) in (errno.EROFS, errno.EPERM, errno.EACCES):
            reason = (error.strerror or type(error).__name__).lower()
            raise UsageError(f"cannot write {path}: {reason}.") from None
        raise


def check_output_file(flag: str, path: str | os.PathLike | None) -> None:
    """UsageError unless `path` can become a file: not a folder, and its nearest existing
    folder writable. Run before any work, so a bad --model or --out costs nothing. `flag` names
    the option in the message; an empty one names the path alone (a positional argument)."""
    if path is None:
        return
    path = Path(path)
    named = f"--{flag} {path}" if flag else str(path)
    if path.is_dir():
        raise UsageError(f"{named} is a folder; give a file name.")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"{named} is inside {parent}, which is not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{named} cannot be written: {parent} is read-only.")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # someone else's process, or not a pid: keep the file
    return True


def _temp_name(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{platform.node() or 'host'}.{pid}.tmp")


def remove_stale_temps(path: str | os.PathLike) -> None:
    """Remove the temporary files of earlier writes of `path` (see `atomic_output`) whose
    process, on this machine, is gone: a write killed with SIGKILL leaves one."""
    path = Path(path)
    prefix, host = f".{path.name}.", platform.node() or "host"
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp")):
            continue
        parts = entry.name[len(prefix) : -len(".tmp")].rsplit(".", 1)
        if parts[-1].isdigit() and (len(parts) == 1 or parts[0] == host):
            if not _pid_alive(int(parts[-1])):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the name of a temporary file beside `path` for the caller to write; when the block
    ends, fsync that file and rename it over `path`: a crash leaves either the old file or the
    new one, never half a file. The temporary file (`.NAME.HOST.PID.tmp`) is removed on any
    failure, and a later write of `path` removes those of dead processes. A full disk raises
    DiskFull; a path that cannot be written (a folder, inside a file, a read-only folder, an
    immutable file) UsageError, each one sentence. A file being replaced keeps its mode."""
    path = Path(path)
    tmp = _temp_name(path, os.getpid())
    with disk_errors(path):
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "is a folder")
        parent = path.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise UsageError(f"cannot write {path}: {parent} is a file, not a folder.")
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        try:
            yield tmp
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if path.exists():
                os.chmod(tmp, path.stat().st_mode & 0o7777)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def atomic_write(path: str | os.PathLike, write: bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write `path` atomically through `atomic_output`; `write` is the bytes, or a function
    that writes to the open binary file."""
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        if isinstance(write, bytes | bytearray):
            fh.write(write)
        else:
            write(fh)
    return Path(path)


@contextlib.contextmanager
def deferred_interrupts(output: str | os.PathLike) -> Iterator[Callable[[], None]]:
    """Within the block, Ctrl-C and SIGTERM only take note; the yielded `check()` raises
    Interrupted, saying that `output` was left as it was, at the caller's safe points once one
    came. Without this, a KeyboardInterrupt can land in a library's cleanup callback, which
    swallows it. Outside the main thread, `check()` does nothing."""
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    def check() -> None:
        if received:
            raise Interrupted(f"interrupted; {output} was left as it was.")

    if threading.current_thread() is not threading.main_thread():
        yield check
        return
    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield check
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def to_json(value: Any) -> Any:
    """`json.dumps(default=...)` for what featx records: numpy scalars and arrays, paths."""
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write `data` as indented JSON, atomically."""
    return atomic_write(path, (json.dumps(data, indent=1, default=to_json) + "\n").encode())
