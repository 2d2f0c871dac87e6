"""marlin: MARLIN facial-video masked autoencoders as a library.

    from marlin import Marlin                       # drop-in for marlin-pytorch
    model = Marlin.from_online("marlin_vit_base_ytf")
    feats = model.extract_video("face.mp4", crop_face=True)

Boolean token masks everywhere in marlin are *visibility* masks: shape [B, N], True = the token is visible to the
encoder, False = hidden (to be reconstructed) — the convention of the released MARLIN code (see `marlin.mae.masking`).
"""

from typing import TYPE_CHECKING, Any

from .models.checkpoint import CheckpointError, read_checkpoint
from .models.config import MarlinConfig
from .models.model import LoadReport, Marlin, create_model, load
from .models.registry import get_config, list_models, register_model

if TYPE_CHECKING:
    from .video.features import open_features

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "LoadReport",
    "Marlin",
    "MarlinConfig",
    "create_model",
    "get_config",
    "list_models",
    "load",
    "open_features",
    "read_checkpoint",
    "register_model",
]


def __getattr__(name: str) -> Any:
    """`marlin.open_features`, imported on first use so that `import marlin` does not load the video stack."""
    if name == "open_features":
        from .video.features import open_features

        return open_features
    raise AttributeError(f"module 'marlin' has no attribute {name!r}")
