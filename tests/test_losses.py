"""The pretraining objective: reconstruction MSE, WGAN critic / generator losses, gradient penalty, the critic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from marlin import get_config
from marlin.mae.critic import PatchCritic
from marlin.mae.losses import critic_loss, generator_adv_loss, gradient_penalty, masked_targets, reconstruction_loss
from marlin.mae.patches import normalize_patches, patchify


def test_reconstruction_loss_is_mse_in_float32() -> None:
    pred, target = torch.randn(2, 7, 12), torch.rand(2, 7, 12)
    torch.testing.assert_close(reconstruction_loss(pred, target), nn.MSELoss()(pred, target))
    assert reconstruction_loss(pred.bfloat16(), target).dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(pred, target[:, :3])


def test_adversarial_losses_by_hand() -> None:
    real = torch.tensor([[[1.0], [3.0]]])  # mean 2
    fake = torch.tensor([[[-1.0], [0.0]], [[1.0], [4.0]]])  # mean 1
    assert critic_loss(real, fake).item() == pytest.approx(1.0 - 2.0)
    assert generator_adv_loss(fake).item() == pytest.approx(-1.0)


def test_gradient_penalty_of_a_linear_critic_is_exact_and_trains_the_critic() -> None:
    critic = nn.Linear(6, 1)
    real, fake = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    gp = gradient_penalty(critic, real, fake, alpha=torch.tensor(0.3))
    expected = (critic.weight.norm() - 1) ** 2  # the gradient is the weight row for every patch
    torch.testing.assert_close(gp, expected)
    gp.backward()
    assert critic.weight.grad is not None and critic.weight.grad.abs().sum() > 0


def test_masked_targets_raw_and_normalized() -> None:
    video = torch.rand(2, 3, 4, 32, 32)
    visible = torch.zeros(2, 8, dtype=torch.bool)
    visible[:, [0, 5]] = True
    raw = masked_targets(video, visible, 2, 16)
    patches = patchify(video, 2, 16)
    torch.testing.assert_close(raw, patches[:, [1, 2, 3, 4, 6, 7]])
    normed = masked_targets(video, visible, 2, 16, normalize=True)
    torch.testing.assert_close(normed, normalize_patches(raw, 3)[0])


def test_patch_critic_shape_names_and_size() -> None:
    cfg = get_config("marlin_vit_base")
    critic = PatchCritic.from_config(cfg)
    names = {k: tuple(v.shape) for k, v in critic.state_dict().items()}
    # The official Lightning checkpoints hold discriminator.layers.{0,1}.linear.{weight,bias} with these shapes.
    assert names == {
        "layers.0.linear.weight": (1536, 1536),
        "layers.0.linear.bias": (1536,),
        "layers.1.linear.weight": (1, 1536),
        "layers.1.linear.bias": (1,),
    }
    assert critic(torch.randn(2, 5, 1536)).shape == (2, 5, 1)
    x = torch.tensor([[-2.0] * 1536])
    with torch.no_grad():
        critic.layers[0].linear.weight.copy_(torch.eye(1536))
        critic.layers[0].linear.bias.zero_()
        critic.layers[1].linear.weight.fill_(1.0)
        critic.layers[1].linear.bias.zero_()
    assert critic(x).item() == pytest.approx(-2.0 * 0.01 * 1536, rel=1e-5)  # LeakyReLU slope 0.01
