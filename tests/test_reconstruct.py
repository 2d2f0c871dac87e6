"""Reconstruction rendering and `marlin reconstruct`: views, de-normalisation, fallbacks, PNG / MP4 output."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from marlin import Marlin, get_config
from marlin.cli import main
from marlin.mae.patches import hidden_patches, normalize_patches, patchify
from marlin.viz.reconstruct import masked_patch_mse, reconstruct_video, reconstruction_views, render_grid

CFG = get_config("marlin_vit_tiny_test")  # 4 frames of 32 x 32, 2 x 2 x 2 tokens


def _clip_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    video = torch.rand(3, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    visible = torch.tensor([True, False, False, True, False, True, False, False])
    return video, visible


def test_views_with_a_perfect_prediction() -> None:
    video, visible = _clip_and_mask()
    truth = hidden_patches(patchify(video[None], 2, 16), visible[None])[0]  # [5, 1536]
    gt, masked, recon = reconstruction_views(video, visible, truth, CFG)
    torch.testing.assert_close(gt, video)
    torch.testing.assert_close(recon, video)
    # token 1 = (t 0, h 0, w 1) is hidden -> grey; token 0 = (t 0, h 0, w 0) is visible -> the input pixels
    assert torch.all(masked[:, 0:2, 0:16, 16:32] == 0.5)
    torch.testing.assert_close(masked[:, 0:2, 0:16, 0:16], video[:, 0:2, 0:16, 0:16])
    normed = normalize_patches(truth, 3)[0]  # a normalised-target model's perfect output
    torch.testing.assert_close(reconstruction_views(video, visible, normed, CFG, norm_target=True)[2], video)
    metrics = masked_patch_mse(video, visible, truth, CFG)
    assert metrics["mse"] == 0 and metrics["clip_mean_mse"] > 0.05 and metrics["visible_mean_mse"] > 0.05


def test_render_grid_layout() -> None:
    video, visible = _clip_and_mask()
    views = reconstruction_views(video, visible, torch.zeros(5, 1536), CFG)
    image = render_grid(*views, labels=False)
    assert image.shape == (3 * 32 + 2 * 2, 2 * 32 + 2, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image[:32, :32], (video[:, 0].permute(1, 2, 0) * 255).round().byte().numpy())
    labelled = render_grid(*views)
    assert labelled.shape[1] > image.shape[1]  # a left margin with the row names


def _write_video(path: Path, n_frames: int = 10, size: tuple[int, int] = (48, 40)) -> None:
    import av

    w, h = size
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for i in range(n_frames):
            img = np.zeros((h, w, 3), np.uint8)
            img[:, :, 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
            img[:, :, 1] = 20 * i
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_reconstruct_video_png_and_mp4(tmp_path) -> None:
    _write_video(tmp_path / "clip.mp4")
    model = Marlin(CFG, as_feature_extractor=False)
    result = reconstruct_video(model, tmp_path / "clip.mp4", strategy="tube", mask_ratio=0.5)
    assert result.strategy == "tube" and int(result.visible.sum()) == 4
    assert result.gt.shape == (3, 4, 32, 32) and set(result.metrics) == {"mse", "clip_mean_mse", "visible_mean_mse"}
    png = result.save(tmp_path / "out" / "recon.png")
    assert Image.open(png).size[1] == 3 * 32 + 2 * 2
    mp4 = result.save(tmp_path / "recon.mp4")
    import av

    with av.open(str(mp4)) as c:
        s = c.streams.video[0]
        assert (s.width, s.height) == (3 * 32 + 2 * 4, 32) and s.frames == 4
    with pytest.raises(ValueError, match="start frame 50 is past the end"):
        reconstruct_video(model, tmp_path / "clip.mp4", strategy="tube", mask_ratio=0.5, start=50)


def test_fasking_falls_back_to_tube_without_face_parsing(tmp_path, monkeypatch) -> None:
    _write_video(tmp_path / "clip.mp4")
    monkeypatch.setitem(sys.modules, "marlin.face.parse", None)  # import fails as without mediapipe
    model = Marlin(CFG, as_feature_extractor=False)
    with pytest.warns(UserWarning, match="using tube masking instead of fasking"):
        result = reconstruct_video(model, tmp_path / "clip.mp4", strategy="fasking", mask_ratio=0.5)
    assert result.strategy == "tube"


def test_reconstruct_command(tmp_path, capsys) -> None:
    _write_video(tmp_path / "clip.mp4")
    model = Marlin(CFG, as_feature_extractor=False)
    ckpt = model.export_official(tmp_path / "tiny.full.pt")
    out = tmp_path / "recon.png"
    argv = ["reconstruct", str(tmp_path / "clip.mp4"), "--model", str(ckpt), "--strategy", "random",
            "--mask-ratio", "0.5", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0 and out.is_file()
    printed = capsys.readouterr().out
    assert "random masking, 4/8 tokens hidden" in printed and "clip-mean baseline" in printed
    enc = Marlin(CFG).export_official(tmp_path / "tiny.encoder.pt")
    assert main([*argv[:3], str(enc), *argv[4:]]) == 2
    assert "full model requested but the file holds only an encoder" in capsys.readouterr().err


@pytest.mark.face
def test_crop_face_reconstructs_the_tracked_face_of_raw_footage(tmp_path, capsys) -> None:
    pytest.importorskip("mediapipe")
    from marlin.viz.sample import make_sample_clip

    video = make_sample_clip(tmp_path / "portrait.mp4", n_frames=40)  # a portrait panning over a 640 x 480 backdrop
    model = Marlin("marlin_vit_tiny_test", as_feature_extractor=False)

    def backdrop_share(clip: torch.Tensor) -> float:  # pixels of the bluish-grey backdrop (r < g < b, dull)
        r, g, b = (clip[c] * 255 for c in range(3))
        return float(((r < g) & (g < b) & (b < 120)).float().mean())

    plain = reconstruct_video(model, video, strategy="tube", mask_ratio=0.5)
    face = reconstruct_video(model, video, strategy="tube", mask_ratio=0.5, crop_face="mediapipe")
    assert face.gt.shape == plain.gt.shape == (3, 4, 32, 32)
    assert backdrop_share(plain.gt) > 0.15 and backdrop_share(face.gt) < backdrop_share(plain.gt) / 4  # 0.23, 0.01
    ckpt = model.export_official(tmp_path / "tiny.full.pt")
    argv = ["reconstruct", str(video), "--model", str(ckpt), "--mask-ratio", "0.5", "--out", str(tmp_path / "r.png")]
    assert main([*argv, "--crop-face"]) == 0 and (tmp_path / "r.png").is_file()
    _write_video(tmp_path / "noface.mp4")
    assert main([*argv[:1], str(tmp_path / "noface.mp4"), *argv[2:], "--crop-face"]) == 2
    assert "no face" in capsys.readouterr().err.lower()


@pytest.mark.slow
@pytest.mark.face
def test_fasking_reconstruction_of_a_real_face_crop(shared_data, tmp_path) -> None:
    pytest.importorskip("mediapipe")
    video = shared_data / "marlin_samples" / "cropped01.mp4"
    model = Marlin("marlin_vit_tiny", as_feature_extractor=False)
    result = reconstruct_video(model, video, strategy="fasking")
    assert result.strategy == "fasking" and int(result.visible.sum()) == 156
    result.save(tmp_path / "recon.png")
    # fasking hides the facial components: the centre of the face is hidden far more often than the border.
    vis = result.visible.view(8, 14, 14).float().mean(0)
    assert vis[5:9, 4:10].mean() < vis[[0, 13]].mean()


def test_uncropped_video_is_reconstructed_with_a_warning(tmp_path, caplog) -> None:
    """A 48x40 clip for a 32 px model used to be centre-cropped without a word (extract refuses it)."""
    _write_video(tmp_path / "wide.mp4")
    _write_video(tmp_path / "crop.mp4", size=(32, 32))
    model = Marlin(CFG, as_feature_extractor=False)
    with caplog.at_level("WARNING", logger="marlin"):
        reconstruct_video(model, tmp_path / "crop.mp4", strategy="random", mask_ratio=0.5)
        assert not caplog.records  # a face crop of the model's size: nothing to say
        result = reconstruct_video(model, tmp_path / "wide.mp4", strategy="random", mask_ratio=0.5)
    assert result.gt.shape == (3, CFG.clip_frames, 32, 32)
    assert any("frames are 48x40, not 32x32 face crops" in r.getMessage() for r in caplog.records)
