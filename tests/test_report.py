"""The HTML report of logged runs: its content, escaping, sections per store, the `featx runs`
/ `featx report` functions and their outputs, and what a crafted log or a bad OUT does."""

from __future__ import annotations

import math
import os
import re
import sqlite3
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from markupsafe import escape
from PIL import Image
from test_runlog import META, REPO, make_store

from featx.errors import UsageError
from featx.report import report_command, runs_command, write_report
from featx.runlog import log_path, read_runs, record_run

HOSTILE = '<script>alert("x")</script>'
CLASSES = ["bird", "cat", HOSTILE]


def _metrics(accuracy: float, macro_f1: float, matrix: list[list[int]]) -> dict:
    """A classification_metrics()-shaped dict."""
    return {
        "n_samples": int(np.sum(matrix)),
        "accuracy": accuracy,
        "balanced_accuracy": accuracy,
        "macro_f1": macro_f1,
        "log_loss": 0.5,
        "per_class": {
            name: {"precision": 0.5 + i / 10, "recall": 0.6, "f1": 0.55, "support": sum(row)}
            for i, (name, row) in enumerate(zip(CLASSES, matrix, strict=True))
        },
        "confusion_matrix": matrix,
        "class_names": CLASSES,
    }


def _history(epochs: int) -> list[dict]:
    return [
        {
            "epoch": e,
            "stage": "head" if e <= 2 else "full",
            "stage_epoch": e if e <= 2 else e - 2,
            "train_loss": 1.5 / e,
            "train_accuracy": 1 - 0.5 / e,
            "val_loss": 1.6 / e + 0.05,
            "val_accuracy": 1 - 0.6 / e,
            "lr": {"head": 1e-3},
        }
        for e in range(1, epochs + 1)
    ]


def _lr_find() -> dict:
    lrs = list(np.geomspace(1e-7, 1.0, 40))
    losses = [2.0 - 1.2 * math.exp(-((math.log10(lr) + 2.5) ** 2)) + (lr > 0.3) for lr in lrs]
    return {"lrs": lrs, "losses": losses, "smoothed": losses, "suggestion": 1e-3}


@pytest.fixture
def logged(tmp_path: Path) -> dict:
    """Two stores with a fit, a fine-tune (history, lr-finder curve, preview PNG), an
    evaluation and a fit whose preview file is gone; returns paths and expected scores."""
    return _logged(tmp_path)


@pytest.fixture(scope="module")
def default_page(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The report of `logged`'s runs with the default options, written once for the tests
    that only read it."""
    return _page(_logged(tmp_path_factory.mktemp("logged")))


def _logged(tmp_path: Path) -> dict:
    (tmp_path / "stores").mkdir()
    a = make_store(tmp_path / "stores" / "birds.h5")
    b = make_store(tmp_path / "stores" / "pets.h5", {**META, "backbone": "vgg16"})
    preview = tmp_path / "stores" / "preview.png"
    gradient = np.tile(np.linspace(0, 255, 120, dtype=np.uint8), (60, 1))
    Image.fromarray(np.dstack([gradient, gradient[::-1], gradient])).save(preview)
    record_run(
        a,
        "fit",
        settings={"layer": "avgpool", "classifier": "logreg", "params": {"C": 0.5}},
        scores={
            "validation": _metrics(0.8125, 0.8, [[3, 1, 0], [0, 4, 0], [0, 0, 2]]),
            "test": _metrics(0.75, 0.7, [[2, 1, 0], [1, 3, 0], [0, 0, 1]]),
        },
        model_path="models/logreg.joblib",
        command="featx fit stores/birds.h5 --classifier logreg",
    )
    record_run(
        a,
        "finetune",
        settings={"backbone": "resnet18", "lr": 0.001, "epochs": 5},
        scores={"validation": _metrics(0.9375, 0.93, [[4, 0, 0], [0, 4, 0], [1, 0, 1]])},
        details={"history": _history(5), "lr_find": _lr_find(), "augment_preview": str(preview)},
        command="featx finetune data --backbone resnet18",
    )
    record_run(
        b,
        "evaluate",
        settings={"classifier": "svm"},
        scores={"test": _metrics(0.625, 0.6, [[1, 1, 0], [1, 2, 0], [0, 0, 0]])},
    )
    record_run(
        b,
        "fit",
        settings={"layer": "fc7", "classifier": "knn", "params": {"k": 5}},
        scores={"validation": {"accuracy": 0.5}},
        details={"augment_preview": str(tmp_path / "gone.png")},
    )
    # rank order by validation, else test accuracy, with the text the leaderboard shows
    expected = [
        ("finetune", "0.9375", "-", "0.9300"),
        ("fit", "0.8125", "0.7500", "0.8000"),
        ("evaluate", "-", "0.6250", "0.6000"),
        ("fit", "0.5000", "-", "-"),
    ]
    return {"a": a, "b": b, "tmp": tmp_path, "expected": expected}


def _page(logged: dict, **kwargs) -> str:
    out = write_report(logged["tmp"] / "out" / "report.html", read_runs([logged["a"], logged["b"]]),
                       **kwargs)  # fmt: skip
    return out.read_text(encoding="utf-8")


def test_report_holds_every_run_escaped_and_self_contained(default_page: str) -> None:
    page = default_page
    assert HOSTILE not in page and str(escape(HOSTILE)) in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    assert not re.search(r"url\((?!#)", page)  # only references inside the page
    assert page.count('<section class="run"') == 4
    assert page.count("<tr data-run=") == 4
    assert page.count('<table class="cm">') == 4  # fit: validation + test; finetune; evaluate
    assert page.count('<div class="chart history"><svg') == 1
    assert page.count('<div class="chart lr-find"><svg') == 1
    assert "learning-rate range test" in page and "Suggested learning rate" in page
    assert "unfrozen" in page and ">validation</text>" in page  # SVG with real text
    assert page.count('src="data:image/png;base64,') == 1
    assert "gone.png is missing, not a PNG, or outside the store's folder" in page
    for text in ("resnet18", "vgg16", "resize 256, center crop 224", "f00d" * 16, "2.5.0"):
        assert text in page
    assert "featx extract data" in page  # the store's history
    assert page.count("<script>") == 1 and "script-src 'sha256-" in page


def test_one_section_per_store_and_only_the_best_runs_in_full(logged: dict) -> None:
    page = _page(logged, best=1)
    stores = re.findall(r'<section class="store" id="store-\d+">\s*<h2>Store ([^<]+)</h2>', page)
    assert stores == ["birds.h5", "pets.h5"]  # the store with the best run first
    birds, pets = page.split('<section class="store"')[1:]
    assert birds.count("<tr data-run=") == 2 and pets.count("<tr data-run=") == 2
    assert page.count('<section class="run"') == 2
    assert page.count('<details class="run"') == 2
    assert birds.index('<section class="run" id="run-birds.h5-2"') < birds.index(
        '<details class="run" id="run-birds.h5-1"'
    )  # the fine-tune (0.9375) in full, the fit (0.8125) collapsed
    assert "1 more runs" in birds and "1 more runs" in pets


def test_leaderboard_params_are_summarised_and_given_in_full_on_expansion(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s.h5")
    augment = {"rotation": 0, "shift": 0.1, "shear": 0, "zoom": 0.1, "flip": True, "p": 0.5}
    params = {"unfreeze_from": "layer3", "epochs_head": 100, "epochs": 20, "lr": 0.001,
              "augment": augment, "seed": 0}  # fmt: skip
    record_run(store, "finetune", settings={"classifier": "finetune", "params": params},
               scores={"validation": {"accuracy": 0.9}})  # fmt: skip
    page = write_report(tmp_path / "r.html", read_runs([store])).read_text()
    cell = page[page.index('<td class="params wrap">') :]
    cell = cell[: cell.index("</td>")]
    summary = re.search(r"<summary>([^<]*)</summary>", cell)[1]
    assert summary == "unfreeze_from=layer3, epochs_head=100, epochs=20, lr=0.001, +2 more"
    assert str(escape('"rotation": 0')) in cell  # the whole value, on expansion
    assert '<a href="#run-s.h5-1" title="s.h5-1">#1</a>' in page


def test_runs_and_report_commands_take_stores_logs_or_nothing(
    logged: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, tmp = logged["a"], logged["b"], logged["tmp"]
    by_store = runs_command([a, b], fmt="wide")
    assert runs_command([log_path(a), b], fmt="wide") == by_store
    monkeypatch.chdir(tmp)
    assert runs_command([], fmt="wide") == by_store  # every log under ./stores
    body = by_store.splitlines()[2:]
    assert len(body) == 4
    for line, (kind, val, test, f1) in zip(body, logged["expected"], strict=True):
        assert line.split()[2] == kind
        assert f" {val} " in line and f" {test} " in line and f" {f1} " in line
    assert len(runs_command([a]).splitlines()) == 2 + 2
    out = report_command(Path("r.html"), [])
    assert out == Path("r.html") and out.read_text().count("<tr data-run=") == 4
    lonely = make_store(tmp / "lonely.h5")
    with pytest.raises(UsageError, match="nothing to report"):
        report_command(tmp / "x.html", [lonely])
    (tmp / "empty").mkdir()
    monkeypatch.chdir(tmp / "empty")
    with pytest.raises(UsageError, match=r"No run logs \(\*\.runs\.sqlite\) under \./stores"):
        runs_command([])


def _long_runs(tmp_path: Path) -> Path:
    store = make_store(tmp_path / "flowers-vgg16-default-std.h5")
    augment = {"rotation": 0, "shift": 0.1, "shear": 0, "zoom": 0.1, "flip": True}
    for i in range(3):
        record_run(store, "finetune" if i else "fit",
                   settings={"layer": "features.28", "classifier": "logreg",
                             "params": {"C": 0.5 + i, "augment": augment, "epochs": 20}},
                   scores={"validation": {"accuracy": 0.5 + i / 10, "macro_f1": 0.4},
                           "test": {"accuracy": 0.45}})  # fmt: skip
    return store


def test_runs_fits_the_width_and_wide_gives_every_column(tmp_path: Path) -> None:
    store = _long_runs(tmp_path)
    wide = runs_command([store], fmt="wide").splitlines()
    assert max(map(len, wide)) > 150
    assert wide[0].split("  ")[0] == "rank" and "time" in wide[0] and "store" in wide[0]
    assert '"shift":0.1' in wide[2]
    for width in (100, 80, 60):
        lines = runs_command([store], width=width).splitlines()
        assert max(map(len, lines)) <= width, (width, lines)
        header = lines[0]
        for column in ("rank", "run", "val acc", "test acc"):
            assert column in header
        assert "flowers-vgg16-default-std.h5-3" in lines[2]
    assert "params" in runs_command([store], width=100).splitlines()[0]
    # without a terminal the default is 100 columns
    code = f"from featx.report import runs_command\nprint(runs_command([{str(store)!r}]))\n"
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    done = subprocess.run([sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 5 and max(map(len, lines)) <= 100 and "params" in lines[0]


def test_runs_as_json_and_csv_give_every_field(tmp_path: Path) -> None:
    import csv
    import json

    store = _long_runs(tmp_path)
    record_run(store, "evaluate", settings={"classifier": "=HYPERLINK(\"http://x\")"},
               scores={"test": {"accuracy": float("nan")}}, command="-2+3")  # fmt: skip
    records = json.loads(runs_command([store], fmt="json"))
    assert [r["rank"] for r in records] == [1, 2, 3, 4]
    first = records[0]
    assert first["run"] == "flowers-vgg16-default-std.h5-3" and first["val_accuracy"] == 0.7
    assert first["params"]["augment"]["shift"] == 0.1 and first["meta"] == META
    assert {"settings", "scores", "details", "command", "host", "pid", "model_path"} <= set(first)
    assert records[3]["scores"]["test"]["accuracy"] is None  # NaN as null: standard JSON
    rows = list(csv.DictReader(runs_command([store], fmt="csv").splitlines()))
    assert len(rows) == 4 and set(rows[0]) == set(first)
    assert json.loads(rows[0]["params"])["augment"]["zoom"] == 0.1
    assert rows[3]["classifier"] == '\'=HYPERLINK("http://x")' and rows[3]["command"] == "'-2+3"
    assert rows[3]["test_accuracy"] == "" and rows[0]["val_accuracy"] == "0.7"
    with pytest.raises(UsageError, match="--format must be one of table, wide, json, csv"):
        runs_command([store], fmt="xml")


def test_report_of_a_log_whose_store_was_never_readable(tmp_path: Path) -> None:
    record_run(tmp_path / "missing.h5", "fit", settings={}, scores={"test": {"accuracy": 1.0}})
    with sqlite3.connect(log_path(tmp_path / "missing.h5")) as conn:
        assert conn.execute("SELECT meta FROM runs").fetchone()[0] is None
    page = write_report(tmp_path / "r.html", read_runs(logs=[log_path(tmp_path / "missing.h5")]))
    assert "no provenance was readable" in page.read_text()


def test_report_without_matplotlib_says_so_instead_of_charts(logged: dict) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from featx.report import report_command\n"
        f"report_command({str(logged['tmp'] / 'r.html')!r}, [{str(logged['a'])!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    page = (logged["tmp"] / "r.html").read_text()
    assert page.count("<tr data-run=") == 2 and "<svg" not in page
    assert page.count("Charts need matplotlib: pip install featx[plot].") == 2


def test_a_crafted_log_embeds_no_file_outside_the_stores_folder(tmp_path: Path) -> None:
    (tmp_path / "stores").mkdir()
    store = make_store(tmp_path / "stores" / "s.h5")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (7, 5), "red").save(secret)
    (tmp_path / "stores" / "link.png").symlink_to(secret)
    inside = tmp_path / "stores" / "inside.png"
    Image.new("RGB", (3, 3), "blue").save(inside)
    for name in (str(secret), "../secret.png", "link.png", "/dev/zero", "inside.png"):
        record_run(store, "finetune", settings={}, scores={"validation": {"accuracy": 0.5}},
                   details={"augment_preview": name})  # fmt: skip
    page = write_report(tmp_path / "r.html", read_runs([store])).read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    import base64

    assert [base64.b64decode(e) for e in embedded] == [inside.read_bytes()]
    assert page.count("is missing, not a PNG, or outside the store's folder") == 4


def _one_sentence(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("featx: ") and lines[0].endswith("."), lines
    return lines[0]


@pytest.mark.slow
def test_report_outputs_that_cannot_be_written_are_one_sentence(logged: dict, mount) -> None:
    from conftest import run_featx

    tmp, store = logged["tmp"], logged["a"]
    (tmp / "folder").mkdir()
    (tmp / "afile").write_text("x")
    readonly = mount("size=1m")
    subprocess.run(["mount", "-o", "remount,ro", str(readonly)], check=True)
    full = mount("size=64k")
    (full / "filler").write_bytes(b"\0" * (64 << 10))
    cases = {
        tmp / "folder": "is a folder",
        tmp / "afile" / "r.html": "is not a folder",
        readonly / "r.html": "read-only",
        full / "r.html": "disk full",
    }
    for out, words in cases.items():
        done = run_featx("report", out, "--store", store, cwd=tmp)
        assert words in _one_sentence(done), (out, done.stderr)
    assert sorted(p.name for p in full.iterdir()) == ["filler"]  # no temporary file left
    assert sorted(p.name for p in (tmp / "folder").iterdir()) == []


# ---- probes and the ladder -------------------------------------------------------------------
SVG = "{http://www.w3.org/2000/svg}"


def _probe_charts(page: str) -> list[ET.Element]:
    found = re.findall(r'<div class="chart probe">(<svg.*?</svg>)\s*</div>', page, flags=re.S)
    return [ET.fromstring(svg) for svg in found]


def _marker_xs(svg: ET.Element, split: str) -> list[float]:
    """The x of every marker of the chart's `split` line."""
    line = next(g for g in svg.iter(f"{SVG}g") if g.get("id") == f"probe-{split}")
    return [float(u.get("x")) for u in line.iter(f"{SVG}use")]


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> dict:
    """A digits store with two real probe calls started in the same second, a real fit of a
    logistic regression on its cache and a fine-tune logged as `featx finetune` logs it
    (made once: the tests only read its log)."""
    from test_probe import digits_store

    from featx.classify.fitting import fit
    from featx.classify.probing import probe

    tmp_path = tmp_path_factory.mktemp("probed")
    (tmp_path / "stores").mkdir()
    store = digits_store(
        tmp_path / "stores" / "digits.h5", splits=("train", "validation", "test"), per_class=15
    )
    results = [probe(store, tol=1e-3), probe(store, tol=1e-3, layers=["noisy", "pixels"])]
    fit(store, "pixels", "logreg", refit="train")
    record_run(
        store, "finetune",
        settings={"layer": "pixels", "classifier": "finetune", "params": {"lr": 1e-3}},
        scores={"validation": {"accuracy": 0.97, "macro_f1": 0.96},
                "test": {"accuracy": 0.95, "macro_f1": 0.94}},
    )  # fmt: skip
    return {"store": store, "results": results, "tmp": tmp_path}


@pytest.mark.slow
def test_a_probe_is_a_curve_against_depth_and_one_leaderboard_row(probed: dict) -> None:
    runs = read_runs([probed["store"]])
    assert [r.kind for r in runs] == ["probe"] * 5 + ["fit", "finetune"]
    page = write_report(probed["tmp"] / "report.html", runs).read_text(encoding="utf-8")
    charts = _probe_charts(page)
    assert len(charts) == 2  # one per probe call, not one per layer
    charts.sort(key=lambda svg: len(_marker_xs(svg, "validation")), reverse=True)
    for svg, result in zip(charts, probed["results"], strict=True):  # 3 layers, then 2
        for split in ("validation", "test"):
            xs = _marker_xs(svg, split)
            assert len(xs) == len(result.layers) and xs == sorted(xs) and len(set(xs)) == len(xs)
        texts = [t.text for t in svg.iter(f"{SVG}text") if t.text]
        names = [r.layer for r in result.layers]
        assert [t for t in texts if t in names] == names  # the axis, in network order
        for layer in result.layers:
            assert f"C={layer.chosen['C']:.3g}" in texts
    board = page.split('class="leaderboard"')[1].split("</table>")[0]
    rows = re.findall(r'<tr data-run="([^"]+)"', board)
    best = [r.key for r in runs if r.kind == "probe" and r.settings["probe"]["best"]]
    assert sorted(rows) == sorted([*best, runs[-2].key, runs[-1].key])
    assert "best of 3 layers" in board and "best of 2 layers" in board


@pytest.mark.slow
def test_the_ladder_compares_best_probe_head_and_fine_tune(probed: dict) -> None:
    runs = read_runs([probed["store"]])
    page = write_report(probed["tmp"] / "report.html", runs).read_text(encoding="utf-8")
    table = page.split('<table class="ladder">')[1].split("</table>")[0]
    steps = re.findall(r'<th scope="row">([^<]+)</th><td><a href="#run-([^"]+)"', table)
    best = max(r.metric("validation", "accuracy") for r in runs if r.kind == "probe")
    probes = [r for r in runs if r.kind == "probe"]
    tops = {r.key: r for r in probes if r.metric("validation", "accuracy") == best}
    assert [s for s, _ in steps] == ["best probe", "head on the cache", "fine-tuned"]
    assert steps[0][1] in tops and [k for _, k in steps[1:]] == [runs[-2].key, runs[-1].key]
    top = tops[steps[0][1]]
    # the fit has no test score: the steps are compared on validation, in points
    assert "vs best probe (validation, points)" in table
    gain = 100 * (0.97 - top.metric("validation", "accuracy"))
    assert f"{gain:+.1f}</td>" in table
    assert f"{top.metric('test', 'accuracy'):.4f}" in table


def test_no_ladder_without_a_probe_and_a_head_or_fine_tune(default_page: str) -> None:
    assert 'class="ladder"' not in default_page
