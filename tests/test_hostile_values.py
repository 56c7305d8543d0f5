"""Hostile values on the command line: usage errors, numbers past any sane bound, counts the
machine cannot hold, paths that would split a message, a FIFO given as a file. Each is refused
in one `featx:` sentence with exit 2 before any work (no store, no partial folder).

These cases cannot crash the interpreter, so they run in this process through typer's runner;
only the Ray cluster check starts a process of its own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from conftest import FEATX, assert_one_sentence_error, invoke_featx, make_folder

from featx.errors import UsageError
from featx.extraction.shard import parse_shard
from featx.settings import machine_workers

BIG = str(10**20)
EXTRACT = ["extract", "data", "--backbone", "resnet18", "--layer", "layer1"]
FIT = ["fit", "--store", "s.h5", "--layer", "x"]
FINETUNE = ["finetune", "data", "--backbone", "resnet18"]
PREDICT = ["predict", "--model", "m.featx"]

# The parser's own errors: each used to print a box with no `featx:` line.
PARSER_CASES = [
    ["extract", "--bogus"],
    ["extract"],
    ["extract", "data", "--layer", "x"],
    [*EXTRACT, "--batch-size", "abc"],
    [*EXTRACT, "--batch-size", "1e20"],
    ["fit", "--store"],
    ["nosuchcommand"],
    ["layers"],
    [*PREDICT, "--top-k", "x", "a.jpg"],
    ["evaluate", "--model", "m", "--device", "tpu"],
    ["info", "a", "b"],
    ["merge"],
    [*FIT, "--chunk-mb", "abc"],
]


@pytest.mark.parametrize("args", PARSER_CASES, ids=" ".join)
def test_a_parser_error_is_one_featx_line(args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = invoke_featx(*args)
    assert_one_sentence_error(done)
    assert len(done.stderr.splitlines()) == 1, done.stderr  # no box around it


# (arguments, words of the refusal)
NUMBER_CASES = {
    "extract --batch-size 1e20": ([*EXTRACT, "--batch-size", BIG], "--batch-size must be"),
    "extract --image-size 1e20": ([*EXTRACT, "--image-size", BIG], "--image-size must be"),
    "extract --seed 1e20": ([*EXTRACT, "--seed", BIG], "--seed must be"),
    "predict --tta 1e20": ([*PREDICT, "--tta", BIG, "a.jpg"], "--tta must be"),
    "predict --batch-size 1e20": ([*PREDICT, "--batch-size", BIG, "a.jpg"], "--batch-size"),
    "finetune --hidden 1e20": ([*FINETUNE, "--hidden", BIG], "--hidden must be"),
    "finetune --seed 1e20": ([*FINETUNE, "--seed", BIG], "--seed must be"),
    "fit --chunk-mb inf": ([*FIT, "--chunk-mb", "inf"], "--chunk-mb"),
    "fit --memory-budget inf": ([*FIT, "--memory-budget", "inf"], "--memory-budget"),
    "probe --memory-budget inf": (
        ["probe", "--store", "s.h5", "--memory-budget", "inf"],
        "--memory-budget",
    ),
    "finetune --lr inf": ([*FINETUNE, "--lr", "inf"], "--lr must be a finite number"),
    "finetune --lr-head inf": ([*FINETUNE, "--lr-head", "inf"], "--lr-head must be a finite"),
    "finetune --weight-decay inf": (
        [*FINETUNE, "--weight-decay", "inf"],
        "--weight-decay must be a finite",
    ),
    "mlp hidden_sizes=(1e11,)": (
        [*FIT, "--clf", "mlp", "--param", "hidden_sizes=(100000000000,)"],
        "hidden_sizes",
    ),
    "rf max_depth=1e20": ([*FIT, "--clf", "rf", "--param", "max_depth=1e20"], "max_depth"),
    "--ray-cpus-per-shard -1": (
        [*EXTRACT, "--ray", "local", "--ray-cpus-per-shard", "-1"],
        "--ray-cpus-per-shard",
    ),
    "--ray-cpus-per-shard nan": (
        [*EXTRACT, "--ray", "local", "--ray-cpus-per-shard", "nan"],
        "--ray-cpus-per-shard",
    ),
    "--ray-cpus-per-shard inf": (
        [*EXTRACT, "--ray", "local", "--ray-cpus-per-shard", "inf"],
        "--ray-cpus-per-shard",
    ),
    "--ray-gpus-per-shard nan": (
        [*EXTRACT, "--ray", "local", "--ray-gpus-per-shard", "nan"],
        "--ray-gpus-per-shard",
    ),
    # resources: every count has an upper bound from the machine
    "extract --workers 1e20": (
        [*EXTRACT, "--workers", "99999999999999999999"],
        f"at most {machine_workers()}",
    ),
    "finetune --workers 1e20": (
        [*FINETUNE, "--workers", "99999999999999999999"],
        f"at most {machine_workers()}",
    ),
    "extract --augment 1e20": ([*EXTRACT, "--augment", BIG], "--augment must be"),
    "--shard ''": ([*EXTRACT, "--shard", ""], "--shard"),
}


@pytest.mark.parametrize("case", list(NUMBER_CASES))
def test_a_number_past_any_bound_is_refused_before_any_work(case, tmp_path, monkeypatch):
    args, words = NUMBER_CASES[case]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "cat").mkdir(parents=True)
    assert words in assert_one_sentence_error(invoke_featx(*args))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


@pytest.mark.parametrize("command", ["augment-preview", "finetune", "lr-find"])
def test_an_augment_config_on_a_fifo_is_refused_without_blocking(command, tmp_path):
    fifo = tmp_path / "aug.toml"
    os.mkfifo(fifo)
    args = [command, tmp_path, "--augment-config", fifo]
    if command != "augment-preview":
        args += ["--backbone", "resnet18"]
    assert "not a regular file" in assert_one_sentence_error(invoke_featx(*args))


def test_a_newline_in_a_path_stays_on_one_line(tmp_path):
    message = assert_one_sentence_error(invoke_featx("info", tmp_path / "a\nb.h5"))
    assert "a\\nb.h5" in message


@pytest.mark.parametrize(
    ("env", "shard"),
    [
        # --array=0-6:2: tasks 0, 2, 4, 6
        ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "0",
          "SLURM_ARRAY_TASK_MAX": "6", "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),
        # --array=1,4,7: an evenly spaced list
        ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
          "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_STEP": "3"}, (2, 3)),
        ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"},
         (2, 4)),
    ],
)  # fmt: skip
def test_a_slurm_array_with_a_step_maps_each_task_to_its_shard(env, shard, monkeypatch):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert parse_shard("slurm") == shard


def test_an_uneven_slurm_array_is_refused(tmp_path, monkeypatch):
    # --array=1,2,7: three tasks that no step spaces evenly
    uneven = {"ID": "2", "COUNT": "3", "MIN": "1", "MAX": "7"}
    for name, value in uneven.items():
        monkeypatch.setenv(f"SLURM_ARRAY_TASK_{name}", value)
    with pytest.raises(UsageError):
        parse_shard("slurm")
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "data", {"cat": 2, "dog": 2}, size=(40, 30))
    assert "slurm" in assert_one_sentence_error(invoke_featx(*EXTRACT, "--shard", "slurm"))


@pytest.mark.slow
def test_asking_ray_for_a_gpu_no_node_has_is_refused_not_waited_for(tmp_path):
    """Ray would wait forever for a worker no node can hold: a real process, as Ray starts."""
    pytest.importorskip("ray")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    make_folder(tmp_path / "data", {"cat": 2, "dog": 2}, size=(40, 30))
    args = [*EXTRACT, "--ray", "local", "--ray-gpus-per-shard", "1", "--weights", "none"]
    done = subprocess.run([*FEATX, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert "--ray-gpus-per-shard 1" in assert_one_sentence_error(done)
    assert not list(Path(tmp_path).glob("*.partial"))
