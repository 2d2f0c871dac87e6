"""The patch critic of MARLIN's adversarial loss."""

from __future__ import annotations

from torch import Tensor, nn

from ..models.config import MarlinConfig
from ..models.layers import WrappedLinear

__all__ = ["PatchCritic"]


class PatchCritic(nn.Module):
    """MLP ``patch_dim -> hidden -> 1`` with LeakyReLU, scoring every patch on its own (a WGAN critic, no sigmoid).

    The released configs use ``hidden = decoder_embed_dim * mlp_ratio`` (1536 for ViT-B). Parameter names match the
    official Lightning checkpoints' ``discriminator.*`` entries; the layers keep PyTorch's default initialisation, as
    the official critic does.
    """

    def __init__(self, patch_dim: int, hidden: int, negative_slope: float = 0.01) -> None:
        super().__init__()
        self.layers = nn.ModuleList([WrappedLinear(patch_dim, hidden), WrappedLinear(hidden, 1)])
        self.act = nn.LeakyReLU(negative_slope)

    @classmethod
    def from_config(cls, config: MarlinConfig) -> PatchCritic:
        return cls(config.patch_dim, int(config.decoder_embed_dim * config.mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:  # [..., patch_dim] -> [..., 1]
        return self.layers[1](self.act(self.layers[0](x)))
