"""The training step: one forward gives the official two-forward updates; accumulation; non-finite guard."""

from __future__ import annotations

import copy

import pytest
import torch

from marlin import Marlin, get_config
from marlin.data.collate import MaskCollator
from marlin.data.sampling import KeyedItems, StreamBatchSampler
from marlin.data.synthetic import SyntheticClips
from marlin.mae.critic import PatchCritic
from marlin.train import NonFiniteLossError, Pretrainer, load_config
from marlin.train.reference import two_forward_step
from marlin.utils.seeding import derive_seed

# fp32: these tests compare against float32 references (the default, auto, is bf16 on CPUs with bf16 units)
TINY = ["mask.ratio=0.5", "data.num_workers=0", "log.tensorboard=false", "ckpt.export=false", "precision=fp32"]


def _cfg(tmp_path, *extra: str):
    return load_config("marlin_vit_tiny_test", [*TINY, f"out_dir={tmp_path}", *extra])


def _batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(n, 3, 4, 32, 32, generator=g)
    visible = torch.zeros(n, 8, dtype=torch.bool)
    for i in range(n):
        visible[i, torch.randperm(8, generator=g)[:4]] = True
    return {"video": video, "visible": visible}


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _count_encoder_forwards(model: Marlin) -> list[int]:
    calls = [0]
    model.encoder.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(("d_steps", "g_steps", "gp_weight"), [(1, 1, 0.0), (1, 1, 10.0), (2, 2, 0.0)])
def test_single_forward_step_equals_official_two_forward_step(tmp_path, d_steps, g_steps, gp_weight) -> None:
    cfg = _cfg(
        tmp_path, f"loss.d_steps={d_steps}", f"loss.g_steps={g_steps}", f"loss.gp_weight={gp_weight}",
        "loss.adv_weight=0.5", "optim.warmup_steps=0", "optim.lr=0.5", "optim.scale_lr=false", "max_steps=10",
    )  # fmt: skip
    ours = Pretrainer(cfg)
    ours.ensure_schedule(steps_per_epoch=1.0)
    model, critic = copy.deepcopy(ours.model), copy.deepcopy(ours.critic)
    # The same (fused) AdamW kernel as the trainer: what is compared is the step, not two optimiser kernels.
    g_opt = torch.optim.AdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    d_opt = torch.optim.AdamW(critic.parameters(), lr=0.0, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
    ours_calls, ref_calls = _count_encoder_forwards(ours.model), _count_encoder_forwards(model)
    before = _params(model)
    for step in range(3):
        batch = _batch(3, seed=step)
        lr = ours.schedule(step)
        for opt in (g_opt, d_opt):
            for group in opt.param_groups:
                group["lr"] = lr
        alpha = torch.rand(1, generator=torch.Generator().manual_seed(derive_seed(cfg.seed, "gp", step)))
        ref = two_forward_step(
            model, critic, g_opt, d_opt, batch["video"], batch["visible"], tubelet=2, patch=16, adv_weight=0.5,
            gp_weight=gp_weight, d_steps=d_steps, g_steps=g_steps, alpha=alpha,
        )  # fmt: skip
        got = ours.train_step([batch])
        ours.step += 1
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    for name, value in _params(model).items():
        torch.testing.assert_close(ours.model.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for name, value in _params(critic).items():
        torch.testing.assert_close(ours.critic.state_dict()[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(before[k], v) for k, v in _params(model).items())  # training did move the weights
    # The point of the exercise: one encoder forward per generator step instead of d_steps + g_steps.
    assert ours_calls[0] == 3 * g_steps
    assert ref_calls[0] == 3 * (d_steps + g_steps)


def test_accumulation_equals_one_large_batch(tmp_path) -> None:
    """Batch 4 in one micro-step == batch 2 x 2 micro-steps (same samples, same masks, same updates).

    Adam eps 1e-6 instead of 1e-8: the critic's output bias has an exactly-zero gradient (the WGAN losses are
    invariant to it), and with eps 1e-8 Adam turns the ~1e-9 round-off in that gradient, which depends on the
    summation order, into visible steps of the bias (and of the logged -mean(D(pred))).
    """
    common = [
        "mask.strategy=fasking",
        "optim.warmup_steps=1",
        "optim.lr=0.3",
        "max_steps=3",
        "loss.gp_weight=1.0",
        "optim.eps=1e-6",
    ]
    data = SyntheticClips(12, get_config("marlin_vit_tiny_test"))
    runs = {}
    for name, extra in {"big": ["batch_size=4"], "accum": ["batch_size=2", "accum_steps=2"]}.items():
        cfg = _cfg(tmp_path / name, *common, *extra)
        trainer = Pretrainer(cfg)
        sampler = StreamBatchSampler(len(data), cfg.batch_size, cfg.accum_steps, total_steps=3, keys=True)
        trainer.ensure_schedule(sampler.steps_per_epoch())
        collate, keyed = MaskCollator(trainer.masker(), cfg.seed), KeyedItems(data)
        batches = [collate([keyed[k] for k in keys]) for keys in sampler]
        history = []
        for step in range(3):
            history.append(trainer.train_step(batches[step * cfg.accum_steps : (step + 1) * cfg.accum_steps]))
            trainer.step += 1
        runs[name] = (history, _params(trainer.model))
    for a, b in zip(runs["big"][0], runs["accum"][0], strict=True):
        for key in ("loss/rec", "loss/critic", "loss/adv", "loss/gp"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for name, value in runs["big"][1].items():
        torch.testing.assert_close(runs["accum"][1][name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_mae_without_critic(tmp_path) -> None:
    trainer = Pretrainer(_cfg(tmp_path, "loss.adversarial=false", "optim.warmup_steps=0", "max_steps=2"))
    trainer.ensure_schedule(1.0)
    assert trainer.critic is None and trainer.d_opt is None
    out = trainer.train_step([_batch(2)])
    assert set(out) == {"loss/rec", "loss/gen", "lr"} and out["loss/rec"] == pytest.approx(out["loss/gen"])


def test_non_finite_loss_skips_the_step(tmp_path) -> None:
    trainer = Pretrainer(_cfg(tmp_path, "optim.warmup_steps=0", "max_steps=5"))
    trainer.ensure_schedule(1.0)
    before, critic_before = _params(trainer.model), _params(trainer.critic)
    bad = _batch(2)
    bad["video"][0, :, :, :4, :4] = float("nan")
    out = trainer.train_step([bad])
    assert out["skipped"] == 1.0 and trainer.nonfinite_streak == 1
    for k, v in _params(trainer.model).items():
        assert torch.equal(v, before[k]), k
    for k, v in _params(trainer.critic).items():
        assert torch.equal(v, critic_before[k]), k
    assert not trainer.g_opt.state  # no optimiser step was taken
    trainer.train_step([_batch(2)])
    assert trainer.nonfinite_streak == 0


class _NaNClips(SyntheticClips):
    def __getitem__(self, index: int) -> dict:
        item = super().__getitem__(index)
        item["video"] = item["video"] * float("nan")
        return item


def test_fit_stops_after_k_non_finite_steps_in_a_row(tmp_path) -> None:
    cfg = _cfg(tmp_path, "max_steps=10", "batch_size=2", "log.max_nonfinite=3", "mask.strategy=tube")
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        Pretrainer(cfg, dataset=_NaNClips(8, cfg.model)).fit()
    events = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert len(events) == 3


def test_critic_matches_official_size_for_released_configs() -> None:
    for name, hidden in (("marlin_vit_small", 768), ("marlin_vit_base", 1536), ("marlin_vit_large", 2048)):
        critic = PatchCritic.from_config(get_config(name))
        assert critic.layers[0].linear.weight.shape == (hidden, 1536)


@pytest.mark.parametrize(("bf16_units", "want"), [(True, torch.bfloat16), (False, None)])
def test_auto_precision_trains_in_bf16_where_the_device_has_bf16_units(tmp_path, monkeypatch, bf16_units, want):
    from marlin.utils import precision as prec

    caps = prec.DeviceCaps("cpu", "cpu", bf16=bf16_units, cpu_capability="AVX512" if bf16_units else "AVX2")
    monkeypatch.setattr(prec, "device_capabilities", lambda device: caps)
    trainer = Pretrainer(_cfg(tmp_path, "precision=auto", "max_steps=2"))
    seen = []
    trainer.model.encoder.register_forward_hook(
        lambda *_: seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
    )
    trainer.ensure_schedule(steps_per_epoch=1.0)
    out = trainer.train_step([_batch(2)])
    assert seen == [want] and all(torch.isfinite(torch.tensor(v)) for v in out.values() if isinstance(v, float))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay float32
