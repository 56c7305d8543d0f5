"""Packed and remote inputs: the same images as a folder, as WebDataset tar shards, as Parquet
files of image bytes (Hugging Face's image struct, img2dataset's jpg column), as a saved Hugging
Face dataset and as URLs served over HTTP give the folder's store; unusable inputs are refused
in one sentence, unreadable rows are skipped with their reason."""

from __future__ import annotations

import csv
import http.server
import io
import json
import tarfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_sentence_error, invoke_featx, make_folder, run_featx

from featx import FeatureStore, extract
from featx.data import open_dataset, scan_image_folder
from featx.data.folders import ImageFolder, load_image

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TINY = {"backbone": "resnet18", "weights": "none", "image_size": 32}
FAST = {"workers": 0, "batch_size": 4, "device": "cpu", "quiet": True}
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> ImageFolder:
    root = tmp_path_factory.mktemp("inputs") / "data"
    make_folder(root, {"cat": 3, "dog": 2}, split="train")
    make_folder(root, {"cat": 1, "dog": 2}, split="val", start=20)
    make_folder(root, {"cat": 1, "dog": 1}, split="test", start=40)
    return scan_image_folder(root)


@pytest.fixture(scope="module")
def folder_store(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("stores") / "folder.h5"
    return extract(folder.root, layers=["layer3"], store=out, **TINY, **FAST).store


def image_bytes(folder: ImageFolder, f) -> bytes:
    return (folder.root / f.path).read_bytes()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(data), 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def write_shards(folder: ImageFolder, out: Path) -> str:
    """Tar shards per split (train in two), labels as .cls, .txt and .json in turn, and a
    classes.txt; returns the brace notation naming them all."""
    out.mkdir(parents=True)
    (out / "classes.txt").write_text("\n".join(folder.class_names) + "\n")
    by_shard: dict[str, list] = {}
    for f in folder.files:
        by_shard.setdefault(SPLIT_NAMES[f.split], []).append(f)
    train = by_shard.pop("train")
    by_shard["train-000000"], by_shard["train-000001"] = train[:3], train[3:]
    for shard, files in by_shard.items():
        name = shard if "-" in shard else f"{shard}-000000"
        with tarfile.open(out / f"{name}.tar", "w") as tar:
            for i, f in enumerate(files):
                key = Path(f.path).stem
                add_member(tar, f"{key}.jpg", image_bytes(folder, f))
                class_name = folder.class_names[f.label]
                label = [
                    ("cls", str(f.label)),
                    ("txt", class_name),
                    ("json", json.dumps({"label": class_name, "url": "u"})),
                ][i % 3]
                add_member(tar, f"{key}.{label[0]}", label[1].encode())
    return str(out / "{train-{000000..000001},val-000000,test-000000}.tar")


def shuffled(folder: ImageFolder) -> list:
    """The folder's files with splits and classes in reverse order; a packed dataset orders
    a class's rows by their name (FILE/ROW), so rows within a class keep their order."""
    return sorted(folder.files, key=lambda f: (-"tvx".index(f.split[0]), -f.label, f.path))


def hf_features(folder: ImageFolder) -> dict:
    return {
        "image": {"_type": "Image"},
        "label": {"_type": "ClassLabel", "names": list(folder.class_names)},
    }


def image_table(folder: ImageFolder, files, split: bool = True) -> pa.Table:
    """Hugging Face's layout: an image struct of {bytes, path}, a ClassLabel index."""
    columns = {
        "image": [{"bytes": image_bytes(folder, f), "path": Path(f.path).name} for f in files],
        "label": [f.label for f in files],
    }
    if split:
        columns["split"] = [SPLIT_NAMES[f.split] for f in files]
    return pa.table(columns)


def write_hf_parquet(folder: ImageFolder, out: Path) -> Path:
    table = image_table(folder, shuffled(folder))
    info = {"info": {"features": hf_features(folder)}}
    table = table.replace_schema_metadata({"huggingface": json.dumps(info)})
    pq.write_table(table, out, row_group_size=4)
    return out


def write_img2dataset_parquet(folder: ImageFolder, out: Path) -> Path:
    files = shuffled(folder)
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(len(files))],
            "caption": [f"photo {i}" for i in range(len(files))],
            "jpg": pa.array([image_bytes(folder, f) for f in files], pa.binary()),
            "label": [folder.class_names[f.label] for f in files],
            "split": [SPLIT_NAMES[f.split] for f in files],
        }
    )
    pq.write_table(table, out)
    return out


def write_saved_dataset(folder: ImageFolder, out: Path) -> Path:
    """The folder `datasets.DatasetDict.save_to_disk` writes (datasets is not needed)."""
    splits = {"train": [], "validation": [], "test": []}
    for f in folder.files:
        splits[f.split].append(f)
    out.mkdir()
    (out / "dataset_dict.json").write_text(json.dumps({"splits": list(splits)}))
    for name, files in splits.items():
        (out / name).mkdir()
        table = image_table(folder, files, split=False)
        with pa.OSFile(str(out / name / "data-00000-of-00001.arrow"), "wb") as sink:
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": name}
        (out / name / "state.json").write_text(json.dumps(state))
        info = {"features": hf_features(folder)}
        (out / name / "dataset_info.json").write_text(json.dumps(info))
    return out


class Server:
    """A real HTTP server on 127.0.0.1 serving `root`; /missing/ answers 404 and /slow/ never
    answers until the server stops."""

    def __init__(self, root: Path):
        release = self.release = threading.Event()

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self):  # noqa: N802 - the http.server API
                if self.path.startswith("/slow/"):
                    release.wait()
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server(folder):
    served = Server(folder.root)
    yield served
    served.close()


def write_url_manifest(folder: ImageFolder, url: str, out: Path, extra=()) -> Path:
    with open(out, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split"])
        for f in folder.files[::-1]:
            writer.writerow([f"{url}/{f.path}", folder.class_names[f.label], f.split])
        for row in extra:
            writer.writerow(row)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    with FeatureStore(a) as sa, FeatureStore(b) as sb:
        assert sa.class_names == sb.class_names
        np.testing.assert_allclose(sa.read("layer3"), sb.read("layer3"), rtol=1e-5, atol=1e-6)
        for column in ("labels", "views", "split_of_rows"):
            np.testing.assert_array_equal(getattr(sa, column)(), getattr(sb, column)())
        assert sa.n_rows == sb.n_rows


def build(kind: str, folder: ImageFolder, tmp: Path, url: str = "") -> str | Path:
    if kind == "tars":
        return write_shards(folder, tmp / "shards")
    if kind == "hf_parquet":
        return write_hf_parquet(folder, tmp / "train.parquet")
    if kind == "img2dataset":
        return write_img2dataset_parquet(folder, tmp / "00000.parquet")
    if kind == "saved":
        return write_saved_dataset(folder, tmp / "saved")
    return write_url_manifest(folder, url, tmp / "urls.csv")


@pytest.mark.parametrize("kind", ["tars", "hf_parquet", "img2dataset", "saved", "urls"])
def test_each_input_lists_and_stores_as_the_folder(kind, folder, folder_store, server, tmp_path):
    data = build(kind, folder, tmp_path, server.url)
    listed = open_dataset(data)
    assert listed.class_names == folder.class_names
    assert [(f.label, f.split) for f in listed.files] == [(f.label, f.split) for f in folder.files]
    for packed, plain in zip(listed.files, folder.files, strict=True):
        a = np.asarray(load_image(listed.root / packed.path))
        np.testing.assert_array_equal(a, np.asarray(load_image(folder.root / plain.path)))
    result = extract(data, layers=["layer3"], store=tmp_path / "s.h5", **TINY, **FAST)
    assert result.skipped == []
    assert_same_store(folder_store, result.store)
    with FeatureStore(result.store) as store:
        assert store.meta["dataset"]["fingerprint"] == listed.fingerprint
        assert store.meta["dataset"]["root"] == str(listed.root)


def test_tar_rows_name_their_shard_and_member(folder, tmp_path):
    listed = open_dataset(write_shards(folder, tmp_path / "shards"))
    assert listed.files[0].path == "train-000000.tar/img-000.jpg"
    assert {f.path.split("/")[0] for f in listed.files} == {
        "train-000000.tar",
        "train-000001.tar",
        "val-000000.tar",
        "test-000000.tar",
    }
    glob = open_dataset(str(tmp_path / "shards" / "*.tar"))
    listed_list = open_dataset(sorted((tmp_path / "shards").glob("*.tar")))
    assert glob.fingerprint == listed_list.fingerprint == listed.fingerprint


def test_parquet_metadata_keeps_text_and_numbers_never_bytes(folder, tmp_path):
    listed = open_dataset(write_img2dataset_parquet(folder, tmp_path / "00000.parquet"))
    assert set(listed.meta) == {"key", "caption"}
    assert all(len(c) < 20 for c in listed.meta["caption"])


def test_identity_comes_from_content_not_stat(folder, tmp_path):
    data = write_shards(folder, tmp_path / "shards")
    before = open_dataset(data).fingerprint
    for shard in (tmp_path / "shards").glob("*.tar"):  # touched: same content
        shard.touch()
    assert open_dataset(data).fingerprint == before
    with tarfile.open(tmp_path / "shards" / "test-000000.tar", "a") as tar:
        add_member(tar, "extra.jpg", image_bytes(folder, folder.files[0]))
        add_member(tar, "extra.cls", b"0")
    assert open_dataset(data).fingerprint != before


@pytest.mark.slow  # three attempts of one second for the URL that never answers
def test_urls_that_fail_are_skipped_with_their_reason(folder, server, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATX_URL_TIMEOUT", "1")
    manifest = write_url_manifest(
        folder,
        server.url,
        tmp_path / "urls.csv",
        extra=[
            [f"{server.url}/missing/cat.jpg", "cat", "train"],
            [f"{server.url}/slow/cat.jpg", "cat", "train"],
        ],
    )
    listed = open_dataset(manifest)
    assert f"{server.url}/slow/cat.jpg" in {f.path for f in listed.files}
    result = extract(manifest, layers=["layer3"], store=tmp_path / "s.h5", **TINY, **FAST)
    reasons = dict(result.skipped)
    assert "not found" in reasons[f"{server.url}/missing/cat.jpg"]
    assert reasons[f"{server.url}/slow/cat.jpg"] == "timed out (3 attempts)"
    assert result.n_rows == len(folder.files)


def test_cloud_urls_keep_their_scheme(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\ns3://bucket/x.jpg,cat\ngs://bucket/y.jpg,dog\n")
    try:
        listed = open_dataset(manifest)
    except Exception as error:  # noqa: BLE001 - without s3fs/gcsfs: one sentence naming it
        assert "s3://" in str(error) or "gs://" in str(error), error
        assert "s3:/b" not in str(error)
    else:
        assert {f.path for f in listed.files} == {"s3://bucket/x.jpg", "gs://bucket/y.jpg"}


def test_unusable_inputs_are_one_sentence(folder, tmp_path):
    corrupt = tmp_path / "bad-000000.tar"
    corrupt.write_bytes(b"\x00garbage" * 100 + b"not a tar header" * 40)
    no_image = tmp_path / "table.parquet"
    pq.write_table(pa.table({"label": ["cat"], "caption": ["x"]}), no_image)
    no_label = tmp_path / "nolabel-000000.tar"
    with tarfile.open(no_label, "w") as tar:
        add_member(tar, "a.jpg", image_bytes(folder, folder.files[0]))
    cases = [
        (corrupt, "not a readable tar shard"),
        (no_image, "has no image column"),
        (no_label, "has no label"),
        (tmp_path / "none-{000000..000002}.tar", "does not exist"),
    ]
    for data, words in cases:
        result = invoke_featx(
            "extract",
            data,
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--layer",
            "avgpool",
            "--store",
            tmp_path / "s.h5",
        )
        assert words in assert_one_sentence_error(result)


@pytest.mark.slow
def test_evaluate_on_tar_shards_scores_as_on_the_folder(folder, folder_store, tmp_path):
    from featx import fit
    from featx.classify import evaluate_images

    model = tmp_path / "m.joblib"
    fit(folder_store, "layer3", "logreg", model=model, log=False)
    data = write_shards(folder, tmp_path / "shards")
    on_tars = evaluate_images(model, data, "train", quiet=True, workers=0)
    on_folder = evaluate_images(model, folder.root, "train", quiet=True, workers=0)
    assert on_tars.metrics == on_folder.metrics
    np.testing.assert_array_equal(on_tars.y_pred, on_folder.y_pred)
    assert on_tars.paths[0] == "train-000000.tar/img-000.jpg"


@pytest.mark.slow
def test_interrupted_extraction_of_tars_resumes_at_its_first_unfinished_row(tmp_path):
    """Ctrl-C on the first saved chunk, then the same command: the store equals one made in a
    single run (two decoding processes reading the shards)."""
    import os
    import re
    import signal
    import subprocess
    import time

    from conftest import FEATX, as_from_a_terminal, run_featx

    from featx.extraction.run import CHUNK_BYTES

    batch, row_bytes = 4, (64 * 96 * 96 + 512) * 4  # conv1 and avgpool at 192 x 192, float32
    chunk_items = batch * max(1, CHUNK_BYTES // (row_bytes * batch))
    n = 5 * chunk_items
    photos = tmp_path / "photos"
    make_folder(photos, {"left": n // 2, "right": n - n // 2}, split="train", size=(64, 48))
    write_shards(scan_image_folder(photos), tmp_path / "shards")
    spec = str(tmp_path / "shards" / "*.tar")
    args = ["extract", spec, "--backbone", "resnet18", "--weights", "none", "--image-size",
            "192", "--layer", "conv1", "--layer", "avgpool", "--batch-size", str(batch),
            "--device", "cpu", "--workers", "2", "--engine", "eager"]  # fmt: skip
    reference = run_featx(*args, "--store", tmp_path / "reference.h5", cwd=tmp_path)
    assert reference.returncode == 0, reference.stderr
    store = tmp_path / "interrupted.h5"
    partial = tmp_path / "interrupted.h5.partial"
    with open(tmp_path / "err.txt", "w") as err:
        command = [*FEATX, *args, "--store", str(store)]
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
            preexec_fn=as_from_a_terminal,
        )
    try:
        while not any(partial.glob("chunk-*.npz")) and proc.poll() is None:
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=300) == 130, (tmp_path / "err.txt").read_text()
    saved = int(re.search(r"after (\d+) of", (tmp_path / "err.txt").read_text()).group(1))
    assert 0 < saved < n, "the interruption came too late to test a resume"
    resumed = run_featx(*args, "--store", store, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{saved} of {n} images already done" in resumed.stderr
    with FeatureStore(store) as a, FeatureStore(tmp_path / "reference.h5") as b:
        for layer in ("conv1", "avgpool"):
            assert a.read(layer).tobytes() == b.read(layer).tobytes()
        np.testing.assert_array_equal(a.paths(), b.paths())
        assert a.paths()[0].startswith("train-000000.tar/")


def test_a_store_of_tar_shards_is_named_after_their_folder(tmp_path):
    from featx.extraction.naming import default_store_path

    for spec in ("shards/*.tar", "shards/train-{000000..000009}.tar", "shards/a.tar"):
        assert default_store_path(tmp_path / spec, "resnet18").name.startswith("shards-resnet18")


@pytest.mark.slow
def test_predict_on_tar_shards_equals_predict_on_the_folder(folder, folder_store, tmp_path):
    """Each shard given to predict is read row by row, its sample without an image reported
    as skipped; every image gets the class and scores it gets as a file of the folder."""
    from featx import fit, predict

    model = tmp_path / "m.joblib"
    fit(folder_store, "layer3", "logreg", model=model, log=False)
    write_shards(folder, tmp_path / "shards")
    with tarfile.open(tmp_path / "shards" / "test-000000.tar", "a") as tar:
        add_member(tar, "lonely.cls", b"0")
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    on_tars = predict(model, shards, **FAST, engine="eager")
    on_folder = predict(model, [folder.root], **FAST, engine="eager")
    assert len(on_tars.paths) == len(on_folder.paths) == len(folder.files)
    assert on_folder.skipped == []
    assert [(Path(where).name, why) for where, why in on_tars.skipped] == [
        ("lonely", "no image member in the sample")
    ]
    by_name = {Path(p).name: i for i, p in enumerate(on_folder.paths)}
    for i, path in enumerate(on_tars.paths):
        assert Path(path).parent.name.endswith(".tar"), path
        j = by_name[Path(path).name]
        assert on_tars.predicted[i] == on_folder.predicted[j], path
        np.testing.assert_allclose(on_tars.scores[i], on_folder.scores[j], rtol=1e-5, atol=1e-6)


def write_one_tar(folder: ImageFolder, out: Path, labelled: bool = True) -> Path:
    """Every image of `folder` in one tar, as CLASS/NAME.jpg members with a .cls each (none
    without `labelled`)."""
    with tarfile.open(out, "w") as tar:
        for f in folder.files:
            stem = f"{folder.class_names[f.label]}/{Path(f.path).stem}-{f.split}"
            add_member(tar, f"{stem}.jpg", image_bytes(folder, f))
            if labelled:
                add_member(tar, f"{stem}.cls", str(f.label).encode())
    return out


def test_one_tar_names_its_rows_by_member_alone(folder, tmp_path):
    tar = write_one_tar(folder, tmp_path / "all.tar")
    listed = open_dataset(tar)
    assert listed.files[0].path == "cat/img-000-train.jpg"
    assert str(listed.root / listed.files[0].path) == f"{tar.resolve()}/cat/img-000-train.jpg"
    for packed in listed.files:  # each row reads its own member
        plain = next(
            f for f in folder.files if packed.path.endswith(f"{Path(f.path).stem}-{f.split}.jpg")
        )
        a = np.asarray(load_image(listed.root / packed.path))
        np.testing.assert_array_equal(a, np.asarray(load_image(folder.root / plain.path)))


@pytest.mark.slow
def test_unlabelled_tars_are_predicted_and_refused_for_extraction(folder, folder_store, tmp_path):
    """Samples without a label are classified as the folder's files are; extracting them for
    training says the labels are missing, as a folder without class folders is refused."""
    from featx import fit, predict

    tar = write_one_tar(folder, tmp_path / "unlabelled.tar", labelled=False)
    model = tmp_path / "m.joblib"
    fit(folder_store, "layer3", "logreg", model=model, log=False)
    on_tar = predict(model, [tar], **FAST, engine="eager")
    on_folder = predict(model, [folder.root], **FAST, engine="eager")
    assert on_tar.skipped == [] and len(on_tar.paths) == len(folder.files)
    by_name = {(Path(p).parent.parent.name, Path(p).stem): i for i, p in enumerate(on_folder.paths)}
    for i, path in enumerate(on_tar.paths):
        name, split = Path(path).stem.rsplit("-", 1)
        j = by_name[({"validation": "val"}.get(split, split), name)]
        assert on_tar.predicted[i] == on_folder.predicted[j], path
    result = invoke_featx(
        "extract", tar, "--backbone", "resnet18", "--weights", "none", "--layer", "avgpool",
        "--store", tmp_path / "s.h5",
    )  # fmt: skip
    assert "has no label" in assert_one_sentence_error(result)


def test_a_manifest_whose_urls_all_fail_is_refused(folder, server, tmp_path):
    manifest = tmp_path / "urls.csv"
    manifest.write_text(
        f"path,label\n{server.url}/missing/a.jpg,cat\n{server.url}/missing/b.jpg,dog\n"
    )
    result = run_featx(
        "extract", manifest, "--backbone", "resnet18", "--weights", "none", "--image-size", 32,
        "--layer", "avgpool", "--workers", 0, "--quiet", "--store", tmp_path / "s.h5",
        cwd=tmp_path,
    )  # fmt: skip
    message = assert_one_sentence_error(result, code=3)
    assert "none of the 2 images" in message and "not found" in message, message
    assert f"{server.url}/missing/a.jpg" in message
    assert not (tmp_path / "s.h5").exists()
    assert not (tmp_path / "s.h5.partial").exists()


def test_bytes_in_a_parquet_manifest_are_not_kept_as_text(folder, tmp_path):
    paths = [str(folder.root / f.path) for f in folder.files]
    table = pa.table(
        {
            "path": paths,
            "label": [folder.class_names[f.label] for f in folder.files],
            "thumbnail": [image_bytes(folder, f) for f in folder.files],
            "id": list(range(len(paths))),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    listed = open_dataset(tmp_path / "m.parquet")
    assert set(listed.meta) == {"id"}
    assert len(listed.notes) == 1 and "'thumbnail' holds bytes" in listed.notes[0]
