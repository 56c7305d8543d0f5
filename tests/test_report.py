"""The HTML report of logged runs: its content, escaping, the `featx runs` / `featx report`
functions, and the page opened in a real headless chromium with no network."""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
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
    (tmp_path / "stores").mkdir()
    a = make_store(tmp_path / "stores" / "birds.h5")
    b = make_store(tmp_path / "stores" / "pets.h5", {**META, "backbone": "vgg16"})
    preview = tmp_path / "preview.png"
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


def test_report_holds_every_run_escaped_and_self_contained(logged: dict) -> None:
    runs = read_runs([logged["a"], logged["b"]])
    out = write_report(logged["tmp"] / "out" / "report.html", runs)
    page = out.read_text(encoding="utf-8")
    assert HOSTILE not in page and html.escape(HOSTILE) in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count('<section class="run"') == 4
    assert page.count("<tr data-run=") == 4
    assert page.count('<table class="cm">') == 4  # fit: validation + test; finetune; evaluate
    assert page.count("<polyline") >= 4 + 2  # history: 2 charts x 2 series; lr: loss, smoothed
    assert "learning-rate range test" in page and "Suggested learning rate" in page
    assert page.count('src="data:image/png;base64,') == 1
    assert "gone.png is missing or not a PNG" in page
    for text in ("resnet18", "vgg16", "resize 256, center crop 224", "f00d" * 16, "2.5.0"):
        assert text in page
    assert "featx extract data" in page  # the store's history


def test_runs_and_report_commands_take_stores_logs_or_nothing(
    logged: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, tmp = logged["a"], logged["b"], logged["tmp"]
    by_store = runs_command([a, b])
    assert runs_command([log_path(a), b]) == by_store
    monkeypatch.chdir(tmp)
    assert runs_command([]) == by_store  # every log under ./stores
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


def test_report_of_a_log_whose_store_was_never_readable(tmp_path: Path) -> None:
    record_run(tmp_path / "missing.h5", "fit", settings={}, scores={"test": {"accuracy": 1.0}})
    with sqlite3.connect(log_path(tmp_path / "missing.h5")) as conn:
        assert conn.execute("SELECT meta FROM runs").fetchone()[0] is None
    page = write_report(tmp_path / "r.html", read_runs(logs=[log_path(tmp_path / "missing.h5")]))
    assert "no provenance was readable" in page.read_text()


def test_report_is_written_without_matplotlib(logged: dict) -> None:
    """Charts are SVG drawn by featx itself, so a report needs no plotting library."""
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from featx.report import report_command\n"
        f"report_command({str(logged['tmp'] / 'r.html')!r}, [{str(logged['a'])!r}])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)
    page = (logged["tmp"] / "r.html").read_text()
    assert page.count("<tr data-run=") == 2 and page.count("<polyline") >= 6


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no system chromium on PATH (Debian package 'chromium')")
    return path


@pytest.mark.slow
def test_report_in_a_headless_browser(logged: dict) -> None:
    from playwright.sync_api import sync_playwright

    chromium = _chromium()
    out = write_report(logged["tmp"] / "report.html", read_runs([logged["a"], logged["b"]]))
    errors: list[str] = []
    requests: list[str] = []
    started = time.monotonic()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
            ],
        )
        try:
            page = browser.new_page()
            page.on(
                "console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else 0
            )
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
            page.on("request", lambda r: requests.append(r.url))
            page.goto(out.resolve().as_uri(), wait_until="load")
            rows = page.locator("#leaderboard tbody tr")
            assert rows.count() == 4
            cells = [rows.nth(i).locator("td").all_inner_texts() for i in range(4)]
            for row, (kind, val, test, f1) in zip(cells, logged["expected"], strict=True):
                assert (row[2], row[7], row[8], row[9]) == (kind, val, test, f1)
            images = page.locator("img")
            assert images.count() == 1
            widths = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            assert widths == [120]
            assert page.locator("section.run svg polyline").count() >= 6
            # clicking "test acc" sorts ascending by it, rows without a value last
            page.locator("#leaderboard th", has_text="test acc").click()
            kinds = page.locator("#leaderboard tbody tr td:nth-child(3)").all_inner_texts()
            assert kinds[:2] == ["evaluate", "fit"]
            assert page.locator("#leaderboard th", has_text="test acc").get_attribute(
                "aria-sort"
            ) == ("ascending")
            # the hostile class name is shown as text, not run
            assert page.get_by_text(HOSTILE).count() >= 1
        finally:
            browser.close()
    elapsed = time.monotonic() - started
    assert errors == []
    assert [u for u in requests if re.match(r"https?:", u)] == []
    assert requests == [out.resolve().as_uri()]
    assert elapsed < 60
