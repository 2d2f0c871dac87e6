"""The lip generator (`marlin.lipsync`): the model, its windows, its losses, `marlin lipsync-train` and dubbing.

Synthetic task as in `test_sync`: a face-like frame whose dark mouth opens with the loudness of a tone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from marlin.lipsync.data import LipWindows, reference_frame
from marlin.lipsync.dub import dub_crops, paste_lower, window_starts_covering
from marlin.lipsync.losses import critic_frames, drop_sound, jitter_windows, pixel_loss, sync_loss
from marlin.lipsync.model import SILENCE_MEL, BorderRefiner, LipGenerator, MouthCritic, load_generator
from marlin.lipsync.train import (
    LipsyncTrainConfig,
    evaluate_generator,
    lipsync_train,
    take_expert_audio,
    window_losses,
)
from marlin.mae.losses import gradient_penalty
from marlin.mae.patches import patchify
from marlin.models.encoder import MarlinEncoder
from marlin.sync.expert import SyncExpert, sync_window
from test_sync import TINY, loudness, talking_audio, talking_frames, talking_video

SIZE = TINY.img_size


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("talking")
    return [talking_video(root / f"v{i}.mkv", 40, seed=300 + i) for i in range(6)]


def _window(seed: int, b: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, TINY.clip_frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def test_a_new_generator_copies_the_reference_mouth_under_the_target_face() -> None:
    torch.manual_seed(0)
    gen = LipGenerator(TINY).eval()
    target, reference = _window(1), _window(2)
    mel = torch.randn(2, 80, gen.mel_length)
    out = gen.generate(target, reference, mel)  # [B, 3, T, S, S]
    top = (TINY.grid_size[1] // 2) * TINY.patch_size  # first redrawn pixel row
    assert out.shape == target.shape
    assert torch.equal(out[..., :top, :], target[..., :top, :])
    assert torch.allclose(out[..., top:, :], reference[..., top:, :], atol=1e-6)  # the residual starts at zero


def test_the_target_mouth_never_reaches_the_drawing() -> None:
    """Only the target's upper-half tokens enter the encoder: changing its lower half changes nothing drawn."""
    torch.manual_seed(0)
    gen = LipGenerator(TINY).eval()
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)  # a generator that draws something
    target, reference, mel = _window(1), _window(2), torch.randn(2, 80, gen.mel_length)
    other = target.clone()
    other[..., SIZE // 2 :, :] = torch.rand_like(other[..., SIZE // 2 :, :])
    with torch.no_grad():
        a, b = gen(target, reference, mel), gen(other, reference, mel)
        c = gen(target, reference, torch.randn(2, 80, gen.mel_length))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)  # ... while the sound does reach it


def test_sound_guidance_extrapolates_from_the_mouth_drawn_for_silence() -> None:
    torch.manual_seed(0)
    gen = LipGenerator(TINY).eval()
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)
    target, reference, mel = _window(1), _window(2), torch.randn(2, 80, gen.mel_length)
    ref = patchify(reference, TINY.tubelet_size, TINY.patch_size)[:, gen.lower]
    with torch.no_grad():
        plain, silent = gen(target, reference, mel), gen(target, reference, torch.full_like(mel, SILENCE_MEL))
        guided = gen(target, reference, mel, guidance=1.5)
        assert torch.equal(gen(target, reference, mel, guidance=0.0), plain)
    assert not torch.allclose(plain, silent)
    expected = ref + 2.5 * (plain - ref) - 1.5 * (silent - ref)  # r + w (r - r_silence), r the residual
    assert torch.allclose(guided, expected, atol=1e-5)
    crops = (torch.rand(3, 16, SIZE, SIZE) * 255).to(torch.uint8)
    a, b = (dub_crops(gen, crops, torch.randn(80, 80), 25.0, guidance=g) for g in (0.0, 1.5))
    top = gen.top
    assert torch.equal(a[..., :top, :], b[..., :top, :]) and not torch.equal(a[..., top:, :], b[..., top:, :])


def test_a_new_refiner_leaves_the_drawing_alone_and_travels_with_the_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = LipGenerator(TINY).eval()
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)
    target, reference, mel = _window(1), _window(2), torch.randn(2, 80, gen.mel_length)
    with torch.no_grad():
        plain = gen(target, reference, mel)
        gen.add_refiner(4)
        assert gen.refine == 4
        assert torch.allclose(gen(target, reference, mel), plain, atol=1e-6)  # it starts as the identity
        torch.nn.init.normal_(gen.refiner.net[-1].weight, std=0.05)  # a refiner that redraws something
        refined, silent = gen(target, reference, mel), gen(target, reference, torch.full_like(mel, SILENCE_MEL))
        guided = gen(target, reference, mel, guidance=2.0)
    assert not torch.allclose(refined, plain, atol=1e-4)
    ref = patchify(reference, TINY.tubelet_size, TINY.patch_size)[:, gen.lower]
    assert torch.allclose(guided, ref + 3 * (refined - ref) - 2 * (silent - ref), atol=1e-5)  # guides the refined
    torch.save(gen.checkpoint(), tmp_path / "g.pt")
    back = load_generator(tmp_path / "g.pt")
    assert back.refine == 4
    with torch.no_grad():
        assert torch.equal(back(target, reference, mel), refined)
    with pytest.raises(ValueError, match="channels"):
        gen.add_refiner(0)


def test_the_refiner_draws_across_patch_borders() -> None:
    """A per-patch head draws each patch from its own token, so where two patches meet it draws a step; the refiner
    learns to blend a step between two patches of random values into a ramp across their border, which needs the
    value on the other side of the border (no per-patch map can draw it)."""
    torch.manual_seed(0)
    p = TINY.patch_size
    sides = torch.rand(8, 3, 2, 1, 2)  # [B, 3, T, 1, 2]: the values of the left and the right patch
    step = sides.repeat_interleave(p, -1).expand(-1, -1, -1, p, -1).contiguous()  # [B, 3, T, p, 2p]
    padded = torch.cat([step[..., :1].expand(-1, -1, -1, -1, 3), step, step[..., -1:].expand(-1, -1, -1, -1, 3)], -1)
    blend = padded.unfold(-1, 7, 1).mean(-1)  # [B, 3, T, p, 2p]: the step averaged over 7 pixels, a ramp
    refiner = BorderRefiner(8)
    opt = torch.optim.Adam(refiner.parameters(), lr=1e-2)
    before = (step - blend).square().mean().item()
    for _ in range(200):
        loss = (refiner(step, torch.zeros_like(step)) - blend).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * before


def test_sound_dropout_silences_whole_windows_at_its_rate() -> None:
    mel = torch.randn(2000, 80, 4)
    assert drop_sound(mel, 0.0, SILENCE_MEL) is mel
    out = drop_sound(mel, 0.3, SILENCE_MEL, torch.Generator().manual_seed(0))
    silent = (out == SILENCE_MEL).all(2).all(1)  # [B]
    kept = (out == mel).all(2).all(1)
    assert torch.equal(silent, ~kept)  # a window is either silenced whole or left as it was
    assert 0.26 < silent.float().mean() < 0.34
    assert torch.equal(out, drop_sound(mel, 0.3, SILENCE_MEL, torch.Generator().manual_seed(0)))  # seeded
    torch.manual_seed(0)
    gen = LipGenerator(TINY).eval()
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)
    batch = {"target": (_window(1) * 255).to(torch.uint8), "reference": (_window(2) * 255).to(torch.uint8),
             "mel": torch.randn(2, 80, gen.mel_length)}  # fmt: skip
    with torch.no_grad():
        pred = window_losses(gen, batch, None, 0.0, torch.device("cpu"), sound_dropout=0.999)["pred"]
        target, reference = batch["target"].float() / 255, batch["reference"].float() / 255
        silent = gen(target, reference, torch.full_like(batch["mel"], SILENCE_MEL))
    assert torch.allclose(pred, silent)  # the generator heard silence


def test_the_reference_frame_comes_from_another_moment() -> None:
    rng = np.random.default_rng(0)
    for start in (0, 5, 20):  # window start .. start + 7 of 32 frames
        got = {reference_frame(start, 32, 8, rng) for _ in range(50)}
        assert all((f < start - 4 or f >= start + 12) and 0 <= f < 32 for f in got) and len(got) > 3
    assert reference_frame(3, 18, 8, None) == 17 and reference_frame(9, 18, 8, None) == 0
    assert reference_frame(1, 10, 8, rng) in (0, 9)  # too short for a distant frame: the farthest one


def test_windows_carry_the_frames_and_the_sound_of_their_moment(videos: list[Path]) -> None:
    data = LipWindows([str(v) for v in videos], clip_frames=8, size=SIZE, mel_length=TINY_MEL, crop_face=False,
                      seed=3)  # fmt: skip
    item = data[5]
    assert item["target"].shape == item["reference"].shape == (3, 8, SIZE, SIZE) and item["mel"].shape == (80, 26)
    assert torch.equal(item["reference"], item["reference"][:, :1].expand(-1, 8, -1, -1))  # one frame, held still
    for k, v in data[5].items():
        assert torch.equal(v, item[k])  # a function of (seed, item)
    va = data.audio(data._video_of(5))
    mouth = (item["target"].float().mean(0)[:, 16:, 9:23] < 100).float().mean((1, 2))  # open fraction per frame
    starts = [s for s in range(va.n_frames - 7) if torch.equal(sync_window(va.mel, s, 8, va.fps, 26), item["mel"])]
    assert len(starts) == 1  # the mel window identifies the target's start ...
    amp = loudness(40, 300 + videos.index(Path(data._video_of(5))))[starts[0] : starts[0] + 8]
    assert np.corrcoef(mouth.numpy(), amp)[0, 1] > 0.9  # ... and the target's mouth follows that sound


TINY_MEL = 26  # mel steps of an 8-frame window at 25 fps


def test_pixel_losses_and_the_sync_loss_reach_the_pixels_not_the_expert() -> None:
    pred, truth = torch.zeros(2, 3, 4), torch.full((2, 3, 4), 0.5)
    assert pixel_loss(pred, truth, "mse") == pytest.approx(0.25) and pixel_loss(pred, truth, "l1") == 0.5
    with pytest.raises(ValueError, match="pixel loss"):
        pixel_loss(pred, truth, "huber")
    torch.manual_seed(0)
    expert = SyncExpert(TINY, embed_dim=16, visual="pixels").eval().requires_grad_(False)
    video = _window(3).requires_grad_(True)
    loss, p = sync_loss(expert, video, torch.randn(2, 80, expert.mel_length))
    loss.backward()
    assert video.grad is not None and video.grad.abs().sum() > 0 and p.shape == (2,) and ((p > 0) & (p < 1)).all()
    assert all(q.grad is None for q in expert.parameters())
    big = torch.nn.functional.interpolate(video.detach().flatten(1, 2), scale_factor=2).unflatten(1, (3, 8))
    loss2, _ = sync_loss(expert, big, torch.randn(2, 80, expert.mel_length))  # other sizes are resized
    assert torch.isfinite(loss2)


def test_window_starts_cover_every_frame() -> None:
    assert window_starts_covering(16, 8) == [0, 8]
    assert window_starts_covering(21, 8) == [0, 8, 13]
    with pytest.raises(ValueError, match="fewer than one"):
        window_starts_covering(5, 8)


def test_dub_crops_redraws_only_the_lower_face_of_every_frame() -> None:
    torch.manual_seed(0)
    gen = LipGenerator(TINY).eval()
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)
    crops = (torch.rand(3, 21, SIZE, SIZE) * 255).to(torch.uint8)
    out = dub_crops(gen, crops, torch.randn(80, 100), 25.0, batch_size=2)
    top = (TINY.grid_size[1] // 2) * TINY.patch_size
    assert out.shape == crops.shape and out.dtype == torch.uint8
    assert torch.equal(out[..., :top, :], crops[..., :top, :])
    changed = (out[..., top:, :] != crops[..., top:, :]).flatten(0, 0).float().mean((0, 2, 3))  # per frame
    assert (changed > 0.5).all()
    with pytest.raises(ValueError, match="uint8 crops"):
        dub_crops(gen, crops.float(), torch.randn(80, 100), 25.0)


def test_a_still_upper_generator_reads_only_the_middle_frame_of_the_face(tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = LipGenerator(TINY, still_upper=True).eval()
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)
    target, reference, mel = _window(1), _window(2), torch.randn(2, 80, gen.mel_length)
    middle = TINY.clip_frames // 2
    other = target.clone()
    other[:, :, :middle] = torch.rand_like(other[:, :, :middle])  # every frame but the middle one
    other[:, :, middle + 1 :] = torch.rand_like(other[:, :, middle + 1 :])
    moved = target.clone()
    moved[:, :, middle, : SIZE // 2] = torch.rand_like(moved[:, :, middle, : SIZE // 2])
    with torch.no_grad():
        a, b, c = gen(target, reference, mel), gen(other, reference, mel), gen(moved, reference, mel)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    torch.save(gen.checkpoint(), tmp_path / "gen.pt")
    assert load_generator(tmp_path / "gen.pt").still_upper


def test_the_sound_trunk_can_start_from_the_experts() -> None:
    torch.manual_seed(0)
    gen, expert = LipGenerator(TINY), SyncExpert(TINY, embed_dim=16, visual="pixels")
    assert not torch.equal(gen.audio.convs[0].weight, expert.audio.convs[0].weight)
    take_expert_audio(gen, expert)
    mel = torch.randn(2, 80, gen.mel_length)
    assert torch.equal(gen.audio(mel), super(type(expert.audio), expert.audio).forward(mel))  # the trunk's features
    with pytest.raises(ValueError, match="needs an expert"):
        take_expert_audio(gen, None)


def test_generators_and_experts_are_described_by_info_and_never_read_as_marlin_models(tmp_path: Path, capsys) -> None:
    from marlin.cli import main as cli
    from marlin.lipsync.model import LIPSYNC_FORMAT
    from marlin.models.checkpoint import TASK_FILES, CheckpointError, read_checkpoint
    from marlin.sync.expert import SYNC_FORMAT

    assert {LIPSYNC_FORMAT, SYNC_FORMAT} <= set(TASK_FILES)
    torch.save(LipGenerator(TINY, still_upper=True).checkpoint(step=7), tmp_path / "gen.pt")
    torch.save(SyncExpert(TINY, embed_dim=16).checkpoint(), tmp_path / "expert.pt")
    assert cli(["info", str(tmp_path / "gen.pt")]) == 0
    out = capsys.readouterr().out
    assert "a lip generator" in out and "still_upper=True" in out and "step=7" in out and "full" not in out
    assert cli(["info", str(tmp_path / "expert.pt")]) == 0
    assert "a lip-sync expert" in capsys.readouterr().out
    broken = LipGenerator(TINY)
    torch.nn.init.constant_(broken.decoder.head.weight, float("nan"))
    torch.save(broken.checkpoint(), tmp_path / "nan.pt")
    assert cli(["info", str(tmp_path / "nan.pt")]) == 1  # described, and named unusable
    assert "NOT USABLE" in capsys.readouterr().err
    for name in ("gen.pt", "expert.pt"):  # both hold MARLIN encoder weights, but are no MARLIN model
        with pytest.raises(CheckpointError, match="not a MARLIN model"):
            read_checkpoint(tmp_path / name)


def test_paste_lower_changes_only_the_lower_face_inside_its_window() -> None:
    frame = np.full((60, 80, 3), 10, np.uint8)
    crop = np.full((SIZE, SIZE, 3), 250, np.uint8)
    out = paste_lower(frame, crop, np.array([20, 10, 60, 50]), top=0.5, edge=0.1)
    assert (out[:30] == 10).all() and (out[:, :20] == 10).all() and (out[:, 60:] == 10).all() and (out[50:] == 10).all()
    assert (out[38:44, 30:50] == 250).all()  # inside the lower half, away from the feathered borders
    edge = paste_lower(frame, crop, np.array([-20, 30, 20, 70]), top=0.5)  # partly outside the frame
    assert edge.shape == frame.shape and (edge[55, 5] > 10).all()


def test_lipsync_train_resumes_and_writes_a_generator(tmp_path: Path, videos: list[Path]) -> None:
    out = tmp_path / "run"
    torch.manual_seed(0)
    expert = SyncExpert(TINY, embed_dim=16, visual="pixels")
    torch.save(expert.checkpoint(), tmp_path / "expert.pt")
    base = dict(videos=tuple(map(str, videos[:4])), val_videos=tuple(map(str, videos[4:])), crop_face=False,
                batch_size=2, workers=0, out=str(out), device="cpu", log_every=1, save_every=2,
                expert=str(tmp_path / "expert.pt"), sync_weight=0.1)  # fmt: skip
    first = lipsync_train(LipsyncTrainConfig(steps=2, **base), encoder=MarlinEncoder(TINY))
    assert (out / "generator.pt").is_file() and first.step == 2 and first.val is not None
    assert {"mse", "ref_mse", "l1", "ref_l1", "p_sync", "p_sync_real"} <= set(first.val)
    with pytest.raises(ValueError, match="pass --resume"):
        lipsync_train(LipsyncTrainConfig(steps=3, **base), encoder=MarlinEncoder(TINY))
    resumed = lipsync_train(LipsyncTrainConfig(steps=3, **base), resume=True, encoder=MarlinEncoder(TINY))
    assert resumed.step == 3 and [h["step"] for h in resumed.history if "loss" in h] == [1, 2, 3]
    gen = load_generator(out / "generator.pt")
    assert gen.meta["step"] == 3 and gen.clip_frames == 8 and not gen.training
    with pytest.raises(ValueError, match="sync weight"):
        LipsyncTrainConfig(sync_weight=1.0)


def test_jitter_moves_each_window_as_a_whole_and_keeps_gradients() -> None:
    video = _window(3, b=4).requires_grad_(True)  # [B, 3, T, S, S]
    moved = jitter_windows(video, 3, torch.Generator().manual_seed(0))
    assert moved.shape == video.shape
    assert torch.equal(jitter_windows(video, 0), video)
    assert torch.equal(moved, jitter_windows(video, 3, torch.Generator().manual_seed(0)))  # seeded
    inner = slice(3, SIZE - 3)
    for i in range(4):  # the interior of each window is the original moved by one (dy, dx), the same in every frame
        shifted = {(dy, dx): video[i].roll((dy, dx), (-2, -1))[..., inner, inner] for dy in range(-3, 4)
                   for dx in range(-3, 4)}  # fmt: skip
        assert len([k for k, v in shifted.items() if torch.equal(moved[i, ..., inner, inner], v)]) == 1
    draws = [jitter_windows(video, 3, torch.Generator().manual_seed(s))[0] for s in range(6)]
    assert any(not torch.equal(d, draws[0]) for d in draws)  # offsets differ between draws
    moved.sum().backward()
    assert video.grad is not None and video.grad.abs().sum() > 0


def test_the_critic_scores_each_lower_face_frame() -> None:
    video = _window(4, b=2)  # [B, 3, T, S, S]
    top = SIZE // 2
    frames = critic_frames(video, top)  # [B, T, 3 * (S - top) * S]
    assert frames.shape == (2, TINY.clip_frames, 3 * (SIZE - top) * SIZE)
    assert torch.equal(frames[1, 3].view(3, SIZE - top, SIZE), video[1, :, 3, top:])
    torch.manual_seed(0)
    critic = MouthCritic(SIZE - top, SIZE)
    scores = critic(frames)  # [B, T, 1]
    assert scores.shape == (2, TINY.clip_frames, 1)
    changed = frames.clone()
    changed[0, 5] = 0.5  # one frame of one window
    moved = (critic(changed) != scores)[..., 0]
    assert moved[0, 5] and moved.sum() == 1  # frames are scored on their own
    gp = gradient_penalty(critic, frames, changed, 0.5)
    assert gp.ndim == 0 and torch.isfinite(gp)


def test_a_warm_start_continues_a_generator_and_a_judge_is_reported(tmp_path: Path, videos: list[Path]) -> None:
    torch.manual_seed(0)
    expert = SyncExpert(TINY, embed_dim=16, visual="pixels")
    torch.save(expert.checkpoint(), tmp_path / "expert.pt")
    base = dict(videos=tuple(map(str, videos[:4])), val_videos=tuple(map(str, videos[4:])), crop_face=False,
                batch_size=2, workers=0, device="cpu", save_every=0, val_every=0)  # fmt: skip
    first = lipsync_train(LipsyncTrainConfig(steps=2, lr=1e-3, out=str(tmp_path / "a"), **base),
                          encoder=MarlinEncoder(TINY))  # fmt: skip
    warm = LipsyncTrainConfig(steps=1, lr=1e-9, warmup_steps=0, init=str(tmp_path / "a" / "generator.pt"),
                              expert=str(tmp_path / "expert.pt"), judge=str(tmp_path / "expert.pt"), sync_weight=0.5,
                              sync_jitter=2, out=str(tmp_path / "b"), **base)  # fmt: skip
    second = lipsync_train(warm)
    head, start = second.generator.decoder.head.weight, first.generator.decoder.head.weight
    assert start.abs().sum() > 0 and torch.allclose(head, start, atol=1e-6)  # not a new, zero-initialised head
    assert second.val["p_sync"] == pytest.approx(second.val["p_sync_judge"])  # the same expert judged twice
    assert second.val["p_sync_real"] == pytest.approx(second.val["p_sync_judge_real"])
    with pytest.raises(ValueError, match="trained at 25 fps"):
        lipsync_train(LipsyncTrainConfig(steps=1, fps=30.0, init=warm.init, out=str(tmp_path / "c"), **base))
    refined = lipsync_train(LipsyncTrainConfig(steps=1, lr=1e-9, warmup_steps=0, init=warm.init, refine=4,
                                               out=str(tmp_path / "d"), **base))  # fmt: skip
    assert refined.generator.refine == 4 and load_generator(tmp_path / "d" / "generator.pt").refine == 4
    with pytest.raises(ValueError, match="refiner has 4 channels"):
        lipsync_train(LipsyncTrainConfig(steps=1, init=str(tmp_path / "d" / "generator.pt"), refine=8,
                                         out=str(tmp_path / "e"), **base))  # fmt: skip
    data = LipWindows([str(v) for v in videos[4:]], clip_frames=8, size=SIZE, mel_length=first.generator.mel_length,
                      crop_face=False, train=False)  # fmt: skip
    assert set(evaluate_generator(first.generator, data)) == {"mse", "ref_mse", "l1", "ref_l1", "mse_other_sound"}
    assert "mse_other_sound" not in evaluate_generator(first.generator, data, batch_size=1)
    for bad, match in (
        (dict(sync_jitter=-1), "sync jitter"),
        (dict(critic_steps=0), "critic steps"),
        (dict(critic_frames=0), "critic frames"),
        (dict(adv_weight=-1.0), "adversarial weight"),
        (dict(sound_dropout=1.0), "sound dropout"),
        (dict(refine=-1), "refiner channels"),
    ):
        with pytest.raises(ValueError, match=match):
            LipsyncTrainConfig(**bad)


def test_the_critic_trains_with_the_generator_and_resumes_with_the_run(tmp_path: Path, videos: list[Path]) -> None:
    base = dict(videos=tuple(map(str, videos[:4])), val_videos=(), val_fraction=0.0, crop_face=False, batch_size=2,
                workers=0, device="cpu", save_every=1, val_every=0, log_every=1, lr=1e-3)  # fmt: skip
    adv = dict(adv_weight=0.1, sync_jitter=2, critic_steps=2, critic_frames=3, out=str(tmp_path / "adv"))
    first = lipsync_train(LipsyncTrainConfig(steps=2, **adv, **base), encoder=MarlinEncoder(TINY))
    assert all({"adv", "critic", "gp"} <= set(h) for h in first.history if "loss" in h)
    state = torch.load(tmp_path / "adv" / "last.pt", weights_only=True)
    critic = dict(state["extra"]["critic"])
    assert critic and state["extra"]["critic_optimizer"]["state"]  # the critic has taken steps
    resumed = lipsync_train(LipsyncTrainConfig(steps=3, **adv, **base), resume=True, encoder=MarlinEncoder(TINY))
    assert resumed.step == 3
    later = torch.load(tmp_path / "adv" / "last.pt", weights_only=True)["extra"]["critic"]
    assert any(not torch.equal(later[k], critic[k]) for k in critic)  # restored, then trained on
    lipsync_train(LipsyncTrainConfig(steps=1, **{**base, "out": str(tmp_path / "plain")}), encoder=MarlinEncoder(TINY))
    with pytest.raises(ValueError, match="had no critic"):
        lipsync_train(LipsyncTrainConfig(steps=2, **{**adv, **base, "out": str(tmp_path / "plain")}), resume=True,
                      encoder=MarlinEncoder(TINY))  # fmt: skip


def test_a_sync_loss_on_the_sound_only_leaves_the_drawing_to_pixels(tmp_path: Path, videos: list[Path]) -> None:
    """With ``sync_trains="sound"`` the gradients outside the sound trunk are exactly those of the pixel term."""
    from marlin.lipsync.train import _LipRun, window_losses
    from marlin.utils.distributed import DistInfo

    torch.manual_seed(0)
    expert = SyncExpert(TINY, embed_dim=16, visual="pixels")
    torch.save(expert.checkpoint(), tmp_path / "expert.pt")
    cfg = LipsyncTrainConfig(videos=tuple(map(str, videos[:4])), val_fraction=0.0, crop_face=False, batch_size=2,
                             workers=0, device="cpu", expert=str(tmp_path / "expert.pt"), sync_weight=0.5,
                             sync_trains="sound")  # fmt: skip
    run = _LipRun(cfg, DistInfo(), MarlinEncoder(TINY))
    torch.nn.init.normal_(run.gen.decoder.head.weight, std=0.05)  # gradients reach the layers below the head
    batch = torch.utils.data.default_collate([run.train_set[i] for i in range(2)])

    def grads(sync_trains: str, weight: float) -> dict[str, torch.Tensor]:
        run.cfg.sync_trains, run.cfg.sync_weight = sync_trains, weight
        run.optimizer.zero_grad(set_to_none=True)
        run.backward(window_losses(run.gen, batch, run.expert, weight, torch.device("cpu")))
        return {k: p.grad.clone() for k, p in run.gen.named_parameters() if p.grad is not None}

    pixels, sound, everything = grads("all", 0.0), grads("sound", 0.5), grads("all", 0.5)
    drawing = ("decoder.head.weight", "decoder.blocks.0.mlp.layers.0.linear.weight", "encoder.blocks.0.attn.qkv.weight")
    for name in drawing:
        assert torch.allclose(sound[name], 0.5 * pixels[name], atol=1e-7), name
        assert not torch.allclose(everything[name], 0.5 * pixels[name], atol=1e-7), name
    for name in ("audio_to_dec.weight", "audio.convs.0.weight"):
        assert not torch.allclose(sound[name], 0.5 * pixels[name], atol=1e-7), name


@pytest.mark.slow  # ~60 s
def test_the_generator_learns_to_draw_the_mouth_the_sound_asks_for(tmp_path: Path) -> None:
    """Held-out windows: the drawn mouth beats copying the reference mouth, and beats the same generator given
    another window's sound (so it uses the sound, not only the average mouth; a generator deaf to it gives exactly 1).
    Measured: 0.79 and 0.94."""
    vids = [str(talking_video(tmp_path / f"v{i}.mkv", 40, seed=400 + i)) for i in range(12)]
    cfg = LipsyncTrainConfig(videos=tuple(vids[:9]), val_videos=tuple(vids[9:]), crop_face=False, batch_size=8,
                             workers=0, steps=80, lr=1e-3, warmup_steps=10, device="cpu", log_every=40, val_every=0,
                             save_every=0)  # fmt: skip
    torch.manual_seed(0)
    gen = lipsync_train(cfg, encoder=MarlinEncoder(TINY)).generator.eval()
    data = LipWindows(vids[9:], clip_frames=8, size=SIZE, mel_length=gen.mel_length, crop_face=False, seed=7)
    batch = torch.utils.data.default_collate([data[i] for i in range(24)])
    target, reference, mel = batch["target"].float() / 255, batch["reference"].float() / 255, batch["mel"]
    truth = patchify(target, 2, 8)[:, gen.lower]
    with torch.no_grad():
        right = pixel_loss(gen(target, reference, mel), truth)
        wrong = pixel_loss(gen(target, reference, mel.roll(1, 0)), truth)  # each window gets another one's sound
    copy = pixel_loss(patchify(reference, 2, 8)[:, gen.lower], truth)
    assert right < 0.9 * copy and right < 0.98 * wrong, (float(right), float(wrong), float(copy))


def test_marlin_lipsync_dubs_a_real_face_video_and_muxes_the_new_sound(tmp_path: Path, capsys) -> None:
    from marlin import cli
    from marlin.video.io import probe_video, read_audio, read_video, write_video
    from marlin.viz.sample import make_sample_clip

    video = make_sample_clip(tmp_path / "face.mp4", n_frames=30)
    amp = loudness(40, 1)
    sound = write_video(tmp_path / "sound.mkv", talking_frames(amp), fps=25, audio=(talking_audio(amp), 16000))
    torch.manual_seed(0)
    gen = LipGenerator(TINY)
    torch.nn.init.normal_(gen.decoder.head.weight, std=0.05)
    torch.save(gen.checkpoint(), tmp_path / "gen.pt")
    out = tmp_path / "dubbed.mp4"
    assert cli.main(["lipsync", str(video), str(sound), "-o", str(out), "--model", str(tmp_path / "gen.pt")]) == 0
    info, (wav, ainfo) = probe_video(out), read_audio(out)
    assert info.n_frames == 40 and ainfo.duration_s == pytest.approx(1.6, abs=0.06)  # the sound's length: looped
    ref = talking_audio(amp)
    assert np.corrcoef(wav[800:24000], ref[800:24000])[0, 1] > 0.95
    before, after = read_video(video).astype(int), read_video(out).astype(int)
    diff = np.abs(after[:30] - before).mean((0, 3))  # [H, W]
    assert diff[:100].mean() < 2.5 and diff.max() > 20  # the upper frame as it was; the mouth redrawn
    assert cli.main(["lipsync", str(video), str(sound), "-o", str(out), "--model", str(tmp_path / "sound.mkv")]) == 2
    args = ["lipsync", str(video), str(sound), "-o", str(tmp_path / "guided.mp4"), "--model", str(tmp_path / "gen.pt")]
    assert cli.main([*args, "--guidance", "-1"]) == 2
    assert cli.main([*args, "--guidance", "2"]) == 0
    assert "without --sound-dropout" in capsys.readouterr().err  # no mouth for silence was learnt: said so
    guided = read_video(tmp_path / "guided.mp4").astype(int)
    assert np.abs(guided[:30] - after[:30]).mean() > 0.1  # guidance changed the drawing
