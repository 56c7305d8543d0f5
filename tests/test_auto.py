"""`--engine auto` measures on the machine where it runs: the first run of a network measures
the candidate engines on its own batches and caches the decision, later runs reuse it until
the signature changes, the store says which engine computed which rows, and a short run never
pays an expensive set-up. `featx engines` prints the table measured here.

The runs that may load OpenVINO are featx subprocesses (its thread pool crashes a process that
later forks DataLoader workers, see test_engines.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder, run_featx

from featx.store import FeatureStore

needs_openvino = pytest.mark.skipif(
    importlib.util.find_spec("openvino") is None, reason="openvino is not installed"
)
TODAY = re.compile(r"measured here \d{4}-\d{2}-\d{2}, \d+ batches each")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("auto") / "photos"
    make_folder(root, {"cat": 10, "dog": 10})
    return root


def extract(photos: Path, store: Path, cache: Path, *extra: object):
    args = ["extract", photos, "--backbone", "resnet18", "--layer", "layer2", "--layer",
            "avgpool", "--weights", "none", "--image-size", "64", "--workers", "0",
            "--store", store, "--overwrite", *extra]  # fmt: skip
    done = run_featx(*args, cwd=store.parent, env={**ONE_THREAD, "FEATX_CACHE": str(cache)})
    assert done.returncode == 0, done.stderr
    return done.stderr


def choice_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("Engine ")]
    return lines[-1]


@pytest.mark.slow
def test_auto_measures_once_then_reuses_the_cached_choice_until_the_signature_changes(
    photos, tmp_path
):
    cache = tmp_path / "cache"
    first = extract(photos, tmp_path / "a.h5", cache, "--batch-size", "1")
    assert "Engine auto: measuring on this run's first batches" in first
    line = choice_line(first)
    assert TODAY.search(line) and "cached" not in line, line
    decisions = [p for p in (cache / "engines").glob("*.json") if len(p.stem) == 32]
    assert len(decisions) == 1
    recorded = json.loads(decisions[0].read_text())
    assert recorded["signature"]["batch_size"] == 1 and recorded["signature"]["cpu"]
    assert recorded["trials"][0]["engine"] == "eager"

    second = extract(photos, tmp_path / "b.h5", cache, "--batch-size", "1")
    assert "measuring" not in second
    line = choice_line(second)
    assert "cached decision" in line and TODAY.search(line), line
    with FeatureStore(tmp_path / "b.h5") as store:
        assert store.meta["history"][-1]["engine_choice"] == line

    for changed in (["--batch-size", "2"], ["--batch-size", "1", "--image-size", "48"]):
        again = extract(photos, tmp_path / "c.h5", cache, *changed[:2], *changed[2:])
        assert "Engine auto: measuring on this run's first batches" in again, changed
    assert len([p for p in (cache / "engines").glob("*.json") if len(p.stem) == 32]) == 3


@needs_openvino
@pytest.mark.slow
def test_the_store_records_which_engine_computed_which_rows_and_they_are_eagers(photos, tmp_path):
    cache = tmp_path / "cache"
    (cache / "engines").mkdir(parents=True)
    # this machine was seen to set openvino up in no time: a short run can afford measuring it
    (cache / "engines" / "setups.json").write_text(json.dumps({"openvino": 0.0}))
    stderr = extract(photos, tmp_path / "auto.h5", cache, "--batch-size", "1")
    line = choice_line(stderr)
    # compile keeps its unmeasured guess (tens of seconds): 20 small images never afford it
    assert "not won back" in line and "compile" in line.split("not won back")[1], line
    extract(photos, tmp_path / "eager.h5", cache, "--batch-size", "1", "--engine", "eager")
    with FeatureStore(tmp_path / "auto.h5") as got, FeatureStore(tmp_path / "eager.h5") as want:
        for key in want.layers:
            attrs = got.layer(key).attrs
            ranges = json.loads(attrs["engine_rows"])
            assert ranges[0][:2] == ["eager", 0] and ranges[-1][2] == got.n_rows
            # after its warm-up, openvino takes turns with eager on the timed batches
            turns = [name for name, _, _ in ranges][:5]
            assert turns == ["eager", "openvino", "eager", "openvino", "eager"], ranges
            assert all(a[2] == b[1] for a, b in zip(ranges, ranges[1:], strict=False))
            names = {name for name, _, _ in ranges}
            assert names <= {"eager", "openvino"} and "openvino" in names, ranges
            assert attrs["engine"] == ", ".join(dict.fromkeys(n for n, _, _ in ranges))
            a, b = got.read(key), want.read(key)
            assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
        assert got.meta["history"][-1]["engine_choice"] == line


def test_a_cached_conversion_counts_its_cached_set_up_not_its_first():
    from featx.inference.auto import CACHED_SETUP, Decision, Trial

    eager = Trial("eager", 2, rate=4.1, setup=0.0)
    openvino = Trial("openvino", 2, rate=9.4, setup=8.0)
    decision = Decision({}, "2024-01-01", [eager, openvino])
    n_images = 40  # eager: ~9.8 s; openvino: 8 s + ~4.3 s built anew, ~1 s + ~4.3 s cached
    assert decision.best(n_images).engine == "eager"
    assert decision.best(n_images, frozenset({"openvino"})).engine == "openvino"
    assert decision.expected_seconds(openvino, n_images, cached=True) == pytest.approx(
        CACHED_SETUP + n_images / 9.4
    )
    openvino.cached_setup = 0.2
    assert decision.expected_seconds(openvino, n_images, cached=True) == pytest.approx(
        0.2 + n_images / 9.4
    )


def test_a_short_run_measures_no_engine_with_a_set_up(small_photos, tmp_path):
    import featx

    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FEATX_CACHE", str(cache))
        featx.extract(
            small_photos, "resnet18", ["layer2"], store=tmp_path / "s.h5", weights="none",
            image_size=32, workers=0, batch_size=1, quiet=True,
        )  # fmt: skip
    with FeatureStore(tmp_path / "s.h5") as store:
        ranges = json.loads(store.layer("layer2").attrs["engine_rows"])
        choice = store.meta["history"][-1]["engine_choice"]
    assert [name for name, _, _ in ranges] == ["eager"] and ranges[0][2] == 10
    assert "openvino" in choice and "compile" in choice and "not won back" in choice, choice


@pytest.mark.slow
def test_featx_engines_prints_a_row_per_candidate_with_agreement(tmp_path):
    args = ["engines", "--backbone", "resnet18", "--layer", "layer1", "--image-size", "32",
            "--weights", "none", "--batch-size", "2"]  # fmt: skip
    env = {**ONE_THREAD, "FEATX_CACHE": str(tmp_path / "cache")}
    done = run_featx(*args, cwd=tmp_path, env=env, timeout=900)
    assert done.returncode == 0, done.stderr
    rows = {tuple(line.split()[:2]): line.split() for line in done.stdout.splitlines()[2:]}
    from featx.inference.auto import candidates
    from featx.runtime import resolve_device

    for name in candidates(resolve_device("cpu"), "fp32"):
        row = rows[name, "fp32"]
        if row[2] != "not":  # available here: the largest difference to eager fp32
            assert float(row[-2]) <= 1e-4, done.stdout
    assert "measuring" in done.stderr
    again = run_featx(*args, cwd=tmp_path, env=env)
    assert "measuring" not in again.stderr and again.stdout == done.stdout
    fresh = run_featx(*args, "--remeasure", "--quiet", cwd=tmp_path, env=env, timeout=900)
    assert fresh.returncode == 0, fresh.stderr
    assert {line.split()[0] for line in fresh.stdout.splitlines()[2:]} == {r[0] for r in rows}
    # the refreshed table is the one cached now
    assert run_featx(*args, cwd=tmp_path, env=env).stdout == fresh.stdout


@pytest.mark.slow
def test_predict_chooses_by_the_same_measurements(photos, tmp_path):
    cache = tmp_path / "cache"
    extract(photos, tmp_path / "s.h5", cache, "--batch-size", "1", "--pool", "avg")
    env = {**ONE_THREAD, "FEATX_CACHE": str(cache)}
    fit = run_featx("fit", "--store", tmp_path / "s.h5", "--layer", "avgpool@avg", "--clf",
                    "logreg", "--model", tmp_path / "m.featx", cwd=tmp_path, env=env)  # fmt: skip
    assert fit.returncode == 0, fit.stderr
    args = ["predict", "--model", tmp_path / "m.featx", photos, "--batch-size", "1",
            "--workers", "0", "--out", tmp_path / "p.csv"]  # fmt: skip
    first = run_featx(*args, cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "Engine auto: measuring on this run's first batches" in first.stderr
    assert TODAY.search(choice_line(first.stderr))
    second = run_featx(*args, cwd=tmp_path, env=env)
    assert "cached decision" in choice_line(second.stderr), second.stderr


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_auto_on_cuda_measures_eager_and_compile(photos, tmp_path, precision):
    stderr = extract(photos, tmp_path / "g.h5", tmp_path / "cache", "--device", "cuda",
                     "--precision", precision, "--batch-size", "1")  # fmt: skip
    assert "candidates: eager, compile" in stderr
    with FeatureStore(tmp_path / "g.h5") as store:
        names = {n for n, _, _ in json.loads(store.layer("avgpool").attrs["engine_rows"])}
        assert names <= {"eager", "compile"} and "eager" in names


def test_a_run_as_long_as_the_one_that_measured_starts_the_cached_choice():
    from featx.inference.auto import Decision, Trial
    from featx.inference.race import _worth_measuring_again

    trials = [Trial("eager", 2, rate=10.0, setup=0.0), Trial("openvino", 2, rate=13.0, setup=3)]
    # compile's expected set-up was too long for the 320 images that measured
    decision = Decision({}, "2024-01-01", trials, unaffordable={"compile": 30.0}, images=320)
    names = ["eager", "openvino", "compile"]
    assert not _worth_measuring_again(decision, names, frozenset(), 320)
    assert not _worth_measuring_again(decision, names, frozenset(), 160)
    # a run long enough to win compile's set-up back measures again
    assert _worth_measuring_again(decision, names, frozenset(), 3200)
    decision.images = 0  # measured by a featx that did not record the run's length
    assert not _worth_measuring_again(decision, names[:2], frozenset(), 320)


def test_the_race_measures_the_fastest_engine_on_fewer_threads_beside_decoding():
    """Two torch threads beside one decoding process: eager also runs on one thread, taking
    turns with itself on two, and the choice line says the threads and processes."""
    from featx.backbones import get_backbone
    from featx.backbones.layers import prepare_tap
    from featx.inference.auto import Decision
    from featx.inference.engines import build_engine
    from featx.inference.race import THREAD_ROUNDS, AutoEngine

    cpu = torch.device("cpu")
    loaded = get_backbone("resnet18").load("none")
    tap = prepare_tap(loaded.model, ["layer1"], "avg", cpu, 32)
    batch = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    saved, lines, built = [], [], []

    def build(name, threads):
        built.append((name, threads))
        return build_engine(tap, name, cpu, "fp32", batch)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        engine = AutoEngine(build, ["eager"], precision="fp32", batch_size=2, n_batches=16,
                            workers=1, decision=Decision({"workers": 1}, ""), save=saved.append,
                            log=lines.append)  # fmt: skip
        want = build_engine(tap, "eager", cpu, "fp32", batch)(batch)
        for _ in range(16):
            out = engine(batch)
            assert torch.allclose(out["layer1"], want["layer1"], rtol=1e-4, atol=1e-5)
        chosen = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    (decision,) = saved
    assert [(t.engine, t.threads) for t in decision.trials] == [("eager", 2), ("eager", 1)]
    assert decision.images == 32 and built == [("eager", None)]
    assert decision.trials[1].batches == THREAD_ROUNDS
    best = max(decision.trials, key=lambda t: t.rate)
    assert chosen == best.threads
    assert lines == [decision.line(best, cached=False)]
    assert f"Engine eager on {best.threads} thread" in lines[0]
    assert "beside 1 decoding process:" in lines[0] and "x eager on 2 threads" in lines[0]
    other = next(t for t in decision.trials if t is not best)
    assert f"(on {other.threads} thread" in lines[0], lines[0]
