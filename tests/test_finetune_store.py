"""Fine-tuning with stage 1 on a feature store's cached rows, the best checkpoint over both
stages, test-split scoring, the experiment log, and reproducibility across worker counts.
Real images, real stores, real (tiny, randomly initialised) networks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_sentence_error, invoke_featx
from ftdata import shapes_folder
from test_finetune import assert_same, config

from featx.extraction.run import extract
from featx.finetuning.run import finetune, load_checkpoint
from featx.runlog import read_runs


@pytest.fixture(scope="module")
def with_test(tmp_path_factory) -> Path:
    """train/, validation/ and test/: 3 classes x (8 + 4 + 4) images."""
    root = tmp_path_factory.mktemp("three") / "shapes"
    return shapes_folder(root, {"train": 8, "validation": 4, "test": 4}, seed=3)


@pytest.fixture(scope="module")
def store(with_test, tmp_path_factory) -> Path:
    return extract(
        with_test, "resnet18", ["layer4"], weights="none", image_size=32, pool="avg",
        store=tmp_path_factory.mktemp("store") / "s.h5", workers=0, quiet=True,
    ).store  # fmt: skip


@pytest.fixture(scope="module")
def cached_run(with_test, store, tmp_path_factory):
    c = config(backbone="resnet18", epochs_head=None, epochs=2, lr=3e-3, patience=0)
    out = tmp_path_factory.mktemp("cached") / "run"
    return finetune(with_test, c, out=out, workers=0, quiet=True, store=store)


@pytest.mark.slow
def test_stage_one_trains_the_head_on_the_cached_rows(cached_run):
    out = cached_run.out
    history = json.loads((out / "history.json").read_text())
    head = [h for h in history if h["stage"] == "head"]
    full = [h for h in history if h["stage"] == "full"]
    assert head and all(h["source"] == "store" for h in head) and len(full) == 2
    assert json.loads((out / "config.json").read_text())["head_from_store"]


@pytest.mark.slow  # a fine-tuning run end to end (the module fixture)
def test_the_head_from_the_cache_scores_on_images_as_on_its_rows(cached_run):
    """The folded standardisation and the copied weights give the network's head the loss it
    had on the stored rows (the store's BatchNorm-folded features differ by float noise)."""
    history = cached_run.history
    head = [h for h in history if h["stage"] == "head"]
    best_on_rows = min(head, key=lambda h: h["val_loss"])
    last = load_checkpoint(cached_run.out / "last.pt")
    assert last["full_start"] == pytest.approx(best_on_rows["val_loss"], rel=1e-3)


@pytest.mark.slow  # a fine-tuning run end to end (the module fixture)
def test_the_model_is_the_best_checkpoint_over_both_stages(cached_run):
    last = load_checkpoint(cached_run.out / "last.pt")
    full = [h for h in cached_run.history if h["stage"] == "full"]
    best_loss = min([last["full_start"], *(h["val_loss"] for h in full)])
    assert last["best"]["val_loss"] == pytest.approx(best_loss)
    assert cached_run.metrics["validation"]["log_loss"] == pytest.approx(best_loss, rel=1e-5)
    assert cached_run.metrics["validation"]["log_loss"] <= last["full_start"] * (1 + 1e-6)


def test_the_test_split_is_scored_with_its_confusion_matrix(cached_run):
    out = cached_run.out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n_samples"] == 12 and metrics["validation"]["n_samples"] == 12
    for split in ("validation", "test"):
        assert (out / f"confusion-{split}.png").read_bytes()[:4] == b"\x89PNG"


def test_the_run_is_in_the_stores_experiment_log(cached_run, store):
    runs = [r for r in read_runs([store]) if r.kind == "finetune"]
    assert len(runs) == 1
    run = runs[0]
    assert run.scores["test"]["accuracy"] == cached_run.metrics["test"]["accuracy"]
    assert run.details["history"] == json.loads((cached_run.out / "history.json").read_text())
    assert run.model_path == str(cached_run.model)


def test_a_store_of_other_preprocessing_is_refused_in_one_sentence(with_test, store, tmp_path):
    result = invoke_featx(
        "finetune", with_test, "--backbone", "resnet18", "--weights", "none",
        "--image-size", 48, "--workers", 0, "--store", store, "--out", tmp_path / "run",
    )  # fmt: skip
    message = assert_one_sentence_error(result)
    assert "preprocessing" in message and not (tmp_path / "run" / "last.pt").exists()


def test_a_store_without_the_feature_layer_is_refused(with_test, store, tmp_path):
    result = invoke_featx(
        "finetune", with_test, "--backbone", "resnet18", "--weights", "none",
        "--image-size", 32, "--workers", 0, "--store", store, "--layer", "layer3",
        "--out", tmp_path / "run",
    )  # fmt: skip
    assert "featx extract --layer layer3 --pool avg" in assert_one_sentence_error(result)


@pytest.mark.slow
def test_the_same_seed_gives_the_same_run_with_0_or_1_workers(with_test, tmp_path):
    c = config(backbone="resnet18", epochs_head=1, epochs=1, dropout=0.5, patience=0)
    runs = [finetune(with_test, c, out=tmp_path / f"w{w}", workers=w, quiet=True) for w in (0, 1)]
    timing = ("seconds", "images_per_second")
    histories = [[{k: v for k, v in h.items() if k not in timing} for h in r.history] for r in runs]
    assert len(histories[0]) == 2
    assert_same(histories[0], histories[1])
    weights = [load_checkpoint(r.out / "last.pt")["network"] for r in runs]
    assert_same(weights[0], weights[1])


def test_fine_tuning_augments_lightly_by_default_and_flags_change_that():
    from dataclasses import replace

    from featx.cli.options import AugmentFlags
    from featx.finetuning.config import FINETUNE_AUGMENT, FinetuneConfig

    assert FinetuneConfig(backbone="resnet18").augment == FINETUNE_AUGMENT
    flags = AugmentFlags(None, {"rotation": 20.0, "zoom": None})
    assert flags.config(default=True, base=FINETUNE_AUGMENT) == replace(
        FINETUNE_AUGMENT, rotation=20.0
    )


@pytest.fixture(scope="module")
def two_layer_store(with_test, tmp_path_factory) -> Path:
    return extract(
        with_test, "resnet18", ["layer3", "layer4"], weights="none", image_size=32, pool="avg",
        store=tmp_path_factory.mktemp("two") / "s.h5", workers=0, quiet=True,
    ).store  # fmt: skip


@pytest.mark.slow
def test_without_layer_the_store_chooses_the_layer_of_the_best_head(
    with_test, two_layer_store, tmp_path, capsys
):
    """A head trains on each stored layer; the lowest validation loss wins, the run says so,
    records the layer, and a resumed run keeps it."""
    c = config(backbone="resnet18", epochs_head=None, epochs=1, lr=3e-3, patience=0)
    out = tmp_path / "run"
    result = finetune(with_test, c, out=out, workers=0, store=two_layer_store)
    said = capsys.readouterr().err
    line = next(x for x in said.splitlines() if x.startswith("Feature layer from the store"))
    chosen = line.split(": ")[1].split(" ")[0]
    losses = dict(
        (part.split(" ")[0], float(part.split(" ")[1]))
        for part in line.split("on each: ")[1].rstrip(").").split(", ")
    )
    assert set(losses) == {"layer3", "layer4"} and chosen == min(losses, key=losses.get)
    recorded = json.loads((out / "config.json").read_text())["config"]["layer"]
    assert recorded == chosen
    head = [h for h in result.history if h["stage"] == "head"]
    assert min(h["val_loss"] for h in head) == pytest.approx(losses[chosen], abs=5e-5)
    again = finetune(with_test, c, out=out, workers=0, quiet=True, resume=True)
    assert json.loads((out / "config.json").read_text())["config"]["layer"] == chosen
    assert again.history[: len(result.history)] == result.history


@pytest.mark.slow
def test_a_given_layer_or_a_one_layer_store_chooses_nothing(with_test, store, tmp_path, capsys):
    c = config(backbone="resnet18", epochs_head=None, epochs=0, lr=3e-3, patience=0)
    finetune(with_test, c, out=tmp_path / "run", workers=0, store=store)
    assert "Feature layer from the store" not in capsys.readouterr().err


@pytest.mark.slow  # a fine-tuning run end to end
def test_epochs_are_numbered_within_their_stage(with_test, store, tmp_path, capsys):
    """Stage 1 on cached rows runs up to 100 epochs; stage 2's one epoch is `epoch 1/1`."""
    c = config(backbone="resnet18", epochs_head=None, epochs=1, lr=3e-3, patience=0)
    finetune(with_test, c, out=tmp_path / "run", workers=0, quiet=False, store=store)
    said = capsys.readouterr().err
    numbered = {line.split(":")[0] for line in said.splitlines() if line.startswith("epoch ")}
    assert numbered == {"epoch 1/1 (full)"}, said
    assert "of stage" in said.splitlines()[-1]
