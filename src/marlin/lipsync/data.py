"""Training windows for the lip generator: a face window, a still reference of the same face, and the sound.

:class:`LipWindows` reads sources as the lip-sync expert's :class:`marlin.sync.data.SyncPairs` does (video files or
``marlin prepare`` store items with sound; the same seeded sample stream: item ``g`` is a function of ``(seed, g)``
only, so resumed and multi-process runs read the same windows).

The reference is *one* frame of another moment (at least half a window away from the target when the video is long
enough), repeated over the window. Why a still frame: its mouth is that of another moment, so the generator cannot
copy the answer, and it does not move, so every movement of the drawn mouth has to come from the sound. With a moving
reference window (Wav2Lip's choice) a 600-step run learned to damp the reference's motion toward an average mouth
(held-out MSE 0.0041 vs 0.0053 for copying it) but, dubbing with the video's own frames as reference, kept their
mouth: dubbing changed the lower face by an MSE of 0.0002 and the sync of dubbed clips did not move.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..sync.data import SyncPairs, read_frames_for_sync
from ..sync.expert import sync_window
from ..utils.seeding import derive_seed

__all__ = ["LipWindows", "reference_frame"]


def reference_frame(start: int, n_frames: int, length: int, rng: np.random.Generator | None) -> int:
    """A frame at least ``length // 2`` frames outside the window ``start .. start + length - 1`` when one exists
    (else the frame farthest from it); with ``rng=None`` the farthest frame (deterministic, for validation)."""
    gap = length // 2
    far = [f for f in range(n_frames) if f < start - gap or f >= start + length + gap]
    if rng is None or not far:
        return 0 if start >= n_frames - (start + length) else n_frames - 1
    return int(rng.choice(far))


class LipWindows(SyncPairs):
    """Item ``g`` -> ``{"target": uint8 [3, T, S, S], "reference": uint8 [3, T, S, S], "mel": float32 [80, L]}``
    (the reference: one frame repeated T times; the mel window in sync with the target). ``train=False``: the
    centred window of video ``g % n`` and the farthest frame, for deterministic validation. Arguments as
    :class:`marlin.sync.data.SyncPairs` (the shift ones are unused)."""

    def __getitem__(self, g: int) -> dict[str, Tensor]:
        path = self._video_of(int(g))
        va = self.audio(path)
        t = self.clip_frames
        last = va.n_frames - t
        if last < 0:
            raise ValueError(f"{path}: {va.n_frames} frames, fewer than the generator's {t}-frame window")
        if self.train:
            rng = np.random.default_rng(derive_seed(self.seed, "lip", int(g)))
            start = int(rng.integers(last + 1))
            ref = reference_frame(start, va.n_frames, t, rng)
        else:
            start = last // 2
            ref = reference_frame(start, va.n_frames, t, None)
        frames = read_frames_for_sync(path, [*range(start, start + t), ref], self.size, self.crop_face,
                                      self.detector)  # fmt: skip  # [3, T + 1, S, S]
        target, reference = frames[:, :t], frames[:, t:].expand(-1, t, -1, -1).contiguous()
        mel = sync_window(va.mel, start, t, va.fps, self.mel_length)  # [80, L]
        return {"target": target, "reference": reference, "mel": mel}
