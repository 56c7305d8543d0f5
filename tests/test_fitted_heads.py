"""`featx finetune --head MODEL` from a linear `featx fit` model: the head is one Linear layer
whose softmax on the stored rows is the model's predict_proba, with the pipeline's scaling and
PCA folded in. Real stores from `featx extract` of tiny image folders (resnet18, random
weights, 32 px), real fits, real model files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ftdata import shapes_folder

from featx.classify.fitting import fit
from featx.errors import UsageError
from featx.extraction.run import extract
from featx.models.file import load_model
from featx.models.heads import load_fitted_head
from featx.store.feature_store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_store(folder: Path, store: Path) -> Path:
    return extract(
        folder, "resnet18", ["layer4"], weights="none", image_size=32, pool="avg",
        store=store, workers=0, quiet=True,
    ).store  # fmt: skip


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("three")
    return tiny_store(shapes_folder(root / "shapes", 6), root / "s.h5")


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("two")
    folder = shapes_folder(root / "shapes", 6)
    for image in (folder / "triangle").iterdir():
        image.unlink()
    (folder / "triangle").rmdir()
    return tiny_store(folder, root / "s.h5")


def head_matches_the_model(store: Path, model_path: Path) -> None:
    fitted = load_fitted_head(model_path)
    with FeatureStore(store) as opened:
        rows = opened.read("layer4@avg")
    with torch.inference_mode():
        logits = fitted.head.eval()(torch.from_numpy(rows.astype(np.float32)))
    expected = load_model(model_path).pipeline.predict_proba(rows)
    assert logits.shape[1] == expected.shape[1]
    np.testing.assert_allclose(logits.double().softmax(dim=1).numpy(), expected, atol=1e-5)
    assert [type(m).__name__ for m in fitted.head] == ["Linear"]
    assert (fitted.layer_module, fitted.pool) == ("layer4", "avg")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("options", "name"),
    [({}, "scaled"), ({"pca": 5}, "pca"), ({"scale": False}, "raw")],
)
def test_a_multinomial_logreg_is_a_linear_head(three_classes, tmp_path, options, name):
    model = tmp_path / f"{name}.featx"
    fit(three_classes, "layer4@avg", "logreg", model=model, log=False, **options)
    head_matches_the_model(three_classes, model)


@pytest.mark.slow
@pytest.mark.parametrize("clf", ["logreg", "sgd"])
def test_a_binary_linear_model_gets_two_logits_with_its_softmax(two_classes, tmp_path, clf):
    model = tmp_path / f"{clf}.featx"
    fit(two_classes, "layer4@avg", clf, model=model, log=False)
    head_matches_the_model(two_classes, model)


@pytest.mark.slow
def test_classifiers_that_are_not_a_softmax_of_a_linear_map_are_refused(three_classes, tmp_path):
    for clf in ("svm", "knn", "sgd"):  # sgd on three classes: one-vs-rest probabilities
        model = tmp_path / f"{clf}.featx"
        fit(three_classes, "layer4@avg", clf, model=model, log=False)
        with pytest.raises(UsageError, match=r"only a model of `featx fit --clf logreg`") as error:
            load_fitted_head(model)
        assert "\n" not in str(error.value) and str(error.value).endswith(".")


@pytest.mark.slow
def test_a_model_of_joined_layers_is_still_refused(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("joined")
    store = extract(
        shapes_folder(root / "shapes", 4), "resnet18", ["layer3", "layer4"], weights="none",
        image_size=32, pool="avg", store=root / "s.h5", workers=0, quiet=True,
    ).store  # fmt: skip
    model = tmp_path / "joined.featx"
    fit(store, "layer3@avg+layer4@avg", "logreg", model=model, log=False)
    with pytest.raises(UsageError, match="several joined layers"):
        load_fitted_head(model)


@pytest.mark.slow
def test_a_fitted_logreg_with_the_store_is_stage_one_and_stage_two_starts_from_it(tmp_path, capsys):
    """With --store, a fitted head is not replaced by a head trained anew on the rows: it is
    stage 1 as it came (0 epochs), scored on the validation images, and stage 2 starts from
    it; its loss there is the model's loss on the store's validation rows."""
    import json

    from sklearn.metrics import log_loss
    from test_finetune import config

    from featx.finetuning.run import finetune, load_checkpoint

    folder = shapes_folder(tmp_path / "shapes", {"train": 8, "validation": 4}, seed=3)
    store = tiny_store(folder, tmp_path / "s.h5")
    model = tmp_path / "best.featx"
    fit(store, "layer4@avg", "logreg", params=["C=0.1,1"], model=model, log=False)
    c = config(backbone="resnet18", head=str(model), epochs_head=None, epochs=1, patience=0)
    result = finetune(folder, c, out=tmp_path / "run", workers=0, store=store)

    assert [h["stage"] for h in result.history] == ["full"]
    assert json.loads((result.out / "config.json").read_text())["stage_epochs"]["head"] == 0
    with FeatureStore(store) as opened:
        rows, labels = opened.read("layer4@avg", "validation"), opened.labels("validation")
    expected = log_loss(labels, load_model(model).pipeline.predict_proba(rows), labels=[0, 1, 2])
    last = load_checkpoint(result.out / "last.pt")
    assert last["full_start"] == pytest.approx(expected, rel=1e-4)
    assert result.metrics["validation"]["log_loss"] <= last["full_start"] * (1 + 1e-6)
    assert "as fitted (0 epochs)" in capsys.readouterr().err


@pytest.mark.slow
def test_a_head_fitted_on_the_validation_images_is_said_to_be_optimistic(tmp_path, capsys):
    """Without a validation folder `featx fit` refits on every training image (--refit all),
    among them the images fine-tuning holds out: the run says that the head's validation loss
    is optimistic (stage 2 must still beat it to be kept)."""
    from test_finetune import config

    from featx.finetuning.run import finetune, load_checkpoint

    folder = shapes_folder(tmp_path / "shapes", 8, seed=4)
    store = tiny_store(folder, tmp_path / "s.h5")
    model = tmp_path / "best.featx"
    fit(store, "layer4@avg", "logreg", model=model, log=False)
    assert load_model(model).provenance["trained_on"]["refit"] == "all"
    c = config(backbone="resnet18", head=str(model), epochs_head=None, epochs=1, patience=0)
    result = finetune(folder, c, out=tmp_path / "run", workers=0, store=store)

    last = load_checkpoint(result.out / "last.pt")
    full = [h["val_loss"] for h in result.history if h["stage"] == "full"]
    assert last["best"]["val_loss"] == pytest.approx(min([last["full_start"], *full]))
    err = capsys.readouterr().err
    assert "Note: --head" in err and "among them this run's validation images" in err
