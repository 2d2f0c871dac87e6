"""Clip feature extraction speed per precision path vs the official `marlin-pytorch` package, and int8 fidelity.

Speed (default): one process holds every path with the same weights (the official model's, loaded into ours) and the
paths take turns clip batch by clip batch, so a loaded machine slows them alike and the ratios hold. Paths: `official`
(marlin-pytorch 0.3.4 fp32, needs `pip install --no-deps marlin-pytorch==0.3.4 einops`), `naive` (ours with explicit
attention, the official computation), `fp32` (ours, SDPA), `int8` (`Marlin.for_inference("int8")`: its attention in
bf16 where the CPU has bf16 units), `int8-sdpa` (int8 linears, float32 SDPA attention everywhere), `int8-7bit`
(the int8 path with the 7-bit activation grid of CPUs without VNNI, where `int8` takes 8 bits), `bf16` / `fp16`
(`for_inference`: autocast, plus marlin's bf16 kernels on CPUs with bf16 units; by default only where the device has
native units), `bf16-autocast` (plain bf16 autocast and SDPA, what the bf16 kernels replace), `fp32-plain` (`F.linear`
instead of the fp32 path's prepacked linears). In the same turns it
times a lone matmul of the ViT-B MLP shape ([B*1568, 768] x [768, 3072]) in fp32, as a dynamic int8 quantised Linear
and in bf16 when measured (oneDNN's prepacked weight where torch has it): the machine's reachable rate per
precision. Printed per path and batch: seconds per clip, speed ratio to official, effective GFLOP/s (the analytic FLOPs
of a clip / time) as a fraction of that precision's lone-matmul rate, and the
pooled-feature cosine to our fp32 (max |official - fp32| is checked <= 1e-4).

    python benchmarks/bench_extract.py                                   # ViT-B, batch 1 and 4, reps 3
    python benchmarks/bench_extract.py --variant marlin_vit_small_ytf --batches 1 --reps 2 --paths official fp32 int8
    python benchmarks/bench_extract.py --fidelity [--checkpoint run/export/...]   # int8 / bf16 vs fp32 on face clips
    (cosines, and the change in units of the features' spread between clips: what a probe would notice)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F

PATHS = ("official", "naive", "fp32", "fp32-plain", "int8", "int8-sdpa", "int8-7bit", "bf16", "bf16-autocast", "fp16")
SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "data" / "marlin_samples"


def clip_gflop(cfg) -> float:
    """Analytic GFLOP of one clip through the encoder (multiply-add = 2): patch embedding, linears, attention."""
    n, d, depth = cfg.num_tokens, cfg.encoder_embed_dim, cfg.encoder_depth
    patch = cfg.in_chans * cfg.tubelet_size * cfg.patch_size**2
    hidden = int(d * cfg.mlp_ratio)
    linear = 2 * n * d * (3 * d + d) + 2 * 2 * n * d * hidden
    attention = 2 * 2 * n * n * d
    return (2 * n * patch * d + depth * (linear + attention)) / 1e9


def official_model(variant: str):
    """The official encoder-only model of `variant` (video-reading imports stubbed: they are not used here)."""
    if importlib.util.find_spec("marlin_pytorch") is None:
        raise SystemExit("the official package is missing: pip install --no-deps marlin-pytorch==0.3.4 einops")
    for name in ("torchvision", "ffmpeg"):
        if importlib.util.find_spec(name) is None:
            sys.modules.setdefault(name, types.ModuleType(name))
    import marlin_pytorch
    from marlin_pytorch.config import resolve_config

    c = resolve_config(variant)
    return marlin_pytorch.Marlin(
        img_size=c.img_size, patch_size=c.patch_size, n_frames=c.n_frames, encoder_embed_dim=c.encoder_embed_dim,
        encoder_depth=c.encoder_depth, encoder_num_heads=c.encoder_num_heads, decoder_embed_dim=c.decoder_embed_dim,
        decoder_depth=c.decoder_depth, decoder_num_heads=c.decoder_num_heads, mlp_ratio=c.mlp_ratio,
        qkv_bias=c.qkv_bias, qk_scale=c.qk_scale, drop_rate=c.drop_rate, attn_drop_rate=c.attn_drop_rate,
        norm_layer=c.norm_layer, init_values=c.init_values, tubelet_size=c.tubelet_size, as_feature_extractor=True,
    ).eval()  # fmt: skip


#: Paths that exist on a CPU only (torch's int8 engine, marlin's CPU kernels turned off to measure them).
CPU_ONLY = ("int8", "int8-sdpa", "int8-7bit", "fp32-plain", "bf16-autocast")


def build_paths(variant: str, paths: list[str], device: torch.device) -> dict:
    """name -> callable(x) -> pooled features, every path with the same weights, on `device`."""
    import warnings

    from marlin import Marlin, get_config

    def copy_of(model: Marlin) -> Marlin:
        twin = Marlin(get_config(variant)).eval()
        twin.load_state_dict(model.state_dict())
        return twin.to(device)

    torch.manual_seed(0)
    ours = Marlin(get_config(variant)).eval()
    fns = {}
    if "official" in paths:
        off = official_model(variant)
        ours.load_state_dict(off.state_dict())
        off = off.to(device)
        fns["official"] = lambda x: off.extract_features(x, keep_seq=False)
    ours = ours.to(device)
    for name in paths:
        if name == "naive":
            naive = copy_of(ours).set_fused_attention(False)
            fns["naive"] = lambda x, m=naive: m.extract_features(x, keep_seq=False)
        elif name == "int8":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # its fidelity warning: measured on purpose
                q = ours.for_inference("int8")
            fns["int8"] = lambda x, m=q: m.extract_features(x, keep_seq=False)
        elif name in ("int8-sdpa", "int8-7bit"):
            from marlin.models.quantize import quantize_int8

            q = quantize_int8(ours, bf16_attn=False) if name == "int8-sdpa" else quantize_int8(ours, full_range=False)
            fns[name] = lambda x, m=q: m.extract_features(x, keep_seq=False)
        elif name in ("bf16", "bf16-autocast", "fp16"):
            low = copy_of(ours)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # emulated on this CPU: measured on purpose (--paths)
                low.for_inference(name.removesuffix("-autocast"))
            if name == "bf16-autocast":
                low.set_cpu_kernels("")
            fns[name] = lambda x, m=low: m.extract_features(x, keep_seq=False)
    if "fp32-plain" in paths:
        plain = copy_of(ours)
        plain.for_inference("fp32").set_cpu_kernels("")
        fns["fp32-plain"] = lambda x, m=plain: m.extract_features(x, keep_seq=False)
    if "fp32" in paths:
        fp32 = ours.for_inference("fp32")  # what users get (one clip of a batch at a time on a CPU, packed linears)
        fns["fp32"] = lambda x: fp32.extract_features(x, keep_seq=False)
    return {k: fns[k] for k in paths if k in fns}


def matmul_probes(batch: int, bf16: bool, device: torch.device) -> dict:
    """Lone matmuls of the ViT-B MLP shape: name -> (callable, GFLOP per call). On a GPU: fp32 (true float32: TF32
    is off, as in our fp32 inference), bf16 and fp16 through `F.linear` (cuBLAS)."""
    import warnings

    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    m, k, n = batch * 1568, 768, 3072
    x, w = torch.randn(m, k), torch.randn(n, k) / k**0.5
    gflop = 2 * m * k * n / 1e9
    if device.type == "cuda":
        x, w = x.to(device), w.to(device)
        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
        return {name: (lambda a=x.to(dt), b=w.to(dt): F.linear(a, b), gflop) for name, dt in dtypes.items()}
    lin = torch.nn.Linear(k, n)
    lin.weight.data.copy_(w)
    with warnings.catch_warnings():  # the same quantisation as the int8 path (`marlin.models.quantize`)
        warnings.simplefilter("ignore")
        qlin = quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear: per_channel_dynamic_qconfig})
    from marlin.models.layers import PackedLinear, packed_linear_available

    def best(x: torch.Tensor, w: torch.Tensor):  # oneDNN's prepacked weight where torch has it (our paths' linears)
        packed = PackedLinear()
        if packed_linear_available(x.dtype):
            return lambda: packed(x, w, (None,), x.dtype)
        return lambda: F.linear(x, w)

    probes = {"fp32": (best(x, w), gflop), "int8": (lambda: qlin(x), gflop)}
    if bf16:
        probes["bf16"] = (best(x.bfloat16(), w.bfloat16()), gflop)
    return probes


def timed(fn, *args, device: torch.device = torch.device("cpu")):  # noqa: ANN201
    """(seconds, result) of one call; on a GPU the queued kernels are waited for on both sides."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, out


@torch.inference_mode()
def run_speed(args: argparse.Namespace) -> list[dict]:
    from marlin import get_config
    from marlin.utils.precision import device_capabilities

    device = torch.device(args.device)
    caps = device_capabilities(device)
    on_gpu = device.type == "cuda"
    default = ["official", "fp32", "bf16" if caps.bf16 else "fp16"] if on_gpu else ["official", "fp32", "int8"] + (
        ["bf16"] if caps.bf16 else [])  # fmt: skip
    paths = args.paths or default
    if on_gpu and set(paths) & set(CPU_ONLY):
        raise SystemExit(f"{sorted(set(paths) & set(CPU_ONLY))}: CPU-only paths; on {device} use {default}")
    cfg = get_config(args.variant)
    with torch.inference_mode(False):  # models built as users build them (inference-mode weights stay unpacked)
        fns = build_paths(args.variant, paths, device)
    gflop = clip_gflop(cfg)
    where = f"gpu {caps.name}" if on_gpu else f"cpu {caps.cpu_capability}, vnni {caps.vnni}"
    print(f"torch {torch.__version__}, {where}, bf16 units {caps.bf16}, threads {torch.get_num_threads()}, "
          f"{args.variant} {gflop:.0f} GFLOP/clip, paths {list(fns)}")  # fmt: skip
    inputs = {b: torch.rand(b, 3, cfg.clip_frames, cfg.img_size, cfg.img_size, device=device) for b in args.batches}
    probes = {b: matmul_probes(b, any(p.startswith("bf16") for p in fns), device) for b in args.batches}
    times = {(b, p): [] for b in args.batches for p in [*fns, *(f"mm-{k}" for k in probes[args.batches[0]])]}
    feats = {}
    for rep in range(args.warmup + args.reps):
        for b in args.batches:
            for name, fn in fns.items():
                t, feats[(b, name)] = timed(fn, inputs[b], device=device)
                if rep >= args.warmup:
                    times[(b, name)].append(t)
            for name, (fn, _) in probes[b].items():
                t = min(timed(fn, device=device)[0] for _ in range(3))
                if rep >= args.warmup:
                    times[(b, f"mm-{name}")].append(t)
        print(f"  rep {rep + 1}/{args.warmup + args.reps} done ({time.strftime('%H:%M:%S')})", flush=True)
    return summarise(args, fns, probes, times, feats, gflop)


def summarise(args, fns, probes, times, feats, gflop) -> list[dict]:
    rows = []
    print(f"{'batch':>5}  {'path':<14}{'s/clip':>8}{'x official':>11}{'GFLOP/s':>9}{'% of mm':>9}{'cos fp32':>10}")
    for b in args.batches:
        rate = {k: probes[b][k][1] / statistics.median(times[(b, f"mm-{k}")]) for k in probes[b]}
        print(f"{b:>5}  lone matmul GFLOP/s: " + ", ".join(f"{k} {v:.0f}" for k, v in rate.items()))
        official = statistics.median(times[(b, "official")]) / b if "official" in fns else None
        if "official" in fns and "fp32" in fns:
            diff = (feats[(b, "official")] - feats[(b, "fp32")]).abs().max().item()
            print(f"{b:>5}  max |official - fp32| = {diff:.2e} ({'ok' if diff <= 1e-4 else 'OVER 1e-4'})")
        for name in fns:
            sec = statistics.median(times[(b, name)]) / b
            peak = rate.get(name.split("-")[0] if name.split("-")[0] in rate else "fp32", float("nan"))
            cos = F.cosine_similarity(feats[(b, name)].float(), feats[(b, "fp32")], dim=-1).min().item() \
                if "fp32" in fns else float("nan")  # fmt: skip
            row = {"batch": b, "path": name, "sec_per_clip": sec, "x_official": official / sec if official else None,
                   "gflops": gflop / sec, "frac_of_matmul": gflop / sec / peak, "cos_fp32": cos}  # fmt: skip
            rows.append(row)
            xo = f"{row['x_official']:.2f}" if official else "-"
            print(f"{b:>5}  {name:<14}{sec:>8.2f}{xo:>11}{row['gflops']:>9.0f}{100 * row['frac_of_matmul']:>8.0f}%"
                  f"{cos:>10.5f}")  # fmt: skip
    return rows


def face_clips(n_windows: int) -> torch.Tensor:
    """Up to `n_windows` clips [n, 3, 16, 224, 224] from the official 224x224 face crops (16 frames, every 2nd),
    taken from each video in turn so every person is represented."""
    import itertools

    from marlin.video.io import read_video

    files = sorted(SAMPLES.glob("cropped*.mp4"))
    if not files:
        raise SystemExit(f"{SAMPLES}: no cropped*.mp4 face clips (the shared data folder is missing)")
    per_file = []
    for f in files:
        frames = torch.from_numpy(read_video(f, step=2, size=224))  # [T, 224, 224, 3]
        per_file.append(
            [frames[s : s + 16].permute(3, 0, 1, 2).float().div(255) for s in range(0, len(frames) - 15, 16)]
        )
    turns = [c for group in itertools.zip_longest(*per_file) for c in group if c is not None]
    return torch.stack(turns[:n_windows])


def spread_error(feats: torch.Tensor, ref: torch.Tensor) -> float:
    """RMS of (feats - ref) in units of each feature's standard deviation across the clips of `ref` ([n, ...]): how
    large a precision's change is against the differences between clips that a probe reads. Cosine cannot show
    this: clips of faces differ by a few % of the feature norm, so a cosine of 0.9999 can hide a change as large as
    the differences between clips (measured on GRID clips: int8 0.8, bf16 0.17)."""
    d, r = feats.double().flatten(1), ref.double().flatten(1)
    return float(((d - r) / r.std(0).clamp_min(1e-12)).pow(2).mean().sqrt())


def varying_error(feats: torch.Tensor, ref: torch.Tensor) -> float:
    """`spread_error` of the part of the change that differs between clips (the change minus its mean over the
    clips): a shift shared by every clip is removed by any probe's standardisation, so this is what a probe sees."""
    d = (feats.double() - ref.double()).flatten(1)
    return spread_error(ref.double().flatten(1) + d - d.mean(0), ref)


@torch.inference_mode()
def run_fidelity(args: argparse.Namespace) -> list[dict]:
    """Cosine of pooled features and of tokens, int8 (and `--fidelity-paths`) vs fp32, on real face clips."""
    import warnings

    from marlin import Marlin, get_config
    from marlin.models.model import load

    torch.manual_seed(0)
    model = load(args.checkpoint, full=False) if args.checkpoint else Marlin(get_config(args.variant)).eval()
    x = face_clips(args.clips)
    if x.shape[-1] != model.config.img_size or x.shape[2] != model.config.clip_frames:
        c = model.config
        x = F.interpolate(x, size=(c.clip_frames, c.img_size, c.img_size), mode="trilinear", align_corners=False)
    name = args.checkpoint or f"{args.variant} (random init)"
    print(f"{name}: {len(x)} face clips {tuple(x.shape[1:])}", flush=True)
    ref_pool = torch.cat([model.extract_features(c[None], keep_seq=False) for c in x])
    ref_tok = torch.cat([model.extract_features(c[None], keep_seq=True) for c in x])
    rows = []
    for path in args.fidelity_paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if path == "int8-7bit":
                from marlin.models.quantize import quantize_int8

                m = quantize_int8(model.for_inference("fp32"), full_range=False)
            else:
                m = model.for_inference(path)
        pool = torch.cat([m.extract_features(c[None], keep_seq=False) for c in x])
        tok = torch.cat([m.extract_features(c[None], keep_seq=True) for c in x])
        cp, ct = F.cosine_similarity(pool, ref_pool, dim=-1), F.cosine_similarity(tok, ref_tok, dim=-1)
        row = {"model": name, "path": path, "pooled_min": cp.min().item(), "pooled_mean": cp.mean().item(),
               "tokens_min": ct.min().item(), "tokens_mean": ct.mean().item(), "pooled_spread_err":
               spread_error(pool, ref_pool), "tokens_spread_err": spread_error(tok, ref_tok), "pooled_varying_err":
               varying_error(pool, ref_pool), "tokens_varying_err": varying_error(tok, ref_tok)}  # fmt: skip
        rows.append(row)
        print(f"  {path}: pooled cosine min {row['pooled_min']:.5f} mean {row['pooled_mean']:.5f}; "
              f"tokens min {row['tokens_min']:.5f} mean {row['tokens_mean']:.5f}; error / spread between clips: "
              f"pooled {row['pooled_spread_err']:.3f}, tokens {row['tokens_spread_err']:.3f}; its part that differs "
              f"between clips: pooled {row['pooled_varying_err']:.3f}, tokens {row['tokens_varying_err']:.3f}",
              flush=True)  # fmt: skip
        model.for_inference("fp32")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="marlin_vit_base_ytf")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    p.add_argument("--paths", nargs="+", choices=PATHS, help="default: official fp32 int8 (+ bf16 where native)")
    p.add_argument("--reps", type=int, default=3, help="timed turns (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (GPU: official, naive, fp32, bf16, fp16)")
    p.add_argument("--fidelity", action="store_true", help="measure fidelity on face clips instead of speed")
    fid_paths = ("int8", "int8-7bit", "bf16", "fp16")
    p.add_argument("--fidelity-paths", nargs="+", default=["int8", "bf16"], choices=fid_paths)
    p.add_argument("--checkpoint", help="--fidelity: a trained checkpoint instead of the random-init --variant")
    p.add_argument("--clips", type=int, default=8, help="--fidelity: number of face clips")
    p.add_argument("--json", help="also write all rows to this JSON file")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU here")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_fidelity(args) if args.fidelity else run_speed(args)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
