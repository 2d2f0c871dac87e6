"""Adversarial masked-autoencoder pretraining (`marlin pretrain`): config, data, step, loop, checkpoints."""

from .config import PretrainConfig, apply_overrides, load_config
from .pretrain import NonFiniteLossError, Pretrainer, TrainResult, train

__all__ = [
    "NonFiniteLossError",
    "PretrainConfig",
    "Pretrainer",
    "TrainResult",
    "apply_overrides",
    "load_config",
    "train",
]
