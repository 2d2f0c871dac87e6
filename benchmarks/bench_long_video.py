"""Peak memory of `marlin extract --crop-face` against video length: is it flat for hour-long 720p video?

Generates 1280x720 25 fps videos of the requested lengths once (a real face clip looped: the longest landscape clip
of at least 1280x720 in ``../shared/data/talking_heads`` or ``../shared/data/marlin_samples``, else the embedded
sample portrait panning over a background), then runs ``marlin extract --crop-face`` on each, one at a time, in a
subprocess with a randomly initialised model (features are meaningless; memory is what is measured). While it runs,
``/proc`` is polled for the RSS of the command and all its descendants (the encoder process plus its
decode/detect worker).

Prints one row per length: windows, wall time, peak RSS of the whole process tree (sum, polled every 0.1 s), peak
RSS of the largest single process (``wait4``'s rusage, exact), and the peak size of the temporary window
folder. ``--pythonpath`` runs another source tree (e.g. an older version copied with ``git archive``) for a
before/after table.

    python benchmarks/bench_long_video.py                              # 1 and 10 minutes, ViT-B
    python benchmarks/bench_long_video.py --minutes 1 --model marlin_vit_tiny
    python benchmarks/bench_long_video.py --minutes 60                 # the hour: slow on a CPU (see README)
    python benchmarks/bench_long_video.py --pythonpath /tmp/old/src    # the same with another marlin tree

The first minute of video is encoded once (~1 min on a 2-core CPU) and cached in ``--cache``; longer videos repeat
its packets (seconds). Extraction is dominated by the encoder and face detection: on a shared 2-core CPU, 6-8 min per
minute of video with ViT-B and ~1.7 min with ViT-Ti, so 60 minutes there is an hours-long run (use a GPU, or measure
the hour with ``--model marlin_vit_tiny``: memory is what this measures, and the encoder's part does not grow).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
FPS = 25
WIDTH, HEIGHT = 1280, 720


# ---- the videos ------------------------------------------------------------------------------------------------------
def _source_clip() -> Path | None:
    """The longest real landscape face clip of at least 1280x720 in the shared data, if it is present."""
    from marlin.video.io import probe_video

    best: tuple[int, Path] | None = None
    for folder in (SHARED / "talking_heads", SHARED / "marlin_samples"):
        for f in sorted(folder.glob("*.mp4")) if folder.is_dir() else []:
            try:
                info = probe_video(f)
            except ValueError:
                continue
            if info.width >= WIDTH and info.height >= HEIGHT and (best is None or info.n_frames > best[0]):
                best = (info.n_frames, f)
    return None if best is None else best[1]


def _looped(source: Path | None, n: int) -> Iterator[np.ndarray]:
    """``n`` 720p frames: the source clip decoded again and again (never held whole), or the sample portrait."""
    from marlin.video.io import iter_frames

    if source is None:
        from marlin.viz.sample import sample_frames

        loop = sample_frames(100, WIDTH, HEIGHT)  # 100 frames x 2.8 MB: the synthetic loop fits in memory
        for i in range(n):
            yield loop[i % len(loop)]
        return
    done = 0
    while done < n:
        for frame in iter_frames(source, size=(HEIGHT, WIDTH)):
            yield frame
            done += 1
            if done == n:
                return


def make_video(cache: Path, minutes: float) -> Path:
    """The cached ``minutes``-long 720p test video: one minute is encoded, longer ones repeat its packets."""
    from marlin.video.io import write_video

    source = _source_clip()
    tag = source.stem if source else "synthetic"
    path = cache / f"long_{tag}_{minutes:g}min.mp4"
    if path.is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    minute = cache / f"long_{tag}_1min.mp4"
    if minutes <= 1 or not minute.is_file():
        n = round(min(minutes, 1) * 60 * FPS)
        write_video(minute if minutes >= 1 else path, _looped(source, n), fps=FPS, crf=28, preset="ultrafast")
    if minutes > 1:
        _repeat(minute, round(minutes), path)
    print(f"generated {path.name} from {tag} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def _repeat(src: Path, times: int, dst: Path) -> None:
    """Write ``src``'s video packets ``times`` times in a row (no re-encoding: every copy starts with a key frame and
    libx264's ultrafast preset makes no B-frames, so shifting the timestamps is enough)."""
    import av

    tmp = dst.with_name(f".{dst.name}.tmp.mp4")
    with av.open(str(src)) as inp, av.open(str(tmp), "w") as out:
        s_in = inp.streams.video[0]
        s_out = out.add_stream_from_template(s_in)
        span = int(s_in.duration)
        for k in range(times):
            inp.seek(0, stream=s_in)
            for packet in inp.demux(s_in):
                if packet.dts is None:
                    continue
                packet.pts += k * span
                packet.dts += k * span
                packet.stream = s_out
                out.mux(packet)
    tmp.replace(dst)


# ---- measuring -------------------------------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from /proc."""
    tree: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _tree_rss(root: int) -> int:
    """Bytes resident in ``root`` and all its descendants now (a page shared by two of them counts twice)."""
    tree, todo, total = _children(), [root], 0
    page = os.sysconf("SC_PAGE_SIZE")
    while todo:
        pid = todo.pop()
        todo.extend(tree.get(pid, []))
        try:
            with open(f"/proc/{pid}/statm") as f:
                total += int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total


def _folder_bytes(root: Path) -> int:
    total = 0
    for d in root.glob(".marlin-tmp*"):
        for f in d.rglob("*"):
            try:
                total += f.stat().st_size
            except OSError:
                pass
    return total


def measure(cmd: list[str], env: dict[str, str], out: Path, log: Path) -> dict[str, float]:
    """Run ``cmd``; return its wall time, peak tree RSS (polled), largest process peak RSS and peak temp disk."""
    peak_tree = peak_disk = 0
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        while True:  # wait4: the exit status and the rusage of this run's processes alone
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak_tree = max(peak_tree, _tree_rss(proc.pid))
            peak_disk = max(peak_disk, _folder_bytes(out))
            time.sleep(0.1)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"extract failed ({proc.returncode}); see {log}:\n" + log.read_text()[-2000:])
    largest = usage.ru_maxrss * 1024  # the child's peak, or that of a worker it waited for, whichever is larger
    return {"wall_s": wall, "tree_mb": peak_tree / 2**20, "proc_mb": largest / 2**20, "disk_mb": peak_disk / 2**20}


def run_length(video: Path, work: Path, args: argparse.Namespace) -> dict[str, float]:
    out = work / f"out_{video.stem}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "marlin.cli", "extract", str(video), "-o", str(out), "--crop-face", "--model",
           args.model, "--random-init", "--workers", str(args.workers),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    if not args.progress:
        cmd.append("--no-progress")
    env = {**os.environ, "PYTHONPATH": str(args.pythonpath or REPO / "src")}
    stats = measure(cmd, env, out, work / f"{video.stem}.log")
    feats = np.load(next(out.glob("*.npy")))
    stats["windows"] = len(feats)
    shutil.rmtree(out, ignore_errors=True)
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10], help="video lengths (default: 1 10)")
    p.add_argument("--model", default="marlin_vit_base_ytf", help="encoder architecture (random init)")
    p.add_argument("--workers", type=int, default=1, help="decode/detect worker processes (default: 1)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--cache", type=Path, default=Path("/tmp/marlin_long_videos"), help="generated videos")
    p.add_argument("--pythonpath", type=Path, help="run `marlin extract` from this source tree instead")
    p.add_argument("--progress", action="store_true", help="keep the progress bar (in the log file)")
    args = p.parse_args()
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)
    tree = args.pythonpath or REPO / "src"
    print(f"model {args.model} (random init), --workers {args.workers}, --batch-size {args.batch_size}, code {tree}")
    print(f"{'minutes':>7} | {'windows':>7} | {'wall s':>7} | {'peak RSS, all processes':>23} | "
          f"{'largest process':>15} | {'temp disk':>9}")  # fmt: skip
    for minutes in args.minutes:
        video = make_video(args.cache, minutes)
        s = run_length(video, work, args)
        print(f"{minutes:>7g} | {s['windows']:>7.0f} | {s['wall_s']:>7.0f} | {s['tree_mb']:>20.0f} MB | "
              f"{s['proc_mb']:>12.0f} MB | {s['disk_mb']:>6.0f} MB", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
