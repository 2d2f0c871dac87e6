"""Training the lip generator (``marlin lipsync-train``) on the engine that pretraining and the sync expert use.

Each optimiser step takes ``batch_size`` windows of :class:`marlin.lipsync.data.LipWindows` per process (a face
window, a reference window of the same video, the sound in sync with the face), draws the lower half from the upper
half + reference + sound, and minimises ``(1 - sync_weight) * pixel loss + sync_weight * sync loss + adv_weight *
adversarial loss`` (Wav2Lip's generator objective: the sync loss is ``-log P(in sync)`` of a frozen expert from
``marlin sync-train``, left out when no expert is given; the adversarial term is that of a lower-face critic,
:class:`marlin.lipsync.model.MouthCritic`, updated once per step with WGAN-GP like pretraining's patch critic).
Wav2Lip trains the pixel loss first and adds the others to the warm generator: ``init`` starts a run from a
``generator.pt``. Held-out videos give, every ``val_every`` steps and at the end: the error of the drawn mouth, that
of copying the reference mouth (the baseline the generator must beat), and P(in sync) of drawn and of real windows by
the expert and by an independent ``judge`` (a second expert that is never a loss).

Outputs in ``out``: ``last.pt`` (``--resume`` continues exactly where it stopped), ``generator.pt`` (read by
:func:`marlin.lipsync.model.load_generator` and ``marlin lipsync --model``), ``results.json``. torchrun-ready.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..mae.losses import critic_loss, generator_adv_loss, gradient_penalty
from ..mae.patches import patchify
from ..train.steprun import StepRun, VideoRunConfig, encoder_scaled_optimizer, run_to_end, split_videos
from ..utils.distributed import DistInfo, all_reduce_grads, broadcast_module
from ..utils.fileio import json_safe
from ..utils.precision import autocast
from ..utils.seeding import derive_seed
from .data import LipWindows
from .losses import PIXEL_LOSSES, critic_frames, drop_sound, expert_input, jitter_windows, pixel_loss, sync_loss
from .model import SILENCE_MEL, LipGenerator, MouthCritic

__all__ = ["LipsyncTrainConfig", "LipsyncTrainResult", "evaluate_generator", "lipsync_train"]

log = logging.getLogger("marlin")

GENERATOR_FILE = "generator.pt"
SYNC_TRAINS = ("all", "sound")


@dataclass
class LipsyncTrainConfig(VideoRunConfig):
    """Everything a ``marlin lipsync-train`` run depends on (stored in its checkpoints and ``results.json``); the
    shared fields are :class:`marlin.train.steprun.VideoRunConfig`'s."""

    pixel_loss: str = "mse"  # "l1" as Wav2Lip; why MSE: marlin.lipsync.losses.pixel_loss
    expert: str | None = None  # a marlin sync-train expert.pt: P(in sync) reported, a loss when sync_weight > 0
    # Wav2Lip uses 0.03 once its generator is warm. Why 0 here: against our raw-pixel expert (a linear map of pooled
    # grey pixels) a weight of 0.03 raised P(in sync) of drawn mouths from 0.01 to 0.78 in 140 steps while their
    # error grew (L1 0.044 vs 0.034 for copying the reference): the generator learned to fool the expert.
    sync_weight: float = 0.0
    # Random whole-pixel offsets of the drawn windows before the expert scores them (losses.jitter_windows): what
    # fools one expert at one position rarely survives a move; 0: off.
    sync_jitter: int = 0
    # What the sync loss may train: "all" (Wav2Lip) or "sound", only the sound trunk and its projection, so that the
    # drawing itself (encoder, decoder) learns from pixels alone and has no way to draw patterns that fool the expert.
    sync_trains: str = "all"
    judge: str | None = None  # a second expert, never a loss: its P(in sync) in validation (is the loss's fooled?)
    init: str | None = None  # a generator.pt to start from (Wav2Lip adds the sync loss once the generator is warm)
    still_upper: bool = False  # the encoder sees one still upper half per window (why: marlin.lipsync.model); kept
    # when `init` was trained so
    expert_audio: bool = False  # start the sound trunk from the expert's, which already hears what mouths do
    # Weight of the adversarial term: a critic (model.MouthCritic, WGAN-GP) scores drawn vs real lower faces (moved by
    # up to sync_jitter pixels), so that flaws an expert can be fooled with (seams, stripes) cost something; 0: none.
    adv_weight: float = 0.0
    gp_weight: float = 10.0  # the critic's gradient penalty (WGAN-GP's usual 10)
    # Critic updates per generator step: with 1 ours barely told drawn from real; WGAN-GP uses 5, slower here.
    critic_steps: int = 3
    critic_frames: int = 4  # frames of each window the critic scores (evenly spaced): all 16 cost ~4x as much
    # Share of training windows drawn with silence instead of their sound (losses.drop_sound), so the generator learns
    # the mouth of "no sound", which sound guidance (--guidance of marlin lipsync) extrapolates away from; 0: off.
    sound_dropout: float = 0.0
    # Channels of a conv net that redraws the decoder's patches as whole lower-face frames (model.BorderRefiner), so
    # neighbouring patches meet instead of drawing the patch grid; with `init`, added to a generator that has none
    # (it starts as the identity). 0: none, the patches are the drawing.
    refine: int = 0
    steps: int = 3000

    def checks(self) -> list[tuple[bool, str]]:
        return [*super().checks(),
                (0 <= self.sync_weight < 1, f"sync weight must be in [0, 1), got {self.sync_weight}"),
                (self.sync_jitter >= 0, f"sync jitter must be >= 0 pixels, got {self.sync_jitter}"),
                (self.sync_trains in SYNC_TRAINS, f"sync_trains must be one of {SYNC_TRAINS}"),
                (self.adv_weight >= 0, f"adversarial weight must be >= 0, got {self.adv_weight}"),
                (self.critic_steps >= 1, f"critic steps must be >= 1, got {self.critic_steps}"),
                (self.critic_frames >= 1, f"critic frames must be >= 1, got {self.critic_frames}"),
                (0 <= self.sound_dropout < 1, f"sound dropout must be in [0, 1), got {self.sound_dropout}"),
                (self.refine >= 0, f"refiner channels must be >= 0, got {self.refine}"),
                (self.pixel_loss in PIXEL_LOSSES, f"pixel loss must be one of {PIXEL_LOSSES}")]  # fmt: skip


@dataclass
class LipsyncTrainResult:
    generator: LipGenerator
    history: list[dict[str, float]] = field(default_factory=list)
    val: dict[str, float] | None = None
    step: int = 0
    stopped_by: int = 0
    checkpoint: Path | None = None


def load_frozen_expert(path: str, generator: LipGenerator, device: torch.device) -> Any:
    """The sync expert for the loss: eval mode, no parameter gradients; refused when its windows differ from the
    generator's (frames, mel length)."""
    from ..sync.expert import load_expert

    expert = load_expert(path, map_location=device).requires_grad_(False)
    if expert.clip_frames != generator.clip_frames or expert.mel_length != generator.mel_length:
        raise ValueError(f"{path}: the expert reads {expert.clip_frames}-frame windows with {expert.mel_length} mel "
                         f"steps, the generator {generator.clip_frames} with {generator.mel_length}; train an expert "
                         "with the same clip length and fps")  # fmt: skip
    return expert


def warm_generator(path: str, fps: float, refine: int = 0) -> LipGenerator:
    """The generator of `path` (a ``generator.pt``) in train mode, to continue training (``init``), given a new
    refiner of `refine` channels when it has none; refused when it was trained for another frame rate or has a
    refiner of another width."""
    from .model import load_generator

    gen = load_generator(path)
    if gen.fps != fps:
        raise ValueError(f"{path}: the generator was trained at {gen.fps:g} fps, this run is at {fps:g} (--fps)")
    if refine and gen.refine and gen.refine != refine:
        raise ValueError(f"{path}: the generator's refiner has {gen.refine} channels, this run asks for {refine}")
    if refine and not gen.refine:
        gen.add_refiner(refine)
    return gen.train()


def take_expert_audio(gen: LipGenerator, expert: Any) -> None:
    """Copy the expert's mel trunk (:class:`marlin.sync.expert.MelSteps`, without its embedding head) into the
    generator's; refused without an expert or when their widths differ."""
    if expert is None:
        raise ValueError("expert_audio needs an expert (--expert)")
    trunk = {k: v for k, v in expert.audio.state_dict().items() if not k.startswith("proj.")}
    if expert.audio_width != gen.audio_width:
        raise ValueError(f"the expert's sound trunk is {expert.audio_width} wide, the generator's {gen.audio_width}")
    gen.audio.load_state_dict(trunk)


def window_losses(gen: LipGenerator, batch: dict[str, Tensor], expert: Any, sync_weight: float,
                  device: torch.device, net: nn.Module | None = None, kind: str = "mse", jitter: int = 0,
                  rng: torch.Generator | None = None, sound_dropout: float = 0.0) -> dict[str, Tensor]:  # fmt: skip
    """Loss terms of one batch: the drawn lower-half patches ``pred``, ``mse`` and ``l1`` of the drawn mouth,
    ``ref_mse`` and ``ref_l1`` of copying the reference (the baseline), ``sync`` and ``p_sync`` (when an expert is
    given) and the weighted ``loss`` (`kind` is the pixel term). `net` runs the forward pass when given (the DDP
    wrapper of `gen`); the expert sees the drawn windows moved by up to `jitter` pixels (drawn from `rng`), and
    the generator hears silence instead of a window's sound with probability `sound_dropout` (the expert always
    hears the sound)."""
    c = gen.config
    target = batch["target"].to(device, non_blocking=True).float().div_(255.0)  # [B, 3, T, S, S]
    reference = batch["reference"].to(device, non_blocking=True).float().div_(255.0)
    mel = batch["mel"].to(device, non_blocking=True)  # [B, 80, L]
    pred = (net or gen)(target, reference, drop_sound(mel, sound_dropout, SILENCE_MEL, rng))  # [B, N_lower, patch_dim]
    truth = patchify(target, c.tubelet_size, c.patch_size)[:, gen.lower]
    ref = patchify(reference, c.tubelet_size, c.patch_size)[:, gen.lower]
    out = {
        "pred": pred,
        "mse": pixel_loss(pred, truth, "mse"),
        "l1": pixel_loss(pred, truth, "l1"),
        "ref_mse": pixel_loss(ref, truth, "mse").detach(),
        "ref_l1": pixel_loss(ref, truth, "l1").detach(),
    }
    if expert is None:
        out["loss"] = out[kind]
        return out
    with torch.set_grad_enabled(torch.is_grad_enabled() and sync_weight > 0):  # weight 0: a report only
        drawn = jitter_windows(gen.compose(target, pred), jitter, rng)  # [B, 3, T, S, S]
        out["sync"], out["p_sync"] = sync_loss(expert, drawn, mel)
    out["loss"] = (1 - sync_weight) * out[kind] + sync_weight * out["sync"]
    return out


@torch.no_grad()
def evaluate_generator(gen: LipGenerator, data: LipWindows, *, expert: Any = None, judge: Any = None,
                       batch_size: int = 8, workers: int = 0,
                       device: torch.device | str = "cpu") -> dict[str, float]:  # fmt: skip
    """Held-out means: ``mse`` / ``l1`` of the drawn mouth, ``ref_mse`` / ``ref_l1`` of the copied reference mouth,
    ``mse_other_sound`` of mouths drawn with another window's sound (batches of 2 or more; about ``mse``: the sound
    is not used) and, with an expert, ``p_sync`` of drawn windows and ``p_sync_real`` of the real ones (with a
    judge too: ``p_sync_judge`` and ``p_sync_judge_real``)."""
    gen.eval()
    device = torch.device(device)
    sums: dict[str, float] = {}
    n = 0
    for batch in DataLoader(data, batch_size=batch_size, num_workers=workers, pin_memory=device.type == "cuda"):
        terms = window_losses(gen, batch, None, 0.0, device)
        b = len(batch["mel"])
        if b > 1:  # each window drawn with another one's sound: as good as with its own means a deaf generator
            terms["mse_other_sound"] = window_losses(gen, {**batch, "mel": batch["mel"].roll(1, 0)}, None, 0.0,
                                                     device)["mse"]  # fmt: skip
        for suffix, scorer in (("", expert), ("_judge", judge)):
            if scorer is not None:
                terms.update(_p_sync(gen, scorer, batch, terms["pred"], device, suffix))
        for k, v in terms.items():
            if k in ("mse", "ref_mse", "l1", "ref_l1", "mse_other_sound") or k.startswith("p_sync"):
                sums[k] = sums.get(k, 0.0) + float(v) * b
        n += b
    return {k: v / max(n, 1) for k, v in sums.items()}


def _p_sync(gen: LipGenerator, expert: Any, batch: dict[str, Tensor], drawn: Tensor, device: torch.device,
            suffix: str) -> dict[str, Tensor]:  # fmt: skip
    """Mean P(in sync) of a batch's drawn windows and of its real ones, by one expert."""
    mel = batch["mel"].to(device)[:, None]  # [B, 1, 80, L]
    real = batch["target"].to(device).float().div_(255.0)  # [B, 3, T, S, S]
    drawn_windows = gen.compose(real, drawn)
    return {f"p_sync{suffix}": expert(expert_input(expert, drawn_windows), mel)[:, 0].sigmoid().mean(),
            f"p_sync{suffix}_real": expert(expert_input(expert, real), mel)[:, 0].sigmoid().mean()}  # fmt: skip


class _LipRun(StepRun):
    """One ``marlin lipsync-train`` run: data, generator (+ frozen expert), optimiser and the training step (the
    rest: StepRun)."""

    name = "lipsync-train"

    def __init__(self, cfg: LipsyncTrainConfig, dist: DistInfo, encoder: nn.Module | None) -> None:
        from ..models.model import from_spec

        self.cfg, self.dist = cfg, dist
        self.train_videos, self.val_videos = split_videos(cfg)
        if cfg.init:
            torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical new parts (a refiner) on every rank
            self.gen = warm_generator(cfg.init, cfg.fps, cfg.refine).to(dist.device)
        else:
            if encoder is None:
                encoder = from_spec(cfg.model, full=False, random_init=cfg.random_init).encoder
            torch.manual_seed(derive_seed(cfg.seed, "init"))  # identical new parts on every rank
            self.gen = LipGenerator(encoder.config, encoder=encoder, fps=cfg.fps, refine=cfg.refine).to(dist.device)
        self.model = self.gen
        self.gen.still_upper = self.gen.still_upper or cfg.still_upper  # a warm start keeps its generator's
        self.expert = load_frozen_expert(cfg.expert, self.gen, dist.device) if cfg.expert else None
        if cfg.expert_audio:
            take_expert_audio(self.gen, self.expert)
        self.judge = load_frozen_expert(cfg.judge, self.gen, dist.device) if cfg.judge else None
        c = self.gen.config
        common = dict(clip_frames=c.clip_frames, size=c.img_size, mel_length=self.gen.mel_length,
                      crop_face=cfg.crop_face, detector=cfg.detector, seed=cfg.seed)  # fmt: skip
        self.train_set = LipWindows(self.train_videos, **common)
        self.val_set = LipWindows(self.val_videos, train=False, **common) if self.val_videos else None
        self.optimizer = encoder_scaled_optimizer(self.gen, self.gen.encoder, cfg)
        self.critic = self.d_opt = None
        if cfg.adv_weight > 0:
            side = self.gen.config.img_size
            self.critic = MouthCritic(side - self.gen.top, side).to(dist.device)
            broadcast_module(self.critic)
            self.d_opt = torch.optim.AdamW(self.critic.parameters(), lr=cfg.lr, betas=(0.5, 0.9), weight_decay=0.0)
        self.start()

    def extra_state(self) -> dict[str, Any]:
        return {"critic": self.critic, "critic_optimizer": self.d_opt} if self.critic is not None else {}

    def train_step(self, micro: list[dict[str, Tensor]]) -> dict[str, float]:
        self.net.train()
        cfg, batch = self.cfg, micro[0]
        rng = torch.Generator().manual_seed(derive_seed(cfg.seed, "jitter", self.step, self.dist.rank))
        with autocast(self.dist.device, cfg.precision):
            terms = window_losses(self.gen, batch, self.expert, cfg.sync_weight, self.dist.device, self.net,
                                  cfg.pixel_loss, cfg.sync_jitter, rng, cfg.sound_dropout)  # fmt: skip
            pred = terms.pop("pred")
            if self.critic is not None:
                real = batch["target"].to(self.dist.device).float().div_(255.0)  # [B, 3, T, S, S]
                terms.update(self.critic_step(real, self.gen.compose(real, pred.detach()), rng))
                terms["adv"] = self.adversarial(self.gen.compose(real, pred), rng)
                terms["loss"] = terms["loss"] + cfg.adv_weight * terms["adv"]
        if not torch.isfinite(terms["loss"]):
            raise RuntimeError(f"non-finite lipsync-train loss at step {self.step + 1}: lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(terms)
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(self.params, cfg.clip_grad)
        self.optimizer.step()
        means = {k: float(v.detach().float().mean()) for k, v in terms.items()}
        self.record(means, len(batch["mel"]))
        return means

    def backward(self, terms: dict[str, Tensor]) -> None:
        """Gradients of the step's loss; with ``sync_trains="sound"`` those of the sync term reach only the sound
        trunk and its projection (the sync term first, without a DDP all-reduce; the rest then reduces both, the
        pattern of gradient accumulation)."""
        cfg = self.cfg
        if cfg.sync_trains == "all" or "sync" not in terms or cfg.sync_weight == 0:
            terms["loss"].backward()
            return
        sync = cfg.sync_weight * terms["sync"]
        with self.net.no_sync() if isinstance(self.net, DistributedDataParallel) else contextlib.nullcontext():
            sync.backward(retain_graph=True)
        sound = {id(q) for m in (self.gen.audio, self.gen.audio_to_dec) for q in m.parameters()}
        for q in self.params:
            if id(q) not in sound:
                q.grad = None
        (terms["loss"] - sync).backward()

    def _critic_input(self, windows: Tensor, rng: torch.Generator) -> Tensor:
        t = windows.shape[2]
        step = max(t // self.cfg.critic_frames, 1)
        start = int(torch.randint(0, step, (1,), generator=rng))
        return critic_frames(windows[:, :, start::step], self.gen.top, self.cfg.sync_jitter, rng)  # [B, T', 3 * H * S]

    def critic_step(self, real: Tensor, drawn: Tensor, rng: torch.Generator) -> dict[str, Tensor]:
        """``critic_steps`` WGAN-GP updates of the critic on real vs drawn (detached) windows ``[B, 3, T, S, S]``,
        each at new random offsets; the last one's losses."""
        for _ in range(self.cfg.critic_steps):
            real_p, fake_p = self._critic_input(real, rng), self._critic_input(drawn, rng)  # [B, T', 3 * H * S]
            d_loss = critic_loss(self.critic(real_p), self.critic(fake_p))
            gp = gradient_penalty(self.critic, real_p, fake_p, torch.rand(1, generator=rng).item())
            self.d_opt.zero_grad(set_to_none=True)
            (d_loss + self.cfg.gp_weight * gp).backward()
            if not torch.isfinite(d_loss + gp):
                raise RuntimeError(f"non-finite critic loss at step {self.step + 1}: lower --lr")
            all_reduce_grads(self.critic.parameters())
            self.d_opt.step()
        return {"critic": d_loss.detach(), "gp": gp.detach()}

    def adversarial(self, drawn: Tensor, rng: torch.Generator) -> Tensor:
        """The generator's side: ``-mean(critic score)`` of its drawn windows, the critic frozen."""
        self.critic.requires_grad_(False)
        adv = generator_adv_loss(self.critic(self._critic_input(drawn, rng)))
        self.critic.requires_grad_(True)
        return adv

    def log_line(self, rec: dict[str, float], rate: float) -> str:
        sync = f", sync loss {rec['sync']:.4f}, P(in sync) {rec['p_sync']:.3f}" if "sync" in rec else ""
        if "adv" in rec:
            sync += f", adversarial {rec['adv']:.3f} (critic {rec['critic']:.3f}, gp {rec['gp']:.3f})"
        return (f"MSE {rec['mse']:.5f}, L1 {rec['l1']:.4f} (copying the reference: {rec['ref_mse']:.5f}, "
                f"{rec['ref_l1']:.4f}){sync}, lr {rec['lr']:.3g}, {rate:.1f} windows/s")  # fmt: skip

    def evaluate(self) -> dict[str, float]:
        """Drawn vs copied-reference MSE and L1; the expert's P(in sync) of drawn and real windows."""
        return evaluate_generator(self.gen, self.val_set, expert=self.expert, judge=self.judge,
                                  batch_size=self.cfg.batch_size, workers=self.cfg.workers,
                                  device=self.dist.device)  # fmt: skip


def lipsync_train(cfg: LipsyncTrainConfig, *, resume: bool = False,
                  encoder: nn.Module | None = None) -> LipsyncTrainResult:  # fmt: skip
    """Train a lip generator (one process, or every rank of a torchrun job); see the module docstring.

    ``resume`` continues ``out/last.pt``; without it an existing ``last.pt`` is refused rather than overwritten.
    `encoder` replaces loading ``cfg.model`` (library use, tests).
    """

    def describe(run: StepRun) -> str:
        sync = f"x{cfg.sync_weight} ({cfg.expert}, jitter {cfg.sync_jitter} px)" if cfg.expert else "off"
        sync += f", judge {cfg.judge}" if cfg.judge else ""
        sync += f", adversarial x{cfg.adv_weight}" if cfg.adv_weight else ""
        sync += f", starting from {cfg.init}" if cfg.init else ""
        return (f"{run.model.config.name}: {len(run.train_videos)} train / {len(run.val_videos)} val videos, steps "
                f"{run.step}..{cfg.steps}, batch {cfg.batch_size} x {run.dist.world_size} ranks, sync loss {sync}, "
                f"device {run.dist.device}")  # fmt: skip

    run, stopped_by = run_to_end(lambda dist: _LipRun(cfg, dist, encoder), cfg, resume, describe)
    result = LipsyncTrainResult(run.gen, run.history, val=run.val if not stopped_by else None, step=run.step,
                                stopped_by=stopped_by)  # fmt: skip
    if not stopped_by:
        ckpt = run.gen.checkpoint(step=run.step, val_metrics=json_safe(run.val), train_config=json_safe(cfg.to_dict()),
                                  crop_face=cfg.crop_face, detector=cfg.detector)  # fmt: skip
        result.checkpoint = run.write_outputs(ckpt, GENERATOR_FILE, "generator")
    return result
