"""Fine-tuning on YouCook2 (the paper's fine-tuned YouCook2 results).

The released `configs/finetuning/finetune_youcook.yaml`: the pre-trained model, Adam lr 1e-5 decayed
x0.9 per epoch, 5 epochs, batch 256 clips of `youcook_train.pkl`, 72 video tokens / 4608 STFT frames
("at once", 48 s), all six loss weights 1, the model kept in eval mode (frozen BatchNorm statistics).

  python -m eao_jax.main --config=configs/finetune_youcook2.py --workdir=WORKDIR \
      --config.init_from=PRETRAINED_CKPT --config.data.data_dir=TFDS_DIR

Argument: the backbone of the pre-trained model, resnet (default), s3d or clip (see finetune_msrvtt.py).
"""

import pathlib
import runpy

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    common = runpy.run_path(str(pathlib.Path(__file__).resolve().parent / "finetune_msrvtt.py"))
    return common["finetune_config"](arg, dataset="youcook2", batch={"resnet": 256, "s3d": 256, "clip": 256},
                                     lr=1e-5, epochs=5, n_video_tokens=72, n_stft=4608, eval_task="youcook2")
