"""The ladder in the report: within a store, a fine-tune without stage 2 is the head on the
cache; across stores of one experiment (one store per split), each step as mean ± std, the
fine-tune's gain over the best probe per split and its standard error. Real HDF5 stores and
real run logs, written as `featx probe` and `featx finetune` log their runs."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import h5py
import pytest

from featx.report.ladder import across_splits, ladder
from featx.report.page import write_report
from featx.runlog import read_runs, record_run

META = {"backbone": "efficientnet_lite0", "weights_sha256": "ab12",
        "preprocessing_text": "resize to 96x96"}  # fmt: skip
# (best probe, head on the cache, fine-tuned) test accuracy of each split's store
SPLITS = {"one": (0.80, 0.81, 0.85), "two": (0.83, 0.82, 0.86), "three": (0.84, 0.83, 0.80)}
N_TEST = 500


def _scores(test: float, validation: float | None = None) -> dict:
    validation = test if validation is None else validation
    return {"validation": {"accuracy": validation}, "test": {"accuracy": test, "n_samples": N_TEST}}


def _store(path: Path, meta: dict, accuracies: tuple[float, float, float]) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["meta"] = json.dumps(meta)
    probe, head, tuned = accuracies
    for layer, value, best in (("blocks.5@avg", probe, True), ("blocks.3@avg", probe - 0.1, False)):
        record_run(
            path, "probe",
            settings={"layer": layer, "classifier": "probe-linear", "params": {"C": 1.0},
                      "probe": {"call": "c1", "best": best, "layers": ["blocks.3@avg",
                                "blocks.5@avg"], "depth": int(best)}},
            scores=_scores(value),
        )  # fmt: skip
    for epochs, value in ((0, head), (15, tuned)):
        record_run(
            path, "finetune",
            settings={"layer": "blocks.5", "classifier": "finetune",
                      "params": {"epochs": epochs, "refit": "all"}},
            scores=_scores(value, validation=0.5),  # the steps are chosen by kind, not score
        )  # fmt: skip
    return path


@pytest.fixture
def stores(tmp_path: Path) -> list[Path]:
    made = [_store(tmp_path / f"fashion-{k}.h5", META, v) for k, v in SPLITS.items()]
    other = {**META, "backbone": "resnet18"}
    made.append(_store(tmp_path / "other.h5", other, (0.7, 0.7, 0.7)))
    return made


def test_a_fine_tune_without_stage_two_is_the_head_on_the_cache(stores) -> None:
    found = ladder(read_runs([stores[0]]))
    steps = [(row["step"], row["run"].params.get("epochs")) for row in found["rows"]]
    assert steps == [("best probe", None), ("head on the cache", 0), ("fine-tuned", 15)]
    assert found["split"] == "test" and found["missing"] == []
    assert found["rows"][2]["gain"] == pytest.approx(5.0)


def test_stores_of_one_experiment_compare_as_mean_and_std(stores) -> None:
    runs = read_runs(stores)
    by_store = {s: [r for r in runs if r.store == s.resolve()] for s in stores}
    found = across_splits([(s, mine[0].meta, ladder(mine)) for s, mine in by_store.items()])
    assert len(found) == 1  # the resnet18 store is another experiment, alone
    comparison = found[0]
    assert comparison["steps"] == ["best probe", "head on the cache", "fine-tuned"]
    for i, summary in enumerate(comparison["summary"]):
        values = [v[i] for v in SPLITS.values()]
        assert summary["mean"] == pytest.approx(statistics.mean(values))
        assert summary["std"] == pytest.approx(statistics.stdev(values))
    gains = [100 * (v[2] - v[0]) for v in SPLITS.values()]
    assert comparison["gain"]["mean"] == pytest.approx(statistics.mean(gains))
    assert comparison["wins"] == 2
    rows = comparison["stores"]
    se = [100 * math.sqrt(v[0] * (1 - v[0]) / N_TEST) for v in SPLITS.values()]
    assert [r["se"] for r in rows] == pytest.approx(se)
    assert [r["below"] for r in rows] == [False, False, True]  # -4 points, 1 SE is 1.6


def test_the_report_shows_the_ladder_across_splits(stores, tmp_path) -> None:
    page = write_report(tmp_path / "report.html", read_runs(stores)).read_text(encoding="utf-8")
    sections = re.findall(r'<section class="across">(.*?)</section>', page, flags=re.S)
    assert len(sections) == 1 and "Ladder across 3 splits: efficientnet_lite0" in sections[0]
    table = sections[0]
    gains = [100 * (v[2] - v[0]) for v in SPLITS.values()]
    mean, sd = statistics.mean(gains), statistics.stdev(gains)
    assert f"{mean:+.1f} &plusmn; {sd:.1f}" in table
    for name in SPLITS:
        assert f">fashion-{name}.h5</a>" in table
    assert table.count('class="num below"') == 1
    assert "beats the best probe on 2 of 3 splits" in table


def test_one_store_has_no_ladder_across_splits(stores, tmp_path) -> None:
    page = write_report(tmp_path / "one.html", read_runs(stores[:1])).read_text(encoding="utf-8")
    assert '<section class="across">' not in page and '<table class="ladder">' in page
