"""Clip feature extraction speed and memory: marlin vs an in-repo naive reference, measured in one run.

The reference is the same network with explicit softmax(q k^T) v attention in fp32 (what the official implementation
does). Each configuration runs in its own subprocess so its peak RSS is its own. Prints clips/s, peak RSS and the
speed ratio to the reference of the same variant and batch size.

    python benchmarks/bench_extract.py                      # ViT-S and ViT-B, batch 1 and 4, all modes
    python benchmarks/bench_extract.py --variants marlin_vit_small_ytf --batches 1 --reps 2
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

MODES = {
    "naive-fp32": "reference: explicit attention, fp32",
    "sdpa-fp32": "marlin default: scaled_dot_product_attention, fp32",
    "sdpa-bf16": "marlin bf16: weights and activations in bfloat16",
    "sdpa-bf16-autocast": "marlin bf16 via torch.autocast (fp32 weights)",
}


def run_one(variant: str, batch: int, mode: str, reps: int, warmup: int, threads: int | None) -> dict:
    import torch

    from marlin import Marlin, get_config

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = get_config(variant)
    model = Marlin(cfg).eval().set_fused_attention(not mode.startswith("naive"))
    x = torch.rand(batch, 3, cfg.clip_frames, cfg.img_size, cfg.img_size)
    if mode == "sdpa-bf16":
        model = model.to(torch.bfloat16)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode.endswith("autocast"))
    times = []
    with torch.inference_mode(), autocast:
        for i in range(warmup + reps):
            t0 = time.perf_counter()
            model.extract_features(x, keep_seq=False)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {
        "variant": variant,
        "batch": batch,
        "mode": mode,
        "sec_per_batch": sec,
        "clips_per_s": batch / sec,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["marlin_vit_small_ytf", "marlin_vit_base_ytf"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", help="also write all rows to this JSON file")
    p.add_argument("--one", nargs=3, metavar=("VARIANT", "BATCH", "MODE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.one:
        v, b, m = args.one
        print(json.dumps(run_one(v, int(b), m, args.reps, args.warmup, args.threads)))
        return

    import torch

    print(
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
        f"threads {args.threads or torch.get_num_threads()}",
        flush=True,
    )
    rows = []
    header = f"{'variant':<22}{'batch':>6}  {'mode':<20}{'clips/s':>9}{'s/batch':>9}{'peak RSS MB':>13}{'x ref':>8}"
    print(header, flush=True)
    for variant in args.variants:
        for batch in args.batches:
            ref = None
            for mode in args.modes:
                cmd = [
                    sys.executable,
                    __file__,
                    "--one",
                    variant,
                    str(batch),
                    mode,
                    "--reps",
                    str(args.reps),
                    "--warmup",
                    str(args.warmup),
                ] + (["--threads", str(args.threads)] if args.threads else [])
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                row = json.loads(out)
                if mode == "naive-fp32":
                    ref = row["clips_per_s"]
                row["ratio_vs_naive"] = row["clips_per_s"] / ref if ref else float("nan")
                rows.append(row)
                print(
                    f"{variant:<22}{batch:>6}  {mode:<20}{row['clips_per_s']:>9.3f}{row['sec_per_batch']:>9.2f}"
                    f"{row['peak_rss_mb']:>13.0f}{row['ratio_vs_naive']:>8.2f}",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
