"""The embedded default: a small Everything-at-Once model on the `synthetic` dataset (CPU, minutes).

  python -m eao_jax.main --config=configs/demo.py --workdir=/tmp/eao_demo

The synthetic dataset (learnable: a shared latent per clip seen through noisy per-modality
projections) is prepared automatically into WORKDIR/data (or --config.data.data_dir) on first use.
The run trains the TVA model with the paper's combinatorial loss on 16 videos x 4 clips per step,
then evaluates zero-shot text-to-video retrieval on the synthetic `retrieval` split (500 clips,
chance R@10 = 2 %), writes WORKDIR/results/synthetic.json and prints the table.

`configs/demo.py:tiny` is the same on the tiny synthetic config and a toy model (tests; seconds),
without the evaluation; `configs/demo.py:tiny,evaluate` evaluates it at the end.
"""

import ml_collections

from eao_jax.defaults import eval_settings, parse_arg, reference_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, tiny=False, evaluate=False)
    tiny, evaluate = args.tiny, args.evaluate
    c = reference_config()
    c.seed = 0

    m = c.model
    m.video_dim = 64  # synthetic: 2D 32 + 3D 32
    m.text_dim = 16  # synthetic word vectors
    m.embed_dim = 128
    m.num_heads = 4
    m.depth = 1
    m.projection_dim = 128
    # DAVEnet v2 layout (6 stages, /64: 768 frames -> 12 tokens), one block per stage, small widths.
    m.davenet.blocks = (1, 1, 1, 1, 1, 1)
    m.davenet.widths = (16, 16, 32, 32, 64, 64, 128)

    d = c.data
    d.dataset = "synthetic"
    d.tfds_config = "default"
    d.data_dir = None  # -> WORKDIR/data
    d.videos_per_batch = 16
    d.clips_per_video = 4
    d.n_video_tokens = 12
    d.n_stft = 768
    d.num_workers = 0  # in-process reading: the synthetic clips are cheap
    d.prefetch = 2

    t = c.train
    t.lr = 1e-3
    t.lr_decay = 0.9
    t.epochs = 8  # of 400 videos // 16 = 25 steps (train.steps_per_epoch=-1)
    t.num_steps = -1
    t.log_every = 10

    c.mesh.data = -1
    c.mesh.model = 1
    c.mesh.fsdp = False

    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    c.checkpoint.async_save = True

    c.eval.tasks = {"synthetic": eval_settings("synthetic", batch_size=50)}  # at the end (every_steps 0)

    if tiny:
        m.embed_dim, m.num_heads, m.projection_dim = 32, 4, 32
        m.davenet.blocks, m.davenet.widths = (1, 1), (8, 8, 16)
        d.tfds_config = "tiny"
        d.videos_per_batch, d.clips_per_video = 4, 2
        d.n_stft = 64
        t.epochs, t.steps_per_epoch, t.log_every = 1, 12, 2
        c.checkpoint.every_steps = 4
        c.eval.tasks = {"synthetic": eval_settings("synthetic", batch_size=16)} if evaluate else {}
    return c
