"""Training data: the world-size-independent stream sampler, synthetic clips, video windows, collate, build_dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from marlin import MarlinConfig
from marlin.data.collate import collate_clips
from marlin.data.datasets import VideoFolderClips
from marlin.data.sampling import StreamBatchSampler, global_positions
from marlin.data.synthetic import SyntheticClips
from marlin.train.config import load_config
from marlin.train.inputs import build_dataset


def _write_video(path: Path, n_frames: int, width: int = 48, height: int = 40) -> None:
    """Frame i is a flat grey of 8 * i + 20 with a white left half-column strip, so frames and crops are checkable."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": "0", "preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        for i in range(n_frames):
            img = np.full((height, width, 3), 8 * i + 20, np.uint8)
            img[:, :4] = 255  # outside the centre square when width > height
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_stream_sampler_covers_every_sample_once_per_epoch_independently_of_world_size() -> None:
    n = 10
    per_step = {}
    for world, batch, accum in ((1, 4, 1), (2, 2, 1), (2, 1, 2), (4, 1, 1)):
        samplers = [StreamBatchSampler(n, batch, accum, rank, world, seed=3, total_steps=5) for rank in range(world)]
        steps: list[list[int]] = [[] for _ in range(5)]
        for s in samplers:
            micro = list(s)
            assert len(micro) == 5 * accum == len(s)
            for k, idx in enumerate(micro):
                steps[k // accum].extend(idx)
        per_step[(world, batch, accum)] = [sorted(x) for x in steps]
        flat = [i for step in steps for i in step]  # 20 positions = 2 epochs
        assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    first = per_step[(1, 4, 1)]
    assert all(v == first for v in per_step.values())  # the same samples per step whatever the split
    # Positions: rank 1, micro 1 of batch 2 x accum 2 x world 2 at step 3 -> 3*8 + 1*4 + 1*2 + [0, 1].
    assert global_positions(3, 1, 2, 2, 1, 2).tolist() == [30, 31]
    resumed = StreamBatchSampler(n, 2, 1, 1, 2, seed=3, start_step=3, total_steps=5)
    assert list(resumed) == list(StreamBatchSampler(n, 2, 1, 1, 2, seed=3, total_steps=5))[3:]


def test_synthetic_clips_are_deterministic_face_like_and_parsed() -> None:
    cfg = MarlinConfig(name="synthetic_test", img_size=96, clip_frames=4)
    ds = SyntheticClips(3, cfg, seed=1)
    a, b = ds[2], SyntheticClips(3, cfg, seed=1)[2]
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["parse"], b["parse"])
    assert a["video"].shape == (3, 4, 96, 96) and a["video"].dtype == torch.float32
    assert 0 <= a["video"].min() and a["video"].max() <= 1
    assert a["parse"].shape == (4, 96, 96) and set(a["parse"].unique().tolist()) == set(range(11))
    assert not torch.equal(ds[0]["video"], ds[1]["video"])
    with pytest.raises(IndexError):
        ds[3]


def test_video_folder_windows_crop_and_resize(tmp_path) -> None:
    _write_video(tmp_path / "long.mp4", 40)
    _write_video(tmp_path / "short.mp4", 5)
    (tmp_path / "notes.txt").write_text("not a video")
    ds = VideoFolderClips(sorted(tmp_path.glob("*.mp4")), clip_frames=4, sample_rate=3, img_size=16, window_stride=8)
    # long: span 10 -> starts 0, 8, 16, 24 (<= 30); short: one window
    assert ds.windows == [(tmp_path / "long.mp4", s) for s in (0, 8, 16, 24)] + [(tmp_path / "short.mp4", 0)]
    item = ds[1]
    video = item["video"]
    assert video.shape == (3, 4, 16, 16) and item["index"] == 1
    means = video.mean(dim=(0, 2, 3)) * 255  # frames 8, 11, 14, 17
    np.testing.assert_allclose(means.numpy(), [8 * f + 20 for f in (8, 11, 14, 17)], atol=3)
    assert video.max() < 0.9  # the white strip lies outside the centre square crop
    short = ds[4]["video"].mean(dim=(0, 2, 3)) * 255  # frames 0, 3, then the last frame (4) repeated
    np.testing.assert_allclose(short.numpy(), [20, 44, 52, 52], atol=3)
    batch = collate_clips([ds[0], ds[4]])
    assert batch["video"].shape == (2, 3, 4, 16, 16) and batch["parse"] is None
    assert batch["index"].tolist() == [0, 4]


def test_build_dataset_sources(tmp_path) -> None:
    _write_video(tmp_path / "a.mp4", 40)
    (tmp_path / "sub").mkdir()
    _write_video(tmp_path / "sub" / "b.mp4", 40)
    cfg = load_config("marlin_vit_tiny_test", ["mask.ratio=0.5", "data.synthetic_size=5", "data.window_stride=40"])
    assert isinstance(build_dataset(cfg), SyntheticClips) and len(build_dataset(cfg)) == 5
    folder = build_dataset(cfg, str(tmp_path))
    assert isinstance(folder, VideoFolderClips) and not folder.has_parse and len(folder) == 2
    assert len(build_dataset(cfg, f"{tmp_path}/a.mp4,{tmp_path}/sub/*.mp4")) == 2
    with pytest.raises(FileNotFoundError, match="nowhere: no such file or directory"):
        build_dataset(cfg, "nowhere")
    with pytest.raises(ValueError, match="no video files found"):
        build_dataset(cfg, str(tmp_path / "*.avi"))
    batch = collate_clips([SyntheticClips(2, cfg.model)[i] for i in range(2)])
    assert batch["parse"].shape == (2, 4, 32, 32) and batch["parse"].dtype == torch.uint8


def test_face_strategy_on_a_dataset_without_parse_is_refused(tmp_path) -> None:
    from marlin.train import Pretrainer

    _write_video(tmp_path / "a.mp4", 12, width=32, height=32)
    cfg = load_config("marlin_vit_tiny_test", ["mask.ratio=0.5", "mask.strategy=fasking", f"data.source={tmp_path}",
                                               f"out_dir={tmp_path / 'run'}", "data.num_workers=0"])  # fmt: skip
    with pytest.raises(ValueError, match="needs face parse maps.*use mask.strategy=tube"):
        Pretrainer(cfg).fit()


def test_weighted_stream_is_deterministic_balanced_and_independent_of_world_size() -> None:
    n = 10
    weights = torch.tensor([0.5 / 9] * 9 + [0.5], dtype=torch.float64)  # item 9 alone is half of every draw
    per_step = {}
    for world, batch in ((1, 4), (2, 2), (4, 1)):
        samplers = [StreamBatchSampler(n, batch, 1, r, world, seed=3, total_steps=250, weights=weights)
                    for r in range(world)]  # fmt: skip
        steps: list[list[int]] = [[] for _ in range(250)]
        for s in samplers:
            for k, idx in enumerate(s):
                steps[k].extend(idx)
        per_step[world] = [sorted(x) for x in steps]
    assert per_step[1] == per_step[2] == per_step[4]  # the same draws per step whatever the split
    flat = np.array([i for step in per_step[1] for i in step])  # 1000 draws
    assert 0.45 < (flat == 9).mean() < 0.55 and set(flat.tolist()) == set(range(10))
    again = StreamBatchSampler(n, 4, seed=3, total_steps=250, weights=weights)
    assert [sorted(b) for b in again] == per_step[1]
    with pytest.raises(ValueError, match="non-negative sampling weights"):
        StreamBatchSampler(n, 4, weights=torch.ones(3))


def test_balance_weights_by_store_and_by_group(tmp_path) -> None:
    from marlin.data.datasets import balance_weights
    from test_data import make_store

    big = make_store(tmp_path / "big", {f"b{i}": 20 for i in range(6)})  # six groups (one per item)
    small = make_store(tmp_path / "small", {"s0": 20, "s1": 20})
    cfg = load_config("marlin_vit_tiny_test", [f"data.source={big},{small}", "data.balance=store", "mask.ratio=0.5"])
    ds = build_dataset(cfg)
    assert balance_weights(ds, "none") is None
    by_store = balance_weights(ds, "store")
    assert torch.allclose(by_store[:6].sum(), torch.tensor(0.5, dtype=torch.float64)) and by_store[6] == 0.25
    by_group = balance_weights(ds, "group")
    assert torch.allclose(by_group, torch.full((8,), 1 / 8, dtype=torch.float64))  # eight groups of one item
    with pytest.raises(ValueError, match="data.balance must be one of"):
        load_config("marlin_vit_tiny_test", ["data.balance=identity", "mask.ratio=0.5"])
    with pytest.raises(ValueError, match="needs `marlin prepare` stores"):
        balance_weights(SyntheticClips(4, cfg.model), "group")
