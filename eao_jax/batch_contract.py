"""The batch contract: what every batch the model sees holds, whoever makes it.

Keys (B items; absent modalities are left out):
  video (B, Nv, Dv) float32, video_mask (B, Nv) float32 -- Dv = D2 + D3 of the backbone(s)
  text (B, Nt, Dt) float32 word vectors, text_mask (B, Nt) float32
  audio (B, N_MELS, T) float32 log-mel frames, audio_mask (B, T) float32 (per STFT frame)
  audio_STFT_nframes (B,) int32 real frame count (-1: unknown, as for HowTo100M clips)
Masked positions are zero. Features run at FPS_2D (2D) and FPS_3D (3D) per second, audio at
100 frames/s (hop 160 at 16 kHz). Producers (the grain pipelines, bench's synthetic batches,
the evaluators) and the consumers (model input selection, config checks) take the keys and shapes
from here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KEYS = ("video", "video_mask", "text", "text_mask", "audio", "audio_mask", "audio_STFT_nframes")
N_MELS = 40  # log-mel bands of the released spectrograms
FPS_2D = 1.0  # 2D (ResNet-152 / CLIP) features per second
FPS_3D = 24.0 / 16.0  # 3D (ResNeXt-101) features per second: 16-frame windows at 24 fps


def batch_shapes(config: Any, batch_size: int | None = None) -> dict[str, tuple]:
    """{key: (shape, dtype)} of a training batch of `config` (its model modalities and widths, its
    data token counts; `batch_size` defaults to videos_per_batch x clips_per_video)."""
    m, d = config.model, config.data
    b = int(d.videos_per_batch) * int(d.clips_per_video) if batch_size is None else batch_size
    shapes = {}
    if "video" in m.modalities:
        shapes["video"] = ((b, int(d.n_video_tokens), int(m.video_dim)), np.float32)
        shapes["video_mask"] = ((b, int(d.n_video_tokens)), np.float32)
    if "text" in m.modalities:
        shapes["text"] = ((b, int(d.max_words), int(m.text_dim)), np.float32)
        shapes["text_mask"] = ((b, int(d.max_words)), np.float32)
    if "audio" in m.modalities:
        shapes["audio"] = ((b, int(m.davenet.n_mels), int(d.n_stft)), np.float32)
        shapes["audio_mask"] = ((b, int(d.n_stft)), np.float32)
        shapes["audio_STFT_nframes"] = ((b,), np.int32)
    return shapes
