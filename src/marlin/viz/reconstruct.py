"""What a full MARLIN model reconstructs from a masked clip: ground truth | masked input | reconstruction.

    from marlin.viz.reconstruct import reconstruct_video
    result = reconstruct_video(model, "face.mp4", strategy="fasking")   # a face crop video
    result.save("recon.png")                                             # or "recon.mp4"

The reconstruction shows the model's predictions on the hidden patches and the input pixels on the visible ones
(the picture in the MARLIN paper). A model trained with normalised targets predicts standardised patches; they are
shown de-normalised with the true patch statistics, as VideoMAE does.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..mae.patches import hidden_patches, merge_hidden, normalize_patches, patchify, unnormalize_patches, unpatchify
from ..models.config import MarlinConfig

__all__ = [
    "Reconstruction",
    "masked_patch_mse",
    "reconstruct_clip",
    "reconstruct_video",
    "reconstruction_views",
    "render_grid",
]

log = logging.getLogger("marlin")

HIDDEN_FILL = 0.5  # grey for hidden patches in the "masked" view (as the official sample images)


def reconstruction_views(
    video: Tensor, visible: Tensor, pred: Tensor, config: MarlinConfig, *, norm_target: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """(ground truth, masked input, reconstruction), each ``[3, T, H, W]`` float in [0, 1] on the CPU.

    Args:
        video: ``[3, T, H, W]`` in [0, 1].
        visible: ``[N]`` bool, True = visible.
        pred: ``[N_hidden, patch_dim]`` model output for this clip.
        config: geometry of the model.
        norm_target: the model predicts per-patch normalised values (de-normalised with the true patch statistics).
    """
    t, p = config.tubelet_size, config.patch_size
    video, visible, pred = video.detach().float().cpu(), visible.cpu(), pred.detach().float().cpu()
    patches = patchify(video[None], t, p)  # [1, N, P]
    vis = visible[None]  # [1, N]
    if norm_target:
        _, mean, std = normalize_patches(hidden_patches(patches, vis), config.in_chans)
        pred = unnormalize_patches(pred[None], mean, std)[0]
    recon = merge_hidden(patches, pred[None].clamp(0, 1), vis)  # [1, N, P]
    masked = merge_hidden(patches, torch.full_like(pred[None], HIDDEN_FILL), vis)
    grid = config.grid_size
    views = (unpatchify(x, grid, t, p, config.in_chans)[0] for x in (patches, masked, recon))
    return tuple(views)  # type: ignore[return-value]


def _to_uint8(x: Tensor) -> np.ndarray:  # [3, H, W] float -> [H, W, 3] uint8
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()


def render_grid(
    gt: Tensor,
    masked: Tensor,
    recon: Tensor,
    frames: Sequence[int] | None = None,
    *,
    gap: int = 2,
    labels: bool = True,
) -> np.ndarray:
    """Rows ground truth / masked / reconstruction, one column per frame: ``[H', W', 3]`` uint8.

    `frames` defaults to the first frame of each tubelet (8 columns for a 16-frame, tubelet-2 clip) when the
    clip has at most 16 frames, else 8 evenly spaced frames.
    """
    n_frames = gt.shape[1]
    if frames is None:
        step = 2 if n_frames <= 16 else max(1, n_frames // 8)
        frames = list(range(0, n_frames, step))[:8]
    rows = []
    for view in (gt, masked, recon):
        tiles = [_to_uint8(view[:, f]) for f in frames]
        h = tiles[0].shape[0]
        sep = np.full((h, gap, 3), 255, np.uint8)
        row = np.concatenate([x for tile in tiles for x in (tile, sep)][:-1], axis=1)
        rows.append(row)
    sep = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    image = np.concatenate([rows[0], sep, rows[1], sep, rows[2]], axis=0)
    if labels:
        image = _add_row_labels(image, ["ground truth", "masked", "reconstruction"], gt.shape[2], gap)
    return image


def _add_row_labels(image: np.ndarray, names: Sequence[str], row_h: int, gap: int, margin: int = 96) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (image.shape[1] + margin, image.shape[0]), (255, 255, 255))
    canvas.paste(Image.fromarray(image), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((4, i * (row_h + gap) + row_h // 2 - 6), name, fill=(0, 0, 0))
    return np.asarray(canvas)


def side_by_side_frames(gt: Tensor, masked: Tensor, recon: Tensor, gap: int = 4) -> np.ndarray:
    """Video frames ``[T, H, 3W + 2 gap, 3]`` uint8 with the three views side by side."""
    frames = []
    for f in range(gt.shape[1]):
        tiles = [_to_uint8(v[:, f]) for v in (gt, masked, recon)]
        sep = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
        frames.append(np.concatenate([tiles[0], sep, tiles[1], sep, tiles[2]], axis=1))
    return np.stack(frames)


@torch.no_grad()
def reconstruct_clip(model: torch.nn.Module, video: Tensor, visible: Tensor) -> Tensor:
    """Predictions of the hidden patches: ``[3, T, H, W]``, ``[N]`` -> ``[N_hidden, patch_dim]`` float32."""
    dev = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pred = model(video[None].to(dev, next(model.parameters()).dtype), visible[None].to(dev))[0].float()
    model.train(was_training)
    return pred


def masked_patch_mse(video: Tensor, visible: Tensor, pred: Tensor, config: MarlinConfig) -> dict[str, float]:
    """Hidden-patch MSE of `pred` and of two trivial baselines (raw-pixel targets).

    ``clip_mean``: every hidden pixel predicted as the clip's per-channel mean; ``visible_mean``: as the per-channel
    mean of the visible pixels (what a model could compute from its input).
    """
    patches = patchify(video[None].float().cpu(), config.tubelet_size, config.patch_size)  # [1, N, P]
    vis = visible[None].cpu()
    target = hidden_patches(patches, vis)  # [1, N_hidden, P]
    c = config.in_chans
    clip_mean = video.float().cpu().mean(dim=(1, 2, 3))  # [C]
    vis_patches = patches[vis].view(-1, c, config.patch_dim // c)  # [N_vis, C, k]
    vis_mean = vis_patches.mean(dim=(0, 2))  # [C]

    def const(mean: Tensor) -> Tensor:
        return mean[:, None].expand(c, config.patch_dim // c).reshape(1, 1, -1).expand_as(target)

    return {
        "mse": torch.mean((pred.float().cpu()[None] - target) ** 2).item(),
        "clip_mean_mse": torch.mean((const(clip_mean) - target) ** 2).item(),
        "visible_mean_mse": torch.mean((const(vis_mean) - target) ** 2).item(),
    }


@dataclass
class Reconstruction:
    """The three views of one clip plus what produced them."""

    gt: Tensor  # [3, T, H, W]
    masked: Tensor
    recon: Tensor
    visible: Tensor  # [N] bool
    strategy: str
    metrics: dict[str, float]
    fps: float = 25.0

    def image(self) -> np.ndarray:
        return render_grid(self.gt, self.masked, self.recon)

    def save(self, path: str | os.PathLike) -> Path:
        """`.png` / `.jpg`: the frame grid; `.mp4` / `.mkv` / ...: the three views side by side, every frame."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp", ".bmp"):
            from PIL import Image

            from ..utils.fileio import atomic_save_image

            # atomic: a full disk or a kill never leaves a truncated image under the real name
            return atomic_save_image(path, Image.fromarray(self.image()), "reconstruct")
        from ..video.io import write_video

        return write_video(path, side_by_side_frames(self.gt, self.masked, self.recon), fps=self.fps / 2)


def _parse_frames(frames: np.ndarray) -> np.ndarray | None:
    """LaPa parse maps ``[T, H, W]`` uint8 of RGB frames, or None (with a warning) when face parsing is unavailable."""
    try:
        from ..face.parse import FaceParser

        with FaceParser() as parser:
            return parser.parse_frames(frames)
    except ImportError as e:
        warnings.warn(
            f"face parsing is unavailable ({e}); using tube masking instead of fasking (pip install 'marlin[face]')",
            stacklevel=3,
        )
        return None


def reconstruct_video(
    model: torch.nn.Module,
    path: str | os.PathLike,
    *,
    strategy: str = "fasking",
    mask_ratio: float = 0.9,
    start: int = 0,
    sample_rate: int = 2,
    seed: int = 0,
    norm_target: bool = False,
    crop_face: str | None = None,
) -> Reconstruction:
    """Read one clip of a video, mask it with `strategy`, and reconstruct it with a full model.

    The clip is `clip_frames` frames `sample_rate` apart from frame `start` (a video shorter than that repeats its
    last frame). Frames are centre-cropped square and resized to the model's size, or, with `crop_face` (a detector
    name: "mediapipe" or "haar"), cropped around the tracked face as `marlin crop` / `marlin extract` do. Face
    strategies parse the frames with `marlin.face.parse.FaceParser`; without mediapipe they fall back to tube masking
    with a warning.
    """
    from ..data.clips import clip_indices, read_clip, read_face_clip
    from ..mae.masking import Masker
    from ..video.io import probe_video

    config: MarlinConfig = model.config
    info = probe_video(path)
    if start >= info.n_frames:
        raise ValueError(f"{path}: start frame {start} is past the end ({info.n_frames} frames)")
    indices = clip_indices(info.n_frames, config.clip_frames, sample_rate, start).tolist()
    if crop_face:
        clip = torch.from_numpy(read_face_clip(path, indices, config.img_size, crop_face)).permute(3, 0, 1, 2)
    else:
        if (info.width, info.height) != (config.img_size, config.img_size):  # said, not done silently
            log.warning("%s: frames are %dx%d, not %dx%d face crops: reconstructing their centre square; pass "
                        "--crop-face (crop_face=) for raw footage", path, info.width, info.height, config.img_size,
                        config.img_size)  # fmt: skip
        clip = read_clip(path, indices, config.img_size)  # [3, T, S, S] uint8
    video = clip.float() / 255.0
    masker = Masker.for_config(config, strategy, mask_ratio)
    parse = None
    if masker.needs_parse:
        labels = _parse_frames(clip.permute(1, 2, 3, 0).contiguous().numpy())  # [T, S, S, 3] -> [T, S, S]
        if labels is None:
            masker = Masker.for_config(config, "tube", mask_ratio)
        else:
            parse = torch.from_numpy(labels)[None]  # [1, T, S, S]
    visible = masker(1, parse=parse, generator=torch.Generator().manual_seed(seed))[0]  # [N]
    pred = reconstruct_clip(model, video, visible)
    gt, masked, recon = reconstruction_views(video, visible, pred, config, norm_target=norm_target)
    metrics = masked_patch_mse(video, visible, pred, config) if not norm_target else {}
    fps = info.fps or 25.0  # sets the output video's speed only
    return Reconstruction(gt, masked, recon, visible, masker.strategy, metrics, fps)
