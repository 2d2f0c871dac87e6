"""Tests for marlin.mae.masking: face-guided and baseline visibility masks (True = visible)."""

from __future__ import annotations

import itertools

import pytest
import torch

from marlin.mae import masking
from marlin.mae.masking import (
    REGION_LABELS,
    STRATEGIES,
    face_guided_visible,
    frame_visible,
    generate_visible,
    normalize_visible,
    num_visible,
    patch_has_label,
    token_grid,
    tube_visible,
    visible_indices,
)

COMPONENTS = (2, 3, 4, 5, 6, 7, 8, 9, 10)  # every label that is neither background nor skin


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def upsample(grid: torch.Tensor, patch: int) -> torch.Tensor:
    """Patch-level labels [..., h, w] -> pixel-level [..., h*patch, w*patch] (every pixel of a patch alike)."""
    return grid.repeat_interleave(patch, dim=-2).repeat_interleave(patch, dim=-1)


def grid_parse(grid: torch.Tensor, frames: int = 2, patch: int = 16) -> torch.Tensor:
    """One patch-level label grid [h, w] -> a parse clip [1, frames, H, W] uint8 with the same map in every frame."""
    return upsample(grid.to(torch.uint8), patch)[None, None].expand(1, frames, -1, -1).contiguous()


def blob_parse(batch: int, frames: int, size: int, seed: int, part: int = 4) -> torch.Tensor:
    """Random face-like maps: background, a skin box, and boxes (side <= size // part) of the other labels."""
    g = gen(seed)
    parse = torch.zeros(batch, frames, size, size, dtype=torch.uint8)

    def box(lo: int, hi: int) -> tuple[int, int]:
        a, b = torch.randint(lo, hi, (2,), generator=g).tolist()
        return min(a, b), max(a, b) + 1

    for b in range(batch):
        for f in range(frames):
            y0, y1 = box(0, size)
            x0, x1 = box(0, size)
            parse[b, f, y0:y1, x0:x1] = 1
            for label in COMPONENTS:
                if torch.rand((), generator=g) < 0.8:
                    y0, y1 = box(0, size)
                    x0, x1 = box(0, size)
                    parse[b, f, y0 : min(y1, y0 + size // part), x0 : min(x1, x0 + size // part)] = label
    return parse


def cell_parse(batch: int, frames: int, size: int, cell: int, seed: int) -> torch.Tensor:
    """Maps of random labels on cells of `cell` px (misaligned with patches), mostly facial components."""
    weights = torch.tensor([0.05, 0.1] + [0.85 / 9] * 9)  # background, skin, the nine component labels
    n = -(-size // cell)
    labels = torch.multinomial(weights, batch * frames * n * n, replacement=True, generator=gen(seed))
    cells = labels.reshape(batch, frames, n, n).to(torch.uint8)
    return upsample(cells, cell)[..., :size, :size].contiguous()


def reference_walk(frame: torch.Tensor, label_order: list[int], patch: int, need: int) -> torch.Tensor:
    """Official semantics, written as a plain loop: reveal label by label, stop once `need` patches are visible."""
    h, w = frame.shape[0] // patch, frame.shape[1] // patch
    if not any(bool((frame == label).any()) for label in range(1, 10)):
        return torch.ones(h, w, dtype=torch.bool)
    vis = torch.zeros(h, w, dtype=torch.bool)
    for label in label_order:
        vis |= (frame == label).reshape(h, patch, w, patch).any(dim=3).any(dim=1)
        if int(vis.sum()) >= need:
            break
    return vis


def label_orders(order: str) -> list[list[int]]:
    """All 120 label walks a clip may take under `order` (component regions permuted)."""
    regions = list(REGION_LABELS.values())
    components, skin, background = regions[:5], regions[5], regions[6]
    walks = []
    for perm in itertools.permutations(components):
        seq = [background, skin, *perm] if order == "fasking" else [*perm, skin, background]
        walks.append([label for group in seq for label in group])
    return walks


# --------------------------------------------------------------------------------------------------------- counts


def test_num_visible_and_grid_defaults() -> None:
    assert token_grid() == (8, 14, 14)
    assert num_visible(1568, 0.9) == 156
    assert masking._num_visible_ceil(196, 0.9) == 20  # tube: visible patches per tubelet
    assert masking._num_visible_ceil(8, 0.9) == 1  # frame: visible tubelets
    assert num_visible(10, 0.9) == 1  # float noise: 10 * (1 - 0.9) == 0.9999999999999998
    assert masking._num_visible_ceil(10, 0.7) == 3  # float noise: 10 * (1 - 0.7) == 3.0000000000000004
    assert num_visible(1568, 0.0) == 1568


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_num_visible_rejects_bad_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match="mask_ratio"):
        num_visible(1568, ratio)


def test_num_visible_rejects_empty_budget() -> None:
    with pytest.raises(ValueError, match="no visible token"):
        num_visible(5, 0.9)


# ------------------------------------------------------------------------------------------------ patch_has_label


def test_patch_has_label_single_pixel_marks_only_its_patch() -> None:
    parse = torch.zeros(2, 32, 48, dtype=torch.uint8)  # [2, H, W] -> grid 2 x 3 with patch 16
    parse[1, 17, 40] = 6  # row 1, col 2
    parse[0, 0, 0] = 4
    got = patch_has_label(parse, [6], patch=16)
    assert got.shape == (2, 2, 3) and got.dtype == torch.bool
    expected = torch.zeros(2, 2, 3, dtype=torch.bool)
    expected[1, 1, 2] = True
    assert torch.equal(got, expected)
    both = patch_has_label(parse, [4, 6], patch=16)
    assert both.sum() == 2 and both[0, 0, 0] and both[1, 1, 2]
    assert patch_has_label(parse, [0], patch=16).all()  # every patch still has background pixels


@pytest.mark.parametrize("patch", [3, 6, 7, 8])  # odd and non-power-of-two sides exercise the OR fold's remainder
def test_label_bits_agree_with_patch_has_label(patch: int) -> None:
    parse = cell_parse(2, 3, 42 if patch != 8 else 48, cell=5, seed=patch)
    bits = masking._patch_label_bits(parse, patch, chunk=4)  # [2, 3, h, w]; 6 maps -> chunks of 4 and 2
    for label in range(11):
        assert torch.equal((bits & (1 << label)) != 0, patch_has_label(parse, [label], patch)), label


def test_patch_has_label_rejects_indivisible_size() -> None:
    with pytest.raises(ValueError, match="divisible by patch"):
        patch_has_label(torch.zeros(30, 32, dtype=torch.uint8), [1], 16)


# ------------------------------------------------------------------------------------------------ face walk, pinned


def test_fasking_background_alone_fills_budget() -> None:
    grid = torch.ones(14, 14, dtype=torch.long)  # skin everywhere ...
    grid[:, :8] = 0  # ... background on 112 patches, far above the 20 needed at mask_ratio 0.9
    grid[2, 9], grid[2, 12], grid[6, 10], grid[10, 10], grid[0, 13] = 4, 5, 6, 8, 10
    raw = face_guided_visible(grid_parse(grid), order="fasking", mask_ratio=0.9, generator=gen(0))
    assert raw.shape == (1, 1, 14, 14)
    assert torch.equal(raw[0, 0], grid == 0)  # only background: skin and every component hidden


def test_fasking_hides_components_before_any_skin() -> None:
    grid = torch.ones(14, 14, dtype=torch.long)
    grid[0, :10] = 0  # 10 background patches < 20 needed: skin must be revealed next, whole
    grid[3, 3], grid[3, 9], grid[4, 3], grid[4, 9] = 2, 3, 4, 5
    grid[7, 6], grid[10, 5:9], grid[11, 6] = 6, 7, 9
    grid[12:, :] = 10
    for seed in range(5):
        raw = face_guided_visible(grid_parse(grid), order="fasking", mask_ratio=0.9, generator=gen(seed))[0, 0]
        assert torch.equal(raw, (grid == 0) | (grid == 1)), seed
        # After normalising, components stay hidden: every visible token is background or skin.
        full = generate_visible("fasking", 1, parse=grid_parse(grid, frames=16), generator=gen(seed))
        labels = grid.flatten().repeat(8)  # [1568] label of each token's patch
        assert set(labels[full[0]].tolist()) <= {0, 1}


def test_fasking_opp_reveals_components_first() -> None:
    grid = torch.ones(14, 14, dtype=torch.long)
    grid[:4] = 0
    grid[5, 2:6], grid[5, 8:12] = 4, 5  # eyes: 8 patches
    grid[7, 6:8], grid[10, 4:10] = 6, 8  # nose + inner mouth: 8 patches
    grid[13, 3:11] = 10  # hair: 8 patches; components total 24 >= 20 needed
    for seed in range(5):
        raw = face_guided_visible(grid_parse(grid), order="fasking_opp", mask_ratio=0.9, generator=gen(seed))[0, 0]
        assert not raw[(grid == 0) | (grid == 1)].any(), seed  # skin and background stay hidden
        assert raw.sum() >= 20 and raw.sum() <= 24
    # With a budget above all components (mask_ratio 0.8 -> 40 patches), skin comes next and background last.
    raw = face_guided_visible(grid_parse(grid), order="fasking_opp", mask_ratio=0.8, generator=gen(0))[0, 0]
    assert torch.equal(raw, grid != 0)


def test_walk_stops_after_a_label_not_a_whole_region() -> None:
    grid = torch.ones(14, 14, dtype=torch.long)
    grid[:3] = 0
    grid[8, :] = 7  # upper lip: 14 patches, enough on its own for 10 (mask_ratio 0.95 -> ceil(9.8))
    grid[9, :] = 8
    grid[10, :] = 9
    for seed in range(3):  # mouth is the only component present, so the component order does not matter
        raw = face_guided_visible(grid_parse(grid), order="fasking_opp", mask_ratio=0.95, generator=gen(seed))[0, 0]
        assert torch.equal(raw, grid == 7)  # official: the check runs after each label of the mouth group


@pytest.mark.parametrize(
    ("order", "ratio"),
    # fasking at 0.9 needs 7 of 64 patches: background alone covers them, so the components are never walked.
    [("fasking", 0.5), ("fasking", 0.75), ("fasking_opp", 0.5), ("fasking_opp", 0.75), ("fasking_opp", 0.9)],
)
def test_face_walk_matches_reference_loop(order: str, ratio: float) -> None:
    # Small geometry (8 x 8 patches of 4 px), labels on 3 px cells that straddle patch borders, and few background /
    # skin cells so that fasking also walks into the components.
    parse = cell_parse(4, 4, 32, cell=3, seed=int(ratio * 100))
    walks = label_orders(order)
    need = masking._num_visible_ceil(64, ratio)
    order_matters = 0
    for b in range(4):
        # One [2, 8, 8] reference per component order (the order is shared by the clip's tubelets).
        refs = {
            torch.stack([reference_walk(parse[b, f], walk, 4, need) for f in (0, 2)]).numpy().tobytes()
            for walk in walks
        }
        order_matters += len(refs) > 1
        outcomes = set()
        for seed in range(6):
            raw = face_guided_visible(parse, order=order, mask_ratio=ratio, tubelet=2, patch=4, generator=gen(seed))
            assert raw.shape == (4, 2, 8, 8)
            outcomes.add(raw[b].numpy().tobytes())
        assert outcomes <= refs, b  # every mask is the official walk for some component order
        if len(refs) > 1:
            assert len(outcomes) > 1, b  # the component order is random: seeds give different masks
    assert order_matters  # the maps are rich enough for the order to matter somewhere


def test_component_order_is_shared_by_the_clip_and_only_first_frames_count() -> None:
    parse = blob_parse(3, 1, 32, seed=7).expand(3, 8, 32, 32).clone()  # same map in all 8 frames
    raw = face_guided_visible(parse, order="fasking_opp", mask_ratio=0.75, tubelet=2, patch=4, generator=gen(1))
    assert (raw == raw[:, :1]).all()  # one component order per clip -> identical tubelets
    noisy = parse.clone()
    noisy[:, 1::2] = torch.randint(0, 11, noisy[:, 1::2].shape, generator=gen(2), dtype=torch.uint8)
    again = face_guided_visible(noisy, order="fasking_opp", mask_ratio=0.75, tubelet=2, patch=4, generator=gen(1))
    assert torch.equal(raw, again)  # the second frame of each tubelet is ignored


def test_no_face_frame_is_all_visible() -> None:
    parse = torch.zeros(3, 4, 32, 32, dtype=torch.uint8)  # clip 0: all background
    parse[1, :, :10] = 10  # clip 1: hair only, no face label
    parse[2] = blob_parse(1, 4, 32, seed=5)[0]  # clip 2: a face in frame 0, none in frame 2
    parse[2, 2] = 0
    for order in ("fasking", "fasking_opp"):
        raw = face_guided_visible(parse, order=order, mask_ratio=0.9, tubelet=2, patch=4, generator=gen(0))
        assert raw[0].all() and raw[1].all() and raw[2, 1].all()
        assert not raw[2, 0].all()
    full = generate_visible("fasking", 3, parse=parse, clip_frames=4, img_size=32, patch=4, generator=gen(0))
    assert full.sum(dim=1).tolist() == [12, 12, 12]  # floor(128 * 0.1): still exactly normalised


# ------------------------------------------------------------------------------------------ baselines and normalise


def test_tube_is_the_same_patches_in_every_tubelet() -> None:
    raw = tube_visible(5, (8, 14, 14), 0.9, generator=gen(0))
    assert raw.shape == (5, 8, 14, 14)
    assert (raw == raw[:, :1]).all()
    assert raw[:, 0].flatten(1).sum(dim=1).tolist() == [20] * 5
    assert not torch.equal(raw[0], raw[1])  # drawn per sample
    full = generate_visible("tube", 5, generator=gen(0))
    assert (full <= raw.flatten(1)).all()  # 160 -> 156 by hiding 4: a subset of the tube


def test_frame_keeps_whole_time_slices() -> None:
    raw = frame_visible(16, (8, 14, 14), 0.9, generator=gen(0))
    per_slice = raw.flatten(2).sum(dim=2)  # [16, 8]
    assert set(per_slice.unique().tolist()) <= {0, 196}
    assert (per_slice == 196).sum(dim=1).tolist() == [1] * 16
    assert len({int(row.argmax()) for row in per_slice}) > 1
    full = generate_visible("frame", 16, generator=gen(0))
    assert (full <= raw.flatten(1)).all() and full.sum(dim=1).eq(156).all()


def test_normalize_trims_and_tops_up() -> None:
    visible = torch.zeros(3, 100, dtype=torch.bool)
    visible[0, :60] = True  # too many
    visible[1, 10:13] = True  # too few: official code crashes; here 7 random hidden tokens are revealed
    visible[2, 50:60] = True  # exact
    out = normalize_visible(visible, 10, generator=gen(0))
    assert out.sum(dim=1).tolist() == [10, 10, 10]
    assert (out[0] <= visible[0]).all()
    assert (out[1] >= visible[1]).all()
    assert torch.equal(out[2], visible[2])
    assert not torch.equal(out, normalize_visible(visible, 10, generator=gen(1)))


def test_normalize_keeps_a_uniform_subset() -> None:
    visible = torch.zeros(4000, 20, dtype=torch.bool)
    visible[:, :10] = True
    freq = normalize_visible(visible, 5, generator=gen(0)).float().mean(dim=0)  # [20]
    assert torch.allclose(freq[:10], torch.full((10,), 0.5), atol=0.04)
    assert (freq[10:] == 0).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generate_visible_counts_and_seeding(strategy: str) -> None:
    parse = blob_parse(4, 16, 224, seed=11) if strategy.startswith("fasking") else None
    a = generate_visible(strategy, 4, parse=parse, generator=gen(0))
    assert a.shape == (4, 1568) and a.dtype == torch.bool
    assert a.sum(dim=1).tolist() == [156] * 4
    assert torch.equal(a, generate_visible(strategy, 4, parse=parse, generator=gen(0)))
    assert not torch.equal(a, generate_visible(strategy, 4, parse=parse, generator=gen(1)))


def test_generate_visible_is_the_raw_mask_normalised() -> None:
    parse = blob_parse(2, 16, 224, seed=12)
    g = gen(4)
    raw = face_guided_visible(parse, order="fasking", generator=g).flatten(1)  # [2, 1568]
    expected = normalize_visible(raw, 156, generator=g)
    got = generate_visible("fasking", 2, parse=parse, generator=gen(4))
    assert torch.equal(got, expected)
    assert (got <= raw).all()


def test_generate_visible_other_geometry() -> None:
    out = generate_visible("random", 3, mask_ratio=0.75, clip_frames=8, tubelet=2, img_size=64, patch=16)
    assert out.shape == (3, 64) and out.sum(dim=1).tolist() == [16] * 3


# ------------------------------------------------------------------------------------------------ visible_indices


def test_visible_indices_partition_in_ascending_order() -> None:
    visible = generate_visible("random", 3, generator=gen(0))
    idx_vis, idx_hid = visible_indices(visible)
    assert idx_vis.shape == (3, 156) and idx_hid.shape == (3, 1412)
    assert (idx_vis.diff(dim=1) > 0).all() and (idx_hid.diff(dim=1) > 0).all()
    assert torch.equal(torch.cat([idx_vis, idx_hid], 1).sort(dim=1).values, torch.arange(1568).expand(3, -1))
    assert visible.gather(1, idx_vis).all() and not visible.gather(1, idx_hid).any()


def test_visible_indices_rejects_ragged_rows() -> None:
    visible = torch.zeros(2, 10, dtype=torch.bool)
    visible[0, :3] = True
    visible[1, :4] = True
    with pytest.raises(ValueError, match="same count per row"):
        visible_indices(visible)


# --------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "blocks"}, "strategy must be one of"),
        ({"strategy": "fasking"}, "needs parse maps"),
        ({"strategy": "fasking", "parse": torch.zeros(2, 16, 224, 224, dtype=torch.uint8)}, "parse must have shape"),
        ({"strategy": "fasking", "parse": torch.zeros(1, 16, 224, 224)}, "integer labels"),
        ({"strategy": "fasking", "parse": torch.full((1, 16, 224, 224), 11, dtype=torch.uint8)}, "labels must be in"),
        ({"strategy": "random", "mask_ratio": 1.0}, "mask_ratio"),
        ({"strategy": "tube", "clip_frames": 15}, "divisible by tubelet"),
        ({"strategy": "tube", "img_size": 200}, "divisible by patch"),
        ({"strategy": "tube", "batch_size": 0}, "batch_size"),
    ],
)
def test_generate_visible_errors_are_one_line(kwargs: dict, match: str) -> None:
    kwargs = {"batch_size": 1, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        generate_visible(**kwargs)
    assert "\n" not in str(info.value)


def test_face_guided_rejects_bad_order_and_shape() -> None:
    with pytest.raises(ValueError, match="order must be"):
        face_guided_visible(torch.zeros(1, 2, 32, 32, dtype=torch.uint8), order="random", patch=4)
    with pytest.raises(ValueError, match=r"\[B, T, H, W\]"):
        face_guided_visible(torch.zeros(2, 32, 32, dtype=torch.uint8), patch=4)
    with pytest.raises(ValueError, match="divisible by tubelet"):
        face_guided_visible(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), patch=4)
