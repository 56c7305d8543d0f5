"""Out-of-core fitting: memory stays bounded by the chunk size, accuracy matches in-memory."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from clfdata import synthetic_store

# Runs one fit in a fresh interpreter and reports its peak resident memory after the imports
# and after the fit, so that the fit's own share can be told apart from the fixed cost of
# importing torch. VmHWM belongs to the new process image; ru_maxrss can carry the parent's
# peak over the fork.
CHILD = """
import json, resource, sys
import sklearn.linear_model, torch, torchvision  # featx imports them lazily: count them before
from featx.classify.fitting import fit

def peak():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

store, stream, chunk = sys.argv[1], sys.argv[2] == "stream", int(sys.argv[3])
before = peak()
sweep = fit(store, "feat", "sgd", stream=stream, chunk_mb=chunk / 1e6, params={"max_iter": 10})
print(json.dumps({"before": before, "after": peak(), "score": sweep.best.score,
                  "streamed": sweep.best.streamed, "passes": len(sweep.best.epochs)}))
"""


def _fit_in_subprocess(store, mode: str, chunk_bytes: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(store), mode, str(chunk_bytes)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_fit_memory_is_bounded_by_the_chunk_not_the_store(tmp_path):
    # 48,000 rows x 2,048 float32 features = 393 MB, rows sorted by class as extraction writes
    # them (so the block shuffle matters).
    store = synthetic_store(tmp_path / "big.h5", 48_000, 2048, 4, n_informative=64, separation=0.3)
    store_bytes = store.stat().st_size
    chunk = 8 << 20

    streamed = _fit_in_subprocess(store, "stream", chunk)
    in_memory = _fit_in_subprocess(store, "memory", chunk)

    assert streamed["streamed"] and not in_memory["streamed"]
    assert streamed["passes"] >= 2
    grew_streamed = streamed["after"] - streamed["before"]
    grew_in_memory = in_memory["after"] - in_memory["before"]
    # measured: +68 MB streamed, +1.1 GB in memory
    assert grew_streamed < 16 * chunk, grew_streamed
    assert grew_streamed < store_bytes / 4, (grew_streamed, store_bytes)
    assert grew_in_memory > store_bytes, grew_in_memory  # the in-memory path holds the layer
    assert streamed["score"] > 0.75  # 4 classes: chance is 0.25
    assert abs(streamed["score"] - in_memory["score"]) <= 0.03, (streamed, in_memory)


def test_layer_rows_read_selected_rows_in_bounded_chunks(tmp_path):
    from featx.store.feature_store import FeatureStore
    from featx.store.rows import LayerRows

    path = synthetic_store(tmp_path / "small.h5", 5000, 16, 4)
    with FeatureStore(path) as store:
        everything = store.read("feat")
        labels = store.labels()
        # a selection with gaps, as a hold-out leaves them
        index = np.flatnonzero(np.random.default_rng(0).random(store.n_rows) < 0.7)
        with LayerRows(store, "feat", chunk_bytes=300 * 16 * 4) as rows:
            assert rows.chunk_rows == 300
            np.testing.assert_array_equal(rows.read(index), everything[index])
            seen = []
            for positions, X in rows.iter(index):
                assert len(X) <= rows.chunk_rows
                np.testing.assert_array_equal(X, everything[index[positions]])
                seen.extend(positions)
            assert seen == list(range(len(index)))

            shuffled = []
            for positions, X in rows.iter(index, rng=np.random.RandomState(0)):
                assert len(X) <= rows.chunk_rows
                np.testing.assert_array_equal(X, everything[index[positions]])
                # rows are stored sorted by class; a shuffled chunk mixes them
                assert np.bincount(labels[index[positions]], minlength=4).max() < 0.6 * len(X)
                shuffled.extend(positions)
            assert sorted(shuffled) == list(range(len(index)))
            assert shuffled != list(range(len(index)))
