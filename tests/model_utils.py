"""Small model configs and random batches shared by the model, loss and converter tests."""

import numpy as np

from eao_jax.defaults import model_config


def small_config(**overrides):
    c = model_config()
    c.video_dim, c.text_dim, c.embed_dim, c.num_heads, c.projection_dim = 24, 10, 32, 4, 48
    c.davenet.widths = (4, 4, 8, 8, 16, 16, 32)
    for k, v in overrides.items():
        c[k] = v
    return c


def random_batch(rng, b=6, nv=7, nt=5, t=256, empty=True):
    batch = {
        "video": rng.normal(size=(b, nv, 24)).astype(np.float32),
        "text": rng.normal(size=(b, nt, 10)).astype(np.float32),
        "audio": rng.normal(size=(b, 40, t)).astype(np.float32),
    }
    lens = {"video": rng.integers(1, nv + 1, b), "text": rng.integers(1, nt + 1, b),
            "audio": rng.integers(1, t + 1, b)}
    for m, n in (("video", nv), ("text", nt), ("audio", t)):
        mask = (np.arange(n)[None] < lens[m][:, None]).astype(np.float32)
        batch[f"{m}_mask"] = mask
    if empty:
        batch["text_mask"][1] = 0
        batch["audio_mask"][2] = 0
        batch["video_mask"][3] = 0
    for m in ("video", "text"):
        batch[m] *= batch[f"{m}_mask"][..., None]
    batch["audio"] *= batch["audio_mask"][:, None, :]
    batch["audio_STFT_nframes"] = batch["audio_mask"].sum(-1).astype(np.int32)
    return batch
