"""Attentive probe: a learnable query cross-attends over frozen encoder tokens, then a linear head (V-JEPA's protocol).

A masked autoencoder's mean-pooled last-layer features are weak under a *linear* probe; an attentive probe lets a
small head choose which tokens matter (the mouth for speech, the eyes for gaze) without touching the encoder. One block,
as in V-JEPA's ``AttentivePooler`` with one query: ``q = q0 + CrossAttention(q0, LN(x))``, ``q = q + MLP(LN(q))``,
``logits = Linear(LN(q))``.

With a single query, multi-head cross-attention needs no key / value projection of every token: for head ``h``
the logits ``(W_k x_i) . q_h`` equal ``x_i . (W_k,h^T q_h)`` and the values ``sum_i a_i W_v,h x_i`` equal
``W_v,h (sum_i a_i x_i)``. :class:`AttentivePooler` computes it that way (exactly the same function as
``nn.MultiheadAttention`` with these weights; a test checks it), so a forward pass costs ``O(L * D * heads)`` instead of
``O(L * D^2)``: probing 1000 clips x 1176 tokens takes seconds per epoch on a CPU.

With ``time_steps`` T > 1 the tokens are T consecutive groups (the encoder's time steps, in order) and the query
pools each group on its own: ``[B, T, D]``, kept in order into the head. One pool over a whole clip averages its time
steps away, and where the answer is *when* something happens (which word a mouth says, in a sentence) that loses
it: on GRID's 800 training sentences the single pool fitted them (train accuracy 0.97) and scored 0.36 on the test
sentences for ``command``, the per-time-step pool 0.47 (random-init tokens; a linear probe on the same tokens 0.50).

Tokens are standardised per position and channel on the training rows (as the linear probe standardises its
features: a frozen encoder's tokens are mostly alike, and the pooler did not even fit its training clips without it),
and a learnt embedding per token position tells the pooler where a token comes from.

With ``centre`` (and ``clip_steps``), each token position's mean over a clip's time steps is subtracted first (per
sample, like :func:`marlin.evaluate.linear.centre_steps` for the linear head): what a clip holds constant at a place
(who, light, pose) goes, what changes there over time (the mouth) stays.

Hyper-parameters are chosen on training data only: :meth:`AttentiveProbe.fit` with ``select=True`` holds out a
stratified part of the training rows, trains once per learning rate, keeps the (learning rate, epoch) with the best
validation score, and refits on all training rows with that rate and the same schedule, stopped at that epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .linear import centre_steps
from .metrics import primary_value
from .splits import split_indices

__all__ = ["AttentiveConfig", "AttentivePooler", "AttentiveProbe", "centre_tokens"]


@dataclass
class AttentiveConfig:
    """Training of the attentive head (the encoder stays frozen; its tokens are given)."""

    heads: int = 4  # attention heads of the pooler (the token width must divide by it)
    positions: bool = True  # learn an embedding per token position (inputs of one fixed length [N, L, D])
    # pool each of this many consecutive token groups (time steps) on its own and keep them in order; 1 = one pool
    # over all tokens. For tasks about when things happen (lip reading): the encoder's time steps (x the windows)
    time_steps: int = 1
    # subtract each token position's mean over a clip's time steps (runs of clip_steps of the time_steps; None: all
    # of them one clip): the per-clip constants dominate a pretrained encoder's tokens (see centre_tokens)
    centre: bool = False
    clip_steps: int | None = None
    epochs: int = 40  # passes over the training rows (the refit uses the epoch count chosen on validation)
    batch_size: int = 32  # small batches: a few hundred labelled clips still give enough optimiser steps
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)  # AdamW peak rates tried; the best on validation is kept
    weight_decay: float = 0.05
    val_fraction: float = 0.2  # of the training rows, held out to choose the learning rate and the epoch count
    seed: int = 0
    device: str = "cpu"  # where the pooler trains: "cpu", "cuda[:i]", or "auto" (the GPU when there is one)


def centre_tokens(x: np.ndarray, time_steps: int, clip_steps: int | None = None) -> np.ndarray:
    """Tokens ``[N, L, D]`` (``time_steps`` consecutive groups of ``L / time_steps`` places) minus each place's mean
    over its clip's time steps (runs of `clip_steps`; None: all steps one clip). A per-sample operation: nothing is
    learnt, nothing leaks between rows."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3 or x.shape[1] % time_steps:
        raise ValueError(f"centring needs tokens [N, L, D] in {time_steps} time steps, got shape {tuple(x.shape)}")
    n, length, d = x.shape
    places = length // time_steps
    per_place = x.reshape(n, time_steps, places, d).transpose(0, 2, 1, 3).reshape(n * places, time_steps, d)
    centred = centre_steps(per_place, clip_steps)  # [N * places, T, D]
    return centred.reshape(n, places, time_steps, d).transpose(0, 2, 1, 3).reshape(n, length, d)


class AttentivePooler(nn.Module):
    """``[B, L, D]`` tokens (+ optional ``[B, L]`` bool mask, True = real token) -> ``[B, n_outputs]`` logits. With
    ``time_steps`` T, the L tokens are T groups of L / T, each pooled on its own; the head sees the T results in
    order."""

    def __init__(self, dim: int, n_outputs: int, heads: int = 4, mlp_ratio: float = 4.0,
                 n_tokens: int | None = None, time_steps: int = 1) -> None:  # fmt: skip
        super().__init__()
        if dim % heads:
            raise ValueError(f"AttentivePooler: token width {dim} does not divide into {heads} heads")
        if time_steps < 1:
            raise ValueError(f"AttentivePooler: time_steps must be >= 1, found {time_steps}")
        self.dim, self.heads, self.time_steps = dim, heads, time_steps
        # with `n_tokens`, a learnt embedding per token position (zero at first): which window / time step / place a
        # token comes from, for encoders whose tokens carry little of it (order matters: a sentence's first word)
        self.pos = nn.Parameter(torch.zeros(n_tokens, dim)) if n_tokens else None
        self.query = nn.Parameter(torch.zeros(dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm_x = nn.LayerNorm(dim)
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm_out = nn.LayerNorm(dim)
        self.head = nn.Linear(time_steps * dim, n_outputs)

    def attend(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cross-attention of the query over each time step's tokens of `x`: (output ``[B, T, D]``, attention weights
        ``[B, T, L / T, heads]``)."""
        b, length, _ = x.shape
        steps, d = self.time_steps, self.dim // self.heads
        if length % steps:
            raise ValueError(f"AttentivePooler: {length} tokens do not divide into {steps} time steps")
        q = self.q_proj(self.query).view(self.heads, d)  # [H, d]
        w_k = self.k_proj.weight.view(self.heads, d, self.dim)  # [H, d, D]
        u = torch.einsum("hd,hdD->hD", q, w_k) / math.sqrt(d)  # [H, D]; the key bias shifts every logit alike
        xn = self.norm_x(x)  # [B, L, D]
        if self.pos is not None:
            if length > len(self.pos):
                raise ValueError(f"AttentivePooler: {length} tokens, but positions were learnt for {len(self.pos)}")
            xn = xn + self.pos[:length]
        xn = xn.view(b, steps, length // steps, self.dim)  # [B, T, S, D]
        logits = xn @ u.T  # [B, T, S, H]
        if mask is not None:
            logits = logits.masked_fill(~mask.view(b, steps, -1, 1), float("-inf"))
        attn = logits.softmax(dim=2)  # [B, T, S, H]
        pooled = torch.einsum("btsh,btsD->bthD", attn, xn)  # [B, T, H, D]
        w_v = self.v_proj.weight.view(self.heads, d, self.dim)  # [H, d, D]
        values = torch.einsum("bthD,hdD->bthd", pooled, w_v).reshape(b, steps, self.dim) + self.v_proj.bias
        return self.out_proj(values), attn  # [B, T, D]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        z = self.query + self.attend(x, mask)[0]  # [B, T, D]
        z = z + self.mlp(self.norm_mlp(z))
        return self.head(self.norm_out(z).flatten(1))  # [B, n_outputs]


def _loss(task: str, logits: Tensor, y: Tensor) -> Tensor:
    if task == "multiclass":
        return F.cross_entropy(logits, y)
    if task in ("binary", "multilabel"):
        return F.binary_cross_entropy_with_logits(logits.reshape(y.shape), y)
    return F.mse_loss(logits, y)


class AttentiveProbe:
    """Fit / score an :class:`AttentivePooler` on tokens ``x`` ``[N, L, D]`` (numpy, any float dtype; fp16 keeps a
    large token cache small) the way :class:`marlin.evaluate.linear.LinearProbe` does on vectors."""

    def __init__(self, task: str, n_outputs: int, cfg: AttentiveConfig | None = None) -> None:
        self.task, self.n_outputs, self.cfg = task, n_outputs, cfg or AttentiveConfig()
        self.model: AttentivePooler | None = None
        self.y_mean, self.y_std = 0.0, 1.0  # regression targets are standardised for training
        self.chosen: dict[str, float] = {}
        self.mu: np.ndarray | None = None  # token standardisation learnt on the training rows
        self.sigma: np.ndarray | None = None

    def _targets(self, y: np.ndarray) -> Tensor:
        if self.task == "multiclass":
            return torch.as_tensor(y, dtype=torch.long)
        if self.task == "binary":
            return torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)
        t = torch.as_tensor(y, dtype=torch.float32).reshape(len(y), -1)
        return (t - self.y_mean) / self.y_std if self.task == "regression" else t

    def _standardizer(self, x: np.ndarray, chunk: int = 64) -> None:
        """Mean and std of the training tokens, per position and channel (fixed-length inputs with ``positions``) or
        per channel: like the linear probe's standardisation, it lifts the small differences between clips above
        what every clip shares (a frozen encoder's tokens are mostly alike; unstandardised, the pooler did not even
        fit its training clips)."""
        axes = (0,) if self.cfg.positions else (0, 1)
        s1 = s2 = 0.0
        for i in range(0, len(x), chunk):
            b = self._centred(x[i : i + chunk]).astype(np.float64)
            s1, s2 = s1 + b.sum(axes), s2 + (b**2).sum(axes)
        n = len(x) * (1 if self.cfg.positions else x.shape[1])
        self.mu = (s1 / n).astype(np.float32)
        self.sigma = np.sqrt(np.maximum(s2 / n - (s1 / n) ** 2, 0) + 1e-6).astype(np.float32)

    def _centred(self, x: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        return centre_tokens(x, cfg.time_steps, cfg.clip_steps) if cfg.centre else np.asarray(x, dtype=np.float32)

    def _inputs(self, x: np.ndarray) -> Tensor:
        batch = torch.from_numpy((self._centred(x) - self.mu) / self.sigma)
        if self.device.type == "cuda":
            return batch.pin_memory().to(self.device, non_blocking=True)
        return batch

    @property
    def device(self) -> torch.device:
        """``cfg.device`` resolved; a GPU asked for where torch sees none is refused with the reason."""
        name = self.cfg.device
        if name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dev = torch.device(name)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"attentive probe device {name!r}: torch {torch.__version__} sees no CUDA GPU here")
        return dev

    def _train(self, x: np.ndarray, y: np.ndarray, lr: float, stop: int, val: tuple | None = None) -> list[float]:
        """Train a fresh pooler for `stop` epochs of the ``cfg.epochs``-long schedule; returns the validation score
        after each epoch (empty without `val`)."""
        cfg = self.cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        n_tokens = x.shape[1] if cfg.positions else None
        self.model = AttentivePooler(x.shape[-1], self.n_outputs, heads=cfg.heads, n_tokens=n_tokens,
                                     time_steps=cfg.time_steps).to(self.device)  # fmt: skip
        opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
        steps_per_epoch = math.ceil(len(x) / cfg.batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=cfg.epochs * steps_per_epoch,
                                                    pct_start=0.1)  # fmt: skip
        targets, history = self._targets(y).to(self.device), []
        for _ in range(stop):
            self.model.train()
            for idx in torch.randperm(len(x), generator=gen).split(cfg.batch_size):
                rows = np.sort(idx.numpy())  # in order: cheap reads from a memory-mapped token cache
                loss = _loss(self.task, self.model(self._inputs(x[rows])), targets[rows])  # inputs [b, L, D]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            if val is not None:
                history.append(primary_value(self.task, val[1], self.scores(val[0])))
        return history

    def fit(self, x: np.ndarray, y: np.ndarray, *, select: bool = True, val: tuple | None = None) -> AttentiveProbe:
        """Fit on ``x`` ``[N, L, D]`` and targets `y`. With `select`, the learning rate and the epoch count are chosen
        first on `val` ``(x_val, y_val)`` when given, else on a held-out part of these rows (never on any other
        data); the final pooler is then trained on all of ``x``."""
        cfg = self.cfg
        if x.ndim != 3:
            raise ValueError(f"the attentive probe needs tokens [N, L, D], got shape {tuple(x.shape)}")
        self._standardizer(x)
        if self.task == "regression":
            t = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
            self.y_mean, self.y_std = torch.as_tensor(t.mean(0)).float(), torch.as_tensor(t.std(0) + 1e-8).float()
        lr, epochs = cfg.lr_grid[0], cfg.epochs
        if select:
            if val is None:
                strat = y if self.task in ("multiclass", "binary") else None
                parts = split_indices(len(x), (1 - cfg.val_fraction, cfg.val_fraction, 0.0), y=strat, seed=cfg.seed)
                fit_x, fit_y, val = x[parts["train"]], y[parts["train"]], (x[parts["val"]], y[parts["val"]])
            else:
                fit_x, fit_y = x, y
            best = (-math.inf, lr, epochs)
            for cand in cfg.lr_grid:
                for e, v in enumerate(self._train(fit_x, fit_y, cand, cfg.epochs, val=val), 1):
                    if not math.isnan(v) and v >= best[0]:  # ties: the later epoch
                        best = (v, cand, e)
            _, lr, epochs = best
            self.chosen = {"val_score": best[0]}
        self._train(x, y, lr, epochs)
        self.chosen.update(lr=lr, epochs=epochs)
        return self

    @torch.no_grad()
    def scores(self, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Logits ``[N, K]`` (binary: ``[N]``; regression: predictions in the targets' units)."""
        if self.model is None:
            raise RuntimeError("AttentiveProbe: call fit() first")
        self.model.eval()
        out = [self.model(self._inputs(x[i : i + batch_size])).cpu() for i in range(0, len(x), batch_size)]
        s = torch.cat(out)
        if self.task == "regression":
            s = s * self.y_std + self.y_mean
        return (s[:, 0] if self.task == "binary" else s).double().numpy()
