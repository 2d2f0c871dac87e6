"""Where do the transfer curve's encoders look? Attention maps on GRID test sentences (issue 14's bug hunt).

For each encoder (random init and the curve's checkpoints, or any ``--encoder NAME=PATH``) and block, the attention
each token receives (`marlin.viz.attention.attention_received`, 1 = a uniform share) on the middle window of the 200
protocol test sentences, summarised as:

- **mouth**: how many times its share of tokens the 3 x 3 patches around the mouth draw (the region the mouth
  probe reads; from the face parser's lip pixels, per window);
- **top 10%**: the share of all attention drawn by the 10% most attended tokens (0.10 = uniform);
- **half**: how many tokens draw half of all attention (half the tokens when uniform);
- **reg**: with register tokens, the share of all attention they draw (the three figures above are then among the
  patch tokens only).

and one clip drawn as a picture (one row per encoder and block, one colour scale). Needs `benchmarks/transfer_curve.py`
run up to its features stage (the decoded clips and mouth centres in ``runs/transfer_curve/features/``).

    python benchmarks/attention_maps.py                  # random init and each curve run's checkpoint at --step 1000
    python benchmarks/attention_maps.py --encoder m=runs/transfer_curve/pretrain_marlin/checkpoints/step_500.pt
"""

from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MARLIN_SHARED_DATA", REPO.parent / "shared" / "data"))  # as the other benchmarks


def test_rows(args: argparse.Namespace) -> list[int]:
    """Row numbers (labels.csv order, the clips' order) of the protocol test sentences."""
    with open(args.work / "manifests" / "grid_s1.csv", newline="") as f:
        held = {Path(r["path"]).stem for r in csv.DictReader(f) if r["split"] == "val"}
    with open(args.data / "grid_s1" / "labels.csv", newline="") as f:
        return [k for k, r in enumerate(csv.DictReader(f)) if Path(r["video"]).stem in held]


def load_encoders(args: argparse.Namespace) -> dict[str, torch.nn.Module]:
    from marlin.models.model import from_spec

    out = {}
    for name, path in args.encoder.items():
        model = from_spec(str(path)).eval()
        if not out:  # random init of the same architecture first (seeded, untrained)
            torch.manual_seed(0)
            out["random"] = from_spec(str(path), random_init=True).eval()
        out[name] = model
    return out


def mouth_regions(centres: np.ndarray, grid: tuple[int, int, int]) -> torch.Tensor:
    """[B, T', H', W'] bool: the 3 x 3 patches around each window's mouth centre ([B, 2] fractions of the side)."""
    t_, h_, w_ = grid
    region = torch.zeros(len(centres), t_, h_, w_, dtype=torch.bool)
    rc = np.clip((centres * h_).astype(int) - 1, 0, h_ - 3)
    for i, (r, c) in enumerate(rc):
        region[i, :, r : r + 3, c : c + 3] = True
    return region


def measure(model, clips: torch.Tensor, region: torch.Tensor, layer: int) -> dict[str, float]:  # noqa: ANN001
    from marlin.viz.attention import attention_received, region_share

    maps = attention_received(model, clips, layer=layer)  # [B, T', H', W'], units of 1 / (registers + patches)
    drawn = maps.flatten(1).sum(1, keepdim=True)  # [B, 1]: what the patches draw; R + N without registers
    flat = maps.flatten(1) / drawn  # [B, N], sums to 1
    ranked = flat.sort(dim=1, descending=True).values  # [B, N], most attended first
    top = ranked[:, : max(1, flat.shape[1] // 10)].sum(1)
    half = (ranked.cumsum(1) < 0.5).sum(1) + 1
    share = region_share(flat.view_as(maps) * flat.shape[1], region)  # among the patches
    reg = 1 - drawn[:, 0] / (flat.shape[1] + model.config.num_registers)
    return {"mouth": share.mean().item(), "mouth_sd": share.std().item(), "top10": top.mean().item(),
            "half": half.float().median().item(), "reg": reg.mean().item(), "maps": maps}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--work", type=Path, default=REPO / "runs" / "transfer_curve")
    p.add_argument("--encoder", nargs="+", default=None, metavar="NAME=PATH",
                   help="default: each curve run's checkpoint at --step")  # fmt: skip
    p.add_argument("--step", type=int, default=1000)
    p.add_argument("--picture-layers", nargs="+", type=int, default=[2, 4, 6])
    p.add_argument("--layers", nargs="+", type=int, default=[2, 4, 6])
    p.add_argument("--clips", type=int, default=200, help="test sentences used (the first N)")
    p.add_argument("--picture", type=Path, default=REPO / "docs" / "attention_maps.png")
    args = p.parse_args(argv)
    if args.encoder:
        args.encoder = dict(e.split("=", 1) for e in args.encoder)
    else:
        found = sorted(args.work.glob(f"pretrain_*/checkpoints/step_{args.step}.pt"))
        args.encoder = {f"{c.parents[1].name.removeprefix('pretrain_')}@{args.step}": c for c in found}
    if not args.encoder:
        raise SystemExit("no encoder: pass --encoder NAME=PATH or run benchmarks/transfer_curve.py first")
    feats = args.work / "features"
    rows = test_rows(args)[: args.clips]
    clips_u8 = np.load(feats / "clips.npy", mmap_mode="r")  # [N, W, T, S, S, 3]
    mid = clips_u8.shape[1] // 2
    frames = np.ascontiguousarray(clips_u8[rows, mid])  # [B, T, S, S, 3]
    clips = torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 255.0  # [B, 3, T, S, S]
    centres = np.load(feats / "mouth_centres.npy")[rows, mid]  # [B, 2]
    torch.set_grad_enabled(False)
    picture = {}
    print(f"{len(rows)} GRID test sentences, middle window; mouth = its 3 x 3 patches' draw in units of their share")
    print(f"{'encoder':<24}{'block':>6}{'mouth':>8}{'(sd)':>7}{'top 10%':>9}{'half':>7}{'reg':>7}")
    for name, model in load_encoders(args).items():
        c = model.config
        region = mouth_regions(centres, (c.clip_frames // c.tubelet_size, *(2 * (c.img_size // c.patch_size,))))
        for layer in args.layers:
            r = measure(model, clips, region, layer)
            reg = f"{r['reg']:.3f}" if c.num_registers else "-"
            print(f"{name:<24}{layer:>6}{r['mouth']:>8.2f}{r['mouth_sd']:>7.2f}{r['top10']:>9.3f}{r['half']:>7.0f}"
                  f"{reg:>7}")  # fmt: skip
            drawn = layer == min(args.picture_layers) if name == "random" else layer in args.picture_layers
            if drawn:  # random init: one row (it is uniform)
                picture[f"{name} block {layer}"] = r["maps"][0].numpy()
    from PIL import Image

    from marlin.viz.attention import attention_sheet

    args.picture.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(attention_sheet(frames[0], picture))
    if args.picture.suffix.lower() in (".jpg", ".jpeg"):
        image.save(args.picture, quality=88)
    else:  # 256 colours: a quarter of the size, same look
        image.quantize(256).save(args.picture)
    print(f"picture: {args.picture} (sentence {rows[0]}, one colour scale)")


if __name__ == "__main__":
    main()
