"""Tests for marlin.video.io: probing, streaming decode, bad inputs and atomic writing, on files made in tmp_path."""

from __future__ import annotations

import time
import tracemalloc
import warnings
from pathlib import Path

import av
import numpy as np
import pytest

from marlin.video import io as mv
from marlin.video.io import VideoError, VideoWarning, iter_frames, probe_video, read_video
from videogen import (
    frame_index,
    make_frame,
    truncate,
    write_audio_only,
    write_undecodable_video,
    write_video,
    write_video_without_frames,
)


def _indices(frames: np.ndarray) -> list[int]:
    return [frame_index(f) for f in frames]


def test_probe_mp4_reads_container_metadata(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=20, height=64, width=96, fps=25)
    info = probe_video(path)
    assert info.path == path
    assert (info.n_frames, info.width, info.height, info.rotation) == (20, 96, 64, 0)
    assert info.fps == pytest.approx(25.0)
    assert info.duration_s == pytest.approx(0.8, abs=0.05)
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")


def test_probe_counts_packets_when_container_has_no_count(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mkv", n_frames=13, codec="ffv1")
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska stores no count: the fallback is what is tested
    assert probe_video(path).n_frames == 13
    assert len(read_video(path)) == 13


def test_iter_frames_yields_every_frame_in_order(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=30)
    frames = read_video(path)
    assert frames.shape == (30, 64, 96, 3) and frames.dtype == np.uint8
    assert frames.flags.c_contiguous
    assert _indices(frames) == list(range(30))
    # lossy H.264, but close to what was written
    assert np.abs(frames[7].astype(int) - make_frame(7).astype(int)).mean() < 6


def test_iter_frames_start_step_stop(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=30)
    assert _indices(list(iter_frames(path, start=3, step=4, stop=20))) == [3, 7, 11, 15, 19]
    assert _indices(list(iter_frames(path, start=28, step=5))) == [28]
    assert list(iter_frames(path, start=40)) == []
    with pytest.raises(VideoError, match="no frames selected"):
        read_video(path, start=40)
    with pytest.raises(ValueError, match="step"):
        iter_frames(path, step=0)  # checked at the call, not at the first frame


def test_iter_frames_resizes(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", n_frames=3)
    assert read_video(path, size=(32, 48)).shape == (3, 32, 48, 3)
    square = read_video(path, size=50)
    assert square.shape == (3, 50, 50, 3)
    assert _indices(read_video(path, size=(64, 200))) == [0, 1, 2]


def test_iter_frames_keeps_memory_flat(tmp_path: Path) -> None:
    n, frame_bytes = 200, 64 * 96 * 3
    path = write_video(tmp_path / "long.mp4", n_frames=n)
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_frames(path))
        _, peak_stream = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        frames = read_video(path)  # the contrast: holds every frame, so the measurement can see frames
        _, peak_read = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n and len(frames) == n
    assert peak_read > n * frame_bytes
    assert peak_stream < 20 * frame_bytes


# ---- bad inputs: each raises VideoError with one line naming the file --------------------------------------------


def _random_bytes(tmp_path: Path) -> Path:
    path = tmp_path / "random.mp4"
    path.write_bytes(np.random.default_rng(0).bytes(20_000))
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.mp4"
    path.write_bytes(b"")
    return path


def _png(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "face.png"
    Image.fromarray(make_frame(3)).save(path)
    return path


BAD_FILES = {
    "missing": (lambda d: d / "missing.mp4", "no such file"),
    "directory": (lambda d: (d / "folder.mp4").mkdir() or d / "folder.mp4", "is a directory"),
    "random bytes": (_random_bytes, "not a video file"),
    "text": (_text, "not a video file"),
    "empty": (_empty, "not a video file"),
    "still image": (_png, "still image"),
    "truncated mp4": (lambda d: truncate(write_video(d / "full.mp4", 50), d / "truncated.mp4"), "not a video file"),
    "audio only mp2": (lambda d: write_audio_only(d / "speech.mp2"), "no video stream"),
    "audio only aac": (lambda d: write_audio_only(d / "speech.m4a"), "no video stream"),
    "zero frames mkv": (lambda d: write_video_without_frames(d / "zero.mkv"), "video stream has no frames"),
    "zero frames avi": (lambda d: write_video_without_frames(d / "zero.avi"), "video stream has no frames"),
    "undecodable": (lambda d: write_undecodable_video(d / "garbage.avi"), "no decodable video frames"),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize(
    "reader", [probe_video, read_video, lambda p: next(iter_frames(p))], ids=["probe", "read", "iter"]
)
def test_bad_file_raises_one_line_video_error(tmp_path: Path, kind: str, reader) -> None:
    make, reason = BAD_FILES[kind]
    path = make(tmp_path)
    with pytest.raises(VideoError) as excinfo:
        reader(path)
    message = str(excinfo.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert reason in message
    assert isinstance(excinfo.value, ValueError)


def test_truncated_after_header_yields_decoded_frames_and_warns(tmp_path: Path) -> None:
    full = write_video(tmp_path / "full.mp4", 60, faststart=True)  # index first, so the cut loses frames only
    path = truncate(full, tmp_path / "cut.mp4")
    assert probe_video(path).n_frames == 60  # the header still declares every frame
    with pytest.warns(VideoWarning, match=r"cut\.mp4: .*decoded \d+ of the 60 frames"):
        frames = read_video(path)
    assert 0 < len(frames) < 60
    assert _indices(frames) == list(range(len(frames)))


def test_intact_file_reads_without_warning(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.mp4", 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(read_video(path)) == 12


def test_max_pixels_guard(tmp_path: Path) -> None:
    path = write_video(tmp_path / "wide.mp4", n_frames=2, height=64, width=96)
    for reader in (probe_video, read_video):
        with pytest.raises(VideoError, match=r"wide\.mp4: resolution 96x64 is above max_pixels=6143"):
            reader(path, max_pixels=96 * 64 - 1)
    assert len(read_video(path, max_pixels=96 * 64)) == 2


@pytest.mark.slow
def test_huge_resolution_decodes_quickly(tmp_path: Path) -> None:
    """8K UHD, 2 frames: within the default limit; probing and decoding take well under a second when idle."""
    path = write_video(tmp_path / "8k.mp4", n_frames=2, height=4320, width=7680, codec_options={"preset": "ultrafast"})
    started = time.perf_counter()
    info = probe_video(path)
    indices = [frame_index(frame) for frame in iter_frames(path)]
    elapsed = time.perf_counter() - started
    assert (info.width, info.height, info.n_frames) == (7680, 4320, 2)
    assert indices == [0, 1]
    assert elapsed < 15, f"probing and decoding two 8K frames took {elapsed:.1f} s"
    small = read_video(path, size=(108, 192))  # the use case: shrink while streaming
    assert small.shape == (2, 108, 192, 3) and _indices(small) == [0, 1]
    with pytest.raises(VideoError, match=r"8k\.mp4: resolution 7680x4320 is above max_pixels=2073600"):
        probe_video(path, max_pixels=1920 * 1080)


# ---- pixel formats and orientation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codec", "pix_fmt", "height", "width"),
    [
        ("odd.mp4", "libx264", "yuv444p", 97, 221),
        ("odd420.mkv", "ffv1", "yuv420p", 97, 221),
        ("gray.mkv", "ffv1", "gray", 64, 96),
        ("gray10.mkv", "ffv1", "gray10le", 64, 96),
        ("rgba.mov", "png", "rgba", 64, 96),
        ("mjpeg.avi", "mjpeg", "yuvj420p", 64, 96),
    ],
)
def test_pixel_formats_decode_to_rgb24(tmp_path: Path, name: str, codec: str, pix_fmt: str, height: int, width: int):
    path = write_video(tmp_path / name, 5, height, width, codec=codec, pix_fmt=pix_fmt)
    info = probe_video(path)
    assert (info.width, info.height, info.pix_fmt) == (width, height, pix_fmt)
    frames = read_video(path)
    assert frames.shape == (5, height, width, 3) and frames.dtype == np.uint8
    assert _indices(frames) == list(range(5))
    first = next(iter_frames(path))
    assert first.flags.c_contiguous and first.flags.owndata  # not a view of FFmpeg's padded rows
    if pix_fmt.startswith("gray"):
        assert np.array_equal(frames[..., 0], frames[..., 1]) and np.array_equal(frames[..., 1], frames[..., 2])


def test_ten_bit_video(tmp_path: Path) -> None:
    try:
        path = write_video(tmp_path / "10bit.mp4", 5, codec="libx264", pix_fmt="yuv420p10le")
    except (av.FFmpegError, ValueError) as err:
        pytest.skip(f"this PyAV build's libx264 cannot encode yuv420p10le: {err}")
    assert probe_video(path).pix_fmt == "yuv420p10le"
    frames = read_video(path)
    assert frames.dtype == np.uint8 and frames.shape == (5, 64, 96, 3)
    assert _indices(frames) == list(range(5))


def _corner_marker(index: int, height: int, width: int) -> np.ndarray:
    frame = np.zeros((height, width, 3), np.uint8)
    frame[: height // 4, : width // 4] = 255  # white block in the top-left corner of the stored frame
    return frame


@pytest.mark.parametrize(
    ("rotation", "corner"), [(0, "top-left"), (90, "bottom-left"), (180, "bottom-right"), (270, "top-right")]
)
def test_display_rotation_is_applied(tmp_path: Path, rotation: int, corner: str) -> None:
    """A display matrix rotating 90 degrees counter-clockwise moves the stored top-left corner to the bottom-left."""
    path = write_video(tmp_path / f"rot{rotation}.mp4", 3, 64, 96, rotation=rotation, frame_fn=_corner_marker)
    info = probe_video(path)
    assert info.rotation == rotation
    assert (info.width, info.height) == ((64, 96) if rotation in (90, 270) else (96, 64))
    frames = read_video(path)
    assert frames.shape == (3, info.height, info.width, 3)
    h, w = info.height // 8, info.width // 8  # a patch well inside each corner
    corners = {
        "top-left": frames[:, :h, :w],
        "top-right": frames[:, :h, -w:],
        "bottom-left": frames[:, -h:, :w],
        "bottom-right": frames[:, -h:, -w:],
    }
    assert {name for name, patch in corners.items() if patch.mean() > 200} == {corner}
    resized = read_video(path, size=(40, 30))  # size is the displayed (height, width)
    assert resized.shape == (3, 40, 30, 3)


# ---- writing -------------------------------------------------------------------------------------------------


def test_write_video_roundtrip_and_no_temp_files(tmp_path: Path) -> None:
    frames = np.stack([make_frame(i, 224, 224) for i in range(20)])
    out = mv.write_video(tmp_path / "crop.mp4", frames, fps=30)
    assert out == tmp_path / "crop.mp4"
    assert [p.name for p in tmp_path.iterdir()] == ["crop.mp4"]
    info = probe_video(out)
    assert (info.n_frames, info.width, info.height, info.codec) == (20, 224, 224, "h264")
    assert info.fps == pytest.approx(30.0)
    back = read_video(out)
    assert _indices(back) == list(range(20))
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 3  # CRF 18


def test_write_video_accepts_an_iterator_and_moves_index_first(tmp_path: Path) -> None:
    out = mv.write_video(tmp_path / "stream.mp4", (make_frame(i) for i in range(8)), fps=25)
    assert _indices(read_video(out)) == list(range(8))
    data = out.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")  # +faststart


def test_write_video_failure_keeps_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "crop.mp4"
    target.write_bytes(b"previous")
    bad = [make_frame(0), make_frame(1).astype(np.float32)]
    with pytest.raises(ValueError, match=r"crop\.mp4: frame 1 must be a uint8 \[H, W, 3\] RGB array"):
        mv.write_video(target, bad)
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["crop.mp4"]


@pytest.mark.parametrize(
    ("frames", "match"),
    [
        (np.zeros((0, 64, 96, 3), np.uint8), "no frames to write"),
        (np.zeros((2, 97, 221, 3), np.uint8), "yuv420p needs even frame sides, got 221x97"),
        ([make_frame(0), make_frame(1, 32, 32)], "frame 1 is 32x32, expected 96x64"),
    ],
    ids=["empty", "odd-sides", "size-change"],
)
def test_write_video_rejects_bad_frames(tmp_path: Path, frames, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        mv.write_video(tmp_path / "out.mp4", frames)
    assert list(tmp_path.iterdir()) == []


def test_write_video_odd_sides_with_yuv444p(tmp_path: Path) -> None:
    frames = np.stack([make_frame(i, 97, 221) for i in range(4)])
    out = mv.write_video(tmp_path / "odd.mp4", frames, pix_fmt="yuv444p")
    assert read_video(out).shape == (4, 97, 221, 3)


# ---- read_frames: frame-accurate seeking ---------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".mp4", ".mkv"])
def test_read_frames_seeks_to_exactly_the_frames_sequential_decoding_numbers(
    tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long clip with B-frames and a keyframe every 50 frames: seeking gives the frames decoding from the start
    gives, bit for bit, and it is the seek path that served them (the sequential one is never entered)."""
    n = mv.SEEK_AFTER + 200
    path = write_video(tmp_path / f"long{suffix}", n, 32, 96, codec_options={"g": "50", "bf": "2"})
    wanted = [mv.SEEK_AFTER + 7, mv.SEEK_AFTER + 3, mv.SEEK_AFTER + 3, mv.SEEK_AFTER + 120, mv.SEEK_AFTER + 61]
    sequential = mv.read_frames(path, wanted, seek=False)
    assert [frame_index(f) for f in sequential] == wanted
    monkeypatch.setattr(mv, "_read_sequentially", lambda *a: pytest.fail("decoded from the start instead of seeking"))
    seeked = mv.read_frames(path, wanted)
    np.testing.assert_array_equal(seeked, sequential)


def test_read_frames_falls_back_to_decoding_from_the_start_near_the_end(tmp_path: Path) -> None:
    n = mv.SEEK_AFTER + 20
    path = write_video(tmp_path / "v.mp4", n, 32, 96, codec_options={"g": "10"})
    got = mv.read_frames(path, [n - 1, n + 5])  # the last frame, then past the end: padded with the last frame
    assert [frame_index(f) for f in got] == [n - 1, n - 1]


def test_written_videos_get_the_usual_file_mode(tmp_path: Path) -> None:
    """write_video's temporary file used to keep mkstemp's 0600 (reconstruct MP4s were private, the rest 0644)."""
    import os
    import stat

    mask = os.umask(0o022)
    try:
        path = mv.write_video(tmp_path / "v.mp4", np.zeros((2, 16, 16, 3), np.uint8))
    finally:
        os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "aac"), (".mkv", "flac")])
def test_write_video_muxes_a_sound_track_aligned_with_frame_0(tmp_path: Path, suffix: str, codec: str) -> None:
    frames = np.random.default_rng(0).integers(0, 255, (50, 32, 48, 3), dtype=np.uint8)
    t = np.arange(32000) / 16000
    sound = (0.5 * np.sin(2 * np.pi * 440 * t) * (t > 0.5)).astype(np.float32)  # silence, then a tone at 0.5 s
    path = mv.write_video(tmp_path / f"a{suffix}", frames, fps=25, audio=(sound, 16000))
    wav, info = mv.read_audio(path)
    assert info.codec == codec and info.video_frames == 50 and info.duration_s == pytest.approx(2.0, abs=0.06)
    onset = int(np.argmax(np.abs(wav) > 0.1))
    assert abs(onset - 8000) < 80  # the tone starts at 0.5 s of the video, within 5 ms
    assert np.corrcoef(wav[9000:30000], sound[9000:30000])[0, 1] > 0.99
    with pytest.raises(ValueError, match="audio needs samples"):
        mv.write_video(tmp_path / f"b{suffix}", frames, audio=(np.zeros(0), 16000))
