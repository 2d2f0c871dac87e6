"""Tests for marlin.data.prepare and `marlin prepare`: sources, splits, store, resume, kill -9, failures."""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from marlin.cli import main
from marlin.data.datasets import PretrainDataset
from marlin.data.prepare import (
    PrepareSettings,
    Source,
    _StoreLock,
    assign_splits,
    collect_sources,
    prepare_store,
    write_manifest,
)
from marlin.data.store import ClipStore, StoreError
from marlin.video.io import write_video
from videogen import frame_index, make_frame

REPO = Path(__file__).resolve().parents[1]
FAST = PrepareSettings(size=64, crop_face=False, parse=False)  # no mediapipe needed


def barcode_video(path: Path, n: int, side: int = 64) -> Path:
    """A square video whose frame k carries k as a barcode (see videogen.make_frame)."""
    return write_video(path, np.stack([make_frame(k, side, side) for k in range(n)]), preset="ultrafast")


def read_manifest(root: Path) -> list[dict[str, str]]:
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def videos(tmp_path) -> Path:
    """Two people, two clips each: <person>/<clip>.mp4."""
    src = tmp_path / "src"
    for person, n in (("ann", 12), ("bob", 20)):
        (src / person).mkdir(parents=True)
        barcode_video(src / person / "c1.mp4", n)
        shutil.copy(src / person / "c1.mp4", src / person / "c2.mp4")
    return src


# ---- sources ---------------------------------------------------------------------------------------------------------
def test_collect_nested_videos_groups_by_first_folder(videos):
    sources = collect_sources([videos])
    assert [(s.id, s.group, s.kind) for s in sources] == [
        ("ann__c1", "ann", "video"),
        ("ann__c2", "ann", "video"),
        ("bob__c1", "bob", "video"),
        ("bob__c2", "bob", "video"),
    ]


def test_collect_flat_folder_groups_by_stem_and_regex(tmp_path):
    for name in ("s1_a.mp4", "s1_b.mp4", "s2_a.mp4"):
        (tmp_path / name).write_bytes(b"")
    assert [s.group for s in collect_sources([tmp_path])] == ["s1_a", "s1_b", "s2_a"]
    assert [s.group for s in collect_sources([tmp_path], group_regex=r"(s\d)_")] == ["s1", "s1", "s2"]
    assert [s.group for s in collect_sources([tmp_path], group_regex=r"_(?P<group>\w)\.mp4")] == ["a", "b", "a"]
    with pytest.raises(ValueError, match="does not match"):
        collect_sources([tmp_path], group_regex=r"s1_")  # whole match... but s2_a.mp4 has none


def test_collect_youtube_faces_layout(tmp_path):
    db = tmp_path / "frame_images_DB"
    for person, clip, n in (("Aaron_Eckhart", "0", 3), ("Zoe_Ball", "1", 2)):
        (db / person / clip).mkdir(parents=True)
        for k in (10, 9, 100)[:n]:
            (db / person / clip / f"{clip}.{k}.jpg").write_bytes(b"")
    sources = collect_sources([db])
    assert [(s.id, s.group, s.kind) for s in sources] == [
        ("Aaron_Eckhart__0", "Aaron_Eckhart", "frames"),
        ("Zoe_Ball__1", "Zoe_Ball", "frames"),
    ]
    from marlin.data.prepare import _frame_files

    assert [p.name for p in _frame_files(sources[0].path)] == ["0.9.jpg", "0.10.jpg", "0.100.jpg"]  # natural order


def test_collect_csv_with_group_and_split(tmp_path, videos):
    manifest = tmp_path / "list.csv"
    manifest.write_text("path,group,split\nsrc/ann/c1.mp4,p1,val\nsrc/bob/c1.mp4,,\n")
    sources = collect_sources([manifest])
    assert [(s.id, s.group, s.split) for s in sources] == [("src__ann__c1", "p1", "val"), ("src__bob__c1", "src", None)]
    (tmp_path / "bad.csv").write_text("name\nx\n")
    with pytest.raises(ValueError, match="'path'"):
        collect_sources([tmp_path / "bad.csv"])


def test_colliding_ids_get_a_path_hash(tmp_path):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "clip.mp4").write_bytes(b"")
    ids = [s.id for s in collect_sources([tmp_path / "a", tmp_path / "b"])]
    assert len(set(ids)) == 2 and all(i.startswith("clip-") for i in ids)
    assert ids == [s.id for s in collect_sources([tmp_path / "a", tmp_path / "b"])]  # deterministic


def test_collect_refuses_missing_and_empty(tmp_path):
    with pytest.raises(ValueError, match="no such file or folder"):
        collect_sources([tmp_path / "nope"])
    with pytest.raises(ValueError, match="no video file or frame folder"):
        collect_sources([tmp_path])


# ---- splits ----------------------------------------------------------------------------------------------------------
def test_split_keeps_groups_whole_and_hits_the_fraction():
    groups = {f"{g}_{k}": g for g in "abcdefghijklmnopqrst" for k in range(5)}  # 20 groups x 5 items
    split = assign_splits(groups, 0.2, seed=0)
    for g in set(groups.values()):
        assert len({split[i] for i in groups if groups[i] == g}) == 1  # never both sides
    assert sum(s == "val" for s in split.values()) == 20
    assert split == assign_splits(dict(reversed(list(groups.items()))), 0.2, seed=0)  # order independent
    assert split != assign_splits(groups, 0.2, seed=1)


def test_split_edge_cases(caplog):
    assert set(assign_splits({"a": "x", "b": "y"}, 0.0).values()) == {"train"}
    assert sorted(assign_splits({"a": "x", "b": "y"}, 0.9).values()) == ["train", "val"]  # one group stays train
    with caplog.at_level(logging.WARNING, logger="marlin"):
        assert set(assign_splits({"a": "s1", "b": "s1"}, 0.1).values()) == {"train"}
    assert "val is empty" in caplog.text
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        assign_splits({"a": "x"}, 1.0)


# ---- building a store (no face tools needed) -------------------------------------------------------------------------
def test_prepare_writes_a_readable_store(tmp_path, videos):
    out = tmp_path / "store"
    summary = prepare_store(collect_sources([videos]), out, FAST, workers=0, val_fraction=0.5, progress=False)
    assert summary.counts == {"ok": 4} and not summary.failed
    rows = read_manifest(out)
    assert [r["n_frames"] for r in rows] == ["12", "12", "20", "20"]
    assert {r["group"]: r["split"] for r in rows} in ({"ann": "val", "bob": "train"}, {"ann": "train", "bob": "val"})
    store = ClipStore(out)
    clip = store.read_video("bob__c1", [0, 7, 19])
    assert clip.shape == (3, 64, 64, 3)
    assert [frame_index(f) for f in clip] == [0, 7, 19]
    assert not any(p.name.startswith(".") for p in (out / "items").iterdir())
    ds = PretrainDataset(out, None, clip_frames=4, img_size=64, seed=0)
    assert "parse" not in ds[0] and ds[0]["video"].shape == (3, 4, 64, 64)


def test_raw_codec_store_is_memory_mappable(tmp_path):
    barcode_video(tmp_path / "v.mp4", 6)
    settings = PrepareSettings(size=64, crop_face=False, parse=False, video_codec="raw", parse_codec="raw")
    prepare_store(collect_sources([tmp_path / "v.mp4"]), tmp_path / "s", settings, workers=0, progress=False)
    raw = np.memmap(tmp_path / "s" / "items" / "v" / "video.raw", dtype=np.uint8, mode="r", shape=(6, 64, 64, 3))
    assert [frame_index(f) for f in raw] == list(range(6))
    np.testing.assert_array_equal(ClipStore(tmp_path / "s").read_video("v", [5, 1]), raw[[5, 1]])


def test_frame_step_and_max_frames_bound_storage(tmp_path):
    barcode_video(tmp_path / "v.mp4", 30)
    settings = PrepareSettings(size=64, crop_face=False, parse=False, frame_step=3, max_frames=4)
    prepare_store(collect_sources([tmp_path / "v.mp4"]), tmp_path / "s", settings, workers=0, progress=False)
    store = ClipStore(tmp_path / "s")
    assert store.items[0].n_frames == 4 and store.items[0].frame_step == 3
    assert [frame_index(f) for f in store.read_video("v", range(4))] == [0, 3, 6, 9]


def test_non_square_input_is_centre_cropped_without_face_detection(tmp_path):
    wide = np.stack([make_frame(k, 64, 96) for k in range(3)])
    wide[:, :, :16] = 255  # only the 16 px margins outside the centre square are white
    wide[:, :, -16:] = 255
    write_video(tmp_path / "w.mp4", wide, preset="ultrafast")
    prepare_store(collect_sources([tmp_path / "w.mp4"]), tmp_path / "s", FAST, workers=0, progress=False)
    crop = ClipStore(tmp_path / "s").read_video("w", [0])[0]
    assert crop.shape == (64, 64, 3) and crop[:, :4].mean() < 200  # the white margins were cut away


def test_youtube_faces_frames_are_prepared(tmp_path):
    from PIL import Image

    clip = tmp_path / "db" / "Ann" / "0"
    clip.mkdir(parents=True)
    for k in range(12):
        Image.fromarray(make_frame(k, 64, 64)).save(clip / f"0.{k}.jpg", quality=95)
    prepare_store(collect_sources([tmp_path / "db"]), tmp_path / "s", FAST, workers=0, progress=False)
    store = ClipStore(tmp_path / "s")
    assert store.items[0].group == "Ann"
    assert [frame_index(f) for f in store.read_video("Ann__0", [2, 10, 11])] == [2, 10, 11]


def test_failures_are_isolated_listed_and_set_the_exit_code(tmp_path, videos, capsys):
    (videos / "bad.mp4").write_bytes(b"this is not a video")
    out = tmp_path / "store"
    rc = main(["prepare", str(videos), "--out", str(out), "--size", "64", "--no-crop-face", "--no-parse",
               "--workers", "0", "--no-progress"])  # fmt: skip
    assert rc == 1
    assert "not a video file" in capsys.readouterr().err
    with open(out / "errors.csv", newline="") as f:
        errors = list(csv.DictReader(f))
    assert [(e["id"], e["status"]) for e in errors] == [("bad", "failed")]
    assert len(read_manifest(out)) == 4  # the good ones are all there
    (videos / "bad.mp4").unlink()
    assert main(["prepare", str(videos), "--out", str(out), "--size", "64", "--no-crop-face", "--no-parse",
                 "--workers", "0", "--no-progress"]) == 0  # fmt: skip
    assert (out / "errors.csv").read_text().strip() == "id,status,source,error"


@pytest.mark.slow  # spawns worker processes that import torch: several seconds
def test_worker_processes_give_the_same_store(tmp_path, videos):
    summary = prepare_store(collect_sources([videos]), tmp_path / "s", FAST, workers=2, progress=False)
    assert summary.counts == {"ok": 4}
    assert [frame_index(f) for f in ClipStore(tmp_path / "s").read_video("ann__c2", [0, 11])] == [0, 11]


@dataclasses.dataclass(frozen=True)
class WorkerKillingSource(Source):
    """A source that kills the worker process unpickling it: a stand-in for a decoder segfault or an OOM kill."""

    def __reduce__(self):
        return (os._exit, (1,))


@pytest.mark.slow  # spawns worker processes that import torch, three pools: ~10 s
def test_a_dead_worker_fails_its_item_only(tmp_path, videos):
    sources = collect_sources([videos])
    sources[2] = WorkerKillingSource(*dataclasses.astuple(sources[2]))
    summary = prepare_store(sources, tmp_path / "s", FAST, workers=1, progress=False)
    assert summary.counts == {"ok": 3, "failed": 1}
    (dead,) = summary.failed
    assert dead.id == sources[2].id and dead.error.startswith("worker process died")
    with open(tmp_path / "s" / "errors.csv", newline="") as f:
        assert [e["id"] for e in csv.DictReader(f)] == [sources[2].id]
    assert len(read_manifest(tmp_path / "s")) == 3


def test_resume_skips_finished_items_and_redoes_changed_sources(tmp_path, videos):
    out = tmp_path / "store"
    sources = collect_sources([videos])
    prepare_store(sources, out, FAST, workers=0, progress=False)
    meta = out / "items" / "ann__c1" / "meta.json"
    before = meta.stat().st_mtime_ns
    (out / "items" / ".tmp-bob__c1-123").mkdir()  # what a killed run leaves behind
    again = prepare_store(sources, out, FAST, workers=0, progress=False)
    assert again.counts == {"skipped": 4}
    assert meta.stat().st_mtime_ns == before
    assert not (out / "items" / ".tmp-bob__c1-123").exists()
    barcode_video(videos / "ann" / "c1.mp4", 5)  # the source changed: its item is redone
    third = prepare_store(sources, out, FAST, workers=0, progress=False)
    assert third.counts == {"skipped": 3, "ok": 1}
    assert ClipStore(out).meta("ann__c1")["n_frames"] == 5


def test_store_settings_are_fixed(tmp_path, videos, capsys):
    out = tmp_path / "store"
    prepare_store(collect_sources([videos]), out, FAST, workers=0, progress=False)
    with pytest.raises(StoreError, match="size: store has 64, asked 32"):
        prepare_store(collect_sources([videos]), out, PrepareSettings(size=32, crop_face=False, parse=False),
                      workers=0, progress=False)  # fmt: skip
    rc = main(["prepare", str(videos), "--out", str(out), "--size", "64", "--no-crop-face", "--workers", "0"])
    assert rc == 2 and "parse: store has False, asked True" in capsys.readouterr().err


def test_a_second_run_on_the_same_store_is_refused(tmp_path, videos):
    out = tmp_path / "store"
    out.mkdir()
    with _StoreLock(out), pytest.raises(StoreError, match="another `marlin prepare`"):
        prepare_store(collect_sources([videos]), out, FAST, workers=0, progress=False)


def test_regrouping_resplits_without_recomputing(tmp_path, videos):
    out = tmp_path / "store"
    prepare_store(collect_sources([videos]), out, FAST, workers=0, progress=False)
    assert {r["split"] for r in read_manifest(out)} == {"train"}
    regrouped = collect_sources([videos], group_regex=r"(c\d)\.mp4")
    summary = prepare_store(regrouped, out, FAST, workers=0, val_fraction=0.5, progress=False)
    assert summary.counts == {"skipped": 4}
    rows = read_manifest(out)
    assert {r["group"] for r in rows} == {"c1", "c2"}
    assert sorted(r["split"] for r in rows) == ["train", "train", "val", "val"]
    assert write_manifest(out) == (4, 0)  # without the run's groups: the groups stored per item, no val


@pytest.mark.slow  # two subprocess runs: ~5 s
def test_kill_9_mid_run_loses_nothing_and_resume_completes(tmp_path):
    """A run killed with SIGKILL leaves only complete items; the rerun skips them and finishes the rest."""
    src = tmp_path / "src"
    src.mkdir()
    barcode_video(src / "v00.mp4", 48, side=128)
    for k in range(1, 30):
        shutil.copy(src / "v00.mp4", src / f"v{k:02d}.mp4")
    out = tmp_path / "store"
    cmd = [sys.executable, "-m", "marlin.cli", "prepare", str(src), "--out", str(out), "--size", "128",
           "--no-crop-face", "--no-parse", "--workers", "0", "--no-progress"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    items = out / "items"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        if items.is_dir() and sum(not p.name.startswith(".") for p in items.iterdir()) >= 3:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed; make it longer"
    done = {p.name: (p / "meta.json").stat().st_mtime_ns for p in items.iterdir() if not p.name.startswith(".")}
    assert 3 <= len(done) < 30
    for name in done:  # every visible item is complete and reads back
        meta = json.loads((items / name / "meta.json").read_text())
        assert meta["n_frames"] == 48
        assert (items / name / "video.bin").stat().st_size == np.load(items / name / "video.idx.npy")[-1]

    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(done)} skipped" in result.stdout and f"{30 - len(done)} ok" in result.stdout
    assert {p.name for p in items.iterdir()} == {f"v{k:02d}" for k in range(30)}  # no leftover temp folder
    assert all((items / n / "meta.json").stat().st_mtime_ns == t for n, t in done.items())  # not redone
    store = ClipStore(out)
    assert len(store) == 30
    assert [frame_index(f) for f in store.read_video("v29", [0, 47])] == [0, 47]


# ---- with face detection and parsing (mediapipe) ---------------------------------------------------------------------
def face_video(path: Path, n: int = 12) -> Path:
    """A real face (Grace Hopper) pasted into a 320x240 frame, moving a few pixels per frame."""
    mpl = pytest.importorskip("matplotlib.cbook")
    from PIL import Image

    face = Image.open(mpl.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((150, 176))
    frames = []
    for k in range(n):
        canvas = Image.new("RGB", (320, 240), (90, 110, 130))
        canvas.paste(face, (80 + 2 * (k % 5), 30 + (k % 3)))
        frames.append(np.asarray(canvas))
    return write_video(path, np.stack(frames), preset="ultrafast")


@pytest.mark.face
@pytest.mark.slow
def test_prepare_crops_and_parses_a_real_face(tmp_path):
    pytest.importorskip("mediapipe")
    (tmp_path / "src").mkdir()
    face_video(tmp_path / "src" / "hopper.mp4")
    noise = np.random.default_rng(0).integers(0, 255, (6, 96, 96, 3), dtype=np.uint8)
    write_video(tmp_path / "src" / "noise.mp4", noise, preset="ultrafast")
    settings = PrepareSettings(size=112)
    summary = prepare_store(collect_sources([tmp_path / "src"]), tmp_path / "s", settings, workers=0, progress=False)
    assert summary.counts == {"ok": 1, "no_face": 1}
    assert "no face detected" in summary.failed[0].error
    store = ClipStore(tmp_path / "s")
    meta = store.meta("hopper")
    assert meta["n_frames"] == 12 and meta["faceless"] == 0 and meta["parse_missing"] == 0
    parse = store.read_parse("hopper", range(12))
    assert parse.shape == (12, 112, 112)
    for label in (1, 4, 5, 6):  # skin, both eyes and the nose in every frame
        assert (parse == label).any(axis=(1, 2)).all()
    # the face fills the crop: skin is the most common label in the central quarter
    centre = parse[:, 28:84, 28:84]
    assert np.bincount(centre.ravel(), minlength=11).argmax() == 1
    item = PretrainDataset(tmp_path / "s", clip_frames=8, img_size=112, seed=0)[0]
    assert item["video"].shape == (3, 8, 112, 112) and item["parse"].shape == (8, 112, 112)


def test_preview_writes_one_sheet_per_prepared_item(tmp_path, videos):
    from PIL import Image

    out, prev = tmp_path / "store", tmp_path / "prev"
    rc = main(["prepare", str(videos), "--out", str(out), "--size", "64", "--no-crop-face", "--no-parse",
               "--workers", "0", "--no-progress", "--preview", str(prev)])  # fmt: skip
    assert rc == 0
    ids = sorted(r["id"] for r in read_manifest(out))
    assert sorted(p.stem for p in prev.glob("*.png")) == ids
    sheet = np.asarray(Image.open(prev / f"{ids[0]}.png").convert("RGB"))
    assert sheet.shape[1] > 4 * 64  # several frames side by side
