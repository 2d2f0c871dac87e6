"""A clip stored rotated (phone video with a display rotation) comes out upright through EVERY consumer of the reader.

Each clip holds the same upright portrait picture (``_upright``: a 4-bit frame-index barcode over the top half, red
bottom-left and blue bottom-right quadrants) stored rotated by 0 (control), 90, 180 or 270 degrees with the matching
display rotation. The picture is drawn in proportion to the frame, so its centre square (``center_crop``) and any
squashed resize are the same picture drawn at the new size: every consumer's frames are matched against
``_upright(k, h, w)``, which identifies the frame index ``k`` and fails for a sideways, flipped or upside-down frame.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from marlin.data.clips import read_clip
from marlin.data.datasets import VideoClips, VideoFolderClips
from marlin.data.prepare import PrepareSettings, Source, prepare_store
from marlin.data.store import ClipStore
from marlin.video.io import iter_frames, probe_video, read_frames, read_video
from marlin.video.pipeline import clip_windows
from marlin.viz.masks import load_face_clip
from marlin.viz.reconstruct import reconstruct_video
from videogen import write_video

HAS_FACE = importlib.util.find_spec("mediapipe") is not None
ROTATIONS = (0, 90, 180, 270)
HEIGHT, WIDTH = 96, 64  # the upright (displayed) picture: portrait, like a phone clip
N_FRAMES = 12
N_BITS = 4  # frame indices < 16
MATCH_TOL = 12.0  # mean absolute error (0-255) of a frame against its upright reference
CODEC = {"crf": "10"}  # near-lossless, so the tolerance only has to absorb resampling and chroma subsampling


def _upright(index: int, height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """The upright picture of frame ``index`` at ``height x width``: ``[H, W, 3]`` uint8.

    Top half: ``N_BITS`` vertical bands, most significant bit first, white for 1. Bottom half: red on the left, blue on
    the right. No rotation or mirroring of it is itself, so a frame that is not upright matches no index.
    """
    frame = np.zeros((height, width, 3), np.uint8)
    bits = (index >> np.arange(N_BITS - 1, -1, -1)) & 1  # [N_BITS]
    frame[: height // 2] = (bits[np.arange(width) * N_BITS // width] * 255).astype(np.uint8)[None, :, None]
    frame[height // 2 :, : width // 2] = (255, 0, 0)
    frame[height // 2 :, width // 2 :] = (0, 0, 255)
    return frame


def _stored_frame_fn(rotation: int) -> Callable[[int, int, int], np.ndarray]:
    """``frame_fn`` for videogen's ``write_video``: the upright picture turned so that the display rotation (applied
    counter-clockwise on playback) makes it upright again."""

    def frame_fn(index: int, height: int, width: int) -> np.ndarray:
        shown = (height, width) if rotation in (0, 180) else (width, height)
        return np.ascontiguousarray(np.rot90(_upright(index, *shown), k=-rotation // 90))

    return frame_fn


def _indices(frames: np.ndarray | torch.Tensor, *, channels_first: bool = False) -> list[int]:
    """The frame index each upright frame shows; fails on a frame that matches no upright picture.

    ``frames``: ``[T, H, W, 3]`` (or ``[3, T, H, W]`` with ``channels_first``), uint8, or a float tensor in [0, 1].
    """
    if isinstance(frames, torch.Tensor):
        scale = 255.0 if frames.is_floating_point() else 1.0
        frames = (frames.detach().cpu().float() * scale).numpy()
    frames = np.asarray(frames, np.float32)
    if channels_first:
        frames = frames.transpose(1, 2, 3, 0)  # [3, T, H, W] -> [T, H, W, 3]
    assert frames.ndim == 4 and frames.shape[-1] == 3, frames.shape
    out = []
    for t, frame in enumerate(frames):
        h, w = frame.shape[:2]
        errors = [np.abs(frame - _upright(k, h, w)).mean() for k in range(2**N_BITS)]
        best = int(np.argmin(errors))
        assert errors[best] < MATCH_TOL, (
            f"frame {t} ({h}x{w}) is not upright: best match {best}, MAE {errors[best]:.1f}"
        )
        out.append(best)
    return out


@dataclass(frozen=True)
class RotatedClip:
    path: Path
    rotation: int


@pytest.fixture(scope="module", params=ROTATIONS, ids=[f"rot{r}" for r in ROTATIONS])
def clip(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> RotatedClip:
    """``N_FRAMES`` frames of the upright picture, stored rotated by ``rotation`` with that display rotation."""
    rotation = request.param
    stored = (HEIGHT, WIDTH) if rotation in (0, 180) else (WIDTH, HEIGHT)
    folder = tmp_path_factory.mktemp(f"rot{rotation}")
    path = write_video(
        folder / "clip.mp4",
        N_FRAMES,
        *stored,
        rotation=rotation,
        codec_options=CODEC,
        frame_fn=_stored_frame_fn(rotation),
    )
    return RotatedClip(path, rotation)


def test_reference_pattern_is_orientation_sensitive() -> None:
    """The check itself: every rotation / mirror of an upright frame (at the shape it would have) matches no index."""
    frame = _upright(5)
    assert _indices(frame[None]) == [5]
    for wrong in (np.rot90(frame, 1), np.rot90(frame, 2), np.rot90(frame, 3), frame[:, ::-1], frame[::-1]):
        with pytest.raises(AssertionError, match="not upright"):
            _indices(np.ascontiguousarray(wrong)[None])
    square = _upright(5, 64, 64)
    for k in (1, 2, 3):
        with pytest.raises(AssertionError, match="not upright"):
            _indices(np.ascontiguousarray(np.rot90(square, k))[None])


# ---- 1. the reader -------------------------------------------------------------------------------------------------


def test_probe_reports_the_displayed_geometry(clip: RotatedClip) -> None:
    """``probe_video`` gives the rotation and the displayed (portrait) size, whatever the stored orientation."""
    info = probe_video(clip.path)
    assert (info.rotation, info.width, info.height, info.n_frames) == (clip.rotation, WIDTH, HEIGHT, N_FRAMES)


def test_iter_frames_is_upright(clip: RotatedClip) -> None:
    """``iter_frames``: every frame, a start/step selection and a resized read are upright and in order."""
    frames = np.stack(list(iter_frames(clip.path)))
    assert frames.shape == (N_FRAMES, HEIGHT, WIDTH, 3)
    assert _indices(frames) == list(range(N_FRAMES))
    assert _indices(np.stack(list(iter_frames(clip.path, start=1, step=3, stop=11)))) == [1, 4, 7, 10]
    resized = np.stack(list(iter_frames(clip.path, stop=3, size=(48, 32))))  # size is the displayed (H, W)
    assert resized.shape == (3, 48, 32, 3) and _indices(resized) == [0, 1, 2]
    np.testing.assert_array_equal(read_video(clip.path), frames)


def test_read_frames_is_upright_in_any_order(clip: RotatedClip) -> None:
    """``read_frames`` with out-of-order and repeated indices, at full and at a given size."""
    wanted = [9, 2, 2, 0, 11, 5]
    frames = read_frames(clip.path, wanted)
    assert frames.shape == (len(wanted), HEIGHT, WIDTH, 3) and _indices(frames) == wanted
    square = read_frames(clip.path, [3, 1], size=32)  # squashed to a square: still the upright picture
    assert square.shape == (2, 32, 32, 3) and _indices(square) == [3, 1]


# ---- 2-3. clips: pretraining on video folders, fine-tuning --------------------------------------------------------


def test_read_clip_is_upright(clip: RotatedClip) -> None:
    """``read_clip`` (centre square + resize) of the portrait picture: the same picture, square."""
    video = read_clip(clip.path, [7, 0, 3, 3], 48)
    assert video.shape == (3, 4, 48, 48) and video.dtype == torch.uint8
    assert _indices(video, channels_first=True) == [7, 0, 3, 3]


def test_video_folder_clips_are_upright(clip: RotatedClip) -> None:
    """Pretraining on video files: every window of ``VideoFolderClips`` is upright and holds the planned frames."""
    ds = VideoFolderClips([clip.path], clip_frames=4, sample_rate=2, img_size=32, window_stride=2)
    assert len(ds) == 3  # starts 0, 2, 4 of a 12-frame video
    for i in range(len(ds)):
        item = ds[i]
        assert item["video"].shape == (3, 4, 32, 32)
        assert (
            _indices(item["video"], channels_first=True)
            == ds.frame_indices(i).tolist()
            == [2 * i + 2 * k for k in range(4)]
        )


def test_video_clips_train_and_eval_are_upright(clip: RotatedClip) -> None:
    """Fine-tuning: ``VideoClips`` training clips (random start) and evaluation clips (spread starts) are upright."""
    train = VideoClips([clip.path, clip.path], np.array([0, 1]), clip_frames=4, img_size=32, sample_rate=2, seed=3)
    for index in range(2):
        item = train[index]
        assert item["video"].shape == (3, 4, 32, 32)
        got = _indices(item["video"], channels_first=True)
        assert got == [got[0] + 2 * k for k in range(4)] and 0 <= got[0] <= N_FRAMES - 7
    val = VideoClips([clip.path], np.array([1]), clip_frames=4, img_size=32, sample_rate=2, train=False, n_clips=2)
    video = val[0]["video"]  # [n_clips, 3, T, S, S]
    assert video.shape == (2, 3, 4, 32, 32)
    assert [_indices(c, channels_first=True) for c in video] == [[0, 2, 4, 6], [5, 7, 9, 11]]


# ---- 4-5. reconstructions and mask sheets ------------------------------------------------------------------------


def test_reconstruction_ground_truth_is_upright(clip: RotatedClip) -> None:
    """``reconstruct_video``: the ground-truth view ``[3, T, H, W]`` of a tiny full model's clip is upright."""
    from marlin import Marlin

    model = Marlin("marlin_vit_tiny_test", as_feature_extractor=False)  # 32 px, 4 frames
    result = reconstruct_video(model, clip.path, strategy="tube", mask_ratio=0.5, start=1, sample_rate=2)
    assert result.gt.shape == (3, 4, 32, 32)
    assert _indices(result.gt, channels_first=True) == [1, 3, 5, 7]


def test_mask_sheet_clip_is_upright(clip: RotatedClip) -> None:
    """``load_face_clip(crop_face=False)``, the mask sheets' reader: centre square of the upright picture."""
    frames, indices, cropped = load_face_clip(
        clip.path, start=2, sample_rate=3, clip_frames=3, size=48, crop_face=False
    )
    assert frames.shape == (3, 48, 48, 3) and indices == [2, 5, 8] and not cropped
    assert _indices(frames) == [2, 5, 8]


# ---- 6. feature extraction and prepared stores --------------------------------------------------------------------


def test_extraction_windows_are_upright(clip: RotatedClip) -> None:
    """``clip_windows(resize=True)``: the squashed windows fed to the encoder are upright, frames as planned."""
    (stream,) = clip_windows(clip.path, clip_frames=4, img_size=32, sample_rate=2, stride=1, resize=True)
    windows = list(stream.windows)
    assert [w.shape for w in windows] == [(4, 32, 32, 3)] * 2
    assert [_indices(w) for w in windows] == [[0, 2, 4, 6], [2, 4, 6, 8]] == stream.window_frames


def test_prepared_store_crops_are_upright(clip: RotatedClip, tmp_path: Path) -> None:
    """``prepare_store`` / ``prepare_item`` without face cropping: the stored crops read back upright and in order."""
    source = Source(id="clip", path=clip.path, kind="video", group="clip")
    settings = PrepareSettings(size=48, crop_face=False, parse=False)
    summary = prepare_store([source], tmp_path / "store", settings, workers=0, progress=False)
    assert [r.status for r in summary.results] == ["ok"]
    store = ClipStore(tmp_path / "store")
    assert store.items[0].n_frames == N_FRAMES
    crops = store.read_video("clip", [0, 11, 4, 4])
    assert crops.shape == (4, 48, 48, 3) and _indices(crops) == [0, 11, 4, 4]


# ---- 7. face detection and cropping -------------------------------------------------------------------------------


@pytest.mark.face
@pytest.mark.skipif(not HAS_FACE, reason="needs the [face] extra")
@pytest.mark.parametrize("rotation", [90, 270])
def test_face_crops_of_a_rotated_real_face(tmp_path: Path, rotation: int) -> None:
    """``plan_face_crops`` + ``iter_face_crops`` find the face in every frame of a sideways-stored portrait clip and
    crop the same upright face as from the unrotated clip."""
    from marlin.face.detect import create_detector
    from marlin.video.faces import iter_face_crops, plan_face_crops
    from marlin.viz.sample import sample_frames

    frames = sample_frames(4)  # [T, 480, 640, 3], an upright face

    def crops(rot: int) -> np.ndarray:
        def frame_fn(index: int, height: int, width: int) -> np.ndarray:
            return np.ascontiguousarray(np.rot90(frames[index], k=-rot // 90))

        h, w = frames.shape[1:3] if rot in (0, 180) else (frames.shape[2], frames.shape[1])  # stored size
        path = write_video(tmp_path / f"face{rot}.mp4", len(frames), h, w, rotation=rot, frame_fn=frame_fn)
        with create_detector("mediapipe") as det:
            (plan,) = plan_face_crops(path, det)
        assert plan.n_frames == len(frames) and plan.n_faceless == 0, f"rotation {rot}: face missed"
        return np.stack([c for _, c in iter_face_crops(plan, size=64)]).astype(np.float32)  # [T, 64, 64, 3]

    upright, rotated = crops(0), crops(rotation)
    assert rotated.shape == upright.shape == (len(frames), 64, 64, 3)
    # the detector boxes differ by a pixel or two between orientations (MAE ~8); a sideways crop gives ~60
    assert np.abs(rotated - upright).mean() < 20
