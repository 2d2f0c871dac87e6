"""Log-mel spectrograms aligned with video frames, as the lip-sync literature computes them (pure torch).

The convention is Wav2Lip's / SyncNet's (``hparams.py`` / ``audio.py`` of Wav2Lip): 16 kHz mono, pre-emphasis 0.97,
an 800-point STFT (Hann window of 800 samples, hop 200, centred frames), magnitudes through 80 Slaney-style mel
filters from 55 to 7600 Hz (librosa's default filterbank: Slaney's mel scale, area-normalised filters), 20 log10 with
a -100 dB floor and a 20 dB reference, and the result scaled to [-4, 4]. At 16 kHz that is 80 mel frames per second:
a 25 fps video frame lasts 3.2 mel frames, and 5 frames span 16 mel frames, as SyncNet's input.

:func:`mel_window` cuts the mel frames that sound during ``n_frames`` video frames from frame ``frame_index`` on, for
any frame rate; steps before the audio starts or after it ends are silence (:data:`SILENCE`), so a shifted window
near an edge still has its full length.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HOP_LENGTH",
    "MEL_FPS",
    "N_FFT",
    "N_MELS",
    "SAMPLE_RATE",
    "SILENCE",
    "delay_mel",
    "log_mel",
    "mel_filterbank",
    "mel_steps",
    "mel_window",
]

SAMPLE_RATE = 16000
N_FFT = 800
HOP_LENGTH = 200
WIN_LENGTH = 800
N_MELS = 80
F_MIN, F_MAX = 55.0, 7600.0
PREEMPHASIS = 0.97
MIN_LEVEL_DB, REF_LEVEL_DB, MAX_ABS = -100.0, 20.0, 4.0
MEL_FPS = SAMPLE_RATE / HOP_LENGTH  # 80 mel frames per second
SILENCE = -MAX_ABS  # the value of a silent mel bin after scaling


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (librosa's default, ``htk=False``): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    mel = f / f_sp
    above = f >= min_log_hz
    return np.where(above, min_log_hz / f_sp + np.log(np.maximum(f, 1e-10) / min_log_hz) / logstep, mel)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    f_sp, min_log_hz, logstep = 200.0 / 3, 1000.0, math.log(6.4) / 27.0
    min_log_mel = min_log_hz / f_sp
    return np.where(m >= min_log_mel, min_log_hz * np.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(
    sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS, fmin: float = F_MIN,
    fmax: float = F_MAX,
) -> Tensor:  # fmt: skip
    """Triangular mel filters ``[n_mels, n_fft // 2 + 1]`` float32 on Slaney's scale, each scaled to unit area
    (``2 / bandwidth``), as ``librosa.filters.mel`` with its defaults."""
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"expected 0 <= fmin < fmax <= sample_rate / 2, got fmin={fmin}, fmax={fmax}, {sample_rate=}")
    fft_freqs = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # [F]
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))  # [n_mels + 2] Hz
    widths = np.diff(edges)  # [n_mels + 1]
    ramps = edges[:, None] - fft_freqs[None, :]  # [n_mels + 2, F]
    lower = -ramps[:-2] / widths[:-1, None]  # rising edge of filter i
    upper = ramps[2:] / widths[1:, None]  # falling edge
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return torch.from_numpy(weights.astype(np.float32))  # [n_mels, F]


def log_mel(wav: np.ndarray | Tensor, sample_rate: int = SAMPLE_RATE) -> Tensor:
    """Samples ``[N]`` (mono, in [-1, 1], at 16 kHz) -> scaled log-mel spectrogram ``[80, N // 200 + 1]`` float32 in
    [-4, 4] (the module docstring's recipe; column ``j`` is centred on sample ``200 j``)."""
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"log_mel expects {SAMPLE_RATE} Hz audio (read_audio resamples), got {sample_rate} Hz")
    x = torch.as_tensor(wav, dtype=torch.float32).reshape(-1)
    if x.numel() == 0:
        raise ValueError("log_mel: empty audio")
    x = torch.cat([x[:1], x[1:] - PREEMPHASIS * x[:-1]])  # pre-emphasis, y[n] = x[n] - 0.97 x[n - 1]
    pad = N_FFT // 2
    mode = "reflect" if x.numel() > pad else "constant"
    x = torch.nn.functional.pad(x[None, None], (pad, pad), mode=mode)[0, 0]  # centred frames
    window = torch.hann_window(WIN_LENGTH, periodic=True)
    spec = torch.stft(x, N_FFT, HOP_LENGTH, WIN_LENGTH, window, center=False, return_complex=True).abs()  # [F, M]
    mel = mel_filterbank() @ spec  # [80, M]
    db = 20.0 * torch.log10(mel.clamp_min(1e-5)) - REF_LEVEL_DB
    scaled = 2 * MAX_ABS * (db - MIN_LEVEL_DB) / -MIN_LEVEL_DB - MAX_ABS
    return scaled.clamp(-MAX_ABS, MAX_ABS).contiguous()


def mel_steps(n_frames: int, fps: float) -> int:
    """Mel frames spanned by `n_frames` video frames at `fps` (16 for 5 frames at 25 fps, 51 for 16 frames)."""
    if n_frames < 1 or fps <= 0:
        raise ValueError(f"expected n_frames >= 1 and fps > 0, got {n_frames=}, {fps=}")
    return max(1, round(n_frames * MEL_FPS / fps))


def mel_start(frame_index: int, fps: float) -> int:
    """The mel frame at which video frame `frame_index` starts (Wav2Lip's ``int(80 * index / fps)``; negative
    indices give negative starts)."""
    return math.floor(frame_index * MEL_FPS / fps + 1e-9)


def mel_window(mel: Tensor, frame_index: int, n_frames: int, fps: float) -> Tensor:
    """The mel frames ``[80, mel_steps(n_frames, fps)]`` that sound during video frames ``frame_index ..
    frame_index + n_frames - 1``; columns outside the spectrogram are :data:`SILENCE` (any `frame_index`, negative
    too, so audio shifted past an edge keeps its length)."""
    length, start = mel_steps(n_frames, fps), mel_start(frame_index, fps)
    total = mel.shape[-1]
    lo, hi = max(start, 0), min(start + length, total)
    if lo == start and hi == start + length:
        return mel[..., lo:hi]
    out = mel.new_full((*mel.shape[:-1], length), SILENCE)
    if hi > lo:
        out[..., lo - start : hi - start] = mel[..., lo:hi]
    return out


def delay_mel(mel: Tensor, frames: int, fps: float) -> Tensor:
    """The spectrogram of the same sound played `frames` video frames (at `fps`) late (> 0) or early (< 0): same
    length, :data:`SILENCE` where nothing sounds. What a video whose audio track is out of sync by `frames` gives;
    used to evaluate the offset search on clips with known delays."""
    shift, total = mel_start(frames, fps), mel.shape[-1]
    out = mel.new_full(mel.shape, SILENCE)
    if shift >= 0:
        out[..., shift:] = mel[..., : max(total - shift, 0)]
    else:
        out[..., : max(total + shift, 0)] = mel[..., -shift:]
    return out
