"""Small synthetic media files for tests, written with PyAV.

Each frame carries its own index as a barcode (``make_frame`` / ``frame_index``), so a test can check which frames a
reader returned even after lossy compression. Import from test files as ``from videogen import write_video``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

N_BITS = 10  # frame indices up to 1023 fit in the barcode


def make_frame(index: int, height: int = 64, width: int = 96) -> np.ndarray:
    """An RGB frame ``[height, width, 3]`` uint8 whose top half is a barcode of ``index``.

    The top half has ``N_BITS`` vertical bands, most significant bit first, white for 1 and black for 0; the bottom
    half is a colour that changes with the index, so colour handling is exercised too.
    """
    if not 0 <= index < 2**N_BITS:
        raise ValueError(f"index must be in [0, {2**N_BITS}), got {index}")
    frame = np.empty((height, width, 3), np.uint8)
    bits = (index >> np.arange(N_BITS - 1, -1, -1)) & 1  # [N_BITS], most significant first
    band = (bits[np.arange(width) * N_BITS // width] * 255).astype(np.uint8)  # [W]
    frame[: height // 2] = band[None, :, None]
    frame[height // 2 :] = ((37 * index) % 256, 128, 255 - (37 * index) % 256)
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Read back the index :func:`make_frame` drew, from the centre of each barcode band (robust to compression)."""
    height, width = frame.shape[:2]
    top = frame[height // 8 : height * 3 // 8].astype(np.float32).mean(axis=(0, 2))  # [W]
    index = 0
    for b in range(N_BITS):
        lo, hi = b * width // N_BITS, (b + 1) * width // N_BITS
        margin = (hi - lo) // 4
        index = (index << 1) | int(top[lo + margin : hi - margin].mean() > 127)
    return index


def write_video(
    path: str | Path,
    n_frames: int = 10,
    height: int = 64,
    width: int = 96,
    *,
    fps: int | Fraction = 25,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    rotation: int | None = None,
    faststart: bool = False,
    codec_options: dict[str, str] | None = None,
    frame_fn: Callable[[int, int, int], np.ndarray] = make_frame,
) -> Path:
    """Write ``n_frames`` frames of ``frame_fn(index, height, width)`` (RGB uint8) and return the path.

    The container follows the extension. ``rotation`` stores a counter-clockwise display rotation in the display
    matrix; ``faststart`` moves the MP4 index to the front. Frames are made one at a time, so huge sizes stay cheap.
    """
    path = Path(path)
    options = {"movflags": "+faststart"} if faststart else {}
    with av.open(str(path), mode="w", options=options) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if codec_options:
            stream.options = codec_options
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for index in range(n_frames):
            frame = av.VideoFrame.from_ndarray(frame_fn(index, height, width), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def _write_audio(container: av.container.OutputContainer, codec: str, seconds: float) -> None:
    """Encode ``seconds`` of a 440 Hz tone into a new audio stream of ``container``."""
    rate = 44100
    stream = container.add_stream(codec, rate=rate)
    stream.layout = "mono"
    chunk = 1152 if codec == "mp2" else 1024
    sample_fmt = "s16" if codec == "mp2" else "fltp"
    for start in range(0, int(seconds * rate), chunk):
        tone = np.sin(2 * np.pi * 440 * (start + np.arange(chunk)) / rate)  # [chunk]
        samples = (tone * 8000).astype(np.int16) if sample_fmt == "s16" else tone.astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None], format=sample_fmt, layout="mono")
        frame.sample_rate = rate
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def write_audio_only(path: str | Path, seconds: float = 0.5) -> Path:
    """An audio-only file: MP2 for ``.mp2``, AAC otherwise (e.g. ``.m4a``)."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        _write_audio(container, "mp2" if path.suffix == ".mp2" else "aac", seconds)
    return path


def write_video_without_frames(path: str | Path) -> Path:
    """A Matroska/AVI file that declares a video stream but holds only audio packets (zero video frames)."""
    path = Path(path)
    with av.open(str(path), mode="w") as container:
        video = container.add_stream("mpeg4", rate=25)
        video.width, video.height, video.pix_fmt = 64, 64, "yuv420p"
        _write_audio(container, "mp2", 0.3)
    return path


def write_undecodable_video(path: str | Path, n_packets: int = 10, seed: int = 0) -> Path:
    """A well-formed container (AVI/MP4) whose MPEG-4 video packets are random bytes, so no frame decodes."""
    path = Path(path)
    rng = np.random.default_rng(seed)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        container.start_encoding()
        for i in range(n_packets):
            packet = av.Packet(rng.bytes(500))
            packet.stream = stream
            packet.pts = packet.dts = i
            packet.time_base = Fraction(1, 25)
            container.mux(packet)
    return path


def truncate(path: str | Path, out: str | Path, fraction: float = 0.5) -> Path:
    """Copy the first ``fraction`` of the bytes of ``path`` to ``out``, like an interrupted download."""
    data = Path(path).read_bytes()
    out = Path(out)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


def frames_of(indices: Iterable[int], height: int = 64, width: int = 96) -> np.ndarray:
    """``[T, H, W, 3]`` stack of :func:`make_frame` for the given indices, e.g. to compare with a lossless read."""
    return np.stack([make_frame(i, height, width) for i in indices])
