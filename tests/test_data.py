"""Tests for marlin.data.store: the frame-stream format, the store reader, and PretrainDataset's clip sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from marlin.data.clips import clip_indices
from marlin.data.datasets import PretrainDataset
from marlin.data.prepare import PrepareSettings, write_manifest
from marlin.data.store import STORE_VERSION, ClipStore, FrameWriter, StoreError, read_stream

SIZE = 32


def frame_of(i: int, size: int = SIZE) -> np.ndarray:
    """A flat-colour frame whose red channel is 6 * (i % 42): survives JPEG to within a level or two."""
    f = np.empty((size, size, 3), np.uint8)
    f[..., 0], f[..., 1], f[..., 2] = 6 * (i % 42), 100, 200
    return f


def index_of(video: torch.Tensor) -> list[int]:
    """Frame indices back from a [3, T, H, W] float clip made of `frame_of` frames."""
    return [round(float(v) * 255 / 6) for v in video[0, :, SIZE // 2, SIZE // 2]]


def make_store(root, n_frames: dict[str, int], *, parse: bool = True, frame_step: int = 1, codec: str = "jpeg",
               splits: dict[str, str] | None = None):  # fmt: skip
    """A store written with the real writers: item `k` of video `name` is `frame_of(k)`, its parse map is k % 11."""
    settings = PrepareSettings(size=SIZE, crop_face=False, parse=parse, frame_step=frame_step, video_codec=codec,
                               parse_codec="zlib" if codec == "jpeg" else "raw")  # fmt: skip
    (root / "items").mkdir(parents=True)
    (root / "store.json").write_text(json.dumps({"version": STORE_VERSION, **settings.__dict__}))
    for name, n in n_frames.items():
        d = root / "items" / name
        d.mkdir()
        video = FrameWriter(d, "video", settings.video_codec, (SIZE, SIZE, 3))
        labels = FrameWriter(d, "parse", settings.parse_codec, (SIZE, SIZE)) if parse else None
        for k in range(n):
            video.append(frame_of(k))
            if labels is not None:
                labels.append(np.full((SIZE, SIZE), k % 11, np.uint8))
        streams = {"video": video.close(), **({"parse": labels.close()} if labels else {})}
        meta = {"id": name, "group": name, "split": (splits or {}).get(name), "n_frames": n, "frame_step": frame_step,
                "source_frames": n * frame_step, "has_parse": parse, "streams": streams}  # fmt: skip
        (d / "meta.json").write_text(json.dumps(meta))
    write_manifest(root)
    return root


# ---- frame streams ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["jpeg", "raw"])
def test_video_stream_round_trip_any_order_and_repeats(tmp_path, codec):
    frames = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    frames[:] = np.round(frames / 64).astype(np.uint8) * 63  # coarse levels: JPEG keeps them within a few units
    w = FrameWriter(tmp_path, "video", codec, (16, 16, 3))
    for f in frames:
        w.append(f)
    desc = w.close()
    assert desc["shape"] == [5, 16, 16, 3] and desc["codec"] == codec
    got = read_stream(tmp_path, desc, [4, 0, 4, 2])
    assert got.shape == (4, 16, 16, 3) and got.dtype == np.uint8
    err = np.abs(got.astype(int) - frames[[4, 0, 4, 2]].astype(int)).mean()
    assert err == 0 if codec == "raw" else err < 8


@pytest.mark.parametrize("codec", ["zlib", "raw"])
def test_parse_stream_is_lossless(tmp_path, codec):
    maps = np.random.default_rng(1).integers(0, 11, (6, 8, 8), dtype=np.uint8)
    w = FrameWriter(tmp_path, "parse", codec, (8, 8))
    for m in maps:
        w.append(m)
    desc = w.close()
    np.testing.assert_array_equal(read_stream(tmp_path, desc, [5, 1, 1]), maps[[5, 1, 1]])


def test_stream_errors(tmp_path):
    with pytest.raises(ValueError, match="codec"):
        FrameWriter(tmp_path, "parse", "jpeg", (8, 8))
    w = FrameWriter(tmp_path, "parse", "zlib", (8, 8))
    with pytest.raises(ValueError, match=r"must be uint8 \(8, 8\)"):
        w.append(np.zeros((8, 9), np.uint8))
    w.append(np.zeros((8, 8), np.uint8))
    desc = w.close()
    with pytest.raises(IndexError, match=r"in \[0, 1\)"):
        read_stream(tmp_path, desc, [1])
    (tmp_path / "parse.bin").write_bytes(b"garbage!")
    with pytest.raises(StoreError, match="does not decode as zlib"):
        read_stream(tmp_path, desc, [0])


# ---- store -----------------------------------------------------------------------------------------------------------
def test_clip_store_lists_items_and_reads_frames(tmp_path):
    store = ClipStore(make_store(tmp_path, {"a": 10, "b": 4}, splits={"b": "val"}))
    assert [(it.id, it.split, it.n_frames, it.has_parse) for it in store.items] == [
        ("a", "train", 10, True),
        ("b", "val", 4, True),
    ]
    assert store.size == SIZE and store.has_parse
    assert [it.id for it in store.split("val")] == ["b"]
    video = store.read_video("a", [3, 7])
    assert video.shape == (2, SIZE, SIZE, 3)
    assert abs(int(video[1, 0, 0, 0]) - 42) <= 2
    np.testing.assert_array_equal(store.read_parse("a", [3, 7])[:, 0, 0], [3, 7])


def test_clip_store_errors_name_the_file(tmp_path):
    with pytest.raises(StoreError, match="store.json: not found"):
        ClipStore(tmp_path)
    root = make_store(tmp_path / "s", {"a": 3}, parse=False)
    with pytest.raises(StoreError, match="no parse maps"):
        ClipStore(root).read_parse("a", [0])
    (root / "manifest.csv").unlink()
    with pytest.raises(StoreError, match="manifest.csv: not found"):
        ClipStore(root)
    (root / "store.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(StoreError, match="version 99, expected 1"):
        ClipStore(root)


# ---- sampling --------------------------------------------------------------------------------------------------------
def test_clip_indices_stride_and_padding():
    np.testing.assert_array_equal(clip_indices(100, 4, 2, 10), [10, 12, 14, 16])
    np.testing.assert_array_equal(clip_indices(5, 6, 2, 0), [0, 2, 4, 4, 4, 4])  # short: repeat the last frame
    with pytest.raises(ValueError, match="start >= 0"):
        clip_indices(5, 4, 2, -1)


def test_item_contract(tmp_path):
    ds = PretrainDataset(make_store(tmp_path, {"a": 40}), clip_frames=16, sample_rate=2, seed=0)
    item = ds[0]
    assert set(item) == {"video", "parse", "index"} and item["index"] == 0 and ds.has_parse
    v, p = item["video"], item["parse"]
    assert v.shape == (3, 16, SIZE, SIZE) and v.dtype == torch.float32 and v.is_contiguous()
    assert 0.0 <= float(v.min()) and float(v.max()) <= 1.0
    assert p.shape == (16, SIZE, SIZE) and p.dtype == torch.uint8
    # video and parse come from the same frames, 2 apart
    frames = index_of(v)
    assert np.all(np.diff(frames) == 2) and 0 <= frames[0] <= 40 - 31
    assert p[:, 0, 0].tolist() == [f % 11 for f in frames]


def test_no_parse_store_gives_video_only(tmp_path):
    ds = PretrainDataset(make_store(tmp_path, {"a": 20}, parse=False), clip_frames=4)
    assert set(ds[0]) == {"video", "index"} and not ds.has_parse
    with pytest.raises(StoreError, match="no parse maps"):
        PretrainDataset(ds.store, parse=True)
    assert "parse" not in PretrainDataset(make_store(tmp_path / "p", {"a": 20}), clip_frames=4, parse=False)[0]


def test_eval_mode_is_centred_and_fixed(tmp_path):
    ds = PretrainDataset(make_store(tmp_path, {"a": 41}), clip_frames=4, sample_rate=2, mode="eval")
    # span 7 stored frames, 35 possible starts -> centre start 17
    assert index_of(ds[0]["video"]) == [17, 19, 21, 23] == index_of(ds[0]["video"])


def test_seeded_starts_depend_on_seed_epoch_index_only(tmp_path):
    root = make_store(tmp_path, {"a": 200, "b": 200})
    ds = PretrainDataset(root, clip_frames=4, seed=3)
    starts = [ds.frame_indices(0)[0] for _ in range(3)]
    assert len(set(starts)) == 1  # same (seed, epoch, index): same clip
    again = PretrainDataset(root, clip_frames=4, seed=3)
    np.testing.assert_array_equal(again.frame_indices(1), ds.frame_indices(1))
    per_epoch = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        idx = ds.frame_indices(0)
        assert 0 <= idx[0] and idx[-1] < 200 and np.all(np.diff(idx) == 2)
        per_epoch.add(int(idx[0]))
    assert len(per_epoch) > 4  # 194 possible starts: epochs differ


def test_epoch_qualified_keys_name_the_epoch(tmp_path):
    """Key `e * len + i` is item i as set_epoch(e) would give it, without touching the dataset's state."""
    ds = PretrainDataset(make_store(tmp_path, {"a": 300, "b": 300}), clip_frames=4, seed=5)
    streamed = [ds.frame_indices(e * 2 + 1) for e in range(4)]
    for e in range(4):
        ds.set_epoch(e)
        np.testing.assert_array_equal(ds.frame_indices(1), streamed[e])
    assert ds[7]["index"] == 1 and ds[-1]["index"] == 1
    with pytest.raises(IndexError):
        ds[-3]


def test_unseeded_starts_follow_torch_rng(tmp_path):
    ds = PretrainDataset(make_store(tmp_path, {"a": 500}), clip_frames=4)
    torch.manual_seed(7)
    first = [int(ds.frame_indices(0)[0]) for _ in range(5)]
    torch.manual_seed(7)
    assert [int(ds.frame_indices(0)[0]) for _ in range(5)] == first
    assert len(set(first)) > 1


def test_short_video_is_padded_with_its_last_frame(tmp_path):
    ds = PretrainDataset(make_store(tmp_path, {"a": 5}), clip_frames=6, sample_rate=2, seed=0)
    assert index_of(ds[0]["video"]) == [0, 2, 4, 4, 4, 4]
    assert ds[0]["parse"][:, 0, 0].tolist() == [0, 2, 4, 4, 4, 4]


def test_stride_counts_source_frames(tmp_path):
    root = make_store(tmp_path, {"a": 30}, frame_step=2)  # stored frame k = source frame 2k
    ds = PretrainDataset(root, clip_frames=4, sample_rate=2, mode="eval")
    assert np.all(np.diff(ds.frame_indices(0)) == 1)
    assert np.all(np.diff(PretrainDataset(root, clip_frames=4, sample_rate=4).frame_indices(0)) == 2)
    with pytest.raises(StoreError, match="every 2-th frame, cannot sample every 3-th frame"):
        PretrainDataset(root, clip_frames=4, sample_rate=3)


def test_splits_and_size_checks(tmp_path):
    root = make_store(tmp_path, {"a": 10, "b": 10, "c": 10}, splits={"c": "val"})
    assert len(PretrainDataset(root, "train", clip_frames=4)) == 2
    assert len(PretrainDataset(root, "val", clip_frames=4)) == 1
    assert len(PretrainDataset(root, None, clip_frames=4)) == 3
    with pytest.raises(StoreError, match="crops are 32 px, smaller than img_size=224"):
        PretrainDataset(root, img_size=224)
    with pytest.raises(ValueError, match="mode must be"):
        PretrainDataset(root, mode="test")


def test_from_config_uses_clip_frames_and_img_size(tmp_path, tiny_config):
    ds = PretrainDataset.from_config(make_store(tmp_path, {"a": 10}), tiny_config.replace(img_size=SIZE), seed=0)
    assert ds[0]["video"].shape == (3, tiny_config.clip_frames, SIZE, SIZE)


def test_larger_store_is_downscaled_on_read(tmp_path):
    root = make_store(tmp_path, {"a": 10})
    full = PretrainDataset(root, clip_frames=4, mode="eval")[0]
    half = PretrainDataset(root, clip_frames=4, mode="eval", img_size=SIZE // 2)[0]
    assert half["video"].shape == (3, 4, SIZE // 2, SIZE // 2)
    # area downscaling = mean of each 2x2 block; parse maps keep class ids (nearest)
    expect = full["video"].reshape(3, 4, SIZE // 2, 2, SIZE // 2, 2).mean(dim=(3, 5))
    torch.testing.assert_close(half["video"], expect)
    assert half["parse"].dtype == torch.uint8 and half["parse"].shape == (4, SIZE // 2, SIZE // 2)
    assert set(half["parse"].unique().tolist()) <= set(full["parse"].unique().tolist())


def test_dataloader_workers_collate_batches(tmp_path):
    ds = PretrainDataset(make_store(tmp_path, {f"v{i}": 12 for i in range(6)}), clip_frames=4, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["video"].shape == (3, 3, 4, SIZE, SIZE) and batches[0]["parse"].shape == (3, 4, SIZE, SIZE)
    assert batches[1]["index"].tolist() == [3, 4, 5]
    # seeded starts do not depend on which worker reads the item
    inline = [ds[i]["video"] for i in range(6)]
    torch.testing.assert_close(torch.cat([b["video"] for b in batches]), torch.stack(inline))


def test_pretrain_reads_a_prepared_store(tmp_path):
    """`marlin pretrain --data STORE` trains on the store's train split, with its parse maps for fasking."""
    from marlin.cli import main
    from marlin.train.config import PretrainConfig
    from marlin.train.inputs import build_dataset

    store = make_store(tmp_path / "store", {"a": 12, "b": 20}, parse=True)
    cfg = PretrainConfig()
    cfg.model = cfg.model.replace(
        img_size=SIZE,
        clip_frames=4,
        encoder_embed_dim=32,
        encoder_depth=1,
        encoder_num_heads=2,
        decoder_embed_dim=16,
        decoder_depth=1,
        decoder_num_heads=1,
    )
    ds = build_dataset(cfg, str(store))
    assert isinstance(ds, PretrainDataset) and len(ds) == 2
    item = ds[0]
    assert item["video"].shape == (3, 4, SIZE, SIZE) and item["parse"].shape == (4, SIZE, SIZE)
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", "marlin_vit_tiny_test", "--data", str(store), "--out", str(out),
               "--max-steps", "2", "--batch-size", "2", "--workers", "0",
               "mask.strategy=fasking", "mask.ratio=0.5"])  # fmt: skip
    assert rc == 0 and (out / "checkpoints" / "last.pt").is_file()


def test_pretraining_reads_several_stores_as_one(tmp_path):
    from marlin.data.datasets import StoreUnion
    from marlin.train.config import load_config
    from marlin.train.inputs import build_dataset

    a = make_store(tmp_path / "a", {"x": 10, "y": 10})
    b = make_store(tmp_path / "b", {"z": 12})
    cfg = load_config("marlin_vit_tiny_test", [f"model.img_size={SIZE // 2}", "model.patch_size=4", "mask.ratio=0.5",
                                              "data.temporal_sample_rate=1"])  # fmt: skip
    ds = build_dataset(cfg, f"{a},{b}")
    assert isinstance(ds, StoreUnion) and len(ds) == 3 and ds.has_parse
    item = ds[2]  # the first item of the second store
    assert item["index"] == 2 and item["video"].shape == (3, cfg.model.clip_frames, SIZE // 2, SIZE // 2)
    assert item["parse"].shape == (cfg.model.clip_frames, SIZE // 2, SIZE // 2)
    assert not build_dataset(cfg, f"{a},{make_store(tmp_path / 'c', {'w': 10}, parse=False)}").has_parse
    with pytest.raises(ValueError, match="mix of `marlin prepare` stores and video files"):
        build_dataset(cfg, f"{a},{tmp_path / 'v.mp4'}")


def test_the_training_stream_draws_a_new_clip_of_each_video_every_epoch(tmp_path):
    """With the run's fixed seed, every epoch used to read the same window of each video (item i, epoch 0, always:
    of a 75-frame GRID clip only one 31-frame window was ever seen). The stream's position now names the epoch."""
    from marlin.data.datasets import StoreUnion
    from marlin.data.sampling import KeyedItems, StreamBatchSampler

    store = make_store(tmp_path / "s", {f"v{i}": 60 for i in range(4)}, parse=False)
    for dataset in (PretrainDataset(store, clip_frames=4, seed=3), StoreUnion([PretrainDataset(store, clip_frames=4,
                                                                                               seed=3)])):  # fmt: skip
        keyed = KeyedItems(dataset)
        sampler = StreamBatchSampler(len(dataset), 4, seed=0, total_steps=6, keys=True)
        starts: dict[int, set[int]] = {}
        for keys in sampler:  # 6 epochs of 4 videos, one step each
            for index, step, position in keys:
                first = int(keyed[(index, step, position)]["video"][0, 0, 0, 0] * 255 + 0.5) // 6  # frame_of(k)
                starts.setdefault(index, set()).add(first)
                assert keyed[(index, step, position)]["key"] == (step, position)
        assert all(len(s) > 1 for s in starts.values()), starts  # several windows of every video
        again = [keyed[k]["video"] for k in next(iter(StreamBatchSampler(len(dataset), 4, seed=0, total_steps=1,
                                                                          keys=True)))]  # fmt: skip
        first_batch = next(iter(sampler))
        for v, k in zip(again, first_batch, strict=True):
            assert torch.equal(v, keyed[k]["video"])  # a pure function of (seed, epoch, index)
