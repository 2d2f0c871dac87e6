"""Training windows for the lip generator: a face window, a reference window of the same video, and the sound.

:class:`LipWindows` reads sources as the lip-sync expert's :class:`marlin.sync.data.SyncPairs` does (video files or
``marlin prepare`` store items with sound; the same seeded sample stream: item ``g`` is a function of ``(seed, g)``
only, so resumed and multi-process runs read the same windows). The reference window starts at least one window
away from the target when the video is long enough (as Wav2Lip picks its reference frames): its mouth is that of
another moment, so the generator cannot copy the answer and must take the mouth's shape from the sound.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from ..sync.data import SyncPairs, read_frames_for_sync
from ..sync.expert import sync_window
from ..utils.seeding import derive_seed

__all__ = ["LipWindows", "reference_start"]


def reference_start(start: int, last: int, length: int, rng: np.random.Generator | None) -> int:
    """A reference window start in ``[0, last]`` at least `length` frames from `start` when one exists (else the
    farthest start); with ``rng=None`` the farthest start (deterministic, for validation)."""
    far = [s for s in range(last + 1) if abs(s - start) >= length]
    if rng is None or not far:
        return 0 if start - 0 >= last - start else last
    return int(rng.choice(far))


class LipWindows(SyncPairs):
    """Item ``g`` -> ``{"target": uint8 [3, T, S, S], "reference": uint8 [3, T, S, S], "mel": float32 [80, L]}``
    (the mel window in sync with the target). ``train=False``: the centred window of video ``g % n`` and the
    farthest reference, for deterministic validation. Arguments as :class:`marlin.sync.data.SyncPairs` (the shift
    ones are unused)."""

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
            ref = reference_start(start, last, t, rng)
        else:
            start = last // 2
            ref = reference_start(start, last, t, None)
        indices = sorted({*range(start, start + t), *range(ref, ref + t)})
        frames = read_frames_for_sync(path, indices, self.size, self.crop_face, self.detector)  # [3, K, S, S]
        at = {i: k for k, i in enumerate(indices)}
        target = frames[:, [at[i] for i in range(start, start + t)]]
        reference = frames[:, [at[i] for i in range(ref, ref + t)]]
        mel = sync_window(va.mel, start, t, va.fps, self.mel_length)  # [80, L]
        return {"target": target, "reference": reference, "mel": mel}
