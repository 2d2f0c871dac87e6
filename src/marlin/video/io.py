"""Video reading and writing with PyAV (the FFmpeg libraries; no ffmpeg binary, no OpenCV).

One module owns video IO so that every part of the project agrees on frame count, frame order, colour conversion and
orientation:

* Frames are indexed in the order the decoder outputs them. Timestamps are ignored: a variable-frame-rate video is
  read frame by frame, with no duplication or dropping to a constant rate, as the official MARLIN code does with
  OpenCV. A 16-frame window therefore covers 16 frames, not a fixed time span.
* Frames come out as ``[H, W, 3]`` uint8 RGB, C-contiguous and owning their memory, whatever the stored pixel format
  (yuv420p, yuvj420p, 10-bit, gray, rgba, odd sizes, ...). Conversion is done by swscale, which honours the colour
  matrix the file is tagged with (BT.601 when untagged).
* The display rotation stored in the container (the display matrix) is applied, so frames come out upright.
  Mirroring in the display matrix is ignored.
* Reading streams one frame at a time, so memory stays flat whatever the video length or resolution.

Failure policy: every failure to read a file raises :class:`VideoError` with the one-line message
``"<path>: <reason>"``: missing path, directory, not a media file, a still image (PNG, JPEG, ...: MARLIN needs motion,
and a one-frame "video" padded to 16 copies is almost always a mistake), no video stream, no frames, no decodable
frame, a resolution above ``max_pixels``. A file that is damaged or truncated after an intact header is read as far as
it goes: packets that fail to decode are skipped, and once the stream ends one :class:`VideoWarning` says how many
were skipped and how many of the declared frames decoded. Real datasets hold a few such clips, FFmpeg conceals the
damage in the frames that follow, and callers that need strictness can turn the warning into an error with
``warnings.simplefilter("error", VideoWarning)``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import VideoReformatter

from ..utils.fileio import default_file_mode

__all__ = [
    "AudioInfo",
    "DEFAULT_MAX_PIXELS",
    "VIDEO_EXTENSIONS",
    "VideoError",
    "VideoInfo",
    "VideoWarning",
    "has_audio",
    "iter_frames",
    "probe_video",
    "read_audio",
    "read_frames",
    "read_video",
    "write_video",
]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".gif")
"""File suffixes taken as videos when a folder is searched (every command uses this one list)."""

DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest frame area accepted by default: above 8K UHD (7680x4320), below what would exhaust memory per frame."""


class VideoError(ValueError):
    """A file that cannot be read as a video; the message is one line, ``"<path>: <reason>"``."""


class VideoWarning(UserWarning):
    """A video that was read, but not cleanly: damaged packets were skipped, or fewer frames decoded than declared."""


@dataclass(frozen=True)
class VideoInfo:
    """What :func:`probe_video` learns about a video without decoding it fully."""

    path: Path
    n_frames: int  # frame count stored in the container, else counted from packets (see probe_video)
    fps: float  # average frame rate
    width: int  # as displayed, i.e. after rotation
    height: int  # as displayed, i.e. after rotation
    rotation: int  # counter-clockwise degrees applied for display (FFmpeg display-matrix convention): 0/90/180/270
    duration_s: float
    pix_fmt: str  # pixel format of the decoded frames, e.g. "yuv420p"
    codec: str  # decoder name, e.g. "h264"


def _reason(err: BaseException) -> str:
    """FFmpeg's message for an error, without the errno and file name PyAV adds around it."""
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _is_still_image(format_name: str) -> bool:
    # FFmpeg's image demuxers are "image2" and "<codec>_pipe" (png_pipe, jpeg_pipe, ...); animated GIF uses "gif".
    return format_name == "image2" or format_name.endswith("_pipe")


def _rotation(frame: av.VideoFrame) -> int:
    """Counter-clockwise display rotation of a frame, rounded to a multiple of 90 degrees, in [0, 360)."""
    return (round(frame.rotation / 90) * 90) % 360


def _open_file(p: Path, kind: str) -> av.container.InputContainer:
    """``av.open`` for reading, or a one-line :class:`VideoError` saying what is wrong with ``p`` (a `kind` file)."""
    if not p.exists():
        raise VideoError(f"{p}: no such file")
    if p.is_dir():
        raise VideoError(f"{p}: is a directory, expected a {kind} file")
    try:
        return av.open(str(p), mode="r")
    except av.FFmpegError as err:
        if isinstance(err, av.InvalidDataError) or kind != "video":
            raise VideoError(f"{p}: not a {kind} file, or corrupt (FFmpeg: {_reason(err)})") from err
        raise VideoError(f"{p}: cannot open ({_reason(err)})") from err


@contextmanager
def _open_video(
    path: str | os.PathLike, max_pixels: int
) -> Iterator[tuple[av.container.InputContainer, av.VideoStream]]:
    """Open ``path`` and return its first video stream, or raise :class:`VideoError`; closes the file on exit."""
    p = Path(path)
    container = _open_file(p, "video")
    try:
        format_name = container.format.name
        if _is_still_image(format_name):
            raise VideoError(f"{p}: is a still image ({format_name}), expected a video")
        if not container.streams.video:
            found = ", ".join(stream.type for stream in container.streams) or "none"
            raise VideoError(f"{p}: no video stream (streams found: {found})")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise VideoError(f"{p}: resolution {width}x{height} is above max_pixels={max_pixels}")
        stream.thread_type = "AUTO"
        yield container, stream
    finally:
        container.close()


def _decode(container: av.container.InputContainer, stream: av.VideoStream, path: Path) -> Iterator[av.VideoFrame]:
    """Decode ``stream`` in output order, skipping packets that fail to decode (see the module docstring)."""
    n_packets = n_decoded = n_failed = 0
    last_error: BaseException | None = None
    try:
        for packet in container.demux(stream):  # ends with an empty packet that flushes the decoder
            n_packets += packet.size > 0
            try:
                frames = packet.decode()
            except av.FFmpegError as err:
                n_failed, last_error = n_failed + 1, err
                continue
            for frame in frames:
                n_decoded += 1
                yield frame
    except av.FFmpegError as err:  # the demuxer cannot read further: the rest of the file is lost
        n_failed, last_error = n_failed + 1, err
    if n_packets == 0 and last_error is None:
        raise VideoError(f"{path}: video stream has no frames")
    if n_decoded == 0:
        detail = f" ({n_failed} packet(s) failed: {_reason(last_error)})" if last_error is not None else ""
        raise VideoError(f"{path}: no decodable video frames{detail}")
    problems = []
    if last_error is not None:
        problems.append(f"skipped {n_failed} damaged packet(s) ({_reason(last_error)})")
    if n_decoded < stream.frames:
        problems.append(f"decoded {n_decoded} of the {stream.frames} frames the container declares")
    if problems:
        warnings.warn(f"{path}: {'; '.join(problems)}", VideoWarning, stacklevel=3)


def _count_packets(path: Path) -> int:
    """Number of non-empty packets in the first video stream, read by demuxing alone (no decoding).

    Stops at a read error, as decoding does, so the count matches what :func:`iter_frames` can reach.
    """
    n_packets = 0
    with av.open(str(path), mode="r") as container:
        try:
            for packet in container.demux(container.streams.video[0]):
                n_packets += packet.size > 0
        except av.FFmpegError:
            pass
    return n_packets


def probe_video(path: str | os.PathLike, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> VideoInfo:
    """Read a video's metadata without decoding it fully.

    ``n_frames`` is the frame count the container stores (MP4, MOV, AVI); when it stores none (Matroska, WebM, raw
    streams) the video packets are counted by demuxing, which reads the file but decodes nothing. It can differ from
    the number of frames that decode (damaged files, MP4 edit lists), which :func:`marlin.video.windows.iter_windows`
    tolerates. One frame is decoded to read the rotation and to check that the stream decodes at all.
    """
    p = Path(path)
    with _open_video(p, max_pixels) as (container, stream):
        frames = _decode(container, stream, p)
        first = next(frames)  # _decode raises VideoError rather than end empty
        frames.close()
        n_frames = stream.frames if stream.frames > 0 else _count_packets(p)
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        if stream.duration is not None and stream.time_base is not None:
            duration_s = float(stream.duration * stream.time_base)
        elif container.duration is not None:
            duration_s = container.duration / av.time_base
        else:
            duration_s = n_frames / fps if fps else 0.0
        rotation = _rotation(first)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
        return VideoInfo(
            path=p,
            n_frames=n_frames,
            fps=fps,
            width=width,
            height=height,
            rotation=rotation,
            duration_s=duration_s,
            pix_fmt=first.format.name,
            codec=stream.codec_context.name,
        )


def iter_frames(
    path: str | os.PathLike,
    *,
    start: int = 0,
    step: int = 1,
    stop: int | None = None,
    size: int | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[np.ndarray]:
    """Stream the frames ``start, start + step, ...`` (below ``stop``) of a video as ``[H, W, 3]`` uint8 RGB arrays.

    Frames are upright (rotation applied) and counted in decoder output order. ``size`` is the output
    ``(height, width)`` (an int means square) after rotation, resized with swscale's bilinear filter, which
    averages when shrinking; by default frames keep the size of the first frame. Frames outside the selection are
    decoded (inter-frame codecs need them) but not converted, and decoding stops after ``stop``.
    Arguments are checked at the call; the file is opened, and :class:`VideoError` raised (see the module docstring),
    when iteration starts.
    """
    if start < 0 or step < 1 or (stop is not None and stop < 0):
        raise ValueError(f"expected start >= 0, step >= 1 and stop >= 0 or None, got {start=}, {step=}, {stop=}")
    if isinstance(size, int):
        size = (size, size)
    if size is not None and (len(size) != 2 or size[0] < 1 or size[1] < 1):
        raise ValueError(f"size must be a positive int or (height, width), got {size}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    return _iter_frames(Path(path), start, step, stop, size, max_pixels)


def _iter_frames(
    p: Path, start: int, step: int, stop: int | None, size: tuple[int, int] | None, max_pixels: int
) -> Iterator[np.ndarray]:
    """The generator behind :func:`iter_frames`."""
    to_rgb = _RGBConverter(p, size, max_pixels)
    with _open_video(p, max_pixels) as (container, stream):
        for index, frame in enumerate(_decode(container, stream, p)):
            if stop is not None and index >= stop:
                return
            if index >= start and (index - start) % step == 0:
                yield to_rgb(frame, index)


class _RGBConverter:
    """Decoded frame -> upright ``[H, W, 3]`` uint8 RGB of one output size (that of the first frame by default, so a
    mid-stream size change cannot break stacking)."""

    def __init__(self, path: Path, size: tuple[int, int] | None, max_pixels: int) -> None:
        self.path, self.size, self.max_pixels = path, size, max_pixels
        self.reformatter = VideoReformatter()  # caches the swscale context across frames

    def __call__(self, frame: av.VideoFrame, index: int) -> np.ndarray:
        if frame.width * frame.height > self.max_pixels:
            raise VideoError(
                f"{self.path}: frame {index} is {frame.width}x{frame.height}, above max_pixels={self.max_pixels}"
            )
        rotation = _rotation(frame)
        if self.size is None:
            self.size = (frame.height, frame.width) if rotation in (0, 180) else (frame.width, frame.height)
        height, width = self.size if rotation in (0, 180) else self.size[::-1]  # resize before rotating
        rgb = self.reformatter.reformat(
            frame, width=width, height=height, format="rgb24", interpolation="BILINEAR", threads=1
        ).to_ndarray()  # [h, w, 3], a view of the frame's buffer, rows possibly padded
        # threads=1: swscale's default thread pool made conversion several times slower and erratic.
        if rotation:
            rgb = np.rot90(rgb, k=rotation // 90)  # counter-clockwise, [H, W, 3]
        return np.array(rgb, dtype=np.uint8, order="C")  # an owned, contiguous copy


def read_video(
    path: str | os.PathLike,
    *,
    start: int = 0,
    step: int = 1,
    stop: int | None = None,
    size: int | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read the selected frames into one ``[T, H, W, 3]`` uint8 RGB array; see :func:`iter_frames`.

    Raises :class:`VideoError` when the selection is empty.
    """
    frames = list(iter_frames(path, start=start, step=step, stop=stop, size=size, max_pixels=max_pixels))
    if not frames:
        raise VideoError(f"{Path(path)}: no frames selected by start={start}, step={step}, stop={stop}")
    return np.stack(frames)  # [T, H, W, 3]


SEEK_AFTER = 250
"""``read_frames`` seeks when the first wanted frame is at least this far in: below it, decoding from the start costs
less than indexing the file's packets for a seek."""


def read_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    size: int | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    seek: bool = True,
) -> np.ndarray:
    """Frames ``indices`` (decoder order, any order, repeats allowed) as one ``[len(indices), H, W, 3]`` uint8 array.

    The clip reader of every consumer (pretraining on video folders, fine-tuning, reconstructions, mask sheets): the
    same decoding, rotation and colour conversion as :func:`iter_frames`, and only the selected frames are converted
    and kept. An index past the frames that actually decode (a container that over-reports its length, a truncated
    file) repeats the last frame that decodes, so a clip is always complete; :class:`VideoError` when nothing decodes.

    Frame-accurate seeking: when the first wanted frame lies :data:`SEEK_AFTER` frames or more into the video, the
    packets are indexed (demuxed, not decoded) and decoding starts at the keyframe before it, so a clip an hour into a
    film costs about what a clip at its start costs. Frames are identified by their timestamps against that index;
    whenever the index cannot be trusted (packets without or with repeated timestamps, discarded packets, a packet that
    fails to decode, wanted frames near the end) the reader decodes from the start instead, so the frames are always
    the ones sequential decoding numbers ``indices``. ``seek=False`` always decodes from the start.
    """
    wanted = sorted({int(i) for i in indices})
    if not wanted or wanted[0] < 0:
        raise ValueError(f"{path}: expected non-empty frame indices >= 0, got {list(indices)[:8]}")
    if isinstance(size, int):
        size = (size, size)
    p = Path(path)
    to_rgb = _RGBConverter(p, size, max_pixels)
    got = _read_by_seeking(p, wanted, to_rgb, max_pixels) if seek and wanted[0] >= SEEK_AFTER else None
    if got is None:
        got = _read_sequentially(p, wanted, to_rgb, max_pixels)
    decoded = sorted(got)
    pick = [i if i in got else max((d for d in decoded if d <= i), default=decoded[0]) for i in map(int, indices)]
    return np.stack([got[i] for i in pick])  # [T, H, W, 3]


def _read_sequentially(p: Path, wanted: list[int], to_rgb: _RGBConverter, max_pixels: int) -> dict[int, np.ndarray]:
    """Decode from the start up to ``wanted[-1]``; the last decoded frame is kept too (it pads indices past the end)."""
    keep, got = set(wanted), {}
    last: tuple[int, av.VideoFrame] | None = None
    with _open_video(p, max_pixels) as (container, stream):
        for index, frame in enumerate(_decode(container, stream, p)):
            if index in keep:
                got[index] = to_rgb(frame, index)
            last = (index, frame)
            if index >= wanted[-1]:
                break
        if last is not None and last[0] not in got:  # the stream ended early: its last frame pads the clip
            got[last[0]] = to_rgb(last[1], last[0])
    return got


def _frame_timestamps(container: av.container.InputContainer, stream: av.VideoStream) -> list[int] | None:
    """Every frame's pts in presentation (= decoder output) order, from the packets alone; None when they cannot
    identify frames reliably."""
    pts = []
    try:
        for packet in container.demux(stream):
            if packet.size == 0:
                continue
            if packet.pts is None or packet.is_discard:
                return None
            pts.append(int(packet.pts))
    except av.FFmpegError:
        return None
    if len(set(pts)) != len(pts) or (stream.frames and len(pts) != stream.frames):
        return None
    return sorted(pts)


_FRAME_INDEX_CACHE: OrderedDict[tuple[str, int, int], tuple[list[int], dict[int, int]] | None] = OrderedDict()
_FRAME_INDEX_CACHE_SIZE = 64  # files; a training process reads clips of the same videos every epoch


def _cached_frame_index(
    p: Path, container: av.container.InputContainer, stream: av.VideoStream
) -> tuple[list[int], dict[int, int]] | None:
    """(pts per frame index, frame index per pts) of a file, demuxed once per process while the file is unchanged."""
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key in _FRAME_INDEX_CACHE:
        _FRAME_INDEX_CACHE.move_to_end(key)
        return _FRAME_INDEX_CACHE[key]
    pts = _frame_timestamps(container, stream)
    value = None if pts is None else (pts, {v: i for i, v in enumerate(pts)})
    _FRAME_INDEX_CACHE[key] = value
    if len(_FRAME_INDEX_CACHE) > _FRAME_INDEX_CACHE_SIZE:
        _FRAME_INDEX_CACHE.popitem(last=False)
    return value


def _read_by_seeking(
    p: Path, wanted: list[int], to_rgb: _RGBConverter, max_pixels: int
) -> dict[int, np.ndarray] | None:
    """The wanted frames, decoded from the keyframe before the first one; None to fall back to sequential decoding."""
    with _open_video(p, max_pixels) as (container, stream):
        index = _cached_frame_index(p, container, stream)
        if index is None or wanted[-1] >= len(index[0]) - 1:  # near the end: sequential decoding pads the clip
            return None
        pts, index_of = index
        container.seek(pts[wanted[0]], stream=stream, backward=True, any_frame=False)
        keep, got, started = set(wanted), {}, False
        try:
            for packet in container.demux(stream):
                for frame in packet.decode():
                    i = index_of.get(frame.pts)
                    if i is None or (not started and i > wanted[0]):
                        return None  # an unknown timestamp, or the seek landed after the first wanted frame
                    started = True
                    if i in keep:
                        got[i] = to_rgb(frame, i)
                    if i >= wanted[-1]:
                        return got if len(got) == len(keep) else None
        except av.FFmpegError:
            return None
    return None


def _check_rgb(frame: object, path: Path, index: int) -> None:
    """A one-line ValueError unless `frame` is a uint8 ``[H, W, 3]`` array."""
    if not (isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3):
        found = f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray) else type(frame).__name__
        raise ValueError(f"{path}: frame {index} must be a uint8 [H, W, 3] RGB array, got {found}")


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    *,
    fps: float | Fraction = 25,
    codec: str = "libx264",
    crf: int | None = 18,
    preset: str | None = "medium",
    pix_fmt: str = "yuv420p",
    audio: tuple[np.ndarray, int] | None = None,
) -> Path:
    """Encode RGB frames (``[T, H, W, 3]`` uint8, or an iterable of ``[H, W, 3]``) to a video file; return its path.

    ``audio=(samples, rate)`` adds a mono sound track (floats in [-1, 1] from frame 0): AAC in MP4, else FLAC.
    The container follows the file extension (``.mp4``, ``.mkv``, ...); MP4/MOV files get their index at the front
    (``+faststart``) so a truncated copy still plays. ``crf`` and ``preset`` apply to libx264/libx265 only; CRF 18
    is close to visually lossless. The file is written to a temporary name in the same folder and renamed into place
    only on success, so readers never see a partial file and a failed write leaves any previous file intact.
    """
    path = Path(path)
    if not path.suffix:
        raise ValueError(f"{path}: expected a file extension naming the container, e.g. .mp4")
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    rate = Fraction(fps).limit_denominator(1001 * 1000)
    if rate <= 0:
        raise ValueError(f"{path}: fps must be positive, got {fps}")
    _check_audio_arg(path, audio)
    try:
        av.Codec(codec, "w")
    except Exception as err:  # PyAV raises UnknownCodecError or ValueError depending on the name
        raise ValueError(f"{path}: this PyAV build has no {codec!r} encoder") from err
    try:
        fmt = av.VideoFormat(pix_fmt)
    except ValueError as err:
        raise ValueError(f"{path}: unknown pixel format {pix_fmt!r}") from err
    options = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".mov", ".m4v") else {}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        try:
            container = av.open(str(tmp), mode="w", options=options)
        except ValueError as err:
            raise ValueError(f"{path}: no container format for the extension {path.suffix!r}") from err
        with container:
            stream: av.VideoStream | None = None
            sound: av.AudioStream | None = None
            for index, frame in enumerate(frames):
                _check_rgb(frame, path, index)
                height, width = frame.shape[:2]
                if stream is None:
                    if (fmt.chroma_width(2) == 1 and width % 2) or (fmt.chroma_height(2) == 1 and height % 2):
                        raise ValueError(
                            f"{path}: {pix_fmt} needs even frame sides, got {width}x{height}; "
                            "crop or pad the frames, or pass pix_fmt='yuv444p'"
                        )
                    stream = container.add_stream(codec, rate=rate)
                    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
                    if codec in ("libx264", "libx265"):
                        stream.options = {k: str(v) for k, v in (("crf", crf), ("preset", preset)) if v is not None}
                    sound = _add_audio_stream(container, audio, "aac" if options else "flac")
                elif (height, width) != (stream.height, stream.width):
                    raise ValueError(
                        f"{path}: frame {index} is {width}x{height}, "
                        f"expected {stream.width}x{stream.height} like frame 0"
                    )
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
            if stream is None:
                raise ValueError(f"{path}: no frames to write")
            container.mux(stream.encode(None))  # flush the encoder
            if sound is not None:
                _mux_audio(container, sound, audio)
        os.chmod(tmp, default_file_mode())  # as any plainly created file (mkstemp alone leaves 0600)
        os.replace(tmp, path)
    except av.FFmpegError as err:
        raise VideoError(f"{path}: cannot encode ({_reason(err)})") from err
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_audio_arg(path: Path, audio: tuple[np.ndarray, int] | None) -> None:
    if audio is not None and (int(audio[1]) < 1 or np.asarray(audio[0]).size == 0):
        raise ValueError(f"{path}: audio needs samples and a sample rate >= 1, got {np.asarray(audio[0]).size} "
                         f"samples at {audio[1]} Hz")  # fmt: skip


def _add_audio_stream(container: av.container.OutputContainer, audio: tuple[np.ndarray, int] | None,
                      codec: str) -> av.AudioStream | None:  # fmt: skip
    """A mono `codec` stream for `audio` (None without audio); every stream must exist before the first packet."""
    if audio is None:
        return None
    sound = container.add_stream(codec, rate=int(audio[1]))
    sound.layout = "mono"
    return sound


def _mux_audio(container: av.container.OutputContainer, stream: av.AudioStream, audio: tuple[np.ndarray, int]) -> None:
    """Encode mono float samples into the audio `stream` of `container` (PyAV re-frames them to the encoder's
    frame size)."""
    samples, rate = np.clip(np.asarray(audio[0], dtype=np.float32).reshape(-1), -1.0, 1.0), int(audio[1])
    fmt = "fltp" if stream.codec_context.name == "aac" else "s16"
    block = rate  # one second per frame handed to the encoder
    for i in range(0, len(samples), block):
        chunk = samples[i : i + block][None]  # [1, n]
        data = chunk if fmt == "fltp" else (chunk * 32767).round().astype(np.int16)
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout="mono")
        frame.sample_rate, frame.pts = rate, i
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


# ---- audio ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AudioInfo:
    """What :func:`read_audio` read: the decoded audio and, when the file has video, how long the video lasts, so a
    caller can refuse audio that ends before the video (lip sync needs sound for every frame)."""

    path: Path
    sample_rate: int  # of the returned samples
    n_samples: int
    duration_s: float  # n_samples / sample_rate: the audio that was decoded (after alignment to the video)
    source_rate: int  # the stream's own sample rate
    source_channels: int
    codec: str
    start_offset_s: float  # audio start - video start in the container; 0.0 without video
    video_duration_s: float | None  # frames / fps of the first video stream (None: audio-only file)
    video_frames: int | None
    fps: float | None

    @property
    def shortfall_s(self) -> float:
        """Seconds of video that have no audio (0.0 when the audio covers the video, or there is no video)."""
        return max(0.0, (self.video_duration_s or 0.0) - self.duration_s)


def _video_timing(
    container: av.container.InputContainer, path: Path
) -> tuple[float, int | None, float | None, float | None]:
    """(start seconds, frame count, fps, duration seconds = frames / fps) of the first video stream, from its header
    (frames counted from packets when the container stores no count, as :func:`probe_video`); Nones without video."""
    if not container.streams.video:
        return 0.0, None, None, None
    stream = container.streams.video[0]
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None and stream.time_base else 0.0
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else None
    n_frames = stream.frames if stream.frames > 0 else _count_packets(path)
    duration = n_frames / fps if n_frames and fps else None
    return start, n_frames, fps, duration


def _decode_audio(container: av.container.InputContainer, stream: av.AudioStream, sample_rate: int,
                  path: Path) -> tuple[np.ndarray, float | None]:  # fmt: skip
    """All of `stream` as float32 mono at `sample_rate` and the first decoded frame's time (None if none decoded);
    packets that fail to decode are skipped (FFmpeg conceals the gap), as for video."""
    resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
    chunks, first_time, n_failed, last_error = [], None, 0, None
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.FFmpegError as err:
                n_failed, last_error = n_failed + 1, err
                continue
            for frame in frames:
                if first_time is None:
                    first_time = frame.time
                chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(frame)]
        chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]  # flush
    except av.FFmpegError as err:  # the demuxer cannot read further
        n_failed, last_error = n_failed + 1, err
    if not chunks or first_time is None:
        detail = f" ({n_failed} packet(s) failed: {_reason(last_error)})" if last_error is not None else ""
        raise VideoError(f"{path}: no decodable audio{detail}")
    if last_error is not None:
        warnings.warn(f"{path}: skipped {n_failed} damaged audio packet(s) ({_reason(last_error)})", VideoWarning,
                      stacklevel=3)  # fmt: skip
    return np.concatenate(chunks).astype(np.float32, copy=False), first_time


def has_audio(path: str | os.PathLike) -> bool:
    """Whether a media file has an audio stream (header only, nothing decoded); :class:`VideoError` for a missing or
    unreadable file."""
    p = Path(path)
    with _open_file(p, "media") as container:
        return bool(container.streams.audio)


def read_audio(path: str | os.PathLike, sample_rate: int = 16000) -> tuple[np.ndarray, AudioInfo]:
    """The first audio stream of a media file as float32 mono samples in [-1, 1] at `sample_rate`, and its
    :class:`AudioInfo`.

    Decoded and resampled by FFmpeg (PyAV's ``AudioResampler``: channels averaged to mono). When the file also has
    video, the samples are aligned to it: sample 0 is the time of the first video frame (audio that starts later is
    preceded by silence, audio that starts earlier is cut), so frame ``i`` at ``fps`` sounds at sample
    ``i / fps * sample_rate``. The audio may still end before the video: ``info.shortfall_s`` says by how much, and
    callers that need sound for every frame refuse it. :class:`VideoError` (one line) for a missing or unreadable
    file, a file without an audio stream and audio that does not decode.
    """
    if sample_rate < 1:
        raise ValueError(f"sample_rate must be >= 1, got {sample_rate}")
    p = Path(path)
    container = _open_file(p, "media")
    with container:
        if not container.streams.audio:
            found = ", ".join(stream.type for stream in container.streams) or "none"
            raise VideoError(f"{p}: no audio stream (streams found: {found}); lip sync needs the video's sound")
        stream = container.streams.audio[0]
        v_start, n_frames, fps, v_duration = _video_timing(container, p)
        codec, rate, channels = stream.codec_context.name, stream.codec_context.sample_rate, stream.channels
        samples, first_time = _decode_audio(container, stream, sample_rate, p)
    offset = (first_time - v_start) if fps is not None else 0.0
    shift = round(offset * sample_rate)
    if shift > 0:  # the audio starts after the first frame: silence until it does
        samples = np.concatenate([np.zeros(shift, np.float32), samples])
    elif shift < 0:
        samples = samples[-shift:]
    samples = np.clip(samples, -1.0, 1.0)  # lossy codecs overshoot full scale slightly
    info = AudioInfo(path=p, sample_rate=sample_rate, n_samples=len(samples), duration_s=len(samples) / sample_rate,
                     source_rate=rate, source_channels=channels, codec=codec, start_offset_s=offset,
                     video_duration_s=v_duration, video_frames=n_frames, fps=fps)  # fmt: skip
    return samples, info
