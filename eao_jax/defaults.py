"""Defaults of the paper's architecture and loss (the main TVA model of Everything at Once).

Numbers come from the authors' released `configs/pretraining/everything_at_once_tva.yaml` and the
model code. They live in the package so that tools which build a model without
a config file (the checkpoint converter) start from the same values as `configs/howto100m.py`.
"""

import ml_collections


def model_config() -> ml_collections.ConfigDict:
    """The TVA fusion model (arch.args of everything_at_once_tva.yaml)."""
    m = ml_collections.ConfigDict()
    m.modalities = ("text", "video", "audio")  # ("text", "video") is the TV-only model
    m.video_dim = 4096  # ResNet-152 2D (2048) + ResNeXt-101 3D (2048), L2-normalised per part
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
