"""`--refit all` (the default): once validation has chosen the epochs of each stage, the
network trains again on train + validation for those epochs; and a probe's saved best layer as
the head of `featx finetune --head`. Real images, real stores, real (tiny, randomly
initialised) networks and real `featx` processes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_featx
from ftdata import shapes_folder
from test_finetune import config
from test_fitted_heads import tiny_store

from featx.finetuning.refit import refit_plan
from featx.finetuning.run import finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _epoch(number: int, stage: str, stage_epoch: int, val_loss: float, **extra) -> dict:
    return {"epoch": number, "stage": stage, "stage_epoch": stage_epoch, "val_loss": val_loss,
            **extra}  # fmt: skip


CACHED_HEAD = [_epoch(i, "head", i, loss, source="store")
               for i, loss in enumerate((1.0, 0.8, 0.9, 0.95), 1)]  # fmt: skip
FULL = [_epoch(4 + i, "full", i, loss) for i, loss in enumerate((0.85, 0.7, 0.75), 1)]


def test_the_plan_retrains_the_epochs_validation_chose() -> None:
    plan = refit_plan([*CACHED_HEAD, *FULL], {"epoch": 6}, {"head": 100, "full": 3})
    # stage 1 up to its best epoch (where stage 2 started), stage 2 up to the kept epoch
    assert plan.epochs == {"head": 2, "full": 2}
    assert plan.lengths == {"head": 4, "full": 3} and plan.cached


def test_a_kept_stage_one_head_retrains_no_stage_two() -> None:
    plan = refit_plan([*CACHED_HEAD, *FULL], {"epoch": 2}, {"head": 100, "full": 3})
    assert plan.epochs == {"head": 2, "full": 0}


def test_a_fitted_head_kept_as_it_came_retrains_nothing() -> None:
    assert refit_plan(FULL, {"epoch": 0}, {"head": 0, "full": 3}).empty
    head_on_images = [_epoch(i, "head", i, loss) for i, loss in enumerate((0.9, 0.8), 1)]
    plan = refit_plan([*head_on_images, *FULL], {"epoch": 5}, {"head": 2, "full": 3})
    assert plan.epochs == {"head": 2, "full": 1} and plan.lengths["head"] == 2
    assert not plan.cached


@pytest.fixture(scope="module")
def unsplit(tmp_path_factory) -> Path:
    """train/ and test/, no validation folder: runs hold out a seeded 20% of train."""
    root = tmp_path_factory.mktemp("refit") / "shapes"
    return shapes_folder(root, {"train": 10, "test": 4}, seed=5)


@pytest.fixture(scope="module")
def store(unsplit, tmp_path_factory) -> Path:
    return tiny_store(unsplit, tmp_path_factory.mktemp("store") / "s.h5")


@pytest.fixture(scope="module")
def both(unsplit, store, tmp_path_factory):
    """The same run with --refit all and --refit train."""
    runs = {}
    for refit in ("all", "train"):
        c = config(backbone="resnet18", epochs_head=None, epochs=2, lr=3e-3, refit=refit)
        out = tmp_path_factory.mktemp(refit) / "run"
        runs[refit] = finetune(unsplit, c, out=out, workers=0, quiet=True, store=store)
    return runs


@pytest.mark.slow  # two fine-tuning runs (the module fixture)
def test_refit_all_trains_again_on_train_and_validation(both) -> None:
    result = both["all"]
    described = json.loads((result.out / "config.json").read_text())["dataset"]
    n_all = described["n_train"] + described["n_validation"]
    assert result.refit["n_train"] == n_all == 30
    retrained = json.loads((result.out / "refit-history.json").read_text())
    assert len(retrained) == sum(result.refit["epochs"].values()) > 0
    assert all(h["refit"] and "val_loss" not in h for h in retrained)
    from featx.models.file import load_model

    seen = load_model(result.model).provenance["trained_on"]
    assert seen == {"n_rows": 30, "splits": ["train"], "refit": "all"}
    assert json.loads((result.out / "metrics.json").read_text())["refit"] == result.refit


@pytest.mark.slow  # two fine-tuning runs (the module fixture)
def test_validation_scores_the_chosen_network_and_test_the_retrained_one(both) -> None:
    every, chosen = both["all"], both["train"]
    assert chosen.refit is None
    assert every.best_epoch == chosen.best_epoch
    assert every.metrics["validation"]["log_loss"] == pytest.approx(
        chosen.metrics["validation"]["log_loss"], rel=1e-6
    )
    before = every.refit["validation_chosen"]["test"]["accuracy"]
    assert before == chosen.metrics["test"]["accuracy"]


@pytest.mark.slow  # two fine-tuning runs (the module fixture)
def test_the_model_file_is_the_retrained_network(both, unsplit) -> None:
    from featx.classify.prediction import predict

    test = sorted(str(p) for p in (unsplit / "test").rglob("*.png"))
    scores = {k: predict(r.model, test, workers=0).scores for k, r in both.items()}
    assert not np.allclose(scores["all"], scores["train"], atol=1e-4)
    labels = [Path(p).parent.name for p in test]
    names = sorted({*labels})
    truth = np.array([names.index(x) for x in labels])
    accuracy = float((scores["all"].argmax(1) == truth).mean())
    assert accuracy == pytest.approx(both["all"].metrics["test"]["accuracy"])


@pytest.mark.slow  # extract, probe, finetune and evaluate as processes
def test_a_probes_saved_best_layer_is_the_head_of_a_fine_tune(unsplit, store, tmp_path) -> None:
    """`featx probe --save-best M.featx` writes a model that `featx finetune --head M.featx`
    starts from, and `featx evaluate` scores both."""
    model = tmp_path / "probe.featx"
    done = run_featx("probe", "--store", store, "--save-best", model, "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    scored = run_featx("evaluate", "--model", model, "--store", store, "--split", "test",
                       cwd=tmp_path)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    out = tmp_path / "run"
    tuned = run_featx(
        "finetune", unsplit, "--backbone", "resnet18", "--weights", "none", "--image-size",
        "32", "--head", model, "--store", store, "--epochs", "1", "--batch-size", "8",
        "--workers", "0", "--out", out, "--quiet", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    described = json.loads((out / "config.json").read_text())
    assert described["config"]["head"] == str(model)
    assert described["stage_epochs"]["head"] == 0  # the probe's head is stage 1 as it came
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["test"]["n_samples"] == 12
    again = run_featx("predict", "--model", out / "model.featx", unsplit / "test",
                      "--workers", "0", cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr
