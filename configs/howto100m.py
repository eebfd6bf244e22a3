"""The paper's HowTo100M pre-training (Everything at Once, CVPR 2022) and its ablations.

The main TVA model is the schema's defaults (eao_jax/defaults.py: the released
`configs/pretraining/everything_at_once_tva.yaml`) run in bf16 with zero-shot MSR-VTT and YouCook2
retrieval after every epoch. The argument picks an ablation and the video features:

  python -m eao_jax.main --config=configs/howto100m.py --workdir=gs://bucket/eao
  python -m eao_jax.main --config=configs/howto100m.py:variant=cls_token,backbone=s3d --workdir=...

  variant=NAME[+NAME...]   entries of VARIANTS below (combined; two that disagree on a field are an error)
  backbone=resnet|s3d|clip the video features (prepare HowTo100M with the same --config)

configs/README.md maps each experiment of the paper to its argument.
"""

import ml_collections

from eao_jax.defaults import VIDEO_DIMS, apply_overrides, eval_settings, parse_arg, reference_config

_WEIGHTS = ("tv", "ta", "va", "t_va", "v_ta", "a_tv")
EQUAL_WEIGHTS = dict.fromkeys(_WEIGHTS, 1.0)
# Models without fused pairs in training keep the main model's tv / ta / va terms (1 / 0.1 / 0.1).
PAIR_WEIGHTS = dict(tv=1.0, ta=0.1, va=0.1, t_va=0.0, v_ta=0.0, a_tv=0.0)

# Each ablation of the paper: the fields it changes in the main model. Steps per epoch follow from
# the batch (train.steps_per_epoch=-1), so a smaller batch has more steps per epoch.
VARIANTS: dict[str, dict] = {
    # The TV model (everything_at_once_tv.yaml): no audio, so only the text-video term has embeddings.
    "tv_only": {"model.modalities": ("text", "video"), "loss.weights": PAIR_WEIGHTS},
    # Architecture. depth 0: each embedding is the mean of its LayerNorm'd token projections.
    "no_transformer": {"model.depth": 0, "model.cross_modal": False, "loss.weights": PAIR_WEIGHTS},
    "transformer_per_modality": {"model.fusion": "per_modality", "model.cross_modal": False,
                                 "loss.weights": PAIR_WEIGHTS},
    # The main model trained without the pair passes; fused pairs are still computed at evaluation.
    "fusion_no_comb": {"model.cross_modal": False, "loss.weights": PAIR_WEIGHTS},
    # Fusion design. A CLS token needs the one shared final projection.
    "cls_token": {"model.use_cls_token": True, "model.individual_projections": False},
    "shared_projection": {"model.individual_projections": False},
    # Transformer size (width, heads) and batch (videos x clips per step).
    "depth2_64heads_4096_112x10": {"model.depth": 2, "model.num_heads": 64, "model.embed_dim": 4096,
                                   "data.videos_per_batch": 112, "data.clips_per_video": 10},
    "depth2_64heads_4096_224x5": {"model.depth": 2, "model.num_heads": 64, "model.embed_dim": 4096,
                                  "data.videos_per_batch": 224, "data.clips_per_video": 5},
    "depth2_32heads_2048": {"model.depth": 2, "model.num_heads": 32, "model.embed_dim": 2048},
    # The released yaml is named "2blocks_16heads_1024hiden" but sets depth 4, what the authors trained.
    "depth4_16heads_1024": {"model.depth": 4, "model.num_heads": 16, "model.embed_dim": 1024},
    # Audio-text disentangling: audio from the narration's own span (no +4 s shift), or shifted; weights 1.
    "aligned_audio_equal_weights": {"data.text_audio_misaligned": False, "loss.weights": EQUAL_WEIGHTS},
    "disentangled_equal_weights": {"data.text_audio_misaligned": True, "loss.weights": EQUAL_WEIGHTS},
    # Long videos: learned positions for the 12 video / 20 text / 12 audio tokens of a training clip
    # (model.max_*_tokens). Only its evaluation configs are released; training is assumed to be the
    # main one. Such a model cannot take the 48 / 72 tokens of "at once": it evaluates 8-s clips.
    "positional_embeddings": {"model.use_positional_emb": True, "eval.tasks.msrvtt.strategy": "clips_average",
                              "eval.tasks.youcook2.strategy": "clips_average"},
}

# The video features (stronger-backbone ablation): the HowTo100M builder config of the same name.
# CLIP deviates from the released clip.yaml, which also replaces word2vec by frozen CLIP text-token
# features: eao_jax has no CLIP text encoder, so the text input stays 300-d word2vec.
BACKBONES: dict[str, dict] = {
    "resnet": {},  # the defaults: R152 + RX101 features, the builder's default config
    "s3d": {"model.video_dim": VIDEO_DIMS["s3d"], "data.tfds_config": "s3d"},  # 1 feature/s in the 3D slot
    "clip": {"model.video_dim": VIDEO_DIMS["clip"], "data.tfds_config": "clip"},  # 1 feature/s in the 2D slot
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, variant="", backbone="resnet")
    names = [n for n in args.variant.split("+") if n]
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    if args.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {args.backbone!r}; known: {', '.join(BACKBONES)}")

    c = reference_config()
    # The original trains with mixed precision (torch.cuda.amp); here bf16 compute with fp32 parameters
    # and optimizer state. Rematerialising the three fusion passes keeps the paper's global batch of
    # 2,240 clips within 16 GiB per chip on 8 chips with FSDP (`python -m eao_jax.bench --memory_only`).
    c.model.dtype = "bfloat16"
    c.model.remat = True
    # Zero-shot evaluation after each epoch (every_steps -1), as the original.
    c.eval.tasks = {task: eval_settings(task, every_steps=-1) for task in ("msrvtt", "youcook2")}
    return apply_overrides(c, BACKBONES[args.backbone], *(VARIANTS[n] for n in names))
