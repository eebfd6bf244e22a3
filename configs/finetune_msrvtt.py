"""Fine-tuning on MSR-VTT (the paper's fine-tuned MSR-VTT results).

The released `configs/finetuning/finetune_msrvtt.yaml`: the pre-trained model, Adam lr 5e-5 decayed
x0.9 per epoch, 25 epochs, batch 128 training items of `msrvtt_train.pkl` (a random caption per
access), 48 video tokens / 3072 STFT frames ("at once", 32 s), all six loss weights 1, and the model
kept in eval mode throughout (frozen BatchNorm statistics, `train.use_eval_mode_always`).

  python -m eao_jax.main --config=configs/finetune_msrvtt.py --workdir=WORKDIR \
      --config.init_from=PRETRAINED_CKPT --config.data.data_dir=TFDS_DIR

Argument (`--config=configs/finetune_msrvtt.py:clip`): the feature backbone of the pre-trained model,
resnet (default, R152 + RX101, 4096-d), s3d (1024-d) or clip (512-d; batch 64 as the released CLIP
config). model.* must describe the `init_from` checkpoint; training checks it before starting.
"""

import pathlib
import runpy

import ml_collections

VIDEO_DIMS = {"resnet": 4096, "s3d": 1024, "clip": 512}


def finetune_config(arg: str | None, *, dataset: str, batch: dict[str, int], lr: float, epochs: int,
                    n_video_tokens: int, n_stft: int, eval_task: str) -> ml_collections.ConfigDict:
    """The common fine-tuning setup on top of the paper's pre-training config."""
    backbone = arg or "resnet"
    if backbone not in VIDEO_DIMS:
        raise ValueError(f"config argument must be one of {sorted(VIDEO_DIMS)}, got {arg!r}")
    c = runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "howto100m.py"))["get_config"]()
    c.model.video_dim = VIDEO_DIMS[backbone]
    c.data.dataset = dataset
    c.data.tfds_config = backbone
    c.data.split = "train"
    c.data.videos_per_batch = batch[backbone]  # items per step (one row each)
    c.data.clips_per_video = 1
    c.data.n_video_tokens = n_video_tokens
    c.data.n_stft = n_stft
    c.data.max_words = 20
    c.train.lr = lr
    c.train.lr_decay = 0.9  # per epoch
    c.train.epochs = epochs
    c.train.steps_per_epoch = -1  # len(training items) // batch
    c.train.use_eval_mode_always = True  # BatchNorm running statistics frozen, as the original
    c.loss.weights = ml_collections.ConfigDict(dict(tv=1.0, ta=1.0, va=1.0, t_va=1.0, v_ta=1.0, a_tv=1.0))
    c.eval.tasks = (eval_task,)
    c.eval.every_steps = 0  # after the last step (an epoch's length is only known from the data)
    c.eval.batch_size = 16
    return c


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return finetune_config(arg, dataset="msrvtt", batch={"resnet": 128, "s3d": 128, "clip": 64}, lr=5e-5,
                           epochs=25, n_video_tokens=48, n_stft=3072, eval_task="msrvtt")
