"""Data layer: released layouts -> TFDS (tfds_builders, eao_jax.prepare) -> grain pipelines.

Modules:
  text        tokenisation, word2vec binary reader, the per-dataset word-vector table
  audio       time <-> STFT frame mapping, crop / pad, cut into clips
  video       video tokens (clip / nearest / max_pool) from 2D + 3D features
  howto       HowTo100M training clips (`clip_from_segment`, random clip sampling)
  validate    prepare-time checks and the skip report
  records     record field encoding shared by builders and pipelines
  dataset     opening a prepared dataset (`PreparedDataset`)
  pipelines   grain iterators: training, retrieval evaluation, localisation
  synthetic   the learnable synthetic dataset (`ensure_prepared`)
  benchmark   `python -m eao_jax.data.benchmark --workers=N`
Only the numpy-only modules are imported here; `pipelines` (grain) and `dataset` (TFDS) on demand.
"""

from eao_jax.data.howto import clip_from_segment
from eao_jax.data.text import WordTable, tokenize
from eao_jax.data.video import video_tokens

__all__ = ["WordTable", "clip_from_segment", "tokenize", "video_tokens"]
