"""Analytic FLOP count of the EAO forward pass and training step (matmuls and convolutions).

Counts 2 FLOPs per multiply-accumulate of every dense matmul and convolution the model runs: token
projections, DAVEnet, the fusion transformer (all passes, attention included, dense over the masked
sequence as computed), output projections and the contrastive similarities. Element-wise work
(norms, activations, softmax, Adam) is left out, so the count is the usual "model FLOPs" and sits a
little below XLA's cost analysis, which counts every element-wise op too (tests/test_bench.py checks
the two agree). Convolution taps that fall on the zero padding are not counted (XLA does not count
them either).

The backward pass costs two forward matmuls per matmul (input and weight gradients), except the
layers whose input is data (video / text token projections, the DAVEnet stem): no input gradient.

    from eao_jax import flops
    f = flops.train_step_flops(config)       # {"forward": ..., "backward": ..., "total": ..., "parts": {...}}

Measured counterparts, shared by the benchmarks: `xla_flops` (XLA's cost analysis of a compiled
program) and `matmul_peak` / `probe_matmul` (the machine's dense matmul FLOP/s).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from typing import Any

import ml_collections

from eao_jax.lazy import lazy_import

# Imported on first use (the analytic counts need no JAX).
jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")

MODALITIES = ("text", "video", "audio")


def conv1d_taps(t_in: int, kernel: int, stride: int) -> int:
    """Multiply-accumulates per (input channel, output channel) of a 1-D conv with `kernel // 2`
    zero padding on both sides: taps inside the input, summed over the ceil(t_in / stride) outputs."""
    pad = kernel // 2
    t_out = (t_in + 2 * pad - kernel) // stride + 1
    taps = 0
    for o in range(t_out):
        lo = o * stride - pad
        taps += sum(1 for j in range(kernel) if 0 <= lo + j < t_in)
    return taps


def davenet_flops(n_stft: int, n_mels: int, blocks: Sequence[int], widths: Sequence[int], kernel: int
                  ) -> tuple[int, int, int]:
    """Per clip: (forward FLOPs, forward FLOPs of the stem, number of output tokens)."""
    stem = 2 * n_stft * n_mels * widths[0]
    total = stem
    t, cin = n_stft, widths[0]
    for n_blocks, cout in zip(blocks, widths[1:], strict=True):
        for b in range(n_blocks):
            stride = 2 if b == 0 else 1
            t_out = (t + 2 * (kernel // 2) - kernel) // stride + 1
            total += 2 * conv1d_taps(t, kernel, stride) * cin * cout  # conv1
            total += 2 * conv1d_taps(t_out, kernel, 1) * cout * cout  # conv2
            if stride != 1 or cin != cout:
                total += 2 * t_out * cin * cout  # 1x1 shortcut
            t, cin = t_out, cout
    return total, stem, t


def _passes(mods: tuple[str, ...], cross_modal: bool) -> list[tuple[tuple[str, ...], ...]]:
    # Mirrors EverythingAtOnce.default_passes.
    if not cross_modal or len(mods) < 2:
        return [tuple((m,) for m in mods)]
    passes = []
    for pair in itertools.combinations(mods, 2):
        passes.append((pair,) + tuple((m,) for m in mods if m not in pair))
    if len(mods) == 2:
        passes.append(tuple((m,) for m in mods))
    return passes


def _block_flops(length: int, dim: int, hidden: int) -> int:
    """One pre-norm ViT block on one sequence of `length` tokens."""
    dense = 2 * length * dim * (3 * dim + dim + 2 * hidden)  # qkv, proj, fc1, fc2
    attn = 2 * 2 * length * length * dim  # q.k and weights.v over all heads
    return dense + attn


def _projection_flops(rows: int, din: int, dout: int, kind: str) -> int:
    return 2 * rows * (din * dout + (dout * dout if kind == "gated" else 0))


def forward_parts(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict[str, int]:
    """Forward FLOPs per part for a global batch of `batch_size` clips (default: the config's
    videos_per_batch x clips_per_video), with the data config's token counts."""
    m, d = config.model, config.data
    b = int(batch_size if batch_size is not None else d.videos_per_batch * d.clips_per_video)
    mods = tuple(m.modalities)
    dim, pdim = int(m.embed_dim), int(m.projection_dim)
    hidden = int(dim * m.mlp_ratio)
    n_tokens = {"video": int(d.n_video_tokens), "text": int(d.max_words)}
    in_dims = {"video": int(m.video_dim), "text": int(m.text_dim)}
    parts: dict[str, int] = {}
    if "audio" in mods:
        dv = m.davenet
        dav, stem, n_audio = davenet_flops(int(d.n_stft), int(dv.n_mels), tuple(dv.blocks), tuple(dv.widths),
                                           int(dv.kernel))
        parts["davenet"] = b * dav
        parts["davenet_stem"] = b * stem  # included in "davenet"; listed for the backward rule
        n_tokens["audio"] = n_audio
        in_dims["audio"] = int(dv.widths[-1])
    for mod in mods:
        parts[f"token_proj_{mod}"] = _projection_flops(b * n_tokens[mod], in_dims[mod], dim, m.token_projection)

    per_modality = m.fusion == "per_modality"
    cross_modal = bool(m.cross_modal) and not per_modality and len(mods) > 1
    passes = _passes(mods, cross_modal)
    depth = int(m.depth)
    if per_modality:
        parts["fusion"] = depth * b * sum(_block_flops(n_tokens[mod], dim, hidden) for mod in mods)
        proj_rows = {mod: b for mod in mods}
    else:
        n_cls = max(len(p) for p in passes) if m.use_cls_token else 0
        length = n_cls + sum(n_tokens[mod] for mod in mods)
        parts["fusion"] = depth * len(passes) * b * _block_flops(length, dim, hidden)
        proj_rows = {mod: 0 for mod in mods}
        for groups in passes:
            for group in groups:
                # A CLS output is projected once per group; pooled tokens once per modality of the group.
                for mod in (group[:1] if m.use_cls_token else group):
                    proj_rows[mod] += b
    parts["output_proj"] = sum(_projection_flops(r, dim, pdim, m.projection) for r in proj_rows.values())

    # Contrastive similarities x @ y.T per loss term present (weight > 0, both embeddings produced).
    produced = set(mods)
    if cross_modal:
        produced |= {"".join(p) for p in itertools.combinations(mods, 2)}
    terms = {"tv": ("text", "video"), "ta": ("text", "audio"), "va": ("video", "audio"),
             "t_va": ("text", "videoaudio"), "v_ta": ("video", "textaudio"), "a_tv": ("audio", "textvideo")}
    n_terms = sum(1 for t, (x, y) in terms.items()
                  if float(config.loss.weights.get(t, 0.0)) > 0 and x in produced and y in produced)
    parts["loss"] = n_terms * 2 * b * b * pdim
    return parts


def train_step_flops(config: ml_collections.ConfigDict, batch_size: int | None = None) -> dict:
    """FLOPs of one training step (forward + backward) for the global batch.

    Returns {"forward", "backward", "total", "parts": forward FLOPs per part}. The backward pass is
    2x forward, minus the input gradients of layers that read data (video/text token projections'
    first matmul, DAVEnet stem), which autodiff does not compute.
    """
    parts = forward_parts(config, batch_size)
    forward = sum(v for k, v in parts.items() if k != "davenet_stem")
    m, d = config.model, config.data
    b = int(batch_size if batch_size is not None else d.videos_per_batch * d.clips_per_video)
    no_input_grad = parts.get("davenet_stem", 0)
    n_tokens = {"video": int(d.n_video_tokens), "text": int(d.max_words)}
    in_dims = {"video": int(m.video_dim), "text": int(m.text_dim)}
    for mod in ("video", "text"):
        if mod in m.modalities:
            no_input_grad += 2 * b * n_tokens[mod] * in_dims[mod] * int(m.embed_dim)
    backward = 2 * forward - no_input_grad
    return {"forward": forward, "backward": backward, "total": forward + backward, "parts": parts}


# ------------------------------------------------------------------------------------------------
# Measured


def xla_flops(compiled: Any) -> float:
    """FLOPs of a compiled program by XLA's cost analysis (one device's program when partitioned)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def matmul_peak(size: int, dtype: Any, repeats: int = 3, device: Any = None) -> tuple[tuple[float, float], Any]:
    """Dense (size x size) @ (size x size) matmul under jit on `device`, `repeats` times.
    Returns ((best FLOP/s of the repeats, FLOP per second of process CPU time over all repeats),
    the probe) so later probes reuse the compiled function: `probe_matmul(*probe, repeats)`."""
    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype) / size, device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    return probe_matmul(f, a, repeats), (f, a)


def probe_matmul(f: Any, a: Any, repeats: int) -> tuple[float, float]:
    """(best FLOP/s, FLOP per process CPU second) of `repeats` runs of the probe `f(a, a)`."""
    best = float("inf")
    c0 = time.process_time()
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    cpu = time.process_time() - c0
    flop = 2.0 * a.shape[0] ** 3
    return flop / best, flop * repeats / max(cpu, 1e-9)
