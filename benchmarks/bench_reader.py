"""Reading a training clip deep into a long video: frame-accurate seeking vs decoding from the start.

Fine-tuning and pretraining on video folders read one 16-frame clip (every 2nd frame) at a random place in each
video; `marlin.video.io.read_frames` seeks to the keyframe before it when the clip starts 250 frames or more in
(the packet index is built once per file and process, as in a training process reading every epoch).
This writes one long H.264 clip (keyframe every 250 frames, as x264's default), reads clips at several depths both
ways in one run, checks that the frames are identical, and prints the seconds and the ratio.

    python benchmarks/bench_reader.py [--minutes 2] [--size 224] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def _write(path: Path, n: int, size: int) -> None:
    from marlin.video.io import write_video

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    frames = (np.roll(base, k, axis=1) for k in range(n))  # a moving texture: real inter-frame coding
    write_video(path, frames, fps=25, preset="ultrafast", crf=23)


def main(argv: list[str] | None = None) -> None:
    from marlin.data.clips import clip_indices
    from marlin.video.io import probe_video, read_frames

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=2.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "long.mp4"
        n = int(args.minutes * 60 * 25)
        _write(path, n, args.size)
        n = probe_video(path).n_frames
        print(f"{path.name}: {n} frames ({n / 25 / 60:.1f} min at 25 fps), {args.size} px")
        print(f"{'clip start':>10} {'from start s':>13} {'seeking s':>10} {'speed-up':>9}  same frames")
        for depth in (0.1, 0.5, 0.9):
            idx = clip_indices(n, 16, 2, int(depth * (n - 40))).tolist()
            times: dict[bool, list[float]] = {False: [], True: []}
            out = {}
            for _ in range(args.reps):
                for seek in (False, True):  # interleaved: load drift hits both alike
                    t0 = time.perf_counter()
                    out[seek] = read_frames(path, idx, seek=seek)
                    times[seek].append(time.perf_counter() - t0)
            slow, fast = statistics.median(times[False]), statistics.median(times[True])
            same = np.array_equal(out[False], out[True])
            print(f"{idx[0]:>10} {slow:>13.3f} {fast:>10.3f} {slow / fast:>8.1f}x  {same}")


if __name__ == "__main__":
    main()
