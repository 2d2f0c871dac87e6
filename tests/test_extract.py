"""Video -> features: the pipeline, `Marlin.extract_video` and the batch `marlin extract` command."""

import csv
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from marlin import Marlin, get_config
from marlin.cli import main as cli
from marlin.data.sources import collect_inputs
from marlin.video.extract import ExtractOptions, extract_many, output_paths, write_combined
from marlin.video.io import VideoWarning, iter_frames
from marlin.video.pipeline import extract_video
from marlin.video.windows import n_windows
from videogen import truncate, write_audio_only, write_video

CFG = get_config("marlin_vit_tiny_test")  # 32x32 crops, 4-frame clips
HAS_FACE = importlib.util.find_spec("mediapipe") is not None


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Marlin(CFG).eval()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, model):
    return model.save_pretrained(tmp_path_factory.mktemp("model") / "tiny")


def crop_video(path: Path, n: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_video(path, n, CFG.img_size, CFG.img_size)


@pytest.mark.parametrize("n", [1, 3, 8, 9, 20, 40])
def test_extract_video_window_counts_follow_the_rule(tmp_path, model, n):
    r = extract_video(model, crop_video(tmp_path / "v.mp4", n), batch_size=3)
    assert r.features.shape == (n_windows(n, CFG.clip_frames), CFG.encoder_embed_dim)
    assert len(r.window_frames) == len(r.features)


def test_features_equal_a_manual_window_forward(tmp_path, model):
    from marlin.video.io import read_video
    from marlin.video.windows import window_indices

    path = crop_video(tmp_path / "v.mp4", 30)
    frames = read_video(path)
    idx = window_indices(len(frames), CFG.clip_frames)
    x = torch.from_numpy(frames[np.array(idx)]).permute(0, 4, 1, 2, 3).float() / 255  # [n, 3, T, H, W]
    ref = model.extract_features(x, keep_seq=False)
    got = model.extract_video(path)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(model.extract_video(path, reduction="mean"), ref.mean(0))
    torch.testing.assert_close(model.extract_video(path, reduction="max"), ref.max(0).values)
    seq = model.extract_video(path, keep_seq=True)
    assert seq.shape == (len(idx), CFG.num_tokens, CFG.encoder_embed_dim)
    with pytest.raises(ValueError, match="reduction must be one of"):
        model.extract_video(path, reduction="median")


def test_uncropped_video_is_refused_without_crop_face_or_resize(tmp_path, model):
    path = write_video(tmp_path / "wide.mp4", 10, 48, 64)
    with pytest.raises(ValueError, match=r"wide.mp4: frames are 64x48, expected 32x32 face crops; use crop_face"):
        model.extract_video(path)
    assert model.extract_video(path, resize=True).shape == (1, CFG.encoder_embed_dim)


def test_collect_inputs_dirs_globs_manifests(tmp_path):
    for rel in ("a/x.mp4", "a/b/y.mkv", "c/z.mp4", "a/notes.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    (tmp_path / "list.csv").write_text("path,label\nc/z.mp4,1\n" + f"{tmp_path / 'a/x.mp4'},0\n")
    assert collect_inputs([tmp_path / "a"]) == [tmp_path / "a/b/y.mkv", tmp_path / "a/x.mp4"]
    assert collect_inputs([str(tmp_path / "**/*.mp4")]) == [tmp_path / "a/x.mp4", tmp_path / "c/z.mp4"]
    assert collect_inputs([tmp_path / "list.csv"]) == [tmp_path / "c/z.mp4", tmp_path / "a/x.mp4"]
    assert collect_inputs([tmp_path / "a", tmp_path / "a/x.mp4"]) == collect_inputs([tmp_path / "a"])  # deduplicated
    outs = output_paths(collect_inputs([tmp_path]), tmp_path / "out")
    assert outs[tmp_path / "a/b/y.mkv"] == tmp_path / "out/a/b/y.npy"


def make_bad_inputs(root: Path) -> dict[str, Path]:
    """One file of every bad-input class; each must fail alone with a one-line reason naming the file."""
    root.mkdir(parents=True, exist_ok=True)
    bad = {"not_video": root / "notes.mp4", "empty": root / "empty.mp4", "audio": root / "audio.mp4"}
    bad["not_video"].write_text("not a video\n")
    bad["empty"].write_bytes(b"")
    write_audio_only(bad["audio"])
    good = crop_video(root / "ok.mp4", 20)
    data = good.read_bytes()
    bad["truncated"] = root / "truncated.mp4"
    bad["truncated"].write_bytes(data[: len(data) // 3])
    bad["missing"] = root / "missing.mp4"
    return bad


def read_index(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {Path(r["input"]).name: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("workers", [0, 1])
def test_batch_isolates_failures_and_writes_index(tmp_path, model, workers):
    src = tmp_path / "in"
    bad = make_bad_inputs(src)
    good = [crop_video(src / "sub" / f"g{i}.mp4", n) for i, n in enumerate((5, 20, 40))]
    inputs = collect_inputs([src]) + [bad["missing"]]
    summary = extract_many(model, inputs, tmp_path / "out", ExtractOptions(workers=workers, batch_size=3,
                                                                           progress=False))  # fmt: skip
    index = read_index(tmp_path / "out" / "index.csv")
    assert len(index) == len(inputs)  # every input accounted for
    for g, n in zip(good, (5, 20, 40), strict=True):
        row = index[g.name]
        assert row["status"] == "ok" and int(row["windows"]) == n_windows(n, CFG.clip_frames)
        feats = np.load(tmp_path / "out" / "sub" / f"{g.stem}.npy")
        torch.testing.assert_close(torch.from_numpy(feats), model.extract_video(g))  # batching across videos
    for name, path in bad.items():
        row = index[path.name]
        assert row["status"] == "failed", name
        assert path.name in row["error"] and "\n" not in row["error"], row["error"]
    assert {r.status for r in summary.failed} == {"failed"}
    assert not (tmp_path / "out" / ".marlin-tmp").exists()


class WorkerKillingPath(type(Path())):
    """A path that kills the worker process unpickling it: a stand-in for a decoder segfault or an OOM kill."""

    def __reduce__(self):
        return (os._exit, (1,))


def test_a_dead_worker_fails_its_video_only(tmp_path, model):
    src = tmp_path / "in"
    inputs = [crop_video(src / f"v{i}.mp4", 12) for i in range(4)]
    inputs[1] = WorkerKillingPath(inputs[1])
    summary = extract_many(model, inputs, tmp_path / "out", ExtractOptions(workers=1, batch_size=3, progress=False))
    assert [r.status for r in summary.results] == ["ok", "failed", "ok", "ok"]  # the batch went on
    row = read_index(tmp_path / "out" / "index.csv")["v1.mp4"]
    assert row["status"] == "failed" and "v1.mp4: worker process died" in row["error"]
    for i in (0, 2, 3):
        feats = np.load(tmp_path / "out" / f"v{i}.npy")
        torch.testing.assert_close(torch.from_numpy(feats), model.extract_video(inputs[i]))
    assert not (tmp_path / "out" / "v1.npy").exists() and not (tmp_path / "out" / ".marlin-tmp").exists()


def test_cli_exit_code_resume_overwrite_and_combined(tmp_path, model_path):
    src = tmp_path / "in"
    for i in range(3):
        crop_video(src / f"v{i}.mp4", 12)
    out = tmp_path / "out"
    args = ["extract", str(src), "-o", str(out), "--model", str(model_path), "--workers", "0", "--no-progress"]
    assert cli(args + ["--combined", str(tmp_path / "all.npz")]) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")}
    assert len(first) == 3
    combined = np.load(tmp_path / "all.npz")
    assert sorted(combined.files) == ["v0", "v1", "v2"]
    assert cli(args) == 0  # resumed: nothing recomputed
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npy")} == first
    assert {r["status"] for r in read_index(out / "index.csv").values()} == {"skipped"}
    assert cli(args + ["--overwrite"]) == 0
    assert all(p.stat().st_mtime_ns > first[p.name] for p in out.glob("*.npy"))
    (src / "broken.mp4").write_text("x")
    assert cli(args) == 1  # any failure -> non-zero exit
    with pytest.raises(ValueError, match="must end in .npz or .safetensors"):
        write_combined(tmp_path / "all.txt", None, out)  # type: ignore[arg-type]


def test_kill_minus_9_then_resume_loses_nothing(tmp_path, model_path):
    src = tmp_path / "in"
    n_videos = 24
    for i in range(n_videos):
        crop_video(src / f"v{i:02d}.mp4", 40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "marlin.cli", "extract", str(src), "-o", str(out), "--model", str(model_path),
           "--workers", "0", "--batch-size", "1", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("*.npy"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in out.glob("*.npy"))
    assert 3 <= len(done_before) < n_videos, "the kill should land mid-run"
    for p in out.glob("*.npy"):  # whatever exists is complete
        assert np.load(p).shape == (n_windows(40, CFG.clip_frames), CFG.encoder_embed_dim)
    # a kill can leave hidden temp files (".name.XXXX.tmp"), never a partial file under a real name
    assert all(p.name.startswith(".") for p in out.rglob("*.tmp"))
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    index = read_index(out / "index.csv")
    assert len(index) == n_videos
    skipped = sorted(Path(r["output"]).name for r in index.values() if r["status"] == "skipped")
    assert skipped == done_before
    assert all(r["status"] in ("ok", "skipped") for r in index.values())
    assert len(list(out.glob("*.npy"))) == n_videos and not (out / ".marlin-tmp").exists()
    assert not list(out.rglob("*.tmp"))  # the resumed run cleaned up after the killed one


@pytest.mark.face
@pytest.mark.skipif(not HAS_FACE, reason="needs the [face] extra")
def test_crop_face_on_generated_real_face_clip(tmp_path):
    from marlin.viz.sample import make_sample_clip

    clip = make_sample_clip(tmp_path / "face.mp4", n_frames=40)
    model = Marlin(CFG.replace(img_size=64)).eval()  # 64 px crops keep it quick
    r = extract_video(model, clip, crop_face=True)
    assert r.features.shape == (1, CFG.encoder_embed_dim) and r.n_faceless == 0 and r.n_frames == 40
    assert r.samples and r.samples[0].shape == (64, 64, 3)
    # a face-less video gives a clear error and no features, never a corner crop
    blank = write_video(tmp_path / "blank.mp4", 20, 120, 160, frame_fn=lambda i, h, w: np.full((h, w, 3), 90, "u1"))
    from marlin.face import NoFaceError

    with pytest.raises(NoFaceError, match="no face detected in any of the"):
        extract_video(model, blank, crop_face=True)
    summary = extract_many(
        model,
        [clip, blank],
        tmp_path / "out",
        ExtractOptions(crop_face=True, workers=0, progress=False, preview_dir=tmp_path / "prev"),
    )
    assert [r.status for r in summary.results] == ["ok", "no_face"]
    assert (tmp_path / "prev" / "face.png").is_file() and not (tmp_path / "out" / "blank.npy").exists()


@pytest.mark.face
@pytest.mark.skipif(not HAS_FACE, reason="needs the [face] extra")
def test_all_faces_gives_one_feature_file_per_track(tmp_path):
    from PIL import Image

    from marlin.video.io import write_video as write_rgb
    from marlin.viz.sample import sample_face_image

    face = Image.fromarray(sample_face_image()).resize((205, 240))
    frames = []
    for t in range(20):  # two people side by side, drifting slightly
        canvas = Image.new("RGB", (640, 360), (80, 90, 100))
        canvas.paste(face, (40 + t, 60))
        canvas.paste(face, (380 - t, 50))
        frames.append(np.asarray(canvas))
    (tmp_path / "in").mkdir()
    clip = write_rgb(tmp_path / "in" / "two.mp4", np.stack(frames))
    model = Marlin(CFG.replace(img_size=64)).eval()
    summary = extract_many(model, [clip], tmp_path / "out",
                           ExtractOptions(crop_face=True, all_faces=True, workers=0, progress=False))  # fmt: skip
    assert summary.results[0].status == "ok" and summary.results[0].track == "0,1"
    files = sorted(p.name for p in (tmp_path / "out").glob("*.npy"))
    assert files == ["two.face0.npy", "two.face1.npy"]
    a, b = (np.load(tmp_path / "out" / f) for f in files)
    assert a.shape == b.shape == (1, CFG.encoder_embed_dim)
    # the index names the files really written (it used to say two.npy, which does not exist)
    outputs = read_index(tmp_path / "out" / "index.csv")["two.mp4"]["output"].split(";")
    assert [Path(o).name for o in outputs] == files and all(Path(o).is_file() for o in outputs)
    combined = np.load(write_combined(tmp_path / "all.npz", summary, tmp_path / "out"))
    assert sorted(combined.files) == ["two.face0", "two.face1"]


def test_same_stem_inputs_get_their_own_outputs(tmp_path, model):
    """clip.avi and clip.mp4 in one folder used to both write clip.npy (both rows ok, one result lost)."""
    src = tmp_path / "in"
    a = write_video(crop_video(src / "clip.mp4", 20).with_name("clip.avi"), 20, CFG.img_size, CFG.img_size,
                    codec="mpeg4")  # fmt: skip
    b = src / "clip.mp4"
    other = crop_video(src / "other.mp4", 9)
    outs = output_paths([a, b, other], tmp_path / "out")
    assert outs == {a: tmp_path / "out" / "clip.avi.npy", b: tmp_path / "out" / "clip.mp4.npy",
                    other: tmp_path / "out" / "other.npy"}  # fmt: skip
    summary = extract_many(model, [a, b, other], tmp_path / "out", ExtractOptions(workers=0, progress=False))
    assert [r.status for r in summary.results] == ["ok", "ok", "ok"]
    assert len({r.output for r in summary.results}) == 3 and all(Path(r.output).is_file() for r in summary.results)
    again = extract_many(model, [a, b, other], tmp_path / "out", ExtractOptions(workers=0, progress=False))
    assert [r.status for r in again.results] == ["skipped"] * 3  # resume sees each output


def test_non_finite_features_are_never_written_as_ok(tmp_path):
    broken = Marlin(CFG).eval()
    with torch.no_grad():
        broken.encoder.norm.weight[0] = float("nan")  # what diverged training or a bad precision would produce
    video = crop_video(tmp_path / "in" / "v.mp4", 9)
    summary = extract_many(broken, [video], tmp_path / "out", ExtractOptions(workers=0, progress=False))
    r = summary.results[0]
    assert r.status == "failed" and "NaN / inf features" in r.error
    assert not (tmp_path / "out" / "v.npy").exists()


def test_the_index_counts_the_frames_that_decoded(tmp_path, model):
    """A truncated file used to be indexed with the frame count its header declares (120) though far fewer decoded."""
    full = write_video(tmp_path / "full.mp4", 120, CFG.img_size, CFG.img_size, faststart=True)
    (tmp_path / "in").mkdir()
    cut = truncate(full, tmp_path / "in" / "cut.mp4")
    with pytest.warns(VideoWarning, match="decoded"), pytest.warns(RuntimeWarning, match="frame stream ended"):
        summary = extract_many(model, [cut], tmp_path / "out", ExtractOptions(workers=0, progress=False))
    r = summary.results[0]
    with pytest.warns(VideoWarning):
        decoded = len(list(iter_frames(cut)))
    assert r.status == "ok" and 0 < decoded < 120
    assert r.frames == decoded  # not the 120 the header declares
    assert read_index(tmp_path / "out" / "index.csv")["cut.mp4"]["frames"] == str(decoded)


def test_a_resumed_run_keeps_the_statistics_of_finished_videos(tmp_path, model):
    """Rows of videos a resumed run skips used to lose their windows / frames / seconds (all 0)."""
    videos = [crop_video(tmp_path / "in" / f"v{i}.mp4", n) for i, n in enumerate((9, 40))]
    first = extract_many(model, videos, tmp_path / "out", ExtractOptions(workers=0, progress=False))
    again = extract_many(model, videos, tmp_path / "out", ExtractOptions(workers=0, progress=False))
    for a, b in zip(first.results, again.results, strict=True):
        assert (a.status, b.status) == ("ok", "skipped")
        assert (b.windows, b.frames, b.faceless_frames) == (a.windows, a.frames, a.faceless_frames) != (0, 0, 0)
        assert b.seconds == pytest.approx(a.seconds, abs=1e-3)
    rows = read_index(tmp_path / "out" / "index.csv")
    assert rows["v1.mp4"]["windows"] == str(n_windows(40, CFG.clip_frames))


# ---- streaming: windows reach the encoder in bounded chunks while the video is still being cut -------------------
def _long_video(tmp_path: Path) -> Path:
    """80 frames at --stride 1: 36 windows (9 chunk files), more than a worker may have unread."""
    return crop_video(tmp_path / "in" / "long.mp4", 80)


def test_windows_stream_to_the_encoder_in_bounded_chunks(tmp_path, model, monkeypatch):
    import marlin.video.extract as ex

    seen: list[tuple[int, bool]] = []  # per chunk read: chunk files waiting on disk, whether the worker had finished
    read = ex._Extraction._read_chunk

    def spy(self, f, *chunk):
        seen.append((sum(p.suffix == ".win" for p in self.tmp_dir.iterdir()), f.position in self.arrived))
        read(self, f, *chunk)

    monkeypatch.setattr(ex._Extraction, "_read_chunk", spy)
    video = _long_video(tmp_path)
    summary = extract_many(model, [video], tmp_path / "out", ExtractOptions(workers=0, stride=1, batch_size=3,
                                                                            progress=False))  # fmt: skip
    n = n_windows(80, CFG.clip_frames, stride=1)
    assert summary.results[0].windows == n and len(seen) == -(-n // ex.CHUNK_WINDOWS)
    assert max(k for k, _ in seen) <= ex.CHUNKS_AHEAD  # never more unread chunks than allowed: disk stays flat
    assert not seen[0][1]  # the encoder started long before the worker finished the video
    feats = np.load(tmp_path / "out" / "long.npy")
    torch.testing.assert_close(torch.from_numpy(feats), model.extract_video(video, stride=1), rtol=0, atol=0)


def test_the_windows_of_a_dead_try_are_replaced_by_its_rerun(tmp_path, model, monkeypatch):
    """A worker that died after writing some chunks (run_jobs reruns its video) must leave no window in the output."""
    import marlin.video.extract as ex

    real, consumed = ex.produce, []

    def dies_once(item, tmp_dir, opts, clip_frames, img_size):
        position, _ = item
        dead = f"v{position:07d}.{0:016x}{0:08x}"  # older than any real try
        garbage = np.random.default_rng(0).integers(0, 255, (ex.CHUNK_WINDOWS, clip_frames, img_size, img_size, 3))
        for k in range(2):
            ex._write_chunk(tmp_dir, dead, 0, k, list(garbage.astype(np.uint8)))
        deadline = time.time() + 30
        while any(tmp_dir.glob(f"{dead}.*")) and time.time() < deadline:  # the encoder takes them...
            time.sleep(0.01)
        consumed.append(not any(tmp_dir.glob(f"{dead}.*")))
        return real(item, tmp_dir, opts, clip_frames, img_size)  # ...then the rerun writes the video again

    monkeypatch.setattr(ex, "produce", dies_once)
    video = _long_video(tmp_path)
    summary = extract_many(model, [video], tmp_path / "out", ExtractOptions(workers=0, stride=1, batch_size=3,
                                                                            progress=False))  # fmt: skip
    assert summary.results[0].status == "ok" and consumed == [True]
    feats = np.load(tmp_path / "out" / "long.npy")
    torch.testing.assert_close(torch.from_numpy(feats), model.extract_video(video, stride=1), rtol=0, atol=0)


class _Broken:
    """An encoder that fails on its first batch."""

    def __init__(self, model: Marlin) -> None:
        self.config, self.device = model.config, model.device

    def extract_features(self, x, keep_seq=False):
        raise RuntimeError("encoder broke")


@pytest.mark.parametrize("workers", [0, 1])
def test_an_encoder_error_stops_the_workers_and_leaves_no_window_file(tmp_path, model, workers):
    video = _long_video(tmp_path)
    with pytest.raises(RuntimeError, match="encoder broke"):  # and no hang: the worker waiting for room gives up
        extract_many(_Broken(model), [video], tmp_path / "out", ExtractOptions(workers=workers, stride=1,
                                                                                progress=False))  # fmt: skip
    assert not list((tmp_path / "out").glob(".marlin-tmp*"))
    assert read_index(tmp_path / "out" / "index.csv")["long.mp4"]["status"] == "pending"


def test_a_long_video_gets_a_progress_bar_of_its_own(tmp_path, model, monkeypatch, capsys):
    import marlin.video.extract as ex

    monkeypatch.setattr(ex, "LONG_VIDEO_S", 0.0)  # every video counts as long here
    monkeypatch.setattr(ex, "PROGRESS_EVERY_S", 0.0)
    video = _long_video(tmp_path)
    extract_many(model, [video], tmp_path / "out", ExtractOptions(workers=0, stride=1, batch_size=1))
    err = capsys.readouterr().err
    assert "long.mp4:" in err and "frame" in err and "extract" in err
    extract_many(model, [video], tmp_path / "out2", ExtractOptions(workers=0, stride=1, progress=False))
    assert capsys.readouterr().err == ""


def test_the_encoder_side_returns_freed_heap_after_every_batch(tmp_path, model, monkeypatch):
    """Long videos ran at growing memory until the encoder process handed its freed heap back after each batch (the
    60-minute 720p run: 1638 MB -> 610 MB peak, benchmarks/bench_long_video.py); the call must stay in the loop."""
    import marlin.video.extract as ex

    calls = []
    monkeypatch.setattr(ex, "release_free_heap", lambda: calls.append(1))
    src = tmp_path / "in"
    inputs = [crop_video(src / f"v{i}.mp4", 100) for i in range(2)]
    summary = extract_many(model, inputs, tmp_path / "out", ExtractOptions(workers=0, batch_size=2, progress=False))
    windows = sum(r.windows for r in summary.results)
    assert windows >= 4 and len(calls) >= windows // 2  # at least once per encoder batch of 2
    monkeypatch.undo()
    ex.release_free_heap()  # the real one: glibc's malloc_trim here, a no-op where there is none
