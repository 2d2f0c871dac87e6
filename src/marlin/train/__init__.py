"""Everything that runs an optimiser over an encoder: the shared engine, pretraining (`marlin pretrain`), fine-tuning
(`marlin finetune`), their configs, held-out evaluation and checkpoints."""

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
