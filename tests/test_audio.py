"""Audio IO (`marlin.video.io.read_audio`) and log-mel spectrograms aligned with video frames (`marlin.audio.mel`)."""

from __future__ import annotations

import math
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from marlin.audio.mel import (
    MEL_FPS,
    SILENCE,
    log_mel,
    mel_filterbank,
    mel_start,
    mel_steps,
    mel_window,
)
from marlin.video.io import VideoError, read_audio
from videogen import write_audio_only, write_video


def write_av(
    path: str | Path,
    frames: np.ndarray,
    audio: np.ndarray,
    *,
    fps: int = 25,
    sample_rate: int = 16000,
    audio_codec: str = "aac",
    audio_start_s: float = 0.0,
) -> Path:
    """A video of `frames` ([T, H, W, 3] uint8) with the mono track `audio` ([N] float in [-1, 1]) starting
    `audio_start_s` after the first frame (tests of alignment). AAC in MP4, or ``pcm_s16le`` (exact) in MKV."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("libx264", rate=fps)
        video.height, video.width = frames.shape[1:3]
        video.pix_fmt = "yuv420p"
        video.options = {"crf": "10", "preset": "ultrafast"}
        sound = container.add_stream(audio_codec, rate=sample_rate)
        sound.layout = "mono"
        for frame in frames:
            container.mux(video.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(video.encode(None))
        fmt = "s16" if audio_codec == "pcm_s16le" else "fltp"
        chunk, offset = 1024, round(audio_start_s * sample_rate)
        for start in range(0, len(audio), chunk):
            part = audio[start : start + chunk]
            data = (part * 32767).astype(np.int16) if fmt == "s16" else part.astype(np.float32)
            af = av.AudioFrame.from_ndarray(data[None], format=fmt, layout="mono")
            af.sample_rate, af.pts = sample_rate, offset + start
            container.mux(sound.encode(af))
        container.mux(sound.encode(None))
    return path


def _clicks(seconds: float, at: list[float], sample_rate: int = 16000) -> np.ndarray:
    """Silence with a 20 ms 1 kHz burst at each time in `at` (seconds)."""
    x = np.zeros(round(seconds * sample_rate), np.float32)
    n = round(0.02 * sample_rate)
    for t in at:
        i = round(t * sample_rate)
        x[i : i + n] = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / sample_rate)
    return x


def _frames(n: int, size: int = 32) -> np.ndarray:
    return np.full((n, size, size, 3), 128, np.uint8)


def _onset(x: np.ndarray, sample_rate: int = 16000) -> float:
    return float(np.argmax(np.abs(x) > 0.1)) / sample_rate


@pytest.mark.parametrize(("ext", "codec", "tol"), [(".mkv", "pcm_s16le", 1e-3), (".mp4", "aac", 0.01)])
def test_read_audio_is_mono_16k_in_range_and_aligned_to_the_frames(tmp_path: Path, ext: str, codec: str,
                                                                   tol: float) -> None:  # fmt: skip
    path = write_av(tmp_path / f"v{ext}", _frames(25), _clicks(1.0, [0.4]), audio_codec=codec)
    x, info = read_audio(path)
    assert x.dtype == np.float32 and x.ndim == 1 and np.abs(x).max() <= 1.0
    assert info.sample_rate == 16000 and info.video_frames == 25 and info.fps == pytest.approx(25)
    assert info.video_duration_s == pytest.approx(1.0) and abs(info.duration_s - 1.0) < 0.05
    assert abs(_onset(x) - 0.4) < tol  # the burst is where it was written, codec delay removed
    y, info8 = read_audio(path, sample_rate=8000)
    assert info8.sample_rate == 8000 and abs(len(y) - len(x) / 2) < 100 and abs(_onset(y, 8000) - 0.4) < tol


def test_audio_that_starts_late_is_preceded_by_silence(tmp_path: Path) -> None:
    path = write_av(tmp_path / "late.mkv", _frames(25), _clicks(0.8, [0.1]), audio_codec="pcm_s16le",
                    audio_start_s=0.2)  # fmt: skip
    x, info = read_audio(path)
    assert info.start_offset_s == pytest.approx(0.2, abs=1e-3)
    assert abs(_onset(x) - 0.3) < 1e-3 and abs(info.duration_s - 1.0) < 0.01 and info.shortfall_s < 0.01


def test_audio_shorter_than_the_video_is_reported(tmp_path: Path) -> None:
    _, info = read_audio(write_av(tmp_path / "short.mkv", _frames(50), _clicks(1.0, []), audio_codec="pcm_s16le"))
    assert info.video_duration_s == pytest.approx(2.0) and info.shortfall_s == pytest.approx(1.0, abs=0.01)


def test_read_audio_errors_are_one_line(tmp_path: Path) -> None:
    silent = write_video(tmp_path / "silent.mp4", n_frames=5)
    with pytest.raises(VideoError, match=r"silent\.mp4: no audio stream \(streams found: video\)"):
        read_audio(silent)
    with pytest.raises(VideoError, match="no such file"):
        read_audio(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a media file at all" * 10)
    with pytest.raises(VideoError, match="junk.mp4: not a media file"):
        read_audio(junk)
    x, info = read_audio(write_audio_only(tmp_path / "a.m4a", seconds=0.5))  # audio-only files are fine
    assert info.video_duration_s is None and info.shortfall_s == 0 and 8000 <= len(x) < 9000  # whole AAC frames


# ---- the filterbank and log-mel ---------------------------------------------------------------------------------
# librosa 0.11.0, librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600) (Wav2Lip's call):
# (row, argmax, max, non-zero count, first non-zero bin), and the sum of every weight. Measured once with librosa
# installed beside this package; ours matched it to 2e-9 everywhere and a log-mel built on it to 1e-5.
LIBROSA_ROWS = [(0, 5, 0.020812449976801872, 4, 3), (1, 6, 0.02248530648648739, 4, 5),
                (20, 40, 0.020181428641080856, 4, 39), (40, 86, 0.014343159273266792, 6, 84),
                (60, 181, 0.0073937964625656605, 13, 175), (79, 366, 0.00363533990457654, 27, 353)]  # fmt: skip
LIBROSA_SUM = 3.999497890472412


def test_filterbank_matches_librosa_reference_values() -> None:
    fb = mel_filterbank().double()
    assert fb.shape == (80, 401)
    for row, arg, peak, count, first in LIBROSA_ROWS:
        w = fb[row]
        assert int(w.argmax()) == arg and float(w.max()) == pytest.approx(peak, rel=1e-5)
        nz = torch.nonzero(w > 0).flatten()
        assert len(nz) == count and int(nz[0]) == first
    assert float(fb.sum()) == pytest.approx(LIBROSA_SUM, rel=1e-5)


def test_filterbank_against_librosa_when_installed() -> None:
    librosa = pytest.importorskip("librosa")
    ref = librosa.filters.mel(sr=16000, n_fft=800, n_mels=80, fmin=55, fmax=7600)
    assert np.abs(mel_filterbank().numpy() - ref).max() < 1e-7


def test_log_mel_shape_range_and_where_a_tone_lands() -> None:
    t = np.arange(16000) / 16000
    wav = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    mel = log_mel(wav)
    assert mel.shape == (80, 81) and mel.dtype == torch.float32  # 80 mel frames per second (+1: centred frames)
    assert float(mel.min()) >= -4 and float(mel.max()) <= 4
    centre = mel_filterbank()[:, 50]  # the FFT bin of 1 kHz (20 Hz bins)
    assert int(mel[:, 40].argmax()) == int(centre.argmax())
    silent = log_mel(np.zeros(16000, np.float32))
    assert torch.all(silent == SILENCE)
    with pytest.raises(ValueError, match="16000 Hz"):
        log_mel(wav, sample_rate=8000)


def test_mel_windows_follow_the_video_frames() -> None:
    assert MEL_FPS == 80 and mel_steps(5, 25) == 16 and mel_steps(16, 25) == 51 and mel_steps(16, 30) == 43
    assert mel_start(5, 25) == 16 and mel_start(3, 30) == 8 and mel_start(-5, 25) == -16
    mel = torch.arange(200, dtype=torch.float32).expand(80, 200)
    w = mel_window(mel, 10, 5, 25)  # frames 10..14 at 25 fps: mel frames 32..47
    assert w.shape == (80, 16) and float(w[0, 0]) == 32 and float(w[0, -1]) == 47
    edge = mel_window(mel, -2, 5, 25)  # starts 6.4 mel frames before the audio: silence first
    assert edge.shape == (80, 16) and torch.all(edge[:, :7] == SILENCE) and float(edge[0, 7]) == 0
    end = mel_window(mel, 70, 5, 25)  # past the end: all silence, still full length
    assert end.shape == (80, 16) and torch.all(end == SILENCE)
    for fps in (24, 25, 29.97, 30, 50):  # a burst at frame 20 lands in the window of frame 20 at every rate
        burst = math.floor(20 / fps * MEL_FPS)
        m = torch.full((80, 400), SILENCE)
        m[:, burst] = 4.0
        assert float(mel_window(m, 20, 1, fps).max()) == 4.0 and float(mel_window(m, 22, 1, fps).max()) == SILENCE
