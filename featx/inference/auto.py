"""`--engine auto`: the engine measured fastest on this machine for this network.

A network's first run long enough to matter measures the candidate engines on its own first
batches (`featx.inference.race.AutoEngine`); the measurements are kept in featx's cache under
the signature of what changes the answer (the network, its weights, layers, pooling, input
and batch size, precision, device, CPU model and flags or GPU, threads, decoding processes,
torch and OpenVINO versions), and later runs of that signature choose from them. Nothing about
any CPU is known in advance: an engine not yet measured here is tried only when its expected
set-up is a small share of what the images left would take on eager.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from featx.inference.engines import ENGINES
from featx.runtime import atomic_write, cache_root

if TYPE_CHECKING:
    import torch

__all__ = [
    "BATCHES_EACH",
    "CACHED_SETUP",
    "SETUP_SHARE",
    "Decision",
    "Trial",
    "candidates",
    "load_decision",
    "resolve_engine",
    "save_decision",
    "setup_expected",
    "signature",
]

TORCH_ENGINES = ("eager", "compile")  # run on torch's intra-op threads
BATCHES_EACH = 3  # timed batches per candidate, after one warm-up batch
# An engine not measured here is tried when its expected set-up is at most this share of the
# time the images left would take on eager: what measuring may cost a run.
SETUP_SHARE = 0.25
# Seconds an engine is expected to take to build from featx's cache before that is measured.
CACHED_SETUP = 1.0


@dataclass
class Trial:
    """One engine measured on this machine: model-only images/s on the run's own batches."""

    engine: str
    threads: int  # torch's intra-op threads while it ran
    rate: float  # images/s
    setup: float  # seconds to build it the first time here (conversion, compilation)
    cached_setup: float | None = None  # seconds to build it from featx's cache, once seen
    batches: int = BATCHES_EACH
    agreement: float | None = None  # max relative difference to eager (fp32) or 1 - cosine


@dataclass
class Decision:
    """The measurements of one signature and when they were taken."""

    signature: dict[str, Any]
    measured: str  # the date, YYYY-MM-DD
    trials: list[Trial] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # engine: why it cannot run here
    # engine: its expected set-up (s), too long for the run that measured
    unaffordable: dict[str, float] = field(default_factory=dict)
    images: int = 0  # the length of the run that measured: a longer run may measure again

    def reference(self) -> Trial:
        """Eager at the process's own thread count: what speed-ups are relative to."""
        return self.trials[0]

    def expected_seconds(self, trial: Trial, n_images: int, cached: bool) -> float:
        setup = trial.setup
        if cached:
            setup = trial.cached_setup if trial.cached_setup is not None else CACHED_SETUP
        return (0.0 if trial.engine == "eager" else setup) + n_images / trial.rate

    def best(self, n_images: int, cached: frozenset[str] = frozenset()) -> Trial:
        """The trial that computes `n_images` soonest, its set-up counted (from featx's cache
        for the engines in `cached`)."""
        return min(
            self.trials, key=lambda t: self.expected_seconds(t, n_images, t.engine in cached)
        )

    def line(self, trial: Trial, cached: bool) -> str:
        """The choice line: the engine, its threads beside the decoding processes, its
        speed-up and where the figure came from."""
        ref, workers = self.reference(), int(self.signature.get("workers", 0))
        where = f"on {_plural(trial.threads, 'thread')}"
        if workers:
            where += f" beside {_plural(workers, 'decoding process', 'es')}"
        source = f"measured here {self.measured}, {trial.batches} batches each"
        text = f"Engine {trial.engine} {where}: {trial.rate / ref.rate:.2f}x eager"
        text += f" on {_plural(ref.threads, 'thread')}"
        others = [t for t in self.trials if t.engine == trial.engine and t is not trial]
        if others:
            rates = (f"on {_plural(t.threads, 'thread')}: {t.rate / ref.rate:.2f}x" for t in others)
            text += f" ({', '.join(rates)})"
        text += f" (cached decision, {source})" if cached else f", {source}"
        if self.skipped:
            text += "; not used: " + ", ".join(f"{k} ({v})" for k, v in self.skipped.items())
        if self.unaffordable:
            text += "; not measured (set-up not won back on the run that measured): " + (
                ", ".join(f"{k} (~{v:.0f}s)" for k, v in self.unaffordable.items())
            )
        return text + "."

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Decision:
        trials = [Trial(**t) for t in data["trials"]]
        return cls(
            data["signature"],
            data["measured"],
            trials,
            dict(data.get("skipped", {})),
            dict(data.get("unaffordable", {})),
            int(data.get("images", 0)),
        )


def _plural(n: int, noun: str, suffix: str = "s") -> str:
    return f"{n} {noun}{suffix * (n != 1)}"


def signature(key: str, batch_size: int, identity: dict[str, Any]) -> dict[str, Any]:
    """What the decision depends on: the conversion key (backbone, weights sha256, layers,
    pooling, input size, precision, torch version), the batch size and the machine
    (`featx.inference.machine.machine_identity`)."""
    return {"network": key, "batch_size": batch_size, **identity}


def _path(sig: dict[str, Any]) -> Path:
    from featx.inference.engine import digest

    return cache_root() / "engines" / f"{digest(json.dumps(sig, sort_keys=True))}.json"


def _lock(path: Path):
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=60)


def load_decision(sig: dict[str, Any]) -> Decision | None:
    """The measurements cached for `sig`, or None."""
    path = _path(sig)
    try:
        data = json.loads(path.read_text())
        decision = Decision.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return decision if decision.signature == sig and decision.trials else None


def save_decision(decision: Decision) -> None:
    """Write `decision` into featx's cache (atomically, one writer at a time); an unwritable
    cache only means the next run measures again."""
    path = _path(decision.signature)
    try:
        with _lock(path):
            atomic_write(path, (json.dumps(decision.to_dict(), indent=1) + "\n").encode())
    except Exception:  # noqa: BLE001
        pass


def _setups_path() -> Path:
    return cache_root() / "engines" / "setups.json"


def setup_expected(engine: str, cached: bool = False) -> float:
    """Seconds `engine` is expected to take to build before it is measured for a network:
    its last set-up on this machine, else its registered guess; with `cached` (its
    conversion for the network is in featx's cache), its last set-up from the cache, else
    CACHED_SETUP."""
    try:
        seen = json.loads(_setups_path().read_text())
        return float(seen[f"{engine} cached" if cached else engine])
    except (OSError, ValueError, KeyError, TypeError):
        return CACHED_SETUP if cached else ENGINES[engine].setup_guess


def record_setup(engine: str, seconds: float, cached: bool = False) -> None:
    """Remember `engine`'s last set-up on this machine, from featx's cache when `cached`
    (see `setup_expected`)."""
    path = _setups_path()
    try:
        with _lock(path):
            try:
                seen = json.loads(path.read_text())
            except (OSError, ValueError):
                seen = {}
            seen[f"{engine} cached" if cached else engine] = round(seconds, 3)
            atomic_write(path, (json.dumps(seen, indent=1) + "\n").encode())
    except Exception:  # noqa: BLE001
        pass


def candidates(device: torch.device, precision: str) -> list[str]:
    """The engines `auto` may measure: installed, running on `device` in `precision`; eager
    first (where it computes `precision`: not int8), the others by expected set-up."""
    names = [
        name
        for name, entry in ENGINES.items()
        if device.type in entry.devices and precision in entry.precisions and entry.available()
    ]
    return sorted(names, key=lambda name: (name != "eager", setup_expected(name)))


def today() -> str:
    return time.strftime("%Y-%m-%d")


def resolve_engine(
    requested: str,
    device: torch.device,
    precision: str,
    n_images: int,
    key: str,
    flops: int = 0,
) -> tuple[str, str]:
    """`requested` as the engine to start and why: a named engine as it is; `auto` stays
    `auto` (measured or looked up when the engine starts, see `start_engine`), except that int8
    is the quantized model of the one engine that computes it. `n_images`, `key` and `flops`
    are accepted for callers that pass them; the choice is made from measurements."""
    if requested != "auto" or precision != "int8":
        return str(requested), ""
    int8 = [entry.name for entry in ENGINES.values() if "int8" in entry.precisions]
    return int8[0], f"int8 is {int8[0]}'s quantized model"
