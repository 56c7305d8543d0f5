"""Fine-tuning: real (tiny) training runs on small image folders, no mocks.

Backbones use seeded random weights (`--weights none`) at 32x32 so that every run takes a few
seconds on a CPU; the real-data comparison with pretrained weights is in
test_finetune_real.py.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ftdata import base_state, changed, head_state, shapes_folder
from typer.testing import CliRunner

from featx.backbones.registry import get_backbone
from featx.classify.prediction import tta_inputs
from featx.cli import app
from featx.errors import UsageError
from featx.finetuning.config import FinetuneConfig
from featx.finetuning.data import training_split
from featx.finetuning.lr_find import lr_range_test
from featx.finetuning.network import build_network
from featx.finetuning.run import finetune, load_checkpoint
from featx.finetuning.session import Session


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Unsplit: 3 classes x 10 images."""
    return shapes_folder(tmp_path_factory.mktemp("shapes") / "shapes", 10)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Unsplit: 3 classes x 4 images, for checks that need a step or two, not learning."""
    return shapes_folder(tmp_path_factory.mktemp("tiny") / "tiny", 4, seed=2)


@pytest.fixture(scope="module")
def shapes_split(tmp_path_factory) -> Path:
    """train/ and validation/: 3 classes x (8 + 4) images."""
    root = tmp_path_factory.mktemp("split") / "shapes"
    return shapes_folder(root, {"train": 8, "validation": 4}, seed=1)


def config(**options) -> FinetuneConfig:
    defaults = {
        "backbone": "mobilenet_v3_small",
        "weights": "none",
        "image_size": 32,
        "batch_size": 8,
        "epochs_head": 1,
        "epochs": 1,
    }
    return FinetuneConfig(**{**defaults, **options})


def session(data: Path, c: FinetuneConfig) -> Session:
    return Session(data, c, workers=0, quiet=True)


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def invoke(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_same(a, b, where="") -> None:
    """Deep, bit-for-bit equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ---- stage 1: the frozen base ----------------------------------------------------------------
@pytest.mark.slow
def test_head_stage_leaves_the_base_bit_for_bit_and_trains_the_head(tiny, tmp_path):
    c = config(epochs_head=2, epochs=0)
    before = snapshot(session(tiny, c).net)
    result = finetune(tiny, c, out=tmp_path / "run", workers=0, quiet=True)
    after = load_checkpoint(tmp_path / "run" / "last.pt")["network"]

    assert [h["stage"] for h in result.history] == ["head", "head"]
    assert changed(base_state(before), base_state(after)) == set()  # weights and BN statistics
    assert changed(head_state(before), head_state(after)) == set(head_state(before))


def test_head_stage_runs_the_base_in_eval_mode_without_gradients(tiny):
    s = session(tiny, config())
    optimizer = s.optimizer("head")
    s.set_modes("head")
    head = {id(p) for p in s.net.head.parameters()}
    assert [g["name"] for g in optimizer.param_groups] == ["head"]
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == head
    assert not any(p.requires_grad for p in s.net.base.parameters())
    assert not any(m.training for m in s.net.base.modules())
    assert all(m.training for m in s.net.head.modules())


# ---- stage 2: exactly the layers from --unfreeze-from ------------------------------------------
@pytest.mark.slow
def test_full_stage_trains_exactly_from_the_keras_layer_on(tiny, tmp_path):
    """vgg16 `block5_conv1` is the conv features.24 and its ReLU: block5's three convs train."""
    c = config(backbone="vgg16", epochs_head=0, unfreeze_from="block5_conv1", augment=None)
    before = snapshot(session(tiny, c).net)
    finetune(tiny, c, out=tmp_path / "run", workers=0, quiet=True)
    after = load_checkpoint(tmp_path / "run" / "last.pt")["network"]

    block5 = {f"features.{i}.{p}" for i in (24, 26, 28) for p in ("weight", "bias")}
    assert changed(base_state(before), base_state(after)) == block5
    assert not any(k.startswith("base.classifier.") and v.numel() for k, v in after.items())


@pytest.mark.parametrize("bn", ["frozen", "train"])
@pytest.mark.slow
def test_full_stage_from_a_module_path_and_batchnorm_modes(tiny, tmp_path, bn):
    c = config(backbone="resnet18", epochs_head=0, unfreeze_from="layer3.1", bn=bn)
    before = base_state(snapshot(session(tiny, c).net))
    finetune(tiny, c, out=tmp_path / "run", workers=0, quiet=True)
    after = base_state(load_checkpoint(tmp_path / "run" / "last.pt")["network"])

    statistics = ("running_mean", "running_var", "num_batches_tracked")
    late = {k for k in before if k.startswith(("layer3.1.", "layer4."))}
    weights = {k for k in late if not k.endswith(statistics)}
    expected = late if bn == "train" else weights
    assert changed(before, after) == expected


def test_unfreeze_from_after_the_feature_layer_is_refused(tiny):
    with pytest.raises(UsageError, match="choose a layer at or before it"):
        session(tiny, config(backbone="resnet18", layer="layer3", unfreeze_from="layer4"))


# ---- learning rates ----------------------------------------------------------------------------
@pytest.mark.slow
def test_parameter_groups_carry_the_learning_rates_the_flags_ask_for(tiny, tmp_path):
    run = tmp_path / "run"
    code, out, err = invoke(
        "finetune", tiny, "--backbone", "vgg16", "--weights", "none", "--image-size", 32,
        "--unfreeze-from", "block4_conv1", "--lr", 0.01, "--lr-head", 0.02, "--lr-mult", 0.5,
        "--schedule", "constant", "--optimizer", "sgd", "--momentum", 0.8,
        "--epochs-head", 1, "--epochs", 1, "--batch-size", 8, "--workers", 0, "--no-augment",
        "--out", run, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    wanted = {"block4": 0.0025, "block5": 0.005, "head": 0.01}
    recorded = json.loads((run / "config.json").read_text())["learning_rates"]
    assert recorded["full"] == pytest.approx(wanted)
    assert recorded["head"] == pytest.approx({"head": 0.02})

    optimizer = load_checkpoint(run / "last.pt")["optimizer"]
    groups = {g["name"]: g for g in optimizer["param_groups"]}
    assert list(groups) == list(wanted)
    assert {n: g["lr"] for n, g in groups.items()} == pytest.approx(wanted)
    assert all(g["momentum"] == 0.8 and g["nesterov"] for g in groups.values())
    history = json.loads((run / "history.json").read_text())
    assert history[0]["lr"] == pytest.approx({"head": 0.02})
    assert history[1]["lr"] == pytest.approx(wanted)


def test_one_cycle_peaks_at_the_requested_rates(tiny):
    s = session(tiny, config(backbone="resnet18", unfreeze_from="layer3", lr=3e-3, lr_mult=0.1))
    optimizer = s.optimizer("full")
    s.scheduler(optimizer, "full", epochs=2)
    peaks = {g["name"]: g["max_lr"] for g in optimizer.param_groups}
    assert peaks == pytest.approx({"layer3": 3e-5, "layer4": 3e-4, "head": 3e-3})
    assert optimizer.param_groups[-1]["lr"] == pytest.approx(3e-3 / 25)  # warm-up start


# ---- lr-find -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_lr_find_restores_weights_optimizer_state_and_rng(tiny):
    c = config(backbone="resnet18", unfreeze_from="layer4", bn="train", dropout=0.3, batch_size=4)

    def prepared():
        s = session(tiny, c)
        optimizer = s.optimizer("full")
        s.set_modes("full")
        return s, optimizer, list(s.training_batches(1))

    def step(s, optimizer, batch):
        torch.manual_seed(123)  # dropout
        return s.train_step(*batch, optimizer, "full")[0]

    a, opt_a, batches = prepared()
    step(a, opt_a, batches[0])  # Adam moments, BN statistics and gradients exist
    weights, state = snapshot(a.net), copy.deepcopy(opt_a.state_dict())
    grads = [None if p.grad is None else p.grad.clone() for p in a.net.parameters()]
    modes = [m.training for m in a.net.modules()]
    rng = torch.get_rng_state()

    result = lr_range_test(
        a.net, opt_a, iter(batches * 10), lambda b: step(a, opt_a, b), num_iter=12
    )

    assert len(result.lrs) >= 2 and result.lrs[0] == pytest.approx(1e-7)
    assert_same(snapshot(a.net), weights)
    assert_same(opt_a.state_dict(), state)
    for p, g in zip(a.net.parameters(), grads, strict=True):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)
    assert [m.training for m in a.net.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)

    # The training that follows is the one that would have happened without the test.
    b, opt_b, _ = prepared()
    step(b, opt_b, batches[0])
    step(a, opt_a, batches[1])
    step(b, opt_b, batches[1])
    assert changed(snapshot(a.net), snapshot(b.net)) == set()


@pytest.mark.slow
def test_lr_find_command_suggests_a_rate_and_writes_the_curve(tiny, tmp_path):
    png = tmp_path / "curve.png"
    code, out, err = invoke(
        "lr-find", tiny, "--backbone", "resnet18", "--weights", "none", "--image-size", 32,
        "--batch-size", 8, "--workers", 0, "--num-iter", 20, "--out", png, "--quiet",
    )  # fmt: skip
    assert code == 0, err
    assert "suggested learning rate" in out or "no suggestion" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_range_test_stops_on_divergence_and_suggests_the_steepest_descent():
    # Noise keeps the lowest loss above zero: with an exact fit SGD can reach a loss of exactly
    # 0.0 (it does on some CPUs), whose gradient is 0 at any learning rate, so it never diverges.
    torch.manual_seed(0)
    x = torch.randn(64, 5)
    y = x @ torch.randn(5, 1) + 0.1 * torch.randn(64, 1)
    model = torch.nn.Linear(5, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)

    def step(_batch) -> float:
        loss = torch.nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    result = lr_range_test(
        model, optimizer, iter(range(1000)), step, start_lr=1e-4, end_lr=100, num_iter=200
    )
    assert result.diverged and len(result.lrs) < 200
    assert 1e-4 < result.suggestion < result.minimum < 5  # SGD on this problem diverges at ~1
    assert result.suggestion == min(result.steepest, result.minimum / 10)
    assert optimizer.param_groups[0]["lr"] == 1.0


# ---- resume ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_after_a_real_kill_continues_from_the_last_checkpoint(shapes, tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable, "-m", "featx.cli", "finetune", str(shapes),
        "--backbone", "mobilenet_v3_small", "--weights", "none", "--image-size", "32",
        "--batch-size", "4", "--epochs-head", "1", "--epochs", "4", "--patience", "0",
        "--workers", "0", "--out", str(run),
    ]  # fmt: skip
    process = subprocess.Popen([*args, "--quiet"], cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "last.pt").exists():
        assert process.poll() is None, process.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    killed = load_checkpoint(run / "last.pt")
    done = len(killed["history"])
    assert 1 <= done < 5 and not (run / "model.featx").exists()

    resumed = subprocess.run([*args, "--resume"], cwd=tmp_path, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"after epoch {done}" in resumed.stderr
    history = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4, 5]
    assert history[:done] == killed["history"]

    # Every epoch is a function of its checkpoint and the seed: as if never interrupted.
    c = config(batch_size=4, epochs_head=1, epochs=4, patience=0)
    whole = finetune(shapes, c, out=tmp_path / "whole", workers=0, quiet=True)
    for a, b in zip(history, whole.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_resume_refuses_other_options_and_a_missing_checkpoint(shapes, tmp_path):
    code, _, err = invoke(
        "finetune", shapes, "--backbone", "resnet18", "--out", tmp_path / "nothing", "--resume"
    )
    assert code == 2
    assert err.startswith("featx: cannot resume: ") and "has no checkpoint last.pt" in err

    c = config(epochs=0)
    finetune(shapes, c, out=tmp_path / "run", workers=0, quiet=True)
    with pytest.raises(UsageError, match=r"--lr was 0\.0001, now 0\.01"):
        finetune(shapes, config(epochs=0, lr=0.01), out=tmp_path / "run", resume=True)
    with pytest.raises(UsageError, match="already holds a fine-tuning run"):
        finetune(shapes, c, out=tmp_path / "run")


# ---- data --------------------------------------------------------------------------------------
def test_without_a_validation_folder_the_split_is_seeded_and_stratified(shapes, shapes_split):
    from featx.data.folders import scan_image_folder

    folder = scan_image_folder(shapes)
    split = training_split(folder, 0.2, seed=0)
    labels = [folder.files[i].label for i in split.validation]
    assert sorted(labels) == [0, 0, 1, 1, 2, 2]
    assert set(split.train) | set(split.validation) == set(range(30))
    assert not set(split.train) & set(split.validation)
    assert training_split(folder, 0.2, seed=0) == split
    assert training_split(folder, 0.2, seed=1).validation != split.validation
    assert "seeded stratified" in split.how

    given = scan_image_folder(shapes_split)
    kept = training_split(given, 0.2, seed=0)
    assert {given.files[i].split for i in kept.validation} == {"validation"}
    assert kept.how == "validation folder"


@pytest.mark.slow
def test_bf16_autocast_trains_on_the_cpu(tiny, tmp_path):
    c = config(precision="bf16", epochs_head=1, epochs=1)
    result = finetune(tiny, c, out=tmp_path / "run", device="cpu", workers=0, quiet=True)
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in result.history)


def test_test_time_views_are_seeded_augmentations_at_input_size():
    from ftdata import shape_image

    preprocessing = get_backbone("resnet18").default_preprocessing()
    image = shape_image("square", np.random.default_rng(1), size=256)
    views = tta_inputs(image, preprocessing, None, 4, seed=3, key=9)
    assert views.shape == (4, 3, 224, 224)
    assert torch.equal(views, tta_inputs(image, preprocessing, None, 4, seed=3, key=9))
    assert len({v.numpy().tobytes() for v in views}) == 4
    assert not torch.equal(views, tta_inputs(image, preprocessing, None, 4, seed=3, key=10))


# ---- outputs, and the model for predict and evaluate -------------------------------------------
@pytest.fixture(scope="module")
def finished(shapes_split, tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    # refit train: the model file is best.pt (test_finetune_refit.py retrains on all images)
    c = config(backbone="resnet18", epochs_head=2, epochs=2, lr=3e-3, class_weights="balanced",
               refit="train")  # fmt: skip
    return c, finetune(shapes_split, c, out=out, workers=0, quiet=True)


@pytest.mark.slow
def test_a_run_writes_its_files(finished):
    c, result = finished
    out = result.out
    for name in ("best.pt", "last.pt", "config.json", "history.json", "metrics.json"):
        assert (out / name).is_file(), name
    assert (out / "history.png").read_bytes()[:4] == b"\x89PNG"
    described = json.loads((out / "config.json").read_text())
    assert described["config"]["augment"] == c.augment.to_dict()
    assert described["network"]["unfreeze_from"] == "conv1"
    assert described["dataset"]["validation"] == "validation folder"
    history = json.loads((out / "history.json").read_text())
    keys = {"epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"}
    assert len(history) == 4 and all(keys <= h.keys() for h in history)
    best = min(history, key=lambda h: h["val_loss"])
    assert result.best_epoch == best["epoch"] == load_checkpoint(out / "best.pt")["epoch"]
    metrics = json.loads((out / "metrics.json").read_text())["validation"]
    assert metrics["n_samples"] == 12
    assert metrics["accuracy"] == pytest.approx(best["val_accuracy"])
    assert metrics["log_loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert set(metrics) >= {"balanced_accuracy", "macro_f1", "per_class", "confusion_matrix"}


@pytest.mark.slow  # a fine-tuning run end to end (the module fixture)
def test_the_model_file_works_with_predict(finished, shapes_split):
    from featx.classify.prediction import predict

    c, result = finished
    s = session(shapes_split, c)
    s.net.load_state_dict(load_checkpoint(result.out / "best.pt")["network"])
    expected, _ = s.predict()
    paths = [str(s.folder.root / s.folder.files[i].path) for i in s.split.validation]
    predictions = predict(result.model, paths, workers=0)
    assert predictions.paths == paths
    np.testing.assert_allclose(predictions.scores, expected, atol=1e-5)


@pytest.mark.slow  # a fine-tuning run end to end (the module fixture)
def test_the_model_file_evaluates_a_store_of_the_fine_tuned_weights(finished, shapes_split):
    from featx.classify.evaluation import evaluate
    from featx.extraction.run import extract

    c, result = finished
    store = extract(
        shapes_split, "resnet18", ["layer4"], weights=str(result.out / "base.safetensors"),
        image_size=32, pool="avg", store=result.out.parent / "tuned.h5", workers=0, quiet=True,
    ).store  # fmt: skip
    evaluation = evaluate(result.model, store, "validation")
    wanted = result.metrics["validation"]
    assert evaluation.metrics["accuracy"] == wanted["accuracy"]
    assert evaluation.metrics["log_loss"] == pytest.approx(wanted["log_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_fitted_mlp_starts_the_head_with_its_pipeline_folded_in(shapes, tmp_path):
    from featx.classify.fitting import fit
    from featx.extraction.run import extract
    from featx.models.file import load_model
    from featx.store.feature_store import FeatureStore

    store = extract(
        shapes, "resnet18", ["layer4"], weights="none", image_size=32, pool="avg",
        store=tmp_path / "s.h5", workers=0, quiet=True,
    ).store  # fmt: skip
    model_path = tmp_path / "mlp.joblib"
    fit(store, "layer4@avg", "mlp", params=["mlp.epochs=5"], pca=8, model=model_path)

    s = session(shapes, config(backbone="resnet18", head=str(model_path)))
    assert s.config.stage_epochs["head"] == 1
    probabilities, _ = s.predict()
    with FeatureStore(store) as opened:
        rows = opened.read("layer4@avg")[list(s.split.validation)]
    _, scores = load_model(model_path).scores(rows)
    np.testing.assert_allclose(probabilities, scores, atol=1e-4)

    with pytest.raises(UsageError, match="use --image-size 32"):
        session(shapes, config(backbone="resnet18", head=str(model_path), image_size=48))
    svm = tmp_path / "svm.joblib"
    fit(store, "layer4@avg", "svm", model=svm)
    with pytest.raises(UsageError, match="only a model of `featx fit --clf logreg`"):
        session(shapes, config(backbone="resnet18", head=str(svm)))


# ---- network structure -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backbone", "blocks", "default"),
    [
        ("vgg16", ["block1", "block2", "block3", "block4", "block5"], "block1_conv1"),
        ("resnet18", ["conv1", "layer1", "layer2", "layer3", "layer4"], "conv1"),
        ("efficientnet_lite0",
         ["conv_stem", *(f"blocks.{i}" for i in range(7)), "conv_head"], "conv_stem"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_blocks_follow_the_architecture(backbone, blocks, default):
    record = get_backbone(backbone)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = record.build().eval()
    net, _ = build_network(record, model, 64, 2)
    assert [b.name for b in net.blocks] == blocks
    assert net.unfreeze_layer_name(record, net.default_unfreeze_start()) == default
    params = {n for b in net.blocks for n in b.params}
    assert params == {n for n, _ in net.base.named_parameters()}


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--unfreeze-from", "block5_conv9"],
         "vgg16 has no layer 'block5_conv9'; closest: block5_conv3, block5_conv2, block5_conv1"),
        (["--rotation", "200"], "--rotation must be at least 0 and at most 180, not 200"),
        (["--shift", "1.5"], "--shift must be at least 0 and at most 1, not 1.5"),
        (["--fill", "wrap"], "Invalid value for '--fill'"),
        (["--no-augment", "--zoom", "0.1"], "augmentation settings were given together with"),
        (["--lr-mult", "3"], "--lr-mult must be above 0 and at most 1, not 3"),
        (["--schedule", "step"], "Invalid value for '--schedule'"),
        (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA or MPS"),
    ],
)  # fmt: skip
@pytest.mark.slow
def test_bad_options_are_one_sentence_with_exit_code_2(tiny, tmp_path, options, message):
    code, _, err = invoke(
        "finetune", tiny, "--backbone", "vgg16", "--weights", "none", "--out", tmp_path / "r",
        *options,
    )  # fmt: skip
    assert code == 2, err
    assert err.startswith(f"featx: {message}") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("lr", math.inf, "--lr must be a finite number, not inf."),
        ("lr_head", math.inf, "--lr-head must be a finite number, not inf."),
        ("weight_decay", math.inf, "--weight-decay must be a finite number, not inf."),
        ("lr", math.nan, "--lr must be a finite number, not nan."),
        ("hidden", 10**20, "--hidden must be at most 65536, not 100000000000000000000."),
        ("seed", 10**20, "--seed must be at most 4294967295, not 100000000000000000000."),
        ("epochs", 10**20, "--epochs must be at most 100000, not 100000000000000000000."),
        ("batch_size", 10**20, "--batch-size must be at most 65536, not 100000000000000000000."),
    ],
)
def test_a_bad_number_is_refused_when_the_config_is_made(option, value, message):
    """Before any work: an infinite learning rate used to fail only after training."""
    with pytest.raises(UsageError) as caught:
        FinetuneConfig(backbone="resnet18", **{option: value})
    assert str(caught.value) == message


def test_every_option_of_the_config_declares_its_help():
    from featx.settings import check_settings, option_spec

    config = FinetuneConfig(backbone="resnet18")
    check_settings(config)
    undeclared = [
        f.name
        for f in dataclasses.fields(FinetuneConfig)
        if f.name != "augment" and option_spec(f) is None
    ]
    assert not undeclared


def test_an_empty_class_folder_is_an_error(shapes, tmp_path):
    data = shapes_folder(tmp_path / "data", 3)
    (data / "empty").mkdir()
    code, _, err = invoke("finetune", data, "--backbone", "resnet18", "--out", tmp_path / "r")
    assert code == 2
    assert err == f"featx: class folder {data / 'empty'} holds no images.\n"


def test_the_command_line_defaults_are_the_configs():
    """The CLI spells its defaults out (importing the config would import torch at start-up);
    they must stay the measured defaults of FinetuneConfig."""
    import dataclasses

    import typer.main

    command = typer.main.get_command(app).commands["finetune"]
    cli = {p.name: p.default for p in command.params}
    for field in dataclasses.fields(FinetuneConfig):
        if field.name in cli and field.default is not dataclasses.MISSING:
            assert cli[field.name] == field.default, field.name
    # the augmentation defaults --help shows are the ones a run uses
    from featx.finetuning.config import FINETUNE_AUGMENT

    helps = {p.name: p.help or "" for p in command.params}
    compared = 0
    for field in dataclasses.fields(FINETUNE_AUGMENT):
        value = getattr(FINETUNE_AUGMENT, field.name)
        said = re.search(r"Default: ([0-9.]+)\.$", helps.get(field.name, ""))
        if said and isinstance(value, float):
            assert float(said[1]) == value, field.name
            compared += 1
    assert compared >= 4
