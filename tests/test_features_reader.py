"""Reading `marlin extract` outputs back (`marlin.open_features`): real extractions of synthetic videos, opened as a
folder and as combined .npz / .safetensors files, as arrays, a matrix and a torch Dataset; and the errors."""

from __future__ import annotations

import csv
import importlib.util
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import marlin
from marlin import Marlin, get_config
from marlin.evaluate.features import FeatureError, load_features
from marlin.evaluate.manifest import LabelSet
from marlin.video.extract import ExtractOptions, extract_many, write_combined
from marlin.video.features import FeatureSet, open_features
from videogen import write_video

CFG = get_config("marlin_vit_tiny_test")  # 32x32 crops, 4-frame clips
HAS_FACE = importlib.util.find_spec("mediapipe") is not None
OPTS = ExtractOptions(workers=0, batch_size=4, sample_rate=1, stride=4, progress=False)  # 12 frames: 3 windows


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Marlin(CFG).eval()


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, model):
    """Two good videos (one in a subfolder, different lengths) and a broken one, extracted for real; combined too."""
    root = tmp_path_factory.mktemp("extraction")
    src = root / "in"
    (src / "sub").mkdir(parents=True)
    a = write_video(src / "sub" / "a.mp4", 12, CFG.img_size, CFG.img_size)
    b = write_video(src / "b.mp4", 30, CFG.img_size, CFG.img_size)
    broken = src / "broken.mp4"
    broken.write_text("not a video\n")
    summary = extract_many(model, [a, b, broken], root / "out", OPTS)
    assert [r.status for r in summary.results] == ["ok", "ok", "failed"]
    write_combined(root / "all.npz", summary, root / "out")
    write_combined(root / "all.safetensors", summary, root / "out")
    return {"root": root, "out": root / "out", "a": a, "b": b, "broken": broken}


def index_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "index.csv", newline="") as f:
        return {r["input"]: r for r in csv.DictReader(f)}


def test_a_folder_opens_as_a_mapping_equal_to_the_files(extraction):
    out, a, b, broken = extraction["out"], extraction["a"], extraction["b"], extraction["broken"]
    assert marlin.open_features is open_features
    fs = marlin.open_features(out)
    assert isinstance(fs, FeatureSet) and list(fs.keys()) == [str(a), str(b)] and len(fs) == 2
    index = index_rows(out)
    for key in fs:
        ref = np.load(index[key]["output"])
        got = fs[key]
        assert isinstance(got, np.memmap) and not got.flags.writeable  # mapped read-only, not read
        np.testing.assert_array_equal(got, ref)
        assert fs.shape(key) == ref.shape and ref.shape[0] == int(index[key]["windows"]) >= 1
    assert fs.shape(str(a)) != fs.shape(str(b))  # 12 and 30 frames: different numbers of windows
    plain = open_features(out, mmap=False)[str(b)]
    assert not isinstance(plain, np.memmap) and plain.flags.writeable
    np.testing.assert_array_equal(plain, np.load(index[str(b)]["output"]))
    # the failed input is no key, but listed with its reason; every row keeps its statistics
    assert str(broken) not in fs and [r.input for r in fs.failed] == [str(broken)]
    assert fs.failed[0].status == "failed" and "broken.mp4" in fs.failed[0].error and fs.failed[0].keys == ()
    rows = {r.input: r for r in fs.rows}
    assert len(rows) == 3 and rows[str(b)].frames == 30 and rows[str(b)].windows == fs.shape(str(b))[0]
    assert rows[str(a)].keys == (str(a),) and rows[str(a)].files == (Path(index[str(a)]["output"]),)
    with pytest.raises(KeyError):
        fs["nope.mp4"]
    assert "2 features, 1 failed" in repr(fs)


@pytest.mark.parametrize("name", ["all.npz", "all.safetensors"])
def test_a_combined_file_holds_the_same_arrays(extraction, name):
    out = extraction["out"]
    fs = open_features(extraction["root"] / name)
    assert sorted(fs) == ["b", "sub/a"] and fs.rows == () and fs.failed == ()  # keyed like --combined writes them
    for key in fs:
        ref = np.load(out / f"{key}.npy")
        got = fs[key]
        assert isinstance(got, np.memmap) and fs.shape(key) == ref.shape and got.dtype == ref.dtype
        np.testing.assert_array_equal(got, ref)
        read = open_features(extraction["root"] / name, mmap=False)[key]
        assert not isinstance(read, np.memmap)
        np.testing.assert_array_equal(read, ref)


def test_a_compressed_npz_and_a_bare_folder_read_too(extraction, tmp_path):
    out = extraction["out"]
    arrays = {"b": np.load(out / "b.npy"), "sub/a": np.load(out / "sub" / "a.npy")}
    np.savez_compressed(tmp_path / "c.npz", **arrays)
    fs = open_features(tmp_path / "c.npz")
    assert list(fs) == ["b", "sub/a"] and fs.shape("sub/a") == arrays["sub/a"].shape
    for key, ref in arrays.items():
        np.testing.assert_array_equal(fs[key], ref)
    bare = tmp_path / "bare"
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns("index.csv"))
    (bare / ".marlin-tmp").mkdir(exist_ok=True)
    np.save(bare / ".marlin-tmp" / "window.npy", np.zeros(3))  # a killed run's leftovers are no features
    fs = open_features(bare)
    assert list(fs) == ["b", "sub/a"] and fs.rows == ()
    np.testing.assert_array_equal(fs["sub/a"], arrays["sub/a"])


def test_stack_reduces_over_windows(extraction):
    fs = open_features(extraction["out"])
    keys, x = fs.stack()
    assert keys == list(fs) and x.shape == (2, CFG.encoder_embed_dim) and x.dtype == np.float32
    for i, key in enumerate(keys):
        np.testing.assert_allclose(x[i], np.asarray(fs[key]).mean(0), rtol=1e-6)
    np.testing.assert_allclose(fs.stack("max")[1][1], np.asarray(fs[keys[1]]).max(0))
    with pytest.raises(ValueError, match=r"shapes differ after 'none' reduction .*use mean or max"):
        fs.stack("none")  # 12 and 30 frames: different numbers of windows
    with pytest.raises(ValueError, match="reduction must be one of mean, max, concat, none, found 'median'"):
        fs.stack("median")


def test_the_dataset_feeds_a_dataloader(extraction):
    fs = open_features(extraction["out"])
    a, b = str(extraction["a"]), str(extraction["b"])
    ds = fs.as_dataset()
    x, key = ds[1]
    assert len(ds) == 2 and key == b and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(np.array(fs[b])))
    x.zero_()  # a copy: the files are untouched
    assert np.asarray(fs[b]).any()
    labelled = fs.as_dataset({a: 0, b: 1}, transform=lambda t: t.mean(0))
    feats, labels = next(iter(DataLoader(labelled, batch_size=2)))
    assert feats.shape == (2, CFG.encoder_embed_dim) and labels.tolist() == [0, 1]
    np.testing.assert_allclose(feats.numpy(), fs.stack("mean")[1], rtol=1e-6)
    assert fs.as_dataset([5, 7])[1][1] == 7  # one label per key, in order
    clone = pickle.loads(pickle.dumps(fs.as_dataset()))  # what DataLoader workers receive
    assert torch.equal(clone[0][0], ds[0][0])
    with pytest.raises(ValueError, match=rf"labels: none for 1 of 2 features .*e\.g\. {b}"):
        fs.as_dataset({a: 0})
    with pytest.raises(ValueError, match="labels: 3 given for 2 features"):
        fs.as_dataset([0, 1, 2])


def test_statuses_after_a_resumed_run(extraction, model, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(extraction["out"], out)
    again = extract_many(model, [extraction["a"], extraction["b"]], out, OPTS)
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    fs = open_features(out)
    assert list(fs) == [str(extraction["a"]), str(extraction["b"])]
    np.testing.assert_array_equal(fs[str(extraction["a"])], np.load(out / "sub" / "a.npy"))  # the copy's files
    assert len(open_features(out, status="ok")) == 0 and len(open_features(out, status=("skipped",))) == 2
    with pytest.raises(ValueError, match="status: only ok and skipped rows have features, not 'failed'"):
        open_features(out, status=("ok", "failed"))


def test_a_relative_out_folder_and_a_moved_folder_are_found(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    video = write_video(tmp_path / "in" / "v.mp4", 9, CFG.img_size, CFG.img_size)
    extract_many(model, [video], Path("rel") / "out", OPTS)  # `marlin extract in -o rel/out`: relative outputs
    assert index_rows(tmp_path / "rel" / "out")[str(video)]["output"] == str(Path("rel/out/v.npy"))
    ref = np.load(tmp_path / "rel" / "out" / "v.npy")
    monkeypatch.chdir(tmp_path / "in")
    np.testing.assert_array_equal(open_features(tmp_path / "rel" / "out")[str(video)], ref)
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "rel" / "out", moved)
    np.testing.assert_array_equal(open_features(moved)[str(video)], ref)


def test_errors_name_the_path_and_what_to_do(extraction, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: no such extraction folder or combined features file"):
        open_features(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: no index.csv and no .npy files; not a `marlin extract` output"):
        open_features(tmp_path / "empty")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match=r"x.txt: expected a `marlin extract` output folder, its index .csv or a"):
        open_features(tmp_path / "x.txt")
    shards = tmp_path / "shards"
    shutil.copytree(extraction["out"], shards)
    (shards / "index.csv").rename(shards / "index.shard0-of-2.csv")
    with pytest.raises(ValueError, match=r"shards: shard indexes \(index.shard0-of-2.csv, ...\) but no index.csv; m"):
        open_features(shards)
    assert len(open_features(shards / "index.shard0-of-2.csv")) == 2  # one shard's index opens alone
    out = tmp_path / "out"
    shutil.copytree(extraction["out"], out)
    a, b = str(extraction["a"]), str(extraction["b"])
    data = (out / "b.npy").read_bytes()
    (out / "b.npy").write_bytes(data[: len(data) // 2])  # header intact, data cut short
    fs = open_features(out)  # opening reads no features
    for mmap in (True, False):
        with pytest.raises(ValueError, match=r"b.npy: not a readable .npy \(.*\); delete it and rerun `marlin ext"):
            open_features(out, mmap=mmap)[b]
    (out / "b.npy").write_text("garbage")
    with pytest.raises(ValueError, match=r"b.npy: not a readable .npy"):
        fs.shape(b)
    (out / "sub" / "a.npy").unlink()
    with pytest.raises(FileNotFoundError, match=rf"index.csv: the features of {a} \(.*a.npy\) are missing; rerun "):
        open_features(out)
    (tmp_path / "bad.npz").write_text("not a zip")
    with pytest.raises(ValueError, match=r"bad.npz: not a readable .npz \(.*\); write the combined file again"):
        open_features(tmp_path / "bad.npz")
    data = (extraction["root"] / "all.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 8])
    with pytest.raises(ValueError, match="cut.safetensors: not a readable .safetensors .*runs past the end"):
        open_features(tmp_path / "cut.safetensors")
    (tmp_path / "index.csv").write_text("path,label\nx.mp4,1\n")
    with pytest.raises(ValueError, match=r"index.csv: not a `marlin extract` index \(no 'input' column\)"):
        open_features(tmp_path)


def test_the_probe_reads_the_same_features(extraction):
    """`marlin probe`'s loader goes through the reader: its matrix is the reader's, from the folder or a file."""
    fs = open_features(extraction["out"])
    ls = LabelSet(paths=[extraction["b"], extraction["a"]], targets=np.array([0, 1]), task="binary", names=["0", "1"])
    want = fs.stack("mean")[1][::-1]
    np.testing.assert_allclose(load_features(extraction["out"], ls), want)
    np.testing.assert_allclose(load_features(extraction["root"] / "all.safetensors", ls), want)


@pytest.mark.face
@pytest.mark.skipif(not HAS_FACE, reason="needs the [face] extra")
def test_all_faces_tracks_are_keys_of_their_own(tmp_path):
    from PIL import Image

    from marlin.video.io import write_video as write_rgb
    from marlin.viz.sample import sample_face_image

    face = Image.fromarray(sample_face_image()).resize((205, 240))
    frames = []
    for t in range(12):  # two people side by side
        canvas = Image.new("RGB", (640, 360), (80, 90, 100))
        canvas.paste(face, (40 + t, 60))
        canvas.paste(face, (380 - t, 50))
        frames.append(np.asarray(canvas))
    (tmp_path / "in").mkdir()
    clip = write_rgb(tmp_path / "in" / "two.mp4", np.stack(frames))
    model = Marlin(CFG.replace(img_size=64)).eval()
    opts = ExtractOptions(crop_face=True, all_faces=True, workers=0, progress=False)
    summary = extract_many(model, [clip], tmp_path / "out", opts)
    assert summary.results[0].track == "0,1"
    keys = [f"{clip}#face0", f"{clip}#face1"]
    fs = open_features(tmp_path / "out")
    assert list(fs) == keys and fs.rows[0].keys == tuple(keys)
    for k, name in zip(keys, ["two.face0.npy", "two.face1.npy"], strict=True):
        np.testing.assert_array_equal(fs[k], np.load(tmp_path / "out" / name))
    combined = open_features(write_combined(tmp_path / "all.npz", summary, tmp_path / "out"))
    assert list(combined) == ["two.face0", "two.face1"]
    np.testing.assert_array_equal(combined["two.face1"], fs[keys[1]])
    assert [y for _, y in fs.as_dataset({str(clip): 3})] == [3, 3]  # tracks fall back to their input's label
    again = extract_many(model, [clip], tmp_path / "out", opts)  # skipped: its row names the planned two.npy
    assert again.results[0].status == "skipped" and not (tmp_path / "out" / "two.npy").exists()
    assert list(open_features(tmp_path / "out")) == keys
    ls = LabelSet(paths=[clip], targets=np.array([[0.5]], np.float32), task="regression", names=["y"])
    with pytest.raises(FeatureError, match="one feature file per face track"):
        load_features(tmp_path / "out", ls)
