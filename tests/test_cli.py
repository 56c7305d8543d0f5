"""The command line's own behaviour: usage errors and bad numbers as one `featx:` line with
exit 2 before any work, and help that shows the real defaults. Each case runs the real CLI in
this process (typer's runner, as the `featx` script does); a few run it in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from featx.settings import machine_workers


def featx(
    *args: object, cwd: Path | None = None, columns: int = 80, fresh: bool = False
) -> subprocess.CompletedProcess:
    """`featx ARGS...` at `columns` wide, in this process or, with `fresh`, in a new one."""
    env = {"COLUMNS": str(columns)}
    if fresh:
        return subprocess.run(
            [sys.executable, "-m", "featx.cli", *map(str, args)],
            capture_output=True, text=True, timeout=300, cwd=cwd, env={**os.environ, **env},
        )  # fmt: skip
    from typer.testing import CliRunner

    from featx.cli import app

    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        result = CliRunner().invoke(app, [str(a) for a in args], env=env, prog_name="featx")
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_line(result: subprocess.CompletedProcess, start: str = "featx: ") -> str:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.startswith(start), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["extract", "--bogus"],
        ["extract"],
        ["extract", "data", "--layer", "x"],
        ["extract", "data", "--backbone", "b", "--layer", "x", "--batch-size", "abc"],
        ["extract", "data", "--backbone", "b", "--layer", "x", "--seed", "1e20"],
        ["fit", "--store"],
        ["nosuchcommand"],
        ["layers"],
        ["predict", "--model", "m.featx", "--top-k", "x", "a.jpg"],
        ["evaluate", "--model", "m", "--device", "tpu"],
        ["info", "a", "b"],
        ["merge"],
        ["fit", "--store", "s.h5", "--layer", "x", "--chunk-mb", "abc"],
    ],
    ids=" ".join,
)
def test_parser_errors_are_one_featx_line(args, tmp_path):
    one_line(featx(*args, cwd=tmp_path))


BASE = ["extract", "data", "--backbone", "resnet18", "--layer", "layer1"]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (BASE + ["--batch-size", 10**20], "--batch-size must be"),
        (BASE + ["--image-size", 10**20], "--image-size must be"),
        (BASE + ["--seed", 10**20], "--seed must be"),
        (BASE + ["--workers", 99999999999999999999], f"at most {machine_workers()}"),
        (BASE + ["--augment", 10**20], "--augment must be"),
        (BASE + ["--ray", "local", "--ray-cpus-per-shard", "-1"], "--ray-cpus-per-shard"),
        (BASE + ["--ray", "local", "--ray-cpus-per-shard", "nan"], "--ray-cpus-per-shard"),
        (BASE + ["--ray", "local", "--ray-cpus-per-shard", "inf"], "--ray-cpus-per-shard"),
        (BASE + ["--shard", ""], "--shard"),
        (["predict", "--model", "m", "--tta", 10**20, "a.jpg"], "--tta must be"),
        (["fit", "--store", "s", "--layer", "x", "--chunk-mb", "inf"], "--chunk-mb"),
        (["fit", "--store", "s", "--layer", "x", "--memory-budget", "inf"], "--memory-budget"),
        (["finetune", "d", "--backbone", "b", "--hidden", 10**20], "--hidden must be"),
        (["finetune", "d", "--backbone", "b", "--lr", "inf"], "--lr must be a finite"),
    ],
)
def test_bad_numbers_stop_before_any_work(args, says, tmp_path):
    assert says in one_line(featx(*args, cwd=tmp_path))


@pytest.mark.parametrize(
    "args",
    [["extract", "--bogus"], [*BASE, "--batch-size", 10**20], ["nosuchcommand"]],
    ids=lambda args: " ".join(map(str, args)),
)
def test_errors_are_one_featx_line_in_a_fresh_process(args, tmp_path):
    one_line(featx(*args, cwd=tmp_path, fresh=True))


def test_augment_config_on_a_fifo_is_refused(tmp_path):
    """In a fresh process: reading the FIFO would block for ever."""
    fifo = tmp_path / "aug.toml"
    os.mkfifo(fifo)
    err = one_line(
        featx("augment-preview", tmp_path, "--augment-config", fifo, cwd=tmp_path, fresh=True)
    )
    assert "not a regular file" in err


def test_a_newline_in_a_path_stays_on_one_line(tmp_path):
    err = one_line(featx("info", tmp_path / "a\nb.h5", cwd=tmp_path))
    assert "a\\nb.h5" in err


@pytest.mark.parametrize("command", ["augment-preview", "finetune", "lr-find"])
def test_help_shows_the_augmentation_defaults_a_run_uses(command):
    """Each augmentation flag comes from its AugmentConfig field; left out, it keeps the
    settings' value, which --help names: the classic recipe, or fine-tuning's lighter one."""
    import dataclasses

    from featx.data.augment_config import AugmentConfig
    from featx.finetuning.config import FINETUNE_AUGMENT
    from featx.settings import flag_of

    base = AugmentConfig() if command == "augment-preview" else FINETUNE_AUGMENT
    entries = _help_entries(command)
    for field in dataclasses.fields(AugmentConfig):
        value = getattr(base, field.name)
        shown = _shown_default(entries[f"--{flag_of(field)}"])
        if isinstance(value, bool):
            assert shown == ("on" if value else "off"), field.name
        elif isinstance(value, float):
            assert float(shown) == pytest.approx(value), field.name
        else:
            assert shown == str(value), field.name


def test_help_is_literal_and_has_no_type_placeholders():
    text = featx("extract", "--help").stdout
    flat = " ".join(text.replace("│", " ").split())
    assert "featx[ray]" in flat
    assert "named after the data, backbone, weights and image size" in flat
    for placeholder in ("<list[str]>", "<bool>", "{data_dir}", "<str>", "<int>"):
        assert placeholder not in text
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.fixture
def logged_store(tmp_path: Path) -> Path:
    """A store whose run log holds three fit runs."""
    from test_runlog import make_store

    from featx.runlog import record_run

    store = make_store(tmp_path / "birds.h5")
    for i, accuracy in enumerate((0.5, 0.75, 0.625)):
        record_run(
            store,
            "fit",
            settings={"layer": "avgpool", "classifier": "logreg", "params": {"C": 10.0**i}},
            scores={"validation": {"accuracy": accuracy}},
        )
    return store


def test_runs_format_gives_every_run_as_json_csv_or_a_table(logged_store, tmp_path):
    import csv
    import io
    import json

    from featx.cli.show import RunsFormat
    from featx.report.table import FORMATS

    assert tuple(f.value for f in RunsFormat) == FORMATS
    as_json = featx("runs", "--store", logged_store, "--format", "json", cwd=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    accuracies = [r["scores"]["validation"]["accuracy"] for r in json.loads(as_json.stdout)]
    assert accuracies == [0.75, 0.625, 0.5]
    as_csv = featx("runs", "--store", logged_store, "--format", "csv", cwd=tmp_path)
    assert len(list(csv.DictReader(io.StringIO(as_csv.stdout)))) == 3
    table = featx("runs", "--store", logged_store, cwd=tmp_path).stdout
    assert "0.7500" in table and max(map(len, table.splitlines())) <= 80
    bad = one_line(featx("runs", "--store", logged_store, "--format", "xml", cwd=tmp_path))
    assert "'--format'" in bad and "'xml'" in bad


def test_report_best_collapses_the_other_runs(logged_store, tmp_path):
    from featx.cli.show import REPORT_BEST
    from featx.report.page import DEFAULT_BEST

    assert REPORT_BEST == DEFAULT_BEST
    pages = {}
    for best in (1, None):
        out = tmp_path / f"report-{best}.html"
        args = ["report", out, "--store", logged_store] + (["--best", best] if best else [])
        result = featx(*args, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        pages[best] = out.read_text()
    assert "2 more runs" in pages[1]
    assert "more runs" not in pages[None]  # the default shows all three in full
    assert "--best must be at least 0" in one_line(
        featx("report", tmp_path / "r.html", "--store", logged_store, "--best", -1, cwd=tmp_path)
    )


# ---- every option's default, as the settings class declares it, the parser and --help -------
def _settings_of(command: str) -> list[tuple[type, tuple[str, ...] | None, tuple[str, ...]]]:
    """The settings classes whose options `command` takes: (class, only, left out)."""
    from featx.classify.fit_settings import FitSettings
    from featx.cli.declare import Shared
    from featx.extraction.settings import ExtractSettings, PredictSettings
    from featx.finetuning.config import FinetuneConfig

    return {
        "extract": [(ExtractSettings, None, ())],
        "predict": [(PredictSettings, None, ()), (Shared, ("trust_pickle",), ())],
        "evaluate": [(PredictSettings, None, ("tta", "top_k")), (Shared, ("trust_pickle",), ())],
        "fit": [(FitSettings, None, ()), (Shared, ("quiet",), ())],
        "finetune": [
            (FinetuneConfig, None, ()),
            (Shared, ("workers", "device", "trust_pickle", "quiet"), ()),
        ],
        "lr-find": [
            (
                FinetuneConfig,
                None,
                ("epochs_head", "epochs", "lr", "lr_head", "schedule", "patience", "refit"),
            ),
            (Shared, ("workers", "device", "quiet"), ()),
        ],
    }[command]


def _help_entries(command: str) -> dict[str, str]:
    """--FLAG -> its help text as `featx COMMAND --help` shows it at 200 columns."""
    result = featx(command, "--help", columns=200)
    assert result.returncode == 0, result.stderr
    entries: dict[str, str] = {}
    flag = None
    for line in result.stdout.splitlines():
        text = line.strip().strip("│").strip().lstrip("* ")
        if text.startswith("--"):
            flag = text.split()[0]
            entries[flag] = text
        elif flag and text and not text.startswith(("╭", "╰")):
            entries[flag] += " " + text
        elif text.startswith(("╭", "╰")):
            flag = None
    return entries


def _shown_default(entry: str) -> str | None:
    import re

    found = re.search(r"\[default: (.*?)\]", entry) or re.search(r"Default: (.*?)\.(?:\s|$)", entry)
    return found.group(1) if found else None


def _expected(field, default) -> tuple[str, ...]:
    """What --help may show for `default`: the default's text, or the field's default_text;
    nothing for None or a False flag."""
    import enum

    from featx.settings import flag_of, option_spec

    spec = option_spec(field)
    if default is None and spec.default_text:
        return (spec.default_text,)
    if default is None:  # nothing, or what the field's own help says None means
        return (None, _shown_default(spec.help))
    if isinstance(default, enum.Enum):
        return (str(default.value),)
    if isinstance(default, bool):
        return (flag_of(field) if default else f"no-{flag_of(field)}", None)
    if isinstance(default, list):
        return (", ".join(map(str, default)) or None,)
    return (str(default),)


@pytest.mark.parametrize(
    "command", ["extract", "predict", "evaluate", "fit", "finetune", "lr-find"]
)
def test_help_and_parser_defaults_are_the_settings_defaults(command):
    """Each option comes from its settings field: the parser's default is the field's, and
    --help shows that default (or the field's default text)."""
    import dataclasses
    import enum

    import typer.main

    from featx.cli import app
    from featx.settings import flag_of, option_spec

    click_command = typer.main.get_command(app).commands[command]
    params = {p.name: p for p in click_command.params}
    entries = _help_entries(command)
    for cls, only, left_out in _settings_of(command):
        for field in dataclasses.fields(cls):
            if option_spec(field) is None or (only is not None and field.name not in only):
                continue
            if field.name in left_out:
                assert f"--{flag_of(field)}" not in entries
                continue
            default = field.default_factory() if callable(field.default_factory) else field.default
            if params[field.name].required:  # no default on the command line
                assert "[required]" in entries[f"--{flag_of(field)}"]
                continue
            parsed = params[field.name].default
            parsed = parsed.value if isinstance(parsed, enum.Enum) else parsed
            want = default.value if isinstance(default, enum.Enum) else default
            assert parsed == want or (parsed is None and want == []), (field.name, parsed)
            shown = _shown_default(entries[f"--{flag_of(field)}"])
            assert shown in _expected(field, default), (field.name, shown)


@pytest.mark.slow
def test_merge_replaces_another_store_only_with_overwrite(tmp_path):
    from conftest import make_folder

    from featx.extraction.run import extract
    from featx.store.feature_store import FeatureStore

    data = tmp_path / "pets"
    make_folder(data, {"cat": 3, "dog": 3})
    options = {"backbone": "resnet18", "weights": "none", "image_size": 32, "workers": 0,
               "device": "cpu", "quiet": True, "pool": "avg"}  # fmt: skip
    shards = [extract(data, store=tmp_path / "s.h5", shard=(i, 2), layers=["layer2"], **options)
              .store for i in range(2)]  # fmt: skip
    out = extract(data, store=tmp_path / "out.h5", layers=["layer1"], **options).store
    with FeatureStore(out) as other:
        before = other.layers
    assert "overwrite" in one_line(featx("merge", out, *shards, cwd=tmp_path))
    with FeatureStore(out) as kept:
        assert kept.layers == before
    result = featx("merge", "--overwrite", out, *shards, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with FeatureStore(out) as merged:
        assert merged.layers != before and merged.n_rows == 6
