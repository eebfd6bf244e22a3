r"""Fine-tuning the pre-trained model on MSR-VTT or YouCook2 (the paper's fine-tuned results).

The released `configs/finetuning/finetune_{msrvtt,youcook}.yaml` (CLIP: `finetuning/clip/clip_*`):
the pre-trained model, Adam decayed x0.9 per epoch, the training items of `msrvtt_train.pkl` (a
random caption per access) or the clips of `youcook_train.pkl`, the "at once" lengths of the dataset
(eval.at_once), all six loss weights 1, and the model kept in eval mode throughout (frozen BatchNorm
statistics, `train.use_eval_mode_always`).

  python -m eao_jax.main --config=configs/finetune.py:dataset=msrvtt --workdir=WORKDIR \
      --config.init_from=PRETRAINED_CKPT --config.data.data_dir=TFDS_DIR

  dataset=msrvtt|youcook2    what to fine-tune on (and evaluate)
  backbone=resnet|s3d|clip   the video features of the pre-trained model (R152 + RX101 4096-d, S3D
                             1024-d, CLIP 512-d); model.* must describe the `init_from` checkpoint,
                             which training checks before starting
"""

import ml_collections

from eao_jax.defaults import VIDEO_DIMS, apply_overrides, eval_settings, parse_arg, reference_config

# What differs between the two released fine-tuning configs (batch: items per step, one row each).
DATASETS: dict[str, dict] = {
    "msrvtt": {"train.lr": 5e-5, "train.epochs": 25, "data.videos_per_batch": 128},
    "youcook2": {"train.lr": 1e-5, "train.epochs": 5, "data.videos_per_batch": 256},
}
CLIP_BATCH = {"msrvtt": 64}  # the released CLIP config halves the MSR-VTT batch


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, dataset="", backbone="resnet")
    if args.dataset not in DATASETS:
        raise ValueError(f"configs/finetune.py: dataset= must be one of {', '.join(DATASETS)}, got {args.dataset!r}")
    if args.backbone not in VIDEO_DIMS:
        raise ValueError(f"configs/finetune.py: backbone= must be one of {', '.join(VIDEO_DIMS)}, "
                         f"got {args.backbone!r}")

    c = reference_config()
    c.model.dtype = "bfloat16"  # as configs/howto100m.py: bf16 compute, fp32 parameters
    c.model.remat = True
    c.model.video_dim = VIDEO_DIMS[args.backbone]
    d = c.data
    d.dataset = args.dataset
    d.tfds_config = args.backbone
    d.clips_per_video = 1
    d.n_video_tokens = c.eval.at_once[args.dataset].n_video_tokens
    d.n_stft = c.eval.at_once[args.dataset].n_stft
    c.train.use_eval_mode_always = True  # BatchNorm running statistics frozen, as the original
    c.loss.weights = dict.fromkeys(c.loss.weights, 1.0)
    c.eval.tasks = {args.dataset: eval_settings(args.dataset)}  # after the last step (every_steps 0)
    apply_overrides(c, DATASETS[args.dataset])
    if args.backbone == "clip" and args.dataset in CLIP_BATCH:
        d.videos_per_batch = CLIP_BATCH[args.dataset]
    return c
