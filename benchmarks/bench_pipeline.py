"""In-the-wild video -> features: video seconds processed per wall second, with a stage breakdown and peak RSS.

Runs the same code as `marlin extract --crop-face` (decode -> detect -> track -> crop -> windows -> encoder) over the
in-the-wild MARLIN sample clips (../shared/data/marlin_samples/video0*.mp4 by default; the generated sample clip when
that folder is absent). Model weights do not change speed, so the architecture is built untrained.

    python benchmarks/bench_pipeline.py                              # ViT-S, inline
    python benchmarks/bench_pipeline.py --model marlin_vit_base_ytf --workers 1 --batch-size 4
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "marlin_samples"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="*", type=Path, help="videos (default: marlin_samples/video0*.mp4)")
    p.add_argument("--model", default="marlin_vit_small_ytf")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, default=0, help="decode/detect processes beside the model")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)

    import torch

    from marlin import create_model
    from marlin.video.extract import ExtractOptions, extract_many
    from marlin.video.io import probe_video

    videos = args.videos or sorted(DEFAULT_DATA.glob("video0*.mp4"))
    tmp = tempfile.TemporaryDirectory()
    if not videos:
        from marlin.viz.sample import make_sample_clip

        print(f"{DEFAULT_DATA} not found: using the generated sample clip")
        videos = [make_sample_clip(Path(tmp.name) / "sample.mp4")]
    duration = {v: probe_video(v).duration_s for v in videos}
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    opts = ExtractOptions(crop_face=True, workers=args.workers, batch_size=args.batch_size, dtype=args.dtype,
                          progress=False, overwrite=True)  # fmt: skip
    print(
        f"model {args.model} (untrained weights, same speed), batch {args.batch_size}, workers {args.workers}, "
        f"dtype {args.dtype}, torch threads {torch.get_num_threads()}"
    )
    t0 = time.perf_counter()
    summary = extract_many(model, videos, Path(tmp.name) / "out", opts)
    wall = time.perf_counter() - t0
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024

    print(f"{'video':<14}{'status':<9}{'seconds':>8}{'frames':>8}{'windows':>9}{'face-less':>11}")
    for r in summary.results:
        v = Path(r.input)
        print(f"{v.name:<14}{r.status:<9}{duration[v]:>8.1f}{r.frames:>8}{r.windows:>9}{r.faceless_frames:>11}")
    t = summary.timings
    total_video = sum(duration.values())
    stages = {"decode": t.decode, "detect": t.detect, "crop": t.crop, "encode": t.encode}
    busy = sum(stages.values())
    print(
        f"\nvideo seconds: {total_video:.1f}, wall seconds: {wall:.1f} -> "
        f"{total_video / wall:.3f} video seconds per wall second"
    )
    print("stage breakdown (seconds, share of the summed stage time):")
    for k, v in stages.items():
        print(f"  {k:<7}{v:>8.2f}  {100 * v / max(busy, 1e-9):5.1f}%")
    print(f"windows/s in the encoder: {sum(r.windows for r in summary.results) / max(t.encode, 1e-9):.2f}")
    print(f"peak RSS: main {rss_self:.0f} MB" + (f", largest worker {rss_children:.0f} MB" if args.workers else ""))
    tmp.cleanup()


if __name__ == "__main__":
    main()
