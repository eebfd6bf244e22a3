"""Video tokens from 2D (1 feature/s) and 3D (1.5 features/s) features, as the original builds them.

Strategies, for `n_tokens` output tokens:
  clip      2D is nearest-resampled to the 3D length, each part L2-normalised, [2D | 3D] concatenated,
            the first `n_tokens` kept and zero-padded. An empty 2D or 3D slice gives an empty video.
  nearest   if there are more than `n_tokens` 3D features, 2D and 3D are each nearest-resampled to
            `n_tokens` (2D is not first matched to the 3D rate); otherwise "clip".
  max_pool  k = floor(T / n_tokens) per part, non-overlapping max-pool (kernel = stride = k, floor
            mode), then "nearest"; falls back to "clip" when T3 <= n_tokens and to "nearest" when k <= 1.
Single-backbone inputs (S3D: 3D only; CLIP: 2D only) skip the 2D->3D resampling. (The original's
nearest / max_pool paths pass a lone 2D tensor as both parts, doubling its width; that only crashes a
model of the right width, so here a single backbone is always treated as one part.)

"Nearest" is PyTorch's legacy rule: source index min(floor(i * s), T_in - 1) with s = T_in / T_out
computed in float32, and the exact cases T_out == T_in and T_out == 2 * T_in special-cased.
"""

from __future__ import annotations

import numpy as np

from eao_jax.data.records import half_to_float32

STRATEGIES = ("clip", "nearest", "max_pool")


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """(n_out,) int64 source indices of PyTorch's legacy 'nearest' interpolation."""
    if n_out == n_in:
        return np.arange(n_out)
    if n_out == 2 * n_in:
        return np.arange(n_out) >> 1
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Row-wise x / max(||x||, eps), float32 (torch.nn.functional.normalize)."""
    y = half_to_float32(x) if x.dtype == np.float16 else np.array(x, dtype=np.float32)  # a copy, normalised in place
    norm = np.sqrt(np.einsum("ij,ij->i", y, y))
    y /= np.maximum(norm, np.float32(eps))[:, None]
    return y


def _max_pool(x: np.ndarray, k: int) -> np.ndarray:
    n = x.shape[0] // k
    return x[: n * k].reshape(n, k, x.shape[1]).max(axis=1)


def video_tokens(feat_2d: np.ndarray | None, feat_3d: np.ndarray | None, n_tokens: int,
                 strategy: str = "clip", out: tuple[np.ndarray, np.ndarray] | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Builds video tokens.

    Args:
      feat_2d: (T2, D2) features at 1/s, or None when the backbone is not used.
      feat_3d: (T3, D3) features at 1.5/s (S3D: 1/s), or None.
      n_tokens: number of output tokens Nv.
      strategy: "clip" | "nearest" | "max_pool".
      out: optional zero-filled (video (Nv, D2 + D3), mask (Nv,)) float32 arrays to write into.

    Returns:
      video (Nv, D2 + D3) float32 (zeros where masked) and mask (Nv,) float32.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"video strategy must be one of {STRATEGIES}, got {strategy!r}")
    if feat_2d is None and feat_3d is None:
        raise ValueError("video_tokens: need 2D or 3D features")
    if feat_2d is None or feat_3d is None:
        return _single(feat_3d if feat_2d is None else feat_2d, n_tokens, strategy, out)
    n2, n3 = feat_2d.shape[0], feat_3d.shape[0]
    d2, d3 = feat_2d.shape[1], feat_3d.shape[1]
    if strategy == "max_pool" and not (n3 <= n_tokens or n2 == 0):
        k3, k2 = n3 // n_tokens, n2 // n_tokens
        if k2 > 1 and k3 > 1:
            feat_2d, feat_3d = _max_pool(feat_2d, k2), _max_pool(feat_3d, k3)
            n2, n3 = feat_2d.shape[0], feat_3d.shape[0]
        strategy = "nearest"
    video, mask = _outputs(out, n_tokens, d2 + d3)
    if strategy == "nearest" and not (n3 <= n_tokens or n2 == 0):
        video[:, :d2] = l2_normalize(feat_2d[nearest_indices(n2, n_tokens)])
        video[:, d2:] = l2_normalize(feat_3d[nearest_indices(n3, n_tokens)])
        mask[:] = 1.0
        return video, mask
    # "clip"
    idx2, m = clip_rows(n2, n3, n_tokens)
    write_clip_tokens(video, mask, feat_2d[idx2], feat_3d[:m])
    return video, mask


def clip_rows(n2: int | None, n3: int | None, n_tokens: int) -> tuple[np.ndarray | None, int]:
    """The rows the "clip" strategy reads: (2D row indices, number m of leading 3D rows).

    With both parts, 2D is nearest-resampled to the 3D length and only its first m = min(n3, n_tokens)
    rows are used; an empty part gives an empty video (m = 0). With one part (n2 or n3 None), its
    first m = min(n, n_tokens) rows (the 2D indices are then None and m counts the single part).
    """
    if n2 is None or n3 is None:
        return None, min(n3 if n2 is None else n2, n_tokens)
    if n2 == 0 or n3 == 0:
        return np.zeros((0,), np.int64), 0
    m = min(n3, n_tokens)
    return nearest_indices(n2, n3)[:m], m


def write_clip_tokens(video: np.ndarray, mask: np.ndarray, rows_2d: np.ndarray | None,
                      rows_3d: np.ndarray | None) -> int:
    """Writes "clip" tokens into rows :m of float32 (Nv, D2 + D3) / (Nv,) arrays from the rows
    `clip_rows` selects (each part L2-normalised in place; a lone part fills the whole width);
    returns m (rows m: are left as they are: zero-filled arrays give the padded video)."""
    parts = [r for r in (rows_2d, rows_3d) if r is not None]
    m = min(len(r) for r in parts)
    if m == 0:
        return 0
    col = 0
    for r in parts:
        # Convert and take norms in a small contiguous array (cache-resident), then write the output once.
        x = half_to_float32(r[:m]) if r.dtype == np.float16 else np.asarray(r[:m], np.float32)
        norm = np.sqrt(np.einsum("ij,ij->i", x, x))
        np.divide(x, np.maximum(norm, np.float32(1e-12))[:, None], out=video[:m, col:col + r.shape[1]])
        col += r.shape[1]
    mask[:m] = 1.0
    return m


def _outputs(out, n_tokens: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    if out is None:
        return np.zeros((n_tokens, d), np.float32), np.zeros((n_tokens,), np.float32)
    video, mask = out
    if video.shape != (n_tokens, d) or mask.shape != (n_tokens,):
        raise ValueError(f"video_tokens: out arrays {video.shape}, {mask.shape} do not fit ({n_tokens}, {d})")
    return video, mask


def _single(feat: np.ndarray, n_tokens: int, strategy: str, out=None) -> tuple[np.ndarray, np.ndarray]:
    n, d = feat.shape
    if strategy == "max_pool" and n > n_tokens:
        k = n // n_tokens
        if k > 1:
            feat = _max_pool(feat, k)
            n = feat.shape[0]
        strategy = "nearest"
    video, mask = _outputs(out, n_tokens, d)
    if strategy == "nearest" and n > n_tokens:
        video[:] = l2_normalize(feat[nearest_indices(n, n_tokens)])
        mask[:] = 1.0
        return video, mask
    write_clip_tokens(video, mask, None, feat[:min(n, n_tokens)])
    return video, mask


def time_slice(features: np.ndarray, fps: float, start: float, end: float,
               accurate_borders: bool = False) -> np.ndarray:
    """Features of [start, end] seconds at `fps` features/s.

    Training clips use the original's indices int(start*fps) to int(end*fps)+1; localisation windows
    use floor(start*fps) to ceil(end*fps) ("accurate borders").
    """
    if accurate_borders:
        a, b = int(np.floor(start * fps)), int(np.ceil(end * fps))
    else:
        a, b = int(start * fps), int(end * fps) + 1
    return features[a:b]
