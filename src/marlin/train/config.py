"""Pretraining configuration: a dataclass family that is the single source of truth for a run.

Native YAML mirrors the dataclasses (every section optional, unknown keys refused)::

    model: marlin_vit_small            # a registered name, or a mapping of MarlinConfig fields ({name: ..., ...})
    batch_size: 16                     # per process and micro-step; global batch = batch_size * accum * world
    epochs: 2000
    mask: {strategy: fasking, ratio: 0.9}
    loss: {adv_weight: 0.01, gp_weight: 0.0, d_steps: 1, g_steps: 1}
    optim: {lr: 1.5e-4, min_lr: 1.0e-5, warmup_epochs: 40, betas: [0.9, 0.95]}

The official MARLIN files (``config/pretrain/marlin_vit_{small,base,large}.yaml``) are accepted as they are and
translated by :meth:`PretrainConfig.from_official_yaml`. Any field can then be overridden with ``dotted.key=value``
strings (:func:`apply_overrides`), values parsed as YAML: ``optim.lr=3e-4``, ``model.encoder_depth=6``,
``mask.strategy=tube``, ``optim.betas=[0.9,0.999]``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..data.sampling import BALANCE
from ..mae.masking import STRATEGIES, num_visible
from ..models.config import MarlinConfig
from ..models.registry import get_config, list_models
from ..utils.precision import TRAIN_PRECISIONS
from ..utils.schedule import CosineSchedule

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "LogConfig",
    "LossConfig",
    "MaskConfig",
    "OptimConfig",
    "PretrainConfig",
    "ValConfig",
    "apply_overrides",
    "build_schedule",
    "load_config",
]


@dataclass
class DataConfig:
    """Where clips come from and how they are sampled."""

    source: str = "synthetic"  # a `marlin prepare` store, "synthetic", or a directory / glob of video files
    temporal_sample_rate: int = 2  # frames between the sampled frames of a clip (official: 2)
    window_stride: int = 16  # frames between the starts of consecutive windows cut from one video file
    num_workers: int = 2  # DataLoader worker processes per rank
    synthetic_size: int = 256  # clips in the synthetic dataset
    cache: bool = False  # keep decoded video windows in memory (per worker; small video datasets only)
    # "none": every clip once per epoch; "store" / "group": draw so that each store / each identity group of the
    # stores is as frequent as any other. Why: one speaker's 800 GRID clips beside 126 clips of ~90 other people
    # trained a model of that speaker (unseen people reconstructed worse than predicting each patch's mean)
    balance: str = "none"


@dataclass
class MaskConfig:
    strategy: str = "fasking"  # one of marlin.mae.masking.STRATEGIES
    ratio: float = 0.9  # fraction of tokens hidden


@dataclass
class LossConfig:
    adversarial: bool = True  # add the patch critic (official `adv_loss`)
    adv_weight: float = 0.01  # weight of -mean(D(pred)) in the generator loss
    gp_weight: float = 0.0  # gradient penalty weight of the critic loss
    d_steps: int = 1  # critic updates per iteration
    g_steps: int = 1  # generator updates per iteration
    norm_target: bool = False  # per-patch normalised targets (VideoMAE); the released models use raw pixels


@dataclass
class OptimConfig:
    """AdamW for the encoder/decoder and the critic, both on the same schedule (as the official trainer)."""

    type: str = "AdamW"  # "AdamW" or "Adam"
    lr: float = 1.5e-4  # peak learning rate per 256 samples of global batch (when scale_lr)
    warmup_lr: float = 1e-6  # learning rate at step 0, per 256 samples
    min_lr: float = 1e-5  # final learning rate of the cosine, per 256 samples
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None  # overrides warmup_epochs when set
    weight_decay: float = 0.0  # biases, norms and the mask token never decay
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    scale_lr: bool = True  # multiply lr, warmup_lr and min_lr by global_batch / 256 (official)
    clip_grad: float | None = None  # max gradient norm of each model, None = no clipping


@dataclass
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at the end)
    keep: int = 2  # numbered checkpoints kept besides last.pt (0 = only last.pt)
    export: bool = True  # at the end, write the encoder / full model in the official and marlin layouts


@dataclass
class LogConfig:
    every: int = 10  # steps between console lines
    image_every: int = 500  # steps between ground truth | masked | reconstruction images (0 = never)
    tensorboard: bool = True  # TensorBoard scalars/images when tensorboard is installed (JSONL always)
    max_nonfinite: int = 5  # stop after this many consecutive steps with a NaN/inf loss


@dataclass
class ValConfig:
    """Held-out reconstruction error while pretraining (see marlin.train.validate): learning vs memorising."""

    source: str | None = "auto"  # "auto" = the val split of the training store(s); a store / videos; "none" = off
    every: int = 500  # steps between evaluations (one more at the end of the run)
    max_clips: int = 64  # held-out clips evaluated, spread evenly over the held-out set (one centred window each)


def _default_model() -> MarlinConfig:
    return get_config("marlin_vit_base")


@dataclass
class PretrainConfig:
    """A whole pretraining run. `model` is a MarlinConfig; the rest are plain values (see the module docstring)."""

    model: MarlinConfig = field(default_factory=_default_model)
    init: str | None = None  # VideoMAE or marlin checkpoint to start from (encoder/decoder weights only)
    epochs: float = 2000.0
    max_steps: int | None = None  # overrides epochs when set
    # end this session at this step, checkpoint saved, the schedule still spanning the whole run (time-sliced
    # compute, or a budget shorter than the schedule); --resume goes on from there. None = run to the end
    stop_at: int | None = None
    batch_size: int = 16  # per process and micro-step
    accum_steps: int = 1  # micro-steps per optimiser step
    seed: int = 0
    # "auto" (bf16 where the device has bf16 matmuls, else fp32: `training_precision`), "fp32" or "bf16" (autocast;
    # master weights and losses stay float32)
    precision: str = "auto"
    grad_checkpointing: bool = False  # recompute encoder activations in the backward pass
    # torch.compile each transformer block (`Marlin.compile_blocks`): for long runs on GPUs; the first steps compile
    compile: bool = False
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK when available, else cpu), "cpu", "cuda"
    out_dir: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ckpt: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    val: ValConfig = field(default_factory=ValConfig)

    def __post_init__(self) -> None:
        checks = [
            (
                self.mask.strategy in STRATEGIES,
                f"mask.strategy must be one of {STRATEGIES}, found {self.mask.strategy!r}",
            ),
            (0.0 < self.mask.ratio < 1.0, f"mask.ratio must be in (0, 1), found {self.mask.ratio}"),
            (self.precision in TRAIN_PRECISIONS, f"precision must be auto, fp32 or bf16, found {self.precision!r}"),
            (self.optim.type in ("AdamW", "Adam"), f"optim.type must be 'AdamW' or 'Adam', found {self.optim.type!r}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, found {self.batch_size}"),
            (self.accum_steps >= 1, f"accum_steps must be >= 1, found {self.accum_steps}"),
            (self.loss.d_steps >= 1 and self.loss.g_steps >= 1, "loss.d_steps and loss.g_steps must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, f"max_steps must be >= 1, found {self.max_steps}"),
            (self.stop_at is None or self.stop_at >= 1, f"stop_at must be >= 1, found {self.stop_at}"),
            (self.epochs > 0, f"epochs must be > 0, found {self.epochs}"),
            (self.ckpt.every >= 1 and self.log.every >= 1, "ckpt.every and log.every must be >= 1"),
            (self.val.every >= 1 and self.val.max_clips >= 1, "val.every and val.max_clips must be >= 1"),
            (self.data.balance in BALANCE, f"data.balance must be one of {BALANCE}, found {self.data.balance!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid PretrainConfig: {msg}")
        n = self.model.num_tokens
        try:
            n_vis = num_visible(n, self.mask.ratio)
        except ValueError:
            n_vis = 0
        if not 1 <= n_vis < n:
            raise ValueError(
                f"invalid PretrainConfig: mask.ratio={self.mask.ratio} leaves {n_vis} of {n} tokens of "
                f"{self.model.name!r} visible; expected at least one visible and one hidden"
            )

    # ---- derived ---------------------------------------------------------------------------------------------------
    def global_batch(self, world_size: int = 1) -> int:
        """Samples per optimiser step over all processes."""
        return self.batch_size * self.accum_steps * world_size

    def lr_scale(self, world_size: int = 1) -> float:
        return self.global_batch(world_size) / 256 if self.optim.scale_lr else 1.0

    # ---- storage ---------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        d["optim"]["betas"] = list(self.optim.betas)
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "config") -> PretrainConfig:
        """Build from a (nested) dict, converting YAML scalars to the field types; unknown keys are refused."""
        return _build(cls, d, where)

    @classmethod
    def from_official_yaml(cls, d: dict[str, Any], where: str = "official config") -> PretrainConfig:
        """Translate an official MARLIN pretraining YAML (already parsed) into a native config."""
        unknown = sorted(set(d) - _OFFICIAL_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown official key(s) {unknown}; expected some of {sorted(_OFFICIAL_KEYS)}")
        model = MarlinConfig.from_official_yaml(d)
        lr = dict(d.get("learning_rate") or {})
        opt = dict(d.get("optimizer") or {})
        native: dict[str, Any] = {
            "model": model.to_dict(),
            "data": {"temporal_sample_rate": d.get("temporal_sample_rate", 2)},
            "mask": {"strategy": d.get("mask_strategy", "fasking"), "ratio": d.get("mask_percentage_target", 0.9)},
            "loss": {
                k: d[o]
                for k, o in (
                    ("adversarial", "adv_loss"),
                    ("adv_weight", "adv_weight"),
                    ("gp_weight", "gp_weight"),
                    ("d_steps", "d_steps"),
                    ("g_steps", "g_steps"),
                )
                if o in d
            },
            "optim": {
                k: v
                for k, v in {
                    "lr": lr.get("base"),
                    "warmup_lr": lr.get("warmup"),
                    "min_lr": lr.get("min"),
                    "warmup_epochs": lr.get("warmup_epochs"),
                    "type": opt.get("type"),
                    "eps": opt.get("eps"),
                    "betas": opt.get("betas"),
                    "weight_decay": d.get("weight_decay"),
                }.items()
                if v is not None
            },
        }
        return cls.from_dict(native, where)


# Keys of the official pretraining YAML (config/pretrain/marlin_vit_*.yaml); `feature_dir` only names the folder the
# official evaluation scripts write features to and has no effect on pretraining.
_OFFICIAL_KEYS = {
    "model_name", "img_size", "patch_size", "clip_frames", "n_frames", "tubelet_size", "mask_strategy",
    "temporal_sample_rate", "mask_percentage_target", "mlp_ratio", "qkv_bias", "qk_scale", "drop_rate",
    "attn_drop_rate", "norm_layer", "init_values", "weight_decay", "feature_dir", "adv_loss", "adv_weight",
    "gp_weight", "d_steps", "g_steps", "learning_rate", "optimizer", "encoder", "decoder",
}  # fmt: skip


def _is_official(d: dict[str, Any]) -> bool:
    return "model_name" in d or isinstance(d.get("learning_rate"), dict) or isinstance(d.get("encoder"), dict)


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """A config from a native or official YAML file, or a registered model name (defaults otherwise), + overrides."""
    if source is None:
        return PretrainConfig.from_dict(_apply(PretrainConfig().to_dict(), overrides), "overrides")
    if Path(source).expanduser().is_file():
        path = Path(source).expanduser()
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if d is None:  # an empty file (e.g. a run's config.yaml cut short by a full disk) is not "all defaults"
            raise ValueError(f"{path}: the config file is empty; expected a YAML mapping of settings")
        if not isinstance(d, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, found {type(d).__name__}")
        cfg = (
            PretrainConfig.from_official_yaml(d, str(path))
            if _is_official(d)
            else PretrainConfig.from_dict(d, str(path))
        )
    elif str(source) in list_models():
        d = PretrainConfig().to_dict()
        d["model"] = get_config(str(source)).to_dict()
        return PretrainConfig.from_dict(_apply(d, overrides), "overrides")
    else:
        raise FileNotFoundError(
            f"{source}: no such config file, and not a registered model ({', '.join(list_models())})"
        )
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: PretrainConfig, overrides: Sequence[str]) -> PretrainConfig:
    """Return a new config with ``dotted.key=value`` overrides applied (values parsed as YAML, then type-checked)."""
    if not overrides:
        return cfg
    return PretrainConfig.from_dict(_apply(cfg.to_dict(), overrides), "overrides")


def _apply(d: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected dotted.key=value (e.g. optim.lr=3e-4)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        parts = key.strip().split(".")
        node = d
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ValueError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = node[part]
        if parts[-1] not in node:
            raise ValueError(f"override {item!r}: unknown key {key!r}; valid here: {sorted(node)}")
        if parts == ["model"] and isinstance(value, str):  # switch architecture by registered name
            value = get_config(value).to_dict()
        node[parts[-1]] = value
    return d


# ---- dict -> dataclass with type conversion ------------------------------------------------------------------------
def _build(cls: type, d: Any, where: str) -> Any:
    if cls is MarlinConfig:
        return _build_model(d, where)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: expected a mapping for {cls.__name__}, found {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown} in {cls.__name__}; expected some of {names}")
    kwargs = {k: _convert(v, hints[k], f"{where}: {k}") for k, v in d.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _build_model(d: Any, where: str) -> MarlinConfig:
    if isinstance(d, MarlinConfig):
        return d
    if isinstance(d, str):
        return get_config(d)
    if not isinstance(d, dict):
        raise ValueError(f"{where}: model must be a registered name or a mapping of MarlinConfig fields, found {d!r}")
    d = dict(d)
    name = d.get("name")
    base = get_config(name).to_dict() if name in list_models() else {}
    base.update(d)
    return MarlinConfig.from_dict(base)


def _convert(value: Any, hint: Any, where: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, where)
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, list | tuple) or len(value) != len(args):
            raise ValueError(f"{where} must be a list of {len(args)} values, found {value!r}")
        return tuple(_convert(v, a, where) for v, a in zip(value, args, strict=True))
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise ValueError(f"{where} must be {hint.__name__}, found {value!r}")


# ---- the learning-rate schedule of a run ---------------------------------------------------------------------------
def total_steps(cfg: PretrainConfig, steps_per_epoch: float) -> int:
    """Optimiser steps of the run: `max_steps`, else `ceil(epochs * steps_per_epoch)`."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * steps_per_epoch))


def build_schedule(cfg: PretrainConfig, steps_per_epoch: float, world_size: int = 1) -> CosineSchedule:
    """The run's schedule; rates are scaled by global_batch / 256 when `optim.scale_lr` (official)."""
    o = cfg.optim
    scale = cfg.lr_scale(world_size)
    total = total_steps(cfg, steps_per_epoch)
    warmup = o.warmup_steps if o.warmup_steps is not None else round(o.warmup_epochs * steps_per_epoch)
    return CosineSchedule(o.lr * scale, o.min_lr * scale, o.warmup_lr * scale, min(warmup, total), total)
