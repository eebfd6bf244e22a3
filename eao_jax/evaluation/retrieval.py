"""Retrieval metrics (numpy, host side): similarity matrices, averaged ranks, R@k / MedR / MeanR.

Protocol (the original's `RetrievalMetric`):
- query i's positive is item i, i.e. the diagonal of a square similarity matrix;
- rank = 0-based position of the diagonal value in its descending-sorted row, averaged over every
  column that holds exactly the same value (so ranks can be fractional);
- R@k = 100 * #(hits) / N_complete where N_complete >= number of evaluated rows; items missing from
  the evaluated set count as failures;
- MedR / MeanR = median / mean of the ranks of the evaluated rows, plus one;
- cosine similarity re-normalises with max(norm, 1e-8).

Everything is vectorised: an averaged rank is #(row values > diagonal) + (#(row values == diagonal) - 1) / 2,
which is the mean of the sorted positions of the tied block, computed in O(N^2) without sorting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# Short modality names used in direction names -> embedding keys of the embeddings dict.
EMBED_KEYS: dict[str, str] = {
    "t": "text_embed",
    "v": "video_embed",
    "a": "audio_embed",
    "tv": "tv_embed",
    "ta": "ta_embed",
    "va": "va_embed",
    "t+v": "t+v_embed",
    "t+a": "t+a_embed",
    "v+a": "v+a_embed",
}

# The 9 similarity matrices that are computed; each also yields its reverse direction by transposition.
QUERY_PAIRS: tuple[tuple[str, str], ...] = (
    ("t", "v"),
    ("t", "a"),
    ("v", "a"),
    ("t", "va"),
    ("v", "ta"),
    ("a", "tv"),
    ("t", "v+a"),
    ("v", "t+a"),
    ("a", "t+v"),
)

# The 18 directions of the original, in its configured order (plain pairs, fused pairs, late fusion).
DIRECTIONS: tuple[str, ...] = (
    "t2v", "v2t", "t2a", "a2t", "v2a", "a2v",
    "t2va", "va2t", "v2ta", "ta2v", "a2tv", "tv2a",
    "t2v+a", "v+a2t", "v2t+a", "t+a2v", "a2t+v", "t+v2a",
)  # fmt: skip

# The directions the original prints in its summary line, also the ones plotted by default.
MAIN_DIRECTIONS: tuple[str, ...] = ("t2v", "t2va", "t2v+a")

RECALL_KS: tuple[int, ...] = (1, 5, 10, 50)
GEOMETRIC_MEAN_KEY = "geometric_mean_R1-R5-R10"
METRIC_NAMES: tuple[str, ...] = ("R1", "R5", "R10", "R50", "MedR", "MeanR", GEOMETRIC_MEAN_KEY)


def split_direction(direction: str) -> tuple[str, str]:
    """'t2v+a' -> ('t', 'v+a'). Raises ValueError for names outside the 9 modality combinations."""
    parts = direction.split("2")
    if len(parts) != 2 or parts[0] not in EMBED_KEYS or parts[1] not in EMBED_KEYS:
        raise ValueError(
            f"unknown retrieval direction {direction!r}: expected '<query>2<target>' with both sides in "
            f"{sorted(EMBED_KEYS)}"
        )
    return parts[0], parts[1]


def normalize_embeddings(x: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Row-wise L2 normalisation x / max(||x||, eps). x: (N, D) -> (N, D), float32 or wider."""
    x = as_float_matrix(x, "embeddings")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, eps)


def cosine_similarity(a: np.ndarray, b: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity with re-normalisation: a (N, D), b (M, D) -> (N, M).

    Computed in the inputs' precision (float32 embeddings give float32 similarities, as the original's
    torch.mm does), since exact ties in the similarities matter for the averaged ranks.
    """
    a = normalize_embeddings(a, eps)
    b = normalize_embeddings(b, eps)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"embedding sizes differ: {a.shape} vs {b.shape}")
    return a @ b.T


def averaged_ranks(sims: np.ndarray, chunk_rows: int = 1024) -> np.ndarray:
    """0-based rank of each row's diagonal entry, ties averaged.

    Args:
      sims: (N, N) similarities; row i's positive is column i.
      chunk_rows: rows compared at a time (bounds the temporary boolean arrays to chunk_rows x N).
    Returns:
      (N,) float64 ranks in [0, N-1]; a diagonal tied with e-1 other columns and below g larger
      values gets g + (e - 1) / 2, the mean of the positions g .. g+e-1 it could occupy.
    """
    sims = _check_square(sims)
    n = sims.shape[0]
    diag = np.diagonal(sims)
    ranks = np.empty(n, dtype=np.float64)
    for start in range(0, n, chunk_rows):
        rows = sims[start : start + chunk_rows]
        d = diag[start : start + chunk_rows, None]
        greater = np.count_nonzero(rows > d, axis=1)
        equal = np.count_nonzero(rows == d, axis=1)  # includes the diagonal itself, so >= 1
        ranks[start : start + chunk_rows] = greater + (equal - 1) / 2.0
    return ranks


def metrics_from_ranks(ranks: np.ndarray, complete_dataset_size: int | None = None) -> dict[str, float]:
    """R1/R5/R10/R50 (percent), MedR, MeanR and the geometric mean of R1, R5, R10.

    Args:
      ranks: (N,) 0-based averaged ranks of the evaluated queries.
      complete_dataset_size: recall denominator (>= N); None means N. The missing items count as failures;
        MedR and MeanR use the evaluated ranks only.
    Note: R1 counts rank == 0 exactly, as the original does, so a diagonal tied for first place
      (rank 0.5) is not an R1 hit although it is an R5 hit; R5/R10/R50 count rank < k.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    if not np.all(np.isfinite(ranks)):
        raise ValueError("ranks contain NaN or inf")
    num_queries = _denominator(ranks.size, complete_dataset_size)
    metrics: dict[str, float] = {}
    for k in RECALL_KS:
        hits = np.count_nonzero(ranks == 0) if k == 1 else np.count_nonzero(ranks < k)
        metrics[f"R{k}"] = 100.0 * float(hits) / num_queries
    metrics["MedR"] = float(np.median(ranks)) + 1.0
    metrics["MeanR"] = float(np.mean(ranks)) + 1.0
    metrics[GEOMETRIC_MEAN_KEY] = geometric_mean([metrics["R1"], metrics["R5"], metrics["R10"]])
    return metrics


def retrieval_metrics(sims: np.ndarray, complete_dataset_size: int | None = None) -> dict[str, float]:
    """Metrics of a square (N, N) similarity matrix whose row i's positive is column i."""
    return metrics_from_ranks(averaged_ranks(sims), complete_dataset_size)


def recall_at_k_curve(ranks: np.ndarray, complete_dataset_size: int | None = None, max_k: int = 50) -> np.ndarray:
    """Recall@K in percent for K = 1..max_k: (max_k,). K=1 counts rank == 0 (as R1 does), K>1 rank < K."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.ndim != 1 or ranks.size == 0:
        raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
    num_queries = _denominator(ranks.size, complete_dataset_size)
    ks = np.arange(1, max_k + 1, dtype=np.float64)
    hits = np.count_nonzero(ranks[None, :] < ks[:, None], axis=1)
    hits[0] = np.count_nonzero(ranks == 0)
    return 100.0 * hits / num_queries


def geometric_mean(values: Sequence[float]) -> float:
    """Geometric mean of non-negative values; 0 if any value is 0 (as scipy's gmean gives)."""
    v = np.asarray(values, dtype=np.float64)
    if np.any(v < 0):
        raise ValueError(f"geometric mean of negative values: {values}")
    if np.any(v == 0):
        return 0.0
    return float(np.exp(np.mean(np.log(v))))


def available_directions(embeds: Mapping[str, np.ndarray]) -> list[str]:
    """The directions of DIRECTIONS whose two embeddings are present in `embeds`, in DIRECTIONS order."""
    out = []
    for direction in DIRECTIONS:
        q, t = split_direction(direction)
        if EMBED_KEYS[q] in embeds and EMBED_KEYS[t] in embeds:
            out.append(direction)
    return out


def direction_ranks(
    embeds: Mapping[str, np.ndarray],
    directions: Sequence[str] | None = None,
    eps: float = 1e-8,
) -> dict[str, np.ndarray]:
    """Averaged ranks (N,) for each direction, computing each similarity matrix once for both directions.

    Args:
      embeds: {'text_embed': (N, D), 'video_embed': (N, D), ...} (see EMBED_KEYS); row i of every array is
        item i. Other keys (e.g. '*_nonempty_input_mask') are ignored.
      directions: names from DIRECTIONS (any '<q>2<t>' over EMBED_KEYS works); None = every direction of
        DIRECTIONS whose embeddings are present. An explicitly requested direction with a missing
        embedding is a KeyError naming it.
    """
    if directions is None:
        directions = available_directions(embeds)
        if not directions:
            raise KeyError(f"no retrieval direction available: embeddings dict has keys {sorted(embeds)}")
    wanted = list(dict.fromkeys(directions))
    n = None
    for direction in wanted:
        for side in split_direction(direction):
            key = EMBED_KEYS[side]
            if key not in embeds:
                raise KeyError(f"direction {direction!r} needs embedding {key!r}, which is missing")
            rows = np.shape(embeds[key])[0]
            if n is None:
                n = rows
            elif rows != n:
                raise ValueError(f"embedding {key!r} has {rows} rows, expected {n} like the others")

    ranks: dict[str, np.ndarray] = {}
    done: set[str] = set()
    for direction in wanted:
        if direction in done:
            continue
        q, t = split_direction(direction)
        sims = cosine_similarity(embeds[EMBED_KEYS[q]], embeds[EMBED_KEYS[t]], eps)
        ranks[direction] = averaged_ranks(sims)
        done.add(direction)
        reverse = f"{t}2{q}"
        if reverse in wanted and reverse not in done:
            ranks[reverse] = averaged_ranks(np.ascontiguousarray(sims.T))
            done.add(reverse)
        del sims  # the matrices can be large (N = 3350): keep one alive at a time
    return {d: ranks[d] for d in wanted}


def compute_all_retrieval_metrics(
    embeds: Mapping[str, np.ndarray],
    complete_dataset_size: int | None = None,
    directions: Sequence[str] | None = None,
    eps: float = 1e-8,
) -> dict[str, dict[str, float]]:
    """Metrics of every retrieval direction from an embeddings dict, ready for the results JSON.

    Args:
      embeds: see `direction_ranks`; each array (N, D) with N evaluated items.
      complete_dataset_size: recall denominator (>= N), e.g. 1000 for MSR-VTT, 3350 for YouCook2.
      directions: see `direction_ranks` (None = all of the 18 whose embeddings exist).
    Returns:
      {direction: {'R1', 'R5', 'R10', 'R50', 'MedR', 'MeanR', 'geometric_mean_R1-R5-R10'}}.
    """
    ranks = direction_ranks(embeds, directions, eps)
    return {d: metrics_from_ranks(r, complete_dataset_size) for d, r in ranks.items()}


def average_embeddings_by_id(
    ids: Sequence[object] | np.ndarray,
    embeds: Mapping[str, np.ndarray],
    drop_id: object = -1,
) -> tuple[list[object], dict[str, np.ndarray]]:
    """Average raw (unnormalised) embeddings of rows sharing an id; for the "cut into clips" strategy.

    Args:
      ids: (R,) one id per row (str or int). Rows whose id equals `drop_id` (-1 or '-1' both match the
        default) are dropped: they are clips rejected for too little audio.
      embeds: {name: (R, D)} arrays, all with R rows.
    Returns:
      (unique_ids, {name: (U, D)}) with the ids in order of first appearance and row u of each array the
      mean of the rows with id unique_ids[u].
    """
    ids_list = list(np.asarray(ids).tolist()) if isinstance(ids, np.ndarray) else list(ids)
    num_rows = len(ids_list)
    for name, x in embeds.items():
        if np.ndim(x) < 1 or np.shape(x)[0] != num_rows:
            raise ValueError(f"embedding {name!r} has shape {np.shape(x)}, expected {num_rows} rows (one per id)")
    drop_keys = {str(drop_id)}

    first_index: dict[str, int] = {}
    unique_ids: list[object] = []
    group = np.full(num_rows, -1, dtype=np.int64)
    for row, id_ in enumerate(ids_list):
        key = str(id_)  # 7 and '7' are the same item; -1 and '-1' both mean "dropped"
        if key in drop_keys:
            continue
        if key not in first_index:
            first_index[key] = len(unique_ids)
            unique_ids.append(id_)
        group[row] = first_index[key]
    keep = group >= 0
    if not np.any(keep):
        raise ValueError("every row has the dropped id; nothing to average")
    counts = np.bincount(group[keep], minlength=len(unique_ids)).astype(np.float64)

    out: dict[str, np.ndarray] = {}
    for name, x in embeds.items():
        x = np.asarray(x)
        sums = np.zeros((len(unique_ids),) + x.shape[1:], dtype=np.float64)
        np.add.at(sums, group[keep], x[keep].astype(np.float64))
        mean = sums / counts.reshape((-1,) + (1,) * (x.ndim - 1))
        out[name] = mean.astype(np.result_type(x.dtype, np.float32))
    return unique_ids, out


def as_float_matrix(x: np.ndarray, what: str) -> np.ndarray:
    """A finite 2-D float array (integers become float32); errors name `what`."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contain NaN or inf")
    return x


def _check_square(sims: np.ndarray) -> np.ndarray:
    sims = np.asarray(sims)
    if sims.ndim != 2 or sims.shape[0] != sims.shape[1] or sims.shape[0] == 0:
        raise ValueError(f"similarity matrix must be square (N, N) with N >= 1, got shape {sims.shape}")
    if not np.all(np.isfinite(sims)):
        raise ValueError("similarity matrix contains NaN or inf")
    return sims


def _denominator(num_evaluated: int, complete_dataset_size: int | None) -> int:
    if complete_dataset_size is None:
        return num_evaluated
    if int(complete_dataset_size) != complete_dataset_size or complete_dataset_size < num_evaluated:
        raise ValueError(
            f"complete_dataset_size={complete_dataset_size} must be an integer >= the {num_evaluated} evaluated queries"
        )
    return int(complete_dataset_size)
