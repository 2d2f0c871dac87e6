"""Is the audio of a talking-face dataset aligned with its video, as marlin reads them? A learning-free check.

For each clip: mouth motion per frame (mean absolute grey-level change of a fixed mouth box between consecutive
frames) and loudness per frame (mean of the log-mel columns that sound during the frame, from
:func:`marlin.sync.data.load_video_audio`, the lip-sync expert's own audio path); both z-scored, then their correlation
at video lags -10..+10 frames, averaged over the clips. An aligned pipeline peaks at lag 0; a peak elsewhere means the
audio path (decoding, resampling, mel framing) or the data is shifted by that many frames, and no sync expert can
learn what it is not given.

    python benchmarks/av_alignment.py                       # 60 GRID s1 clips, their fixed mouth box
    python benchmarks/av_alignment.py --clips 200 --box 168,264,112,208

Needs ../shared/data (or --data).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _z(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-8)


def _lagged(a: np.ndarray, b: np.ndarray, lag: int) -> float:
    """Mean product of `a` (video) shifted later by `lag` frames against `b` (audio)."""
    x, y = (a[lag:], b[: len(b) - lag]) if lag >= 0 else (a[:lag], b[-lag:])
    return float((x * y).mean())


def clip_curves(path: Path, box: tuple[int, int, int, int], lags: range) -> tuple[list[float], list[float]]:
    """(correlation with loudness, with loudness change) of one clip's mouth motion, per lag."""
    from marlin.sync.data import load_video_audio
    from marlin.video.io import read_video

    y0, y1, x0, x1 = box
    grey = read_video(path)[:, y0:y1, x0:x1].astype(np.float32).mean(-1)  # [T, h, w]
    motion = np.abs(np.diff(grey, axis=0)).mean((1, 2))  # [T-1]: change from frame t-1 to t
    va = load_video_audio(path)
    mel, per = va.mel.numpy(), 80 / va.fps  # 80 mel frames per second
    loud = np.array([mel[:, round(t * per) : round((t + 1) * per)].mean() for t in range(1, va.n_frames)])
    n = min(len(motion), len(loud))
    motion, loud = _z(motion[:n]), loud[:n]
    onset = _z(np.abs(np.diff(np.r_[loud[0], loud])))
    loud = _z(loud)
    return [_lagged(motion, loud, k) for k in lags], [_lagged(motion, onset, k) for k in lags]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("MARLIN_SHARED_DATA", REPO.parent / "shared" / "data"))
    ap.add_argument("--data", type=Path, default=shared)
    ap.add_argument("--clips", type=int, default=60)
    ap.add_argument("--box", default="168,264,112,208", help="mouth box rows y0,y1 and columns x0,x1 (GRID's)")
    args = ap.parse_args(argv)
    files = sorted((args.data / "grid_s1" / "videos").glob("*.mp4"))[: args.clips]
    if not files:
        raise SystemExit(f"no GRID clips under {args.data / 'grid_s1' / 'videos'}")
    box = tuple(int(v) for v in args.box.split(","))
    lags = range(-10, 11)
    curves = np.array([clip_curves(f, box, lags) for f in files])  # [clips, 2, lags]
    mean = curves.mean(0)
    print(f"{len(files)} clips; correlation of mouth motion with the audio, video shifted later by `lag` frames")
    print("| lag | loudness | loudness change |\n|---|---|---|")
    for i, k in enumerate(lags):
        print(f"| {k:+d} | {mean[0, i]:+.3f} | {mean[1, i]:+.3f} |")
    best = [list(lags)[int(np.argmax(mean[j]))] for j in range(2)]
    per_clip = np.array(list(lags))[curves[:, 0].argmax(1)]
    print(f"\npeak lag: loudness {best[0]:+d}, loudness change {best[1]:+d}; per clip (loudness): "
          f"{np.mean(np.abs(per_clip) <= 1):.0%} of clips peak within +-1 frame of 0")  # fmt: skip


if __name__ == "__main__":
    main()
