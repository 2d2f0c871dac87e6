"""A corpus of hostile inputs for the fault-injection suite (``tests/test_faults.py``), built in about two seconds.

Every file is tiny (a few KB) and made here, never downloaded: broken files (zero bytes, random bytes, truncated,
damaged in the middle, audio only, a video stream without frames, a header declaring a 10000x10000 picture, a
symlink to itself or to nothing), odd but valid videos (1 frame, 8x8, monochrome, 10-bit, variable frame rate,
rotated, not square, in MP4 / AVI / MKV / WebM), odd file names, and bad checkpoints. Each video case says what a
truthful reader makes of it (``kind``):

* ``good``: a readable video; ``Entry.frames`` is how many frames decode.
* ``partial``: readable as far as it goes (damage after an intact header); ``Entry.frames`` is how many frames really
  decode, counted with marlin's one reader, so a command reporting the container's declared count is caught.
* ``bad``: nothing can be read; a command must say so in one line naming the file.

The case tables (:data:`VIDEO_CASES`, :data:`CHECKPOINT_CASES`) are static so that pytest can parametrize over them
before anything is built, and :func:`reliability_section` renders the README's table from them.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from videogen import (
    make_frame,
    truncate,
    write_audio_only,
    write_undecodable_video,
    write_video,
    write_video_without_frames,
)

SIDE = 32  # the tiny test model's img_size: a SIDE x SIDE video is a ready face crop for it
N_FRAMES = 12


@dataclass(frozen=True)
class Case:
    """One kind of hostile input: how to make it and what a truthful command makes of it."""

    name: str  # test id
    filename: str
    kind: str  # "good", "partial" or "bad" (module docstring)
    note: str  # what the input is (README table)
    build: Callable[[Path], Path]


@dataclass(frozen=True)
class Entry:
    """A built corpus file."""

    case: Case
    path: Path
    frames: int  # frames that decode (0 for bad inputs)

    @property
    def kind(self) -> str:
        return self.case.kind


def decoded_frames(path: Path) -> int:
    """How many frames of ``path`` decode with marlin's reader (0 when none); warnings about damage silenced."""
    from marlin.video.io import VideoError, iter_frames

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return sum(1 for _ in iter_frames(path))
        except VideoError:
            return 0


# ---- writers ---------------------------------------------------------------------------------------------------------
def write_vfr(path: Path, gaps_ms: tuple[int, ...] = (40, 10, 90, 40, 200, 15, 40, 40, 120, 40, 33)) -> Path:
    """An H.264 MP4 whose frames are ``gaps_ms`` milliseconds apart (variable frame rate; ``len(gaps_ms) + 1``
    frames)."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width = stream.height = SIDE
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        for index, t in enumerate(np.concatenate([[0], np.cumsum(gaps_ms)]).astype(int)):
            frame = av.VideoFrame.from_ndarray(make_frame(index, SIDE, SIDE), format="rgb24")
            frame.pts, frame.time_base = int(t), Fraction(1, 1000)
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_huge_header(path: Path, side: int = 10000) -> Path:
    """An AVI declaring a ``side`` x ``side`` raw video stream (100 Mpx a frame) that holds one 64-byte packet."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("rawvideo", rate=25)
        stream.width = stream.height = side
        stream.pix_fmt = "gray"
        container.start_encoding()
        packet = av.Packet(b"\x80" * 64)
        packet.stream, packet.pts, packet.dts, packet.time_base = stream, 0, 0, Fraction(1, 25)
        container.mux(packet)
    return path


def _noisy(index: int, height: int, width: int) -> np.ndarray:
    """A barcode frame with noise in its lower half, so that every frame costs many bytes (damage hits frame data)."""
    frame = make_frame(index, height, width)
    frame[height // 2 :] = np.random.default_rng(index).integers(0, 256, frame[height // 2 :].shape, dtype=np.uint8)
    return frame


def _noisy_mp4(path: Path, faststart: bool) -> Path:
    """A 40-frame 64x64 noisy MP4 written beside ``path`` (the source of a truncated / damaged copy)."""
    return write_video(path.with_name(f".src-{path.name}"), 40, 64, 64, frame_fn=_noisy, faststart=faststart)


def write_truncated(path: Path, faststart: bool = True) -> Path:
    """The first half of a noisy MP4: with its index first, 17 of the 40 frames decode; with it last, none."""
    src = _noisy_mp4(path, faststart)
    truncate(src, path, 0.5)
    src.unlink()
    return path


def write_damaged_middle(path: Path, start: float = 0.35, stop: float = 0.65) -> Path:
    """A noisy MP4 whose bytes between the ``start`` and ``stop`` fractions of the file are overwritten at random."""
    src = _noisy_mp4(path, True)
    data = bytearray(src.read_bytes())
    lo, hi = int(len(data) * start), int(len(data) * stop)
    data[lo:hi] = np.random.default_rng(0).bytes(hi - lo)
    path.write_bytes(bytes(data))
    src.unlink()
    return path


def _bytes(data: bytes) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        path.write_bytes(data)
        return path

    return build


def _self_link(path: Path) -> Path:
    os.symlink(path.name, path)  # a symlink to itself: ELOOP on open
    return path


def _dangling_link(path: Path) -> Path:
    os.symlink(f"missing-{path.name}", path)  # listed by folder expansion, then failed: no such file
    return path


def _video(n: int = N_FRAMES, height: int = SIDE, width: int = SIDE, **kw: object) -> Callable[[Path], Path]:
    return lambda path: write_video(path, n, height, width, **kw)  # type: ignore[arg-type]


# ---- the cases -------------------------------------------------------------------------------------------------------
VIDEO_CASES: tuple[Case, ...] = (
    Case("zero_byte", "zero_byte.mp4", "bad", "empty file", _bytes(b"")),
    Case("random_bytes", "random_bytes.mp4", "bad", "4 KB of random bytes named .mp4",
         _bytes(np.random.default_rng(1).bytes(4096))),
    Case("truncated_index_last", "truncated_moov.mp4", "bad", "first half of an MP4 whose index is at the end",
         lambda p: write_truncated(p, faststart=False)),
    Case("truncated", "truncated.mp4", "partial", "first half of an MP4 whose index is first (17 of 40 frames)",
         write_truncated),
    Case("damaged_middle", "damaged_middle.mp4", "partial", "MP4 with bytes 35-65% overwritten (27 of 40 frames)",
         write_damaged_middle),
    Case("undecodable", "undecodable.avi", "bad", "AVI of random MPEG-4 packets", write_undecodable_video),
    Case("audio_only", "audio_only.mp4", "bad", "AAC audio, no video stream", write_audio_only),
    Case("zero_frames", "zero_frames.mkv", "bad", "video stream with no frame", write_video_without_frames),
    Case("huge_header", "huge_header.avi", "bad", "header declares 10000x10000 (above max_pixels)",
         write_huge_header),
    Case("dangling_link", "dangling.mp4", "bad", "symlink to a missing file", _dangling_link),
    Case("symlink_loop", "loop.mp4", "bad", "symlink to itself", _self_link),
    Case("one_frame", "one_frame.mp4", "good", "a single frame", _video(1)),
    Case("tiny_8x8", "tiny_8x8.mp4", "good", "8x8 pixels", _video(height=8, width=8)),
    Case("gray", "gray.mkv", "good", "monochrome (FFV1 gray)", _video(codec="ffv1", pix_fmt="gray")),
    Case("ten_bit", "ten_bit.mp4", "good", "10-bit H.264 (yuv420p10le)", _video(pix_fmt="yuv420p10le")),
    Case("vfr", "vfr.mp4", "good", "variable frame rate (10-200 ms gaps)", write_vfr),
    Case("rotated", "rotated.mp4", "good", "display matrix rotates 90 degrees", _video(height=48, rotation=90)),
    Case("wide", "wide.mp4", "good", "64x36, not a square crop", _video(height=36, width=64)),
    Case("avi", "container.avi", "good", "MPEG-4 part 2 in AVI", _video(codec="mpeg4")),
    Case("mkv", "container.mkv", "good", "H.264 in Matroska", _video()),
    Case("webm", "container.webm", "good", "VP9 in WebM", _video(codec="libvpx-vp9")),
    Case("name_space", "with space.mp4", "good", "a space in the name", _video()),
    Case("name_unicode", "ünïcødé 名前.mp4", "good", "non-ASCII name", _video()),
    Case("name_dash", "-leading-dash.mp4", "good", "name starting with '-'", _video()),
    Case("name_newline", "new\nline.mp4", "good", "a newline in the name", _video()),
)  # fmt: skip
CASES_BY_NAME = {c.name: c for c in VIDEO_CASES}


def build_corpus(root: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Write every video case into the flat folder ``root`` (plus ``self_dir``, a symlink to ``root`` itself, which
    folder expansion must not follow). Returns the entries by name, and why a case could not be made here (an
    encoder this FFmpeg build lacks, a file name the file system refuses) by name."""
    root.mkdir(parents=True, exist_ok=True)
    entries, missing = {}, {}
    for case in VIDEO_CASES:
        try:
            path = case.build(root / case.filename)
        except (OSError, ValueError, av.FFmpegError) as e:  # av.codec.codec.UnknownCodecError is a ValueError
            missing[case.name] = f"{case.note}: cannot be made here ({type(e).__name__}: {e})"
            continue
        entries[case.name] = Entry(case, path, decoded_frames(path) if case.kind != "bad" else 0)
    os.symlink(".", root / "self_dir")
    return entries, missing


# ---- checkpoints -----------------------------------------------------------------------------------------------------
CHECKPOINT_CASES: tuple[tuple[str, str, str], ...] = (
    # (name, expectation: good / bad / nonfinite, what it is)
    ("good", "good", "a tiny full model, official layout"),
    ("odd_name", "good", "the same file, named 'ünï cødé -ckpt.pt'"),
    ("zero_byte", "bad", "empty file"),
    ("truncated", "bad", "first half of a .pt"),
    ("random_bytes", "bad", "4 KB of random bytes"),
    ("video_file", "bad", "an MKV named .pt"),
    ("folder", "bad", "a folder without model.safetensors"),
    ("symlink_loop", "bad", "symlink to itself"),
    ("pickle_exec", "bad", "a pickle that calls os.system"),
    ("nan_weights", "nonfinite", "one tensor holds NaN"),
    ("huge_config", "bad", "config.json says encoder_embed_dim=3000000"),
    ("negative_depth", "bad", "config.json says encoder_depth=-1"),
    ("garbage_safetensors", "bad", "safetensors with a garbage header"),
)
EVIL_PICKLE = (b"\x80\x04\x95\x1d\x00\x00\x00\x00\x00\x00\x00\x8c\x05posix\x94\x8c\x06system\x94\x93\x94\x8c\x05true"
               b"\x94\x85\x94R\x94.")  # os.system("true"): must be refused, never run  # fmt: skip


def _edit_config(folder: Path, **changes: object) -> Path:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def build_checkpoints(root: Path, video: Path) -> dict[str, Path]:
    """Write the :data:`CHECKPOINT_CASES` into ``root``; name -> path (a file or a ``save_pretrained`` folder)."""
    import torch

    from marlin import Marlin

    root.mkdir(parents=True, exist_ok=True)
    model = Marlin("marlin_vit_tiny_test", as_feature_extractor=False)
    good = model.export_official(root / "good.full.pt")
    data = good.read_bytes()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd[next(k for k in sd if sd[k].is_floating_point())].view(-1)[0] = float("nan")
    paths = {
        "good": good,
        "odd_name": _bytes(data)(root / "ünï cødé -ckpt.pt"),
        "zero_byte": _bytes(b"")(root / "zero_byte.pt"),
        "truncated": _bytes(data[: len(data) // 2])(root / "truncated.pt"),
        "random_bytes": _bytes(np.random.default_rng(2).bytes(4096))(root / "random_bytes.pt"),
        "video_file": _bytes(video.read_bytes())(root / "video.pt"),
        "symlink_loop": _self_link(root / "loop.pt"),
        "pickle_exec": _bytes(EVIL_PICKLE)(root / "pickle_exec.pt"),
        "garbage_safetensors": _bytes(b"\xff" * 8 + b"{not json")(root / "garbage.safetensors"),
        "huge_config": _edit_config(model.save_pretrained(root / "huge_config"), encoder_embed_dim=3_000_000),
        "negative_depth": _edit_config(model.save_pretrained(root / "negative_depth"), encoder_depth=-1),
    }
    paths["folder"] = root / "folder.pt"
    paths["folder"].mkdir()
    torch.save(sd, root / "nan.pt")
    paths["nan_weights"] = root / "nan.pt"
    return paths


# ---- README ----------------------------------------------------------------------------------------------------------
# What test_faults asserts per group of cases: (batch commands, single-input commands, face cropping)
OUTCOMES = {
    "bad": ("`failed` row naming the file, the other inputs done, exit 1", "exit 2, one line naming the file",
            "`failed` row / line"),
    "loop": ("not listed; a warning names it", "exit 2, one line naming the file", "not listed; a warning"),
    "partial": ("`ok`; `frames` = the frames that decode (17 / 27), not the declared 40",
                "exit 0 (a clip past the end repeats the last frame that decodes)", "`no_face`"),
    "good": ("`ok`, every frame counted", "exit 0", "`no_face` (no face in synthetic frames)"),
}  # fmt: skip


def _group(case: Case) -> str:
    return "loop" if case.name == "symlink_loop" else case.kind


def reliability_table() -> str:
    """The README table: the video cases by outcome, and what marlin does with them (what test_faults asserts)."""
    rows = ["| inputs | `extract`, `prepare` | `masks`, `reconstruct`, `pretrain`, `probe`, `finetune` | "
            "`extract --crop-face`, `crop` |", "|---|---|---|---|"]  # fmt: skip
    for group, (batch, single, face) in OUTCOMES.items():
        names = "; ".join(c.note for c in VIDEO_CASES if _group(c) == group)
        rows.append(f"| {names} | {batch} | {single} | {face} |")
    return "\n".join(rows)
