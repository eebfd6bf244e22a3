"""The config schema: every field a training config has, each with the paper's default.

Numbers come from the authors' released `configs/pretraining/everything_at_once_tva.yaml` (the main
TVA model), their training code and the released evaluation configs. This module is the one home of
those defaults: `configs/*.py` start from `reference_config()` and change only what their experiment
changes, tools that build a model without a config file (the checkpoint converter) start from
`model_config()`, and `config_utils.validate_config` checks field names against `reference_config()`.

It also holds the two helpers config files share: `parse_arg` (the big_vision-style
`--config=file.py:key=value,flag` argument) and `apply_overrides` (a table entry of dotted overrides).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ml_collections
from ml_collections import config_dict

# Feature width of each video backbone the authors released features for (the token projection's input).
VIDEO_DIMS = {"resnet": 4096, "s3d": 1024, "clip": 512}  # R152 2D + RX101 3D | S3D | CLIP ViT-B/32


def model_config() -> ml_collections.ConfigDict:
    """The TVA fusion model (arch.args of everything_at_once_tva.yaml)."""
    m = ml_collections.ConfigDict()
    m.modalities = ("text", "video", "audio")  # ("text", "video") is the TV-only model
    m.video_dim = VIDEO_DIMS["resnet"]  # ResNet-152 2D (2048) + ResNeXt-101 3D (2048), L2-normalised per part
    m.text_dim = 300  # GoogleNews word2vec
    m.embed_dim = 4096  # fusion width
    m.depth = 1  # fusion blocks; 0 = no transformer (ablation)
    m.num_heads = 64  # head dim 64
    m.mlp_ratio = 1.0
    m.qkv_bias = True
    m.projection_dim = 6144  # output space
    m.token_projection = "gated"  # "gated" (GatedEmbeddingUnit) | "linear"
    m.projection = "gated"  # final projection: "gated" | "linear"
    m.individual_projections = True  # one final projection per modality; False = shared (ablation)
    m.fusion = "shared"  # "shared" transformer | "per_modality" (one per modality, ablation)
    m.cross_modal = True  # compute the fused pairs tv/ta/va in training
    m.use_cls_token = False  # ablation: pooled output is a CLS token (needs a shared projection)
    m.use_positional_emb = False  # ablation: learned per-modality position embeddings
    m.max_video_tokens = 12  # lengths of the positional embeddings when enabled
    m.max_text_tokens = 20
    m.max_audio_tokens = 12
    m.layer_norm_eps = 1e-6
    # DAVEnet audio CNN. v2 (paper): 6 stages [2,2,1,1,1,1], widths 128..4096, /64 in time.
    # v1: 4 stages [2,2,2,2], widths [128,128,256,512,1024], /16.
    m.davenet = ml_collections.ConfigDict()
    m.davenet.n_mels = 40
    m.davenet.blocks = (2, 2, 1, 1, 1, 1)
    m.davenet.widths = (128, 128, 256, 512, 1024, 2048, 4096)  # stem width, then one per stage
    m.davenet.kernel = 9
    m.davenet.bn_momentum = 0.9  # PyTorch momentum 0.1
    m.davenet.bn_eps = 1e-5
    # Audio token pooling for long inputs at evaluation ("none" in training and "at once" eval).
    m.audio_pooling = "none"  # none | clip | nearest | max_pool | avg_pool
    m.audio_pooling_tokens = 12
    # Numerics: parameters always fp32; compute dtype for matmuls / convs.
    m.dtype = "float32"  # "bfloat16" on accelerators
    m.remat = False  # rematerialise fusion blocks and DAVEnet stages in the backward pass
    return m


def loss_config() -> ml_collections.ConfigDict:
    loss = ml_collections.ConfigDict()
    loss.name = "NormSoftmax"  # symmetric InfoNCE on cosine similarities | "MMS"
    loss.temperature = 0.05
    loss.mms_margin = 0.001
    # CombinatorialLoss weights of the main model; 0 disables a term.
    loss.weights = ml_collections.ConfigDict(
        dict(tv=1.0, ta=0.1, va=0.1, t_va=0.1, v_ta=0.1, a_tv=0.1))
    return loss


def data_config() -> ml_collections.ConfigDict:
    """HowTo100M training clips: 8-s windows sampled as the original does."""
    d = ml_collections.ConfigDict()
    d.dataset = "howto100m"
    d.data_dir = config_dict.placeholder(str)  # TFDS data_dir written by `python -m eao_jax.prepare`
    d.videos_per_batch = 224  # 224 videos x 10 clips = 2,240 clips per step
    d.clips_per_video = 10
    d.n_video_tokens = 12  # 8 s at 1.5 3D features/s
    d.max_words = 20  # text tokens of a clip (training and evaluation)
    d.n_stft = 768  # 7.68 s, exactly 12 DAVEnet-v2 tokens
    d.min_time = 8.0
    d.text_audio_misaligned = True  # audio shifted +4 s (the main model)
    d.num_workers = 8  # grain worker processes (0: threads in the training process)
    d.prefetch = 2  # batches per worker; also the batches kept ready on the devices
    # Read by the data layer (eao_jax.data.pipelines) when set:
    d.tfds_config = config_dict.placeholder(str)  # builder config (None: the builder's default, resnet)
    d.split = "train"
    d.read_threads = 2
    d.read_buffer = 4
    # HowTo layouts: videos per element a reader builds (a divisor of the process's videos per batch;
    # None: the largest one up to 16), so a worker holds tens of MB of clips rather than a batch.
    d.worker_videos = config_dict.placeholder(int)
    d.video_strategy = "clip"  # fine-tuning on item datasets
    return d


def train_config() -> ml_collections.ConfigDict:
    """Adam 5e-5, x0.9 per epoch, 15 epochs; no weight decay, warm-up or clipping."""
    t = ml_collections.ConfigDict()
    t.lr = 5e-5
    t.b1 = 0.9
    t.b2 = 0.999
    t.eps = 1e-8
    t.lr_decay = 0.9  # per epoch, staircase: lr * lr_decay ** (step // steps_per_epoch)
    t.epochs = 15
    # -1: derived from the dataset, training videos // data.videos_per_batch (drop_last, as the
    # original; HowTo100M's 1,166,089 videos // 224 = 5205), by config_utils.resolve_epoch_steps.
    t.steps_per_epoch = -1
    t.num_steps = -1  # -1: epochs * steps_per_epoch; else stop after this many steps
    t.log_every = 50
    t.use_eval_mode_always = False  # fine-tuning: BatchNorm uses (and keeps) its running statistics
    return t


def mesh_config() -> ml_collections.ConfigDict:
    """Data axis over all devices; FSDP shards the large matrices over it."""
    m = ml_collections.ConfigDict()
    m.data = -1  # -1: all devices not used by other axes
    m.model = 1
    m.fsdp = True
    m.fsdp_min_size = 2**18  # parameters with fewer elements stay replicated
    return m


def checkpoint_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.every_steps = 1000
    c.keep = 3
    c.async_save = True
    return c


# The zero-shot evaluations of the paper, by name: what each reads and which evaluator runs it
# (`type`, a module of eao_jax/evaluators). An entry of eval.tasks names one of these (its key, or its
# `task` field) and may change any setting of EVAL_SETTINGS[type].
EVAL_TASKS: dict[str, dict[str, Any]] = {
    "msrvtt": dict(type="retrieval", dataset="msrvtt", split="test"),  # the 1k-A test set
    "youcook2": dict(type="retrieval", dataset="youcook2", split="val"),  # 3,350 validation clips
    "synthetic": dict(type="retrieval", dataset="synthetic", split="retrieval"),
    "crosstask": dict(type="localisation", dataset="crosstask", split="test", benchmark="crosstask"),
    "mining_youtube": dict(type="localisation", dataset="mining_youtube", split="test", benchmark="mining_youtube"),
    # Every task present is averaged (not CrossTask's 18 primary ones).
    "synthetic_localization": dict(type="localisation", dataset="synthetic", split="localization",
                                   benchmark="crosstask", all_tasks=True),
}

# The settings of an entry, per evaluator type, with their defaults.
EVAL_SETTINGS: dict[str, dict[str, Any]] = {
    "retrieval": dict(
        every_steps=0,  # 0: only after the last step (eval.at_end); -1: after every epoch; N: every N steps
        batch_size=16,  # items per process and step
        tfds_config=None,  # builder config; None: the training one (same dataset) or the one matching model.video_dim
        strategy="at_once",  # at_once | clip | nearest | max_pool | clips_average (long videos)
    ),
    "localisation": dict(
        every_steps=0,
        batch_size=64,  # one-second windows per process and step
        tfds_config=None,
        embedding="v+a",  # window embedding: late fusion v+a, or the fused pair va
        decoder="dp",  # dp (ordered, one window per step) | argmax (best step per window)
        log_softmax=None,  # row log-softmax over the steps before decoding; None: Mining YouTube only
        convention="per_video",  # task recall: mean of per-video recalls, or hits pooled per task
    ),
}


def eval_entry(name: str, settings: Mapping[str, Any] | None = None, *,
               where: str | None = None) -> ml_collections.ConfigDict:
    """The complete settings of the evaluation entry `name`: its task's fields (EVAL_TASKS[task],
    task = settings['task'] or `name`), then the type's defaults (EVAL_SETTINGS), then `settings`.
    Raises ValueError starting with `where` (default 'eval.tasks.NAME.') and the setting, for an
    unknown task or setting."""
    settings = dict(settings or {})
    where = f"eval.tasks.{name}." if where is None else where
    task = settings.pop("task", None) or name
    if task not in EVAL_TASKS:
        raise ValueError(f"{where}task: unknown task {task!r}; known: {', '.join(EVAL_TASKS)} "
                         "(an entry's name is its task unless it sets task=...)")
    fields = dict(EVAL_TASKS[task])
    known = EVAL_SETTINGS[fields["type"]]
    for key in settings:
        if key not in known:
            raise ValueError(f"{where}{key}: not a setting of a {fields['type']} evaluation ({task}); known: "
                             + ", ".join(known))
    return ml_collections.ConfigDict({"task": task, **fields, **known, **settings})


_OPTIONAL_SETTINGS = {"tfds_config": str, "log_softmax": bool}  # settings whose default is None


def eval_settings(task: str, **settings: Any) -> ml_collections.ConfigDict:
    """An eval.tasks entry for `task` holding every setting of its type (the defaults, then
    `settings`), so that each can be changed from the command line
    (`--config.eval.tasks.msrvtt.batch_size=32`). Pass task=... to name the entry otherwise."""
    entry = eval_entry(task, settings, where=f"eval_settings({task!r}): ")
    out = ml_collections.ConfigDict()
    if "task" in settings:
        out.task = entry.task
    for key in EVAL_SETTINGS[entry.type]:
        value = entry[key]
        out[key] = config_dict.placeholder(_OPTIONAL_SETTINGS[key]) if value is None else value
    return out


def eval_config() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    # Named evaluations {name: {setting: value}}, e.g. {"msrvtt": eval_settings("msrvtt", every_steps=-1),
    # "msrvtt_clip": eval_settings("msrvtt", task="msrvtt", strategy="clip")}; settings an entry leaves
    # out take their defaults (eval_entry).
    e.tasks = ml_collections.ConfigDict()
    e.data_dir = config_dict.placeholder(str)  # TFDS data_dir of the eval datasets (default: data.data_dir)
    e.at_end = True  # run every entry after the last step
    # One training-length clip (8 s): what the clip / clips_average strategies and the localisation
    # windows feed the model (video tokens at 1.5/s, STFT frames at 100/s).
    e.clip = ml_collections.ConfigDict({"n_video_tokens": 12, "n_stft": 768})
    # "At once" (the paper's main setting): a whole test clip in one pass, with room for the longest
    # clips of the split: MSR-VTT 32 s, YouCook2 48 s. clips_average cuts these into `clip`-long pieces.
    e.at_once = ml_collections.ConfigDict({
        "msrvtt": {"n_video_tokens": 48, "n_stft": 3072},
        "youcook2": {"n_video_tokens": 72, "n_stft": 4608},
        "synthetic": {"n_video_tokens": 48, "n_stft": 3072},
    })
    return e


def reference_config() -> ml_collections.ConfigDict:
    """Every known field with its default: the paper's main TVA model and its HowTo100M pre-training."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = model_config()
    c.loss = loss_config()
    c.data = data_config()
    c.train = train_config()
    c.init_from = config_dict.placeholder(str)  # converted or earlier checkpoint to start from
    c.mesh = mesh_config()
    c.checkpoint = checkpoint_config()
    c.eval = eval_config()
    return c


# ------------------------------------------------------------------------------------------------
# Helpers of the config files


def parse_arg(arg: str | None, **spec: Any) -> ml_collections.ConfigDict:
    """A config file's argument (`--config=FILE.py:ARG`), big_vision style: ARG is comma-separated
    `key=value` items, or a bare `key` for a boolean (True). `spec` names every key with its default;
    a value is converted to its default's type (bool: true/false/1/0). Raises ValueError naming an
    unknown key (and the known ones) or a value of the wrong type."""
    args = ml_collections.ConfigDict(spec)
    for item in filter(None, (s.strip() for s in (arg or "").split(","))):
        key, eq, value = item.partition("=")
        if key not in spec:
            raise ValueError(f"config argument {item!r}: unknown key {key!r}; known: "
                             + ", ".join(f"{k}={v!r}" for k, v in spec.items()))
        default = spec[key]
        if isinstance(default, bool):
            if eq and value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config argument {item!r}: {key} takes true or false")
            args[key] = not eq or value.lower() in ("true", "1")
        elif not eq:
            raise ValueError(f"config argument {item!r}: expected {key}=VALUE")
        else:
            try:
                args[key] = type(default)(value)
            except ValueError:
                raise ValueError(f"config argument {item!r}: {key} takes a value of type "
                                 f"{type(default).__name__}") from None
    return args


def apply_overrides(config: ml_collections.ConfigDict, *tables: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Sets each `{"section.field": value}` of `tables` in `config` (in place; returned). Every field
    must exist; two tables that set one field to different values are an error, so that combining
    variants never silently drops one of them."""
    merged: dict[str, Any] = {}
    for table in tables:
        for path, value in table.items():
            if path in merged and merged[path] != value:
                raise ValueError(f"{path}: set to {merged[path]!r} and to {value!r} by the combined variants")
            merged[path] = value
    for path, value in merged.items():
        *parents, field = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        if field not in node:
            raise KeyError(f"{path}: not a config field")
        node[field] = value
    return config
