"""The report page in a real headless Chromium with no network, at 1280 and 800 px: the
leaderboards fit their container, every chart label lies inside its chart, sorting works, and
hostile logged text never runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from test_report import HOSTILE, logged  # noqa: F401  (the fixture)
from test_runlog import make_store

from featx.report import write_report
from featx.runlog import read_runs, record_run

pytestmark = pytest.mark.slow

SCREENSHOT = Path("/tmp/report-1280.png")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update"]  # fmt: skip

# Every <text> of every chart: its box against the box of its <svg>.
LABELS_OUTSIDE = """() => {
  const out = [];
  for (const svg of document.querySelectorAll(".chart svg")) {
    const box = svg.getBoundingClientRect();
    for (const t of svg.querySelectorAll("text")) {
      const r = t.getBoundingClientRect();
      if (!t.textContent.trim()) continue;
      if (r.left < box.left - 0.5 || r.right > box.right + 0.5 ||
          r.top < box.top - 0.5 || r.bottom > box.bottom + 0.5)
        out.push(t.textContent + " " + JSON.stringify([r.left, r.right, box.left, box.right]));
    }
  }
  return out;
}"""

OVERFLOWING_BOARDS = """() => Array.from(document.querySelectorAll(".board")).filter(
  b => b.scrollWidth > b.clientWidth || b.getBoundingClientRect().right >
       document.documentElement.clientWidth).map(b => b.firstElementChild.id)"""


def _chromium() -> str:
    pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no system chromium on PATH (Debian package 'chromium')")
    return path


def _add_hostile_runs(logged: dict) -> None:  # noqa: F811
    """A long-named store with a fine-tune whose params hold the whole augmentation, a run
    named with markup, and enough runs that some are collapsed."""
    store = make_store(logged["tmp"] / "stores" / "flowers-vgg16-default-std-with-long-name.h5")
    augment = {"rotation": 0, "shift": 0.1, "shear": 0, "zoom": 0.1, "flip": "horizontal",
               "brightness": [0.8, 1.2], "erase": {"p": 0.25, "scale": [0.02, 0.33]}}  # fmt: skip
    history = [
        {
            "epoch": e,
            "stage": "head" if e < 9 else "full",
            "stage_epoch": e if e < 9 else e - 8,
            "train_loss": 2 / e,
            "val_loss": 2.2 / e,
            "train_accuracy": 1 - 1 / (e + 1),
            "val_accuracy": 1 - 1.2 / (e + 1),
        }
        for e in range(1, 10)
    ]  # fmt: skip  (the unfreezing right at the chart's right edge)
    for i in range(5):
        record_run(
            store, "finetune",
            settings={"layer": f"features.{20 + i}<img src=x onerror=alert(1)>",
                      "classifier": HOSTILE,
                      "params": {"unfreeze_from": "features.24", "epochs_head": 100,
                                 "epochs": 20, "lr": 1e-4, "lr_head": 1e-3, "lr_mult": 0.1,
                                 "bn": "frozen", "schedule": "cosine", "augment": augment,
                                 "seed": i}},
            scores={"validation": {"accuracy": 0.80 + i / 100, "macro_f1": 0.79},
                    "test": {"accuracy": 0.78}},
            details={"history": history},
            command=f"featx finetune photos --backbone vgg16 --lr 1e-4 --seed {i} {HOSTILE}",
        )  # fmt: skip


def _add_probe(store: Path) -> None:
    """A linear probe of six layers, logged as `ProbeResult.record` logs it (one layer named
    with markup, long chosen C values), and a head fitted on the cache: with the fine-tunes,
    the store's ladder."""
    order = ["stem", "blocks.1", "blocks.2", f"blocks.3{HOSTILE}", "blocks.4", "head.avgpool"]
    for depth, layer in enumerate(order):
        accuracy = 0.5 + 0.08 * depth - 0.1 * (depth == 5)
        record_run(
            store, "probe",
            settings={"layer": layer, "classifier": "probe-linear",
                      "params": {"C": 10 ** (-5 + depth) * 3.1622776},
                      "probe": {"protocol": "linear", "depth": depth, "layers": order,
                                "created": "2026-11-01T10:00:00+0000", "call": "c0ffee",
                                "best": depth == 4},
                      "refit": "train+validation", "metric": "accuracy"},
            scores={"validation": {"accuracy": accuracy}, "test": {"accuracy": accuracy - 0.03}},
            details={"path": []},
        )  # fmt: skip
    record_run(
        store, "fit",
        settings={"layer": "blocks.4", "classifier": "mlp", "params": {"hidden": 256}},
        scores={"validation": {"accuracy": 0.83}, "test": {"accuracy": 0.8}},
    )  # fmt: skip


def test_report_layout_at_1280_and_800_px(logged: dict) -> None:  # noqa: F811
    from playwright.sync_api import sync_playwright

    _add_hostile_runs(logged)
    _add_probe(next((logged["tmp"] / "stores").glob("flowers*.h5")))
    stores = [logged["a"], logged["b"], *sorted((logged["tmp"] / "stores").glob("flowers*.h5"))]
    out = write_report(logged["tmp"] / "report.html", read_runs(stores), best=2)
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=ARGS)
        try:
            for width in (1280, 800):
                page = browser.new_page(viewport={"width": width, "height": 900})
                page.on("console", lambda m: errors.append(m.text))
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
                page.on("request", lambda r: requests.append(r.url))
                page.goto(out.resolve().as_uri(), wait_until="load")
                assert page.locator(".board table.leaderboard").count() == 3  # one per store
                assert page.evaluate(OVERFLOWING_BOARDS) == [], width
                assert page.evaluate(
                    "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
                ), width
                # open every collapsed section and parameter cell: still no overflow
                page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
                assert page.evaluate(OVERFLOWING_BOARDS) == [], width
                assert page.locator(".chart svg").count() >= 6
                assert page.locator(".chart.probe svg").count() == 1
                assert page.locator("table.ladder tr").count() == 4
                assert page.evaluate(LABELS_OUTSIDE) == [], width
                # run ids stay on one line
                heights = page.eval_on_selector_all(
                    "td.run a", "els => els.map(e => e.getClientRects().length)"
                )
                assert heights and set(heights) == {1}
                if width == 1280:
                    page.evaluate(
                        "document.querySelectorAll('details').forEach(d => d.open = false)"
                    )
                    page.locator("#store-2").scroll_into_view_if_needed()  # the fine-tunes
                    page.evaluate("document.getElementById('store-2').scrollIntoView()")
                    page.screenshot(path=str(SCREENSHOT), full_page=False)
                    page.screenshot(path=str(SCREENSHOT.with_name("report-1280-full.png")),
                                    full_page=True)  # fmt: skip
                page.close()
            _sorting_and_text(browser, out, logged)
        finally:
            browser.close()
    assert errors == []
    assert {u for u in requests} == {out.resolve().as_uri()}


def _sorting_and_text(browser, out: Path, logged: dict) -> None:  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(out.resolve().as_uri(), wait_until="load")
    board = page.locator("table.leaderboard").first  # birds.h5 holds the best run
    cells = board.locator("tbody tr").evaluate_all(
        "rows => rows.map(r => Array.from(r.cells).map(c => c.innerText))"
    )
    assert [(c[2], c[6]) for c in cells] == [("finetune", "0.9375"), ("fit", "0.8125")]
    board.locator("th", has_text="test acc").click()
    kinds = board.locator("tbody tr td:nth-child(3)").all_inner_texts()
    assert kinds == ["fit", "finetune"]  # 0.75 first, the run without a test score last
    assert board.locator("th", has_text="test acc").get_attribute("aria-sort") == "ascending"
    assert page.get_by_text(HOSTILE).count() >= 1  # shown as text
    assert page.locator("img").count() == 1  # the preview; the onerror image is text
    summary = (
        page.locator("table.leaderboard").nth(1).locator("td.params summary").first.inner_text()
    )
    assert re.fullmatch(r"unfreeze_from=features\.24, .*\+6 more", summary)
    page.close()
