"""The CPU benchmark configuration (issue #7): a reduced EAO whose PyTorch baseline we track.

The paper's model (the schema's defaults, eao_jax/defaults.py) with embed 1024 / 16 heads / MLP
ratio 1, projection 1536, DAVEnet v1 (widths 128,128,256,512,1024; blocks 2,2,2,2), a batch of 32
clips with 12 video, 20 text and 12 audio tokens (192 STFT frames), 4096-d video and 300-d text
features, float32.

  python -m eao_jax.bench --config=configs/bench_cpu.py --steps=10
  python -m eao_jax.bench --config=configs/bench_cpu.py:tiny --steps=2     # seconds, for tests

`tiny` keeps every architectural feature (three modalities, gated projections, DAVEnet with a
strided stage, the three fusion passes) at toy widths.
"""

import ml_collections

from eao_jax.defaults import parse_arg, reference_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    tiny = parse_arg(arg, tiny=False).tiny
    c = reference_config()
    m = c.model
    m.embed_dim = 1024
    m.num_heads = 16
    m.mlp_ratio = 1.0
    m.projection_dim = 1536
    m.video_dim = 4096
    m.text_dim = 300
    m.davenet.widths = (128, 128, 256, 512, 1024)  # DAVEnet v1
    m.davenet.blocks = (2, 2, 2, 2)
    m.dtype = "float32"
    m.remat = False  # the tracked baseline; the paper config turns remat on for 16 GiB chips

    d = c.data
    d.videos_per_batch = 32  # 32 clips per step, one per video
    d.clips_per_video = 1
    d.n_video_tokens = 12
    d.n_stft = 192  # 12 DAVEnet-v1 tokens (/16)

    c.mesh.data = -1
    c.mesh.fsdp = False  # one CPU device: nothing to shard
    if tiny:
        m.embed_dim = 32
        m.num_heads = 4
        m.projection_dim = 48
        m.video_dim = 24
        m.text_dim = 16
        m.davenet.widths = (8, 8, 16)
        m.davenet.blocks = (2, 1)
        d.videos_per_batch = 8
        d.n_video_tokens = 4
        d.max_words = 6
        d.n_stft = 16  # 4 audio tokens
    return c
