"""`auto` as an engine: the run's first batches are computed by the candidate engines in turn
and timed, and the run continues on the fastest. Every batch computed while measuring is a real
batch of the run; `AutoEngine.name` says which engine computed the last one, so a store can
record which engine computed which rows.

Eager runs first, one warm-up and `BATCHES_EACH` timed batches. Each other candidate gets one
warm-up batch (compared with eager on the same batch: an engine whose features differ from
eager's by more than `AGREEMENT` is dropped and that batch kept from eager), then it and eager
take turns for `ROUNDS` rounds of `ROUND_BATCHES` timed batches each, so that both see the same
load from decoding; each engine's rate is its median batch. Then threads: the fastest engine
takes turns with itself on as many threads fewer as there are decoding processes (at least one
fewer: on a busy machine the network's threads wait on each other and on decoding), and the
faster count is part of the choice. An engine not measured here is tried only when its
expected set-up (from featx's cache when its conversion is there) is at most `SETUP_SHARE` of
what the batches left would take on the fastest engine so far."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING

from featx.inference import auto
from featx.inference.auto import BATCHES_EACH, SETUP_SHARE, Decision, Trial

if TYPE_CHECKING:
    import torch

    from featx.inference.engine import Engine

__all__ = [
    "AGREEMENT",
    "ROUNDS",
    "ROUND_BATCHES",
    "THREAD_ROUNDS",
    "AutoEngine",
    "agreement",
    "start_auto",
]

ROUNDS, ROUND_BATCHES = 2, 2  # a candidate and eager alternate: rounds, timed batches per turn
THREAD_ROUNDS = 2  # fewer threads and all of them alternate, one timed batch per turn

# fp32 engines must give eager's features within this relative difference; low precisions
# within this distance from cosine 1.
AGREEMENT = {"fp32": 1e-4, "bf16": 1e-2, "fp16": 1e-2}

Outputs = dict[str, "torch.Tensor"]
Build = Callable[[str, "int | None"], "Engine"]


def agreement(out: Outputs, ref: Outputs, precision: str) -> float:
    """fp32: the largest difference to eager relative to eager's largest value, over the
    outputs; lower precisions: 1 - the lowest cosine of a row to eager's."""
    import torch

    worst = 0.0
    for name, r in ref.items():
        a = out[name].float()
        if precision == "fp32":
            scale = r.abs().max().clamp_min(1e-30)
            worst = max(worst, ((a - r).abs().max() / scale).item())
        else:
            cos = torch.cosine_similarity(a.flatten(1), r.flatten(1).float()).min().item()
            worst = max(worst, 1.0 - cos)
    return worst


class AutoEngine:
    """Callable like an `Engine`; measures the candidates on the first batches, then runs the
    fastest. `build(name, threads)` builds an engine (OpenVINO on `threads` threads, None: its
    own count); `save(decision)` keeps the measurements."""

    def __init__(
        self,
        build: Build,
        names: list[str],
        *,
        precision: str,
        batch_size: int,
        n_batches: int,
        workers: int,
        decision: Decision,
        save: Callable[[Decision], None],
        log: Callable[[str], None],
        cached: frozenset[str] = frozenset(),
    ):
        import torch

        self.build, self.names, self.precision = build, names, precision
        self.cached = cached  # the engines whose conversion is in featx's cache
        self.batch_size = batch_size
        self.batches_left, self.workers = n_batches, workers
        self.images = n_batches * batch_size
        self.decision, self.save, self.log = decision, save, log
        self.threads = torch.get_num_threads()
        self.name, self.chosen, self.choice = "eager", None, ""
        self.quality, self.fallback_reason, self.device = None, None, None
        self._steps = self._race()
        next(self._steps)

    def __call__(self, batch: torch.Tensor) -> Outputs:
        self.batches_left -= 1
        if self.chosen is not None:
            return self.chosen(batch)
        out = self._steps.send(batch)
        if self.chosen is not None:
            # The race's frame holds self: closed, the engines it built are freed when the
            # run drops them, in this thread, not by a garbage collection that may happen
            # to run on one of OpenVINO's threads and make it join itself.
            self._steps.close()
        return out

    def describe(self) -> str:
        chosen = self.chosen.describe() if self.chosen is not None else "eager"
        return f"auto: {chosen}"

    # ---- the race ------------------------------------------------------------------------
    def _race(self) -> Generator[Outputs, torch.Tensor, None]:

        batch = yield {}  # primed
        eager = self.build("eager", None)
        self.device = eager.device
        trials: list[Trial] = []
        batch = yield from self._measure(eager, trials, batch)
        engines: dict[tuple[str, int], Engine] = {("eager", self.threads): eager}
        eager_rates: list[float] = []  # eager's batches in the rounds it took turns in
        for name in self.names[1:]:
            cached = name in self.cached
            expected = auto.setup_expected(name, cached)
            if not self._room(expected, trials, 1 + 2 * ROUNDS * ROUND_BATCHES):
                self.decision.unaffordable[name] = round(expected, 1)
                continue
            start = time.perf_counter()
            engine = self.build(name, None)
            setup = time.perf_counter() - start
            if engine.fallback_reason:
                self.decision.skipped[name] = engine.fallback_reason
                continue
            auto.record_setup(name, setup, cached)
            engines[name, self.threads] = engine
            trial = Trial(name, self.threads, 0.0, setup)
            if cached:
                trial.setup, trial.cached_setup = auto.setup_expected(name), setup
            batch = yield from self._alternate(engine, eager, trial, trials, eager_rates, batch)
        if eager_rates:  # eager's rate from the same rounds as the candidates'
            trials[0].rate = statistics.median(eager_rates)
            trials[0].batches = len(eager_rates)
        batch = yield from self._threads(trials, engines, batch)
        self._finish(trials, engines)
        while True:
            batch = yield self.chosen(batch)

    def _threads(self, trials: list[Trial], engines: dict, batch):
        """The fastest engine so far on fewer threads, as many fewer as there are decoding
        processes (at least one): it takes turns with itself on all threads for THREAD_ROUNDS
        rounds of one batch, and a Trial at the fewer count is added, its rate scaled by the
        ratio of the two medians. OpenVINO is built again (from featx's cache) for its thread
        count."""
        import torch

        fewer = max(1, self.threads - max(1, self.workers))
        best = max(trials, key=lambda t: t.rate)
        torch_engine = best.engine in auto.TORCH_ENGINES
        expected = 0.0 if torch_engine else auto.setup_expected(best.engine, cached=True)
        needed = 2 * THREAD_ROUNDS + (0 if torch_engine else 1)
        if fewer == self.threads or not self._room(expected, trials, needed):
            return batch
        full, few, setup = engines[best.engine, self.threads], None, None
        if torch_engine:
            few = full
        else:
            start = time.perf_counter()
            few = self.build(best.engine, fewer)
            setup = time.perf_counter() - start
            if few.fallback_reason:
                return batch
            auto.record_setup(best.engine, setup, cached=True)
            self.name = few.name
            batch = yield few(batch)  # its warm-up
        rates: dict[int, list[float]] = {fewer: [], self.threads: []}
        for _ in range(THREAD_ROUNDS):
            for count, runner in ((fewer, few), (self.threads, full)):
                torch.set_num_threads(count)
                out, rate = self._timed(runner, batch)
                rates[count].append(rate)
                batch = yield out
        torch.set_num_threads(self.threads)
        scale = statistics.median(rates[fewer]) / statistics.median(rates[self.threads])
        trials.append(
            Trial(best.engine, fewer, best.rate * scale, best.setup, setup,
                  len(rates[fewer]), best.agreement)
        )  # fmt: skip
        engines[best.engine, fewer] = few
        return batch

    def _room(self, setup: float, trials: list[Trial], batches: int) -> bool:
        """Whether the batches left can afford measuring one more candidate: `batches` of
        them and one after, and its set-up within SETUP_SHARE of what they would take on the
        fastest engine so far (the batches it is measured on are the run's own work)."""
        rate = max((t.rate for t in trials), default=0.0)
        seconds = self.batches_left * self.batch_size / rate if rate else 0.0
        return self.batches_left >= batches + 1 and setup <= SETUP_SHARE * seconds

    def _timed(self, engine, batch) -> tuple[Outputs, float]:
        """`engine`'s outputs for `batch` and its images/s on it."""
        self.name = engine.name
        start = time.perf_counter()
        out = engine(batch)
        return out, len(batch) / max(time.perf_counter() - start, 1e-9)

    def _measure(self, eager, trials, batch):
        """Run eager on one warm-up batch and BATCHES_EACH timed ones; append its Trial."""
        import torch

        self.name = eager.name
        batch = yield eager(batch)
        rates = []
        for _ in range(BATCHES_EACH):
            out, rate = self._timed(eager, batch)
            rates.append(rate)
            batch = yield out
        trials.append(Trial("eager", torch.get_num_threads(), statistics.median(rates), 0.0))
        return batch

    def _alternate(self, engine, eager, trial, trials, eager_rates, batch):
        """Run `engine` on one warm-up batch checked against eager, then take turns with
        eager for ROUNDS rounds of ROUND_BATCHES timed batches; append `trial` with its median
        rate unless it disagrees with eager."""
        self.name = engine.name
        out = engine(batch)
        ref = eager(batch)
        trial.agreement = agreement(out, ref, self.precision)
        if trial.agreement > AGREEMENT.get(self.precision, 1e-2):
            self.decision.skipped[engine.name] = f"differs from eager by {trial.agreement:.1e}"
            self.name = "eager"
            return (yield ref)
        batch = yield out
        rates: list[float] = []
        for _ in range(ROUNDS):
            for runner, into in ((engine, rates), (eager, eager_rates)):
                for _ in range(ROUND_BATCHES):
                    out, rate = self._timed(runner, batch)
                    into.append(rate)
                    batch = yield out
        trial.rate, trial.batches = statistics.median(rates), len(rates)
        trials.append(trial)
        return batch

    def _finish(self, trials: list[Trial], engines: dict) -> None:
        import torch

        self.decision.trials = trials
        self.decision.measured = auto.today()
        self.decision.images = self.images
        best = max(trials, key=lambda t: t.rate)
        torch.set_num_threads(best.threads)
        self.chosen, self.name = engines[best.engine, best.threads], best.engine
        self.choice = self.decision.line(best, cached=False)
        self.save(self.decision)
        self.log(self.choice)


def start_auto(
    build: Build,
    *,
    key: str,
    device: torch.device,
    precision: str,
    batch_size: int,
    n_batches: int,
    workers: int,
    log: Callable[[str], None],
) -> Engine | AutoEngine:
    """The engine `auto` runs: the best of the measurements cached for this signature,
    counting each engine's set-up against the `n_batches` left; or an `AutoEngine` that
    measures, when nothing is cached or this run can afford an engine the cached measurement
    could not."""
    from featx.inference.engines import is_cached
    from featx.inference.machine import machine_identity

    names = auto.candidates(device, precision)
    cached = frozenset(name for name in names if is_cached(name, key))
    sig = auto.signature(key, batch_size, machine_identity(device, workers))
    decision = auto.load_decision(sig)
    n_images = n_batches * batch_size
    if decision is not None and not _worth_measuring_again(decision, names, cached, n_images):
        return _from_decision(decision, build, key, n_images, log)
    if n_batches < BATCHES_EACH + 1:
        engine = build("eager", None)
        engine.choice = f"Engine eager: {n_batches} batch(es) are too few to measure engines on."
        log(engine.choice)
        return engine
    log(f"Engine auto: measuring on this run's first batches (candidates: {', '.join(names)}).")
    fresh = Decision(sig, auto.today())
    return AutoEngine(
        build, names, precision=precision, batch_size=batch_size, n_batches=n_batches,
        workers=workers, decision=fresh, save=auto.save_decision, log=log, cached=cached,
    )  # fmt: skip


def _worth_measuring_again(
    decision: Decision, names: list[str], cached: frozenset[str], n_images: int
) -> bool:
    """Whether this run measures again although `decision` is cached: only when it is longer
    than the run that measured (a run as long decides the same, so a warm run just starts the
    chosen engine) and an engine left unmeasured then could now be afforded."""
    if n_images <= decision.images:
        return False
    eager_left = n_images / max(t.rate for t in decision.trials if t.engine == "eager")
    measured = {t.engine for t in decision.trials} | set(decision.skipped)
    return any(
        auto.setup_expected(name, name in cached) <= SETUP_SHARE * eager_left
        for name in names
        if name not in measured
    )


def _from_decision(decision: Decision, build, key: str, n_images: int, log) -> Engine:
    import torch

    from featx.inference.engines import is_cached

    cached = frozenset(t.engine for t in decision.trials if is_cached(t.engine, key))
    best = decision.best(n_images, cached)
    default = torch.get_num_threads()
    torch.set_num_threads(best.threads)
    start = time.perf_counter()
    engine = build(best.engine, best.threads if best.threads != default else None)
    if best.engine in cached and not engine.fallback_reason:
        best.cached_setup = round(time.perf_counter() - start, 3)
        auto.save_decision(decision)
    engine.choice = decision.line(best, cached=True)
    log(engine.choice)
    if engine.fallback_reason:
        log(f"Engine: {engine.describe()}.")
    return engine
