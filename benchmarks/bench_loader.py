"""Can the pretraining data path keep a training step fed? Loader samples/s against a tiny model's train step.

On a store written by ``marlin prepare`` (or a synthetic one), measured in one run on this machine:

1. loader alone: ``DataLoader(PretrainDataset)`` with 0 / 1 / 2 workers, samples/s in steady state (worker start-up
   and the first batch excluded);
2. masks: fasking on each batch's parse maps, ms per batch (pretraining draws them in the DataLoader's collate);
3. train step: ``marlin_vit_tiny`` full model, forward + MSE on the hidden patches + backward + AdamW step, on a fixed
   batch, samples/s;
4. fed: the same train step pulling its batches (and making its masks) from the loader, samples/s, per worker count.
   This is the number that matters: when it matches (3), the loader is not the bottleneck.

    python benchmarks/bench_loader.py --store /tmp/marlin_store/talking_heads
    python benchmarks/bench_loader.py --synthetic 24 --batch-size 4 --batches 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def synthetic_store(root: Path, n_items: int, n_frames: int = 64, size: int = 224) -> Path:
    """A store of smooth moving gradients with block parse maps, written with the real writers."""
    import numpy as np

    from marlin.data.prepare import PrepareSettings, write_manifest
    from marlin.data.store import STORE_VERSION, FrameWriter

    settings = PrepareSettings(size=size, crop_face=False)
    (root / "items").mkdir(parents=True)
    (root / "store.json").write_text(json.dumps({"version": STORE_VERSION, **settings.__dict__}))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rng = np.random.default_rng(0)
    for i in range(n_items):
        d = root / "items" / f"syn{i:03d}"
        d.mkdir()
        video = FrameWriter(d, "video", "jpeg", (size, size, 3))
        parse = FrameWriter(d, "parse", "zlib", (size, size))
        blocks = rng.integers(0, 11, (7, 7)).astype(np.uint8)
        for k in range(n_frames):
            phase = k / n_frames + i
            rgb = np.stack([np.sin(6 * xx + phase), np.cos(5 * yy - phase), np.sin(4 * (xx + yy) + 2 * phase)], -1)
            video.append(((rgb + 1) * 127.5).astype(np.uint8))
            parse.append(np.kron(blocks, np.ones((size // 7, size // 7), np.uint8)))
        meta = {"id": d.name, "group": d.name, "n_frames": n_frames, "frame_step": 1, "source_frames": n_frames,
                "has_parse": True, "streams": {"video": video.close(), "parse": parse.close()}}  # fmt: skip
        (d / "meta.json").write_text(json.dumps(meta))
    write_manifest(root)
    return root


def patchify(video, tubelet: int, patch: int):  # noqa: ANN001, ANN201
    """[B, C, T, H, W] -> [B, N, C * tubelet * patch * patch], tokens (t, h, w), values (c, t, h, w)."""
    b, c, t, h, w = video.shape
    x = video.reshape(b, c, t // tubelet, tubelet, h // patch, patch, w // patch, patch)
    x = x.permute(0, 2, 4, 6, 1, 3, 5, 7)  # [B, t, h, w, C, tubelet, p, p]
    return x.reshape(b, -1, c * tubelet * patch * patch)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--store", type=Path, help="a store from `marlin prepare` (with parse maps)")
    p.add_argument("--synthetic", type=int, default=0, help="no store: build one with this many items in a temp dir")
    p.add_argument("--split", default=None, help="train / val / all items (default)")
    p.add_argument("--model", default="marlin_vit_tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--batches", type=int, default=6, help="timed batches per measurement")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=None, help="torch threads in the main process (default: torch's)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from marlin import Marlin, get_config
    from marlin.data.datasets import PretrainDataset
    from marlin.mae.masking import Masker

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = get_config(args.model)
    tmp = None
    if args.store is None:
        if not args.synthetic:
            p.error("give --store STORE or --synthetic N")
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        args.store = synthetic_store(Path(tmp.name) / "store", args.synthetic, size=cfg.img_size)
    ds = PretrainDataset.from_config(args.store, cfg, split=args.split)
    bs = args.batch_size
    print(f"store {args.store}: {len(ds)} items; batch {bs}; torch threads {torch.get_num_threads()}; model {cfg.name}")
    results: dict[str, float] = {}

    def masks(batch: dict) -> torch.Tensor:
        return Masker.for_config(cfg, "fasking")(batch["parse"].shape[0], parse=batch["parse"])

    def batches(workers: int):  # noqa: ANN202
        # persistent workers: a small store ends an epoch every few batches, and re-forking workers each time would
        # be measured instead of the loading
        loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=workers, drop_last=True,
                            persistent_workers=workers > 0)  # fmt: skip
        while True:
            yield from loader

    # 1 + 2: loader alone, and masks
    # CPU time as well as wall time: on a shared machine wall time mostly measures the neighbours.
    mask_ms, mask_cpu_ms = [], []
    for w in args.workers:
        it = batches(w)
        next(it)  # worker start-up and first batch
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(args.batches):
            batch = next(it)
            t1, c1 = time.perf_counter(), time.process_time()
            masks(batch)
            mask_ms.append((time.perf_counter() - t1) * 1e3)
            mask_cpu_ms.append((time.process_time() - c1) * 1e3)
            t0, c0 = t0 + mask_ms[-1] / 1e3, c0 + mask_cpu_ms[-1] / 1e3  # masks are timed apart
        sps = args.batches * bs / (time.perf_counter() - t0)
        results[f"loader_w{w}_samples_s"] = sps
        extra = ""
        if w == 0:  # in this process: its CPU time is the loader's cost per sample
            results["loader_cpu_ms_per_sample"] = (time.process_time() - c0) * 1e3 / (args.batches * bs)
            extra = f"  (CPU {results['loader_cpu_ms_per_sample']:.1f} ms/sample)"
        print(f"loader, {w} worker(s): {sps:7.1f} samples/s{extra}")
        del it
    results["fasking_ms_per_batch"] = statistics.median(mask_ms)
    results["fasking_cpu_ms_per_batch"] = statistics.median(mask_cpu_ms)
    print(f"generate_visible('fasking') on a batch of {bs}: {results['fasking_ms_per_batch']:.1f} ms "
          f"(CPU {results['fasking_cpu_ms_per_batch']:.1f} ms over {torch.get_num_threads()} threads)")  # fmt: skip

    # 3: train step alone
    model = Marlin(cfg, as_feature_extractor=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1.5e-4, weight_decay=0.05)

    def train_step(video: torch.Tensor, visible: torch.Tensor) -> float:
        pred = model(video, visible)  # [B, N_hidden, patch_dim]
        target = patchify(video, cfg.tubelet_size, cfg.patch_size)[~visible].view(pred.shape)  # hidden patches
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach().item()

    fixed = next(batches(0))
    fixed_visible = masks(fixed)
    train_step(fixed["video"], fixed_visible)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        train_step(fixed["video"], fixed_visible)
    step_s = (time.perf_counter() - t0) / args.batches
    results["train_step_s"] = step_s
    results["train_step_cpu_s"] = (time.process_time() - c0) / args.batches
    results["train_samples_s"] = bs / step_s
    print(f"train step ({cfg.name}, fixed batch): {step_s:.2f} s/step = {bs / step_s:.1f} samples/s "
          f"(CPU {results['train_step_cpu_s']:.2f} s/step)")  # fmt: skip
    if "loader_cpu_ms_per_sample" in results:
        share = results["loader_cpu_ms_per_sample"] * bs / 1e3 / results["train_step_cpu_s"]
        results["loader_cpu_share"] = share
        print(f"loading a batch costs {100 * share:.1f}% of the CPU time of a train step")

    # 4: train step fed by the loader (masks made in the step, as the trainer does)
    for w in args.workers:
        it = batches(w)
        batch = next(it)
        train_step(batch["video"], masks(batch))
        t0 = time.perf_counter()
        for _ in range(args.batches):
            batch = next(it)
            train_step(batch["video"], masks(batch))
        sps = args.batches * bs / (time.perf_counter() - t0)
        results[f"fed_w{w}_samples_s"] = sps
        print(f"train step fed by the loader, {w} worker(s): {sps:.1f} samples/s "
              f"({100 * sps / results['train_samples_s']:.0f}% of the fixed-batch rate)")  # fmt: skip
        del it
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
