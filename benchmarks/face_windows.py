"""Precision and recall of face windows: which windows `marlin extract --crop-face` keeps, on clips labelled here.

Positives: every real face clip in ../shared/data (talking heads, MARLIN samples, faces_more, the first GRID clips):
all their frames show a face, so every window the old planner made should stay (recall). Negatives, generated here
with a fixed seed: scenery (sky with clouds, a street of moving blocks), test patterns (colour bars, noise), and a
drawn smiley moving over the sky (a face-like drawing the detector scores up to 0.83): any window kept is garbage.
Cut-heavy clips: shots of 10-60 frames, alternating real faces (from different clips) and negatives, with hard cuts;
a kept window is right only when all its frames lie in one face shot.

Two settings are compared on the same clips, in one run: the face checks as shipped (`FaceChecks()`), and the checks
off (`min_score=0.5`, no verification, no cuts, no coverage threshold: the planner before face confirmation).

    python benchmarks/face_windows.py [--data ../shared/data] [--work DIR] [--grid 20] [--max-frames 300]

Prints one row per clip group and setting: clips, clips with a kept window, windows kept, wrong windows, precision
and recall, then the totals. Takes ~10 minutes on 2 cores (detection dominates).
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from marlin.face.detect import create_detector
from marlin.face.track import NoFaceError
from marlin.video.faces import FaceChecks
from marlin.video.io import iter_frames, write_video
from marlin.video.pipeline import clip_windows
from marlin.video.windows import window_indices

H, W = 360, 480  # size of the generated clips
OFF = FaceChecks(min_score=0.5, min_face_fraction=0.0, verify=False, cuts=False)


# ---- generated clips -------------------------------------------------------------------------------------------------
def _sky(rng: np.random.Generator, t: int) -> np.ndarray:
    import cv2

    y = np.linspace(0, 1, H)[:, None, None]
    f = (1 - y) * np.array([90, 150, 235]) + y * np.array([200, 220, 250])  # [H, 1, 3]
    clouds = cv2.resize(cv2.GaussianBlur(rng.random((H // 8, W // 8)).astype(np.float32), (0, 0), 2), (W, H))
    return np.clip(f + 60 * np.roll(clouds, 3 * t, axis=1)[..., None], 0, 255).astype(np.uint8)


def _smiley(rng: np.random.Generator, t: int) -> np.ndarray:
    import cv2

    f = _sky(rng, t)
    cx, cy = 150 + 2 * t % 200, 180
    cv2.circle(f, (cx, cy), 70, (250, 220, 40), -1)
    for dx in (-25, 25):
        cv2.circle(f, (cx + dx, cy - 20), 9, (20, 20, 20), -1)
    cv2.ellipse(f, (cx, cy + 10), (35, 25), 0, 20, 160, (20, 20, 20), 5)
    return f


def _bars(rng: np.random.Generator, t: int) -> np.ndarray:
    colours = np.array([[192] * 3, [192, 192, 0], [0, 192, 192], [0, 192, 0], [192, 0, 192], [192, 0, 0],
                        [0, 0, 192]], np.uint8)  # fmt: skip
    f = colours[np.arange(W) * 7 // W][None].repeat(H, 0)
    f[H * 2 // 3 :] = rng.integers(0, 256, (H - H * 2 // 3, W, 1), dtype=np.uint8)
    f[40:90, (8 * t) % (W - 50) :][:, :50] = 255
    return f


def _street(rng: np.random.Generator, t: int) -> np.ndarray:
    f = np.full((H, W, 3), 60, np.uint8)
    layout = np.random.default_rng(1)  # the same street every frame; the camera pans
    for _ in range(40):
        x, y = int(layout.integers(0, 2 * W)) - 4 * t, int(layout.integers(0, H))
        w, h = int(layout.integers(10, 120)), int(layout.integers(10, 200))
        x = x % (W + 200) - 100
        f[max(y, 0) : y + h, max(x, 0) : max(x + w, 0)] = layout.integers(0, 255, 3)
    return f


def _noise(rng: np.random.Generator, t: int) -> np.ndarray:
    return rng.integers(0, 256, (H, W, 3), dtype=np.uint8)


NEGATIVES = {"sky": _sky, "smiley": _smiley, "bars": _bars, "street": _street, "noise": _noise}


def _resized(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.resize(frame, (W, H), interpolation=cv2.INTER_AREA)


def make_negatives(work: Path, n_frames: int = 75) -> list[Path]:
    out = []
    for name, draw in NEGATIVES.items():
        path = work / f"neg_{name}.mp4"
        if not path.exists():
            rng = np.random.default_rng(0)
            write_video(path, np.stack([draw(rng, t) for t in range(n_frames)]), fps=25)
        out.append(path)
    return out


def make_cut_clips(work: Path, faces: list[Path], n_clips: int = 6, n_frames: int = 240) -> list[tuple[Path, list]]:
    """Clips of hard cuts; returns (path, shots) with shots as (start, stop, is_face)."""
    rng = np.random.default_rng(0)
    out = []
    for c in range(n_clips):
        frames, shots = [], []
        while len(frames) < n_frames:
            length = int(rng.integers(10, 61))
            start = len(frames)
            if len(shots) % 2 == 0:  # a face shot from a random real clip
                src = faces[int(rng.integers(len(faces)))]
                shot = [_resized(f) for f in iter_frames(src, stop=length)]
                is_face = True
            else:
                draw = list(NEGATIVES.values())[int(rng.integers(len(NEGATIVES)))]
                shot = [draw(rng, t) for t in range(length)]
                is_face = False
            frames += shot
            shots.append((start, len(frames), is_face))
        path = work / f"cuts_{c}.mp4"
        if not path.exists():
            write_video(path, np.stack(frames), fps=25)
        out.append((path, shots))
    return out


# ---- scoring ---------------------------------------------------------------------------------------------------------
@dataclass
class Row:
    clips: int = 0
    with_window: int = 0
    kept: int = 0
    wrong: int = 0
    possible: int = 0  # windows a perfect planner keeps
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def right(self) -> int:
        return self.kept - self.wrong


def kept_windows(path: Path, detector, checks: FaceChecks) -> list[list[int]]:
    """The windows `extract --crop-face` keeps (planned only: nothing is cropped or encoded)."""
    try:
        streams = clip_windows(path, crop_face=True, detector=detector, checks=checks)
    except NoFaceError:
        return []
    return [w for s in streams for w in s.window_frames]


def score(groups: dict[str, list[tuple[Path, list | None]]], detector, checks: FaceChecks,
          baseline: dict[Path, int]) -> dict[str, Row]:  # fmt: skip
    """Rows per group; ``baseline`` maps a face clip to the windows the checks-off planner keeps (filled when empty)."""
    rows = {}
    for group, clips in groups.items():
        row = rows[group] = Row()
        t0 = time.perf_counter()
        for path, shots in clips:
            windows = kept_windows(path, detector, checks)
            row.clips += 1
            row.with_window += bool(windows)
            row.kept += len(windows)
            if shots is None and group.startswith("face"):  # all frames show a face
                row.possible += baseline.setdefault(path, len(windows))
            elif shots is None:  # a negative: nothing is right
                row.wrong += len(windows)
            else:
                row.wrong += sum(not _inside_face_shot(w, shots) for w in windows)
                row.possible += sum(len(window_indices(b - a)) for a, b, face in shots if face and b - a >= 16)
        row.seconds = time.perf_counter() - t0
    return rows


def _inside_face_shot(window: list[int], shots: list) -> bool:
    return any(a <= min(window) and max(window) < b and face for a, b, face in shots)


def _print(setting: str, rows: dict[str, Row]) -> None:
    total = Row()
    for group, r in rows.items():
        _line(setting, group, r)
        for k in ("clips", "with_window", "kept", "wrong", "possible", "seconds"):
            setattr(total, k, getattr(total, k) + getattr(r, k))
    _line(setting, "all", total)


def _line(setting: str, group: str, r: Row) -> None:
    precision = r.right / r.kept if r.kept else float("nan")
    recall = r.right / r.possible if r.possible else float("nan")
    print(f"| {setting} | {group} | {r.clips} | {r.with_window} | {r.kept} | {r.wrong} | {precision:.3f} | "
          f"{recall:.3f} | {r.seconds:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--work", type=Path, default=None, help="where generated clips go (default: a temp folder)")
    ap.add_argument("--grid", type=int, default=20, help="GRID clips to include")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    work = args.work or Path(tempfile.mkdtemp(prefix="face_windows_"))
    work.mkdir(parents=True, exist_ok=True)
    d = args.data
    faces = [Path(p) for pat in ("talking_heads/*.mp4", "marlin_samples/*.mp4", "faces_more/videos/*")
             for p in sorted(glob.glob(os.fspath(d / pat)))]  # fmt: skip
    grid = [Path(p) for p in sorted(glob.glob(os.fspath(d / "grid_s1/videos/*")))[: args.grid]]
    if not faces:
        raise SystemExit(f"no face clips under {d} (pass --data)")
    groups = {
        "face clips": [(p, None) for p in faces + grid],
        "negatives": [(p, None) for p in make_negatives(work)],
        "cut-heavy": make_cut_clips(work, faces),
    }
    print("| setting | group | clips | with a window | windows kept | wrong | precision | recall | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    baseline: dict[Path, int] = {}
    with create_detector("mediapipe") as det:
        _print("checks off", score(groups, det, OFF, baseline))
        _print("FaceChecks()", score(groups, det, FaceChecks(), baseline))


if __name__ == "__main__":
    main()
