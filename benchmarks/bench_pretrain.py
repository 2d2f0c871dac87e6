"""Pretraining step speed: marlin's single-forward step vs an in-repo reproduction of the official step, one run.

The official iteration (`marlin.train.reference.two_forward_step`) forwards the encoder/decoder once for the critic
update (and back-propagates the critic loss through them) and once more for the generator update, with the official
explicit softmax(q k^T) v attention and the Conv3d embedding of every patch. Ours forwards once, with
`scaled_dot_product_attention` and only the visible patches embedded. A third row, the two-forward step with
marlin's kernels, separates the algorithmic gain from the kernels. All rows start from the same weights and use the
same batches and masks (fasking on synthetic face clips). The last lines count each step's arithmetic (attention
counted as explicit matmuls in both): the speed-up that equally efficient kernels would give.

    python benchmarks/bench_pretrain.py                                   # ViT-S, batch 2, CPU
    python benchmarks/bench_pretrain.py --model marlin_vit_base --batch 4 --reps 5 --bf16
    python benchmarks/bench_pretrain.py --curve-steps 20                  # + bf16-vs-fp32 loss curve (tiny model)
    python benchmarks/bench_pretrain.py --device cuda --batch 32 --reps 10 --bf16   # on a GPU: + clips/s, % of peak

On a GPU every row runs with TF32 allowed for float32 matmuls (what training runs set: `allow_tf32`), and each row's
arithmetic rate is also given against a lone 8192^3 matmul measured in the same run (bf16 and TF32): the fraction of
the chip's reachable peak the step uses.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch


def _batches(cfg, n: int, batch: int) -> list[dict]:
    from marlin.data.collate import collate_clips
    from marlin.data.synthetic import SyntheticClips
    from marlin.mae.masking import Masker

    data = SyntheticClips(n * batch, cfg.model, seed=cfg.seed)
    out = []
    g = torch.Generator().manual_seed(0)
    masker = Masker.for_config(cfg.model, cfg.mask.strategy, cfg.mask.ratio)
    for i in range(n):
        b = collate_clips([data[i * batch + j] for j in range(batch)])
        b["visible"] = masker(batch, parse=b["parse"], generator=g)
        out.append(b)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(
    fns: dict, batches: list[dict], warmup: int, device: torch.device
) -> dict[str, tuple[float, list[dict]]]:
    """Median seconds per step of each function, taking turns step by step so load drift on a shared machine hits
    every row alike; also every step's returned metrics."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    results: dict[str, list[dict]] = {name: [] for name in fns}
    for i, b in enumerate(batches):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            results[name].append(fn(b))
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def bench_speed(args: argparse.Namespace) -> None:
    from marlin.models.layers import Attention
    from marlin.train import Pretrainer, load_config
    from marlin.train.reference import two_forward_step

    device = torch.device(args.device)
    overrides = [f"batch_size={args.batch}", "optim.warmup_steps=0", "optim.scale_lr=false", "max_steps=1000",
                 f"out_dir={tempfile.mkdtemp()}", "log.tensorboard=false", "mask.strategy=fasking",
                 f"device={args.device}"]  # fmt: skip
    cfg = load_config(args.model, overrides)
    batches = _batches(cfg, args.warmup + args.reps, args.batch)
    m = cfg.model

    def ours(precision: str, explicit_attention: bool = False):
        trainer = Pretrainer(load_config(args.model, [*overrides, f"precision={precision}"]))
        trainer.ensure_schedule(1.0)
        if explicit_attention:  # for counting FLOPs only: the CPU flash kernel has no FLOP formula
            for module in trainer.model.modules():
                if isinstance(module, Attention):
                    module.fused = False

        def step(b: dict) -> dict:
            out = trainer.train_step([b])
            trainer.step += 1
            return out

        return step

    def official(fused: bool):
        base = Pretrainer(cfg)  # same seed -> same initial weights as ours
        model, critic = copy.deepcopy(base.model).set_fused_attention(fused), copy.deepcopy(base.critic)
        model, critic = model.to(device), critic.to(device)
        o = cfg.optim
        g_opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=0.0)
        d_opt = torch.optim.AdamW(critic.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=0.0)

        def step(b: dict) -> dict:
            return two_forward_step(
                model, critic, g_opt, d_opt, b["video"].to(device), b["visible"].to(device), tubelet=m.tubelet_size,
                patch=m.patch_size,
                adv_weight=cfg.loss.adv_weight,
            )  # fmt: skip

        return step

    modes = {
        "official (2 forwards, explicit attention)": lambda: official(False),
        "2 forwards, marlin kernels": lambda: official(True),
        "marlin (1 forward, marlin kernels)": lambda: ours("fp32"),
    }
    if args.bf16:
        modes["marlin (1 forward, SDPA, bf16 autocast)"] = lambda: ours("bf16")
    print(f"{m.name}, batch {args.batch}, {torch.get_num_threads()} threads, {args.reps} timed steps after "
          f"{args.warmup} warm-up, rows taking turns; device {device}")  # fmt: skip
    rows = _time_interleaved({name: make() for name, make in modes.items()}, batches, args.warmup, device)
    for name, (sec, results) in rows.items():
        print(f"  {name:<44} {sec:7.3f} s/step  {args.batch / sec:8.2f} clips/s  rec {results[-1]['loss/rec']:.5f}",
              flush=True)  # fmt: skip
    ref = rows["official (2 forwards, explicit attention)"][0]
    for name, (sec, _) in rows.items():
        print(f"  speed-up vs official: {name:<44} {ref / sec:5.2f}x")
    a = rows["official (2 forwards, explicit attention)"][1]
    b = rows["marlin (1 forward, marlin kernels)"][1]
    diff = max(abs(x["loss/rec"] - y["loss/rec"]) for x, y in zip(a, b, strict=True))
    print(f"  max |rec loss difference| official vs marlin over {len(a)} steps: {diff:.2e}")
    counted = {"official": lambda: official(False), "marlin": lambda: ours("fp32", explicit_attention=True)}
    flops = {name: _step_flops(make, batches[0]) for name, make in counted.items()}
    print(
        f"  arithmetic per step: official {flops['official'] / 1e9:.1f} GFLOP, marlin {flops['marlin'] / 1e9:.1f} "
        f"GFLOP ({flops['official'] / flops['marlin']:.2f}x fewer); the rest of a speed-up is kernel efficiency"
    )
    peaks = _matmul_peaks(device)
    print("  lone matmul: " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    for name, (sec, _) in rows.items():
        rate = flops["official" if name.startswith(("official", "2 forwards")) else "marlin"] / sec
        peak = peaks["bf16" if "bf16" in name else "fp32"]
        print(f"  {name:<44} {rate / 1e9:9.0f} GFLOP/s = {100 * rate / peak:5.1f}% of the lone matmul")


def _step_flops(make, batch: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    step = make()
    with FlopCounterMode(display=False) as counter:
        step(batch)
    return float(counter.get_total_flops())


def _matmul_peaks(device: torch.device) -> dict[str, float]:
    """FLOP/s of a lone square matmul on `device` in fp32 (TF32 where allowed) and bf16: the reachable rate a step's
    arithmetic is held against (8192 on a GPU, 1536 on a CPU)."""
    n = 8192 if device.type == "cuda" else 1536
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(5):
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best
    return out


def bench_curve(args: argparse.Namespace) -> None:
    """Loss curve of a short run in fp32 and bf16 autocast (same data, masks and initial weights)."""
    from marlin.train import Pretrainer, load_config

    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(args.curve_model, [
            f"precision={precision}", f"max_steps={args.curve_steps}", "batch_size=2", "data.num_workers=0",
            "mask.strategy=tube", "log.tensorboard=false", "ckpt.export=false", f"out_dir={tempfile.mkdtemp()}",
            "optim.warmup_steps=2", "optim.lr=2e-2", "data.synthetic_size=16", "log.every=100000",
        ])  # fmt: skip
        t0 = time.perf_counter()
        curves[precision] = [h["loss/rec"] for h in Pretrainer(cfg).fit().history]
        print(f"  {precision}: {args.curve_steps} steps in {time.perf_counter() - t0:.1f} s")
    fp32, bf16 = curves["fp32"], curves["bf16"]
    rel = [abs(a - b) / abs(a) for a, b in zip(fp32, bf16, strict=True)]
    print(f"{args.curve_model}: rec loss fp32 {fp32[0]:.4f} -> {fp32[-1]:.4f}, bf16 {bf16[0]:.4f} -> {bf16[-1]:.4f}; "
          f"max relative difference {max(rel):.3%}, mean {statistics.mean(rel):.3%}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="marlin_vit_small")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--bf16", action="store_true", help="also time our step under bf16 autocast")
    p.add_argument("--curve-steps", type=int, default=0, help="also compare a short fp32 / bf16 loss curve")
    p.add_argument("--curve-model", default="marlin_vit_tiny")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.skip_speed:
        bench_speed(args)
    if args.curve_steps:
        bench_curve(args)


if __name__ == "__main__":
    main()
