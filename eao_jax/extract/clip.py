"""CLIP ViT (OpenAI; ViT-B/32 in EAO's CLIP checkpoint): image features, and the per-token text
outputs EAO's CLIP variant feeds the fusion model. Equal to openai/CLIP's `model.py`.

Image: frames (B, R, R, 3) uint8, already resized so the short side is R (224; bicubic) and centre-
cropped (`centre_crop`) -> (x / 255 - mean) / std with CLIP's mean and std -> R/P x R/P patches
(a PxP stride-P convolution, no bias) -> [class embedding; patches] + positional embedding -> ln_pre ->
pre-norm residual attention blocks (multi-head attention; MLP 4x with QuickGELU x * sigmoid(1.702 x))
-> ln_post of the class token -> @ proj -> image features (B, E) (E = 512 for ViT-B/32).
Text: token ids (B, L) (`Tokenizer`; L = 77) -> token + positional embedding -> the same blocks under
a causal mask -> ln_final -> @ text_projection -> (B, L, E) per-token outputs. From those:
  `text_tokens`: EAO's text input: positions 1 .. max_tokens (the start token dropped) and a mask of
    the positions before the end-of-text token (the largest id: the end token itself excluded);
  `text_features`: CLIP's own sentence feature, the output at the end-of-text token.
Attention heads are width // 64 (as openai/CLIP's `build_model` infers them).

Decoding and resizing the video (1 frame per second, short side 224, bicubic) are the extraction
job's; this module starts from the resized frames.

Weights: OpenAI's released TorchScript archive (`ViT-B-32.pt`: only its tensors are read, never its
code) or a plain state dict of the same keys (e.g. `torch.save(model.state_dict())` of an open_clip
or openai/CLIP model). The BPE vocabulary `bpe_simple_vocab_16e6.txt.gz` ships inside the
`open_clip_torch` wheel (`pip install --no-deps open_clip_torch`: the file is found without importing
the package, so torch is not needed) and in the openai/CLIP repository.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import html
import importlib.metadata
import os
import zipfile
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eao_jax import torch_pickle
from eao_jax.extract import weights
from eao_jax.extract.runner import Runner
from eao_jax.model.fusion import Attention
from eao_jax.model.layers import layer_norm, linear

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64
LN_EPS = 1e-5
MAX_TOKENS = 20  # EAO's max_words
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """A CLIP ViT (ViT-B/32's values as defaults)."""

    embed_dim: int = 512
    image_resolution: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12


# ------------------------------------------------------------------------------------------------
# Layers


class MLP(nnx.Module):
    """c_fc -> QuickGELU -> c_proj, (..., D) -> (..., D) through 4D."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.c_fc = linear(dim, 4 * dim, rngs=rngs, dtype=None)
        self.c_proj = linear(4 * dim, dim, rngs=rngs, dtype=None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.c_fc(x)
        return self.c_proj(h * jax.nn.sigmoid(1.702 * h))


class ResidualAttentionBlock(nnx.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)). (B, L, D) -> (B, L, D)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.ln_1 = layer_norm(dim, LN_EPS, rngs=rngs, dtype=None)
        self.attn = Attention(dim, dim // HEAD_WIDTH, qkv_bias=True, rngs=rngs, dtype=None)
        self.ln_2 = layer_norm(dim, LN_EPS, rngs=rngs, dtype=None)
        self.mlp = MLP(dim, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | bool) -> jax.Array:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))


class Transformer(nnx.Module):
    def __init__(self, dim: int, layers: int, *, rngs: nnx.Rngs):
        self.resblocks = nnx.List([ResidualAttentionBlock(dim, rngs=rngs) for _ in range(layers)])

    def __call__(self, x: jax.Array, mask: jax.Array | bool = True) -> jax.Array:
        for block in self.resblocks:
            x = block(x, mask)
        return x


def _param(shape: tuple[int, ...], rngs: nnx.Rngs, scale: float) -> nnx.Param:
    return nnx.Param(scale * jax.random.normal(rngs.params(), shape, jnp.float32))


class VisionTransformer(nnx.Module):
    """Frames (B, R, R, 3) -> image features (B, E). uint8 frames (0-255) are normalised with CLIP's
    mean and std here; float frames are taken as already normalised."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        w, p = cfg.vision_width, cfg.patch_size
        grid = cfg.image_resolution // p
        self.resolution = cfg.image_resolution
        self.conv1 = nnx.Conv(3, w, (p, p), strides=(p, p), padding="VALID", use_bias=False, rngs=rngs)
        self.class_embedding = _param((w,), rngs, w ** -0.5)
        self.positional_embedding = _param((grid * grid + 1, w), rngs, w ** -0.5)
        self.ln_pre = layer_norm(w, LN_EPS, rngs=rngs, dtype=None)
        self.transformer = Transformer(w, cfg.vision_layers, rngs=rngs)
        self.ln_post = layer_norm(w, LN_EPS, rngs=rngs, dtype=None)
        self.proj = _param((w, cfg.embed_dim), rngs, w ** -0.5)

    def __call__(self, frames: jax.Array) -> jax.Array:
        chex.assert_rank(frames, 4)
        r = self.resolution
        if frames.shape[1:] != (r, r, 3):
            raise ValueError(f"CLIP takes (B, {r}, {r}, 3) frames (see centre_crop), got {frames.shape}")
        dtype = self.proj[...].dtype
        x = frames.astype(dtype)
        if not jnp.issubdtype(frames.dtype, jnp.floating):
            x = (x / 255 - jnp.asarray(MEAN, dtype)) / jnp.asarray(STD, dtype)
        x = self.conv1(x)  # (B, R/P, R/P, W)
        b, gh, gw, w = x.shape
        x = x.reshape(b, gh * gw, w)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, w))
        x = jnp.concatenate([cls, x], axis=1) + self.positional_embedding[...].astype(x.dtype)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj[...].astype(x.dtype)


class TextTransformer(nnx.Module):
    """Token ids (B, L) int, L = context_length -> per-token outputs after text_projection (B, L, E)."""

    def __init__(self, cfg: CLIPConfig, *, rngs: nnx.Rngs):
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.text_width, rngs=rngs)
        self.positional_embedding = _param((cfg.context_length, cfg.text_width), rngs, 0.01)
        self.ln_final = layer_norm(cfg.text_width, LN_EPS, rngs=rngs, dtype=None)
        self.text_projection = _param((cfg.text_width, cfg.embed_dim), rngs, cfg.text_width ** -0.5)

    def __call__(self, ids: jax.Array) -> jax.Array:
        chex.assert_rank(ids, 2)
        chex.assert_type(ids, int)
        length = ids.shape[1]
        if length != self.positional_embedding.shape[0]:
            raise ValueError(f"CLIP's text takes {self.positional_embedding.shape[0]} tokens per row, got {length}")
        x = self.token_embedding(ids)
        x = x + self.positional_embedding[...].astype(x.dtype)
        causal = jnp.tril(jnp.ones((length, length), bool))
        x = self.ln_final(self.transformer(x, causal))
        return x @ self.text_projection[...].astype(x.dtype)


class CLIP(nnx.Module):
    """`visual` (VisionTransformer) and `textual` (TextTransformer). Attribute names follow openai/CLIP's
    modules (whose text layers sit at the top level of its state dict)."""

    def __init__(self, cfg: CLIPConfig = CLIPConfig(), *, rngs: nnx.Rngs):
        for name, width in (("vision_width", cfg.vision_width), ("text_width", cfg.text_width)):
            if width < HEAD_WIDTH:
                raise ValueError(f"{name}={width} gives no attention head ({HEAD_WIDTH} channels per head)")
        self.cfg = cfg
        self.visual = VisionTransformer(cfg, rngs=rngs)
        self.textual = TextTransformer(cfg, rngs=rngs)


def text_tokens(outputs: np.ndarray, ids: np.ndarray, max_tokens: int = MAX_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """EAO's text input from `TextTransformer` outputs (B, L, E) and their ids (B, L): the outputs at positions
    1 .. max_tokens (B, min(max_tokens, L - 1), E) and a float32 mask, 1 before the end-of-text token
    (the position of the largest id after the start token), 0 from it on."""
    chex.assert_rank([outputs, ids], [3, 2])
    tokens = outputs[:, 1:1 + max_tokens]
    n_before_eot = np.argmax(ids[:, 1:], axis=1)
    mask = (np.arange(tokens.shape[1])[None] < n_before_eot[:, None]).astype(np.float32)
    return tokens, mask


def text_features(outputs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """CLIP's sentence features (B, E): the outputs at each row's end-of-text token (its largest id)."""
    chex.assert_rank([outputs, ids], [3, 2])
    return outputs[np.arange(len(ids)), np.argmax(ids, axis=1)]


def centre_crop(frames: np.ndarray, size: int) -> np.ndarray:
    """(N, H, W, 3) frames whose short side is `size` -> (N, size, size, 3), the centre as torchvision's
    CenterCrop takes it (offsets int(round((H - size) / 2)) and the same for W)."""
    chex.assert_rank(frames, 4)
    h, w = frames.shape[1:3]
    if min(h, w) != size:
        raise ValueError(f"CLIP frames must be resized so that their short side is {size} (bicubic) before the "
                         f"centre crop; got {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return frames[:, top:top + size, left:left + size]


# ------------------------------------------------------------------------------------------------
# Weights

_IGNORED = ("logit_scale", "input_resolution", "context_length", "vocab_size")  # not used by the towers
_ATTENTION = {("qkv", "kernel"): "in_proj_weight", ("qkv", "bias"): "in_proj_bias",
              ("proj", "kernel"): "out_proj.weight", ("proj", "bias"): "out_proj.bias"}


def _torch_key(path: tuple) -> str:
    path = tuple(str(p) for p in path)
    if path[0] == "textual":
        path = path[1:]
    if len(path) >= 3 and path[-3] == "attn":
        return ".".join([*path[:-2], _ATTENTION[path[-2:]]])
    return weights.torch_key(path)


def _layers(sd: weights.StateDict, prefix: str) -> int:
    """Blocks under `prefix` (the largest index + 1, so a gap shows as a missing key)."""
    idx = {int(k[len(prefix):].split(".")[0]) for k in sd.keys_with_prefix(prefix)}
    if not idx:
        raise weights.WeightsError(f"{sd.source}: no {prefix}N.* entries (no transformer blocks)")
    return max(idx) + 1


def infer_config(sd: weights.StateDict) -> CLIPConfig:
    """Every dimension from the state dict's shapes."""
    if sd.keys_with_prefix("visual.layer1."):
        raise weights.WeightsError(f"{sd.source}: a ResNet CLIP (visual.layer1.*); only the ViT models are supported")
    width, _, patch, _ = sd.shape("visual.conv1.weight")
    grid = round((sd.shape("visual.positional_embedding")[0] - 1) ** 0.5)
    return CLIPConfig(embed_dim=sd.shape("text_projection")[1], image_resolution=grid * patch, patch_size=patch,
                      vision_width=width, vision_layers=_layers(sd, "visual.transformer.resblocks."),
                      context_length=sd.shape("positional_embedding")[0],
                      vocab_size=sd.shape("token_embedding.weight")[0], text_width=sd.shape("ln_final.weight")[0],
                      text_layers=_layers(sd, "transformer.resblocks."))


def from_state_dict(state: dict[str, np.ndarray], source: str) -> CLIP:
    """A CLIP holding `state`'s weights; WeightsError naming any missing, mis-shaped or unexpected key."""
    sd = weights.StateDict(state, source)
    cfg = infer_config(sd)
    try:
        abstract = nnx.eval_shape(lambda: CLIP(cfg, rngs=nnx.Rngs(0)))
    except ValueError as e:
        raise weights.WeightsError(f"{source}: {e}") from None
    model = weights.fill_nnx(abstract, sd, _torch_key)
    sd.skip(_IGNORED)
    sd.finish()
    return model


def load(path: str | os.PathLike) -> CLIP:
    """CLIP from OpenAI's TorchScript archive or a plain state dict (read without torch; no code run)."""
    source = os.fspath(path)
    try:
        state = weights.load_state_dict(source, torchscript=True)
    except torch_pickle.UnsafePickleError as e:
        if zipfile.is_zipfile(source) and any("/code/" in n for n in zipfile.ZipFile(source).namelist()):
            raise weights.WeightsError(
                f"{source}: this TorchScript archive holds objects that cannot be read without running its code "
                f"({e}); convert it to a state dict first: torch.save(torch.jit.load(path).state_dict(), out)"
            ) from None
        raise
    return from_state_dict(state, source)


# ------------------------------------------------------------------------------------------------
# Tokenizer (CLIP's byte-level BPE)


def default_vocab_path() -> str:
    """`bpe_simple_vocab_16e6.txt.gz` from an installed `open_clip_torch` (found by its file list;
    the package is not imported). FileNotFoundError saying how to get it otherwise."""
    try:
        dist = importlib.metadata.distribution("open_clip_torch")
        path = str(dist.locate_file(f"open_clip/{VOCAB_FILE}"))
        if os.path.exists(path):
            return path
    except importlib.metadata.PackageNotFoundError:
        pass
    raise FileNotFoundError(f"CLIP's BPE vocabulary {VOCAB_FILE} not found: `pip install --no-deps open_clip_torch` "
                            "(it ships the file; torch is not needed for it), or pass the file's path "
                            "(it is also in the openai/CLIP repository, clip/)")


@functools.lru_cache
def _byte_symbols() -> dict[int, str]:
    """Each byte as one printable character (CLIP's byte alphabet): printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) for the characters from U+0100 on, in byte order.
    The dict's order (printable bytes first, then the others) is the order of the first 256 ids."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in symbols]
    symbols.update({b: chr(256 + i) for i, b in enumerate(others)})
    return symbols


class Tokenizer:
    """CLIP's tokenizer: ftfy + HTML-unescape cleanup, whitespace collapsed, lower case, split into
    special tokens / contractions / letter runs / single digits / other symbol runs, each piece's UTF-8
    bytes merged by byte-pair encoding (the vocabulary file's first 48,894 merges, by rank), ids in the
    order: 256 byte symbols, the same with an end-of-word mark, the merges, <|startoftext|>, <|endoftext|>.

    `tokenize(texts)` = openai/CLIP's `clip.tokenize(texts, truncate=True)`: (N, context_length) int32,
    start token, ids, end token, zero padding; a longer text is cut and ends with the end token.
    """

    _N_MERGES = 49152 - 256 - 2  # the reference's vocabulary size less bytes and specials

    def __init__(self, vocab_path: str | os.PathLike | None = None):
        import ftfy  # noqa: PLC0415 (only the tokenizer needs these)
        import regex  # noqa: PLC0415

        self._fix_text, self._regex = ftfy.fix_text, regex
        path = os.fspath(vocab_path) if vocab_path is not None else default_vocab_path()
        try:
            with gzip.open(path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except (OSError, UnicodeDecodeError, EOFError) as e:
            raise ValueError(f"{path}: not a gzip-compressed BPE merge list ({e})") from None
        merges = [tuple(line.split()) for line in lines[1:self._N_MERGES + 1]]  # line 0: a version header
        symbols = list(_byte_symbols().values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges),
                 "<|startoftext|>", "<|endoftext|>"]
        self.encoder = dict(zip(vocab, range(len(vocab)), strict=True))
        self.ranks = dict(zip(merges, range(len(merges)), strict=True))
        self.sot, self.eot = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]
        self.vocab_size = len(vocab)
        pieces = [r"<\|startoftext\|>", r"<\|endoftext\|>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d",
                  r"[\p{L}]+", r"[\p{N}]", r"[^\s\p{L}\p{N}]+"]
        self._split = regex.compile("|".join(pieces), regex.IGNORECASE)
        self._cache = {"<|startoftext|>": ("<|startoftext|>",), "<|endoftext|>": ("<|endoftext|>",)}

    def _bpe(self, piece: str) -> tuple[str, ...]:
        """A piece (in byte symbols) as vocabulary entries: repeatedly merge its lowest-ranked adjacent pair."""
        if piece in self._cache:
            return self._cache[piece]
        word = (*piece[:-1], piece[-1] + "</w>")
        while len(word) > 1:
            pair = min(zip(word[:-1], word[1:], strict=True), key=lambda p: self.ranks.get(p, float("inf")))
            if pair not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == pair:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """One text's ids, without the start / end tokens."""
        text = html.unescape(html.unescape(self._fix_text(text))).strip()
        text = self._regex.sub(r"\s+", " ", text).strip().lower()
        symbols = _byte_symbols()
        ids = []
        for piece in self._split.findall(text):
            ids.extend(self.encoder[t] for t in self._bpe("".join(symbols[b] for b in piece.encode("utf-8"))))
        return ids

    def tokenize(self, texts: Sequence[str], context_length: int = 77) -> np.ndarray:
        out = np.zeros((len(texts), context_length), np.int32)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is a {type(text).__name__}, not a str")
            ids = [self.sot, *self.encode(text), self.eot][:context_length]
            ids[-1] = self.eot
            out[i, :len(ids)] = ids
        return out


# ------------------------------------------------------------------------------------------------
# Extraction


class Extractor:
    """CLIP jitted over fixed-shape batches (`Runner`): `image(frames)`, `text(texts)`.

    Args:
      model: a CLIP (`load`).
      tokenizer: for `text` (default: `Tokenizer()` on the installed vocabulary, made on first use).
      batch_size: frames (or texts) per device call.
      compute_dtype: jnp.bfloat16 on accelerators.
    """

    def __init__(self, model: CLIP, tokenizer: Tokenizer | None = None, *, batch_size: int = 32,
                 compute_dtype: Any = jnp.float32, devices: list | None = None):
        self.cfg, self._tokenizer = model.cfg, tokenizer
        self.image_runner = Runner(model.visual, lambda m, x: m(x), batch_size, compute_dtype=compute_dtype,
                             devices=devices)
        self.text_runner = Runner(model.textual, lambda m, ids: m(ids), batch_size, compute_dtype=compute_dtype,
                            devices=devices)

    def image(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W, 3) uint8 frames, short side = image_resolution -> image features (N, E)."""
        return self.image_runner(centre_crop(frames, self.cfg.image_resolution))

    def text_outputs(self, ids: np.ndarray) -> np.ndarray:
        """(N, L) token ids -> per-token outputs (N, L, E)."""
        return self.text_runner(ids)

    def text(self, texts: Sequence[str], max_tokens: int = MAX_TOKENS) -> dict[str, np.ndarray]:
        """EAO's CLIP text input: {"tokens": (N, max_tokens, E), "mask": (N, max_tokens),
        "features": CLIP's sentence features (N, E)}."""
        if self._tokenizer is None:
            self._tokenizer = Tokenizer()
        ids = self._tokenizer.tokenize(texts, self.cfg.context_length)
        if self._tokenizer.vocab_size != self.cfg.vocab_size:
            raise ValueError(f"the tokenizer has {self._tokenizer.vocab_size} tokens, the checkpoint "
                             f"{self.cfg.vocab_size} token embeddings")
        outputs = self.text_runner(ids)
        tokens, mask = text_tokens(outputs, ids, max_tokens)
        return {"tokens": tokens, "mask": mask, "features": text_features(outputs, ids)}


def benchmark(batch_size: int = 32, repeats: int = 3, compute_dtype: Any = jnp.float32,
              cfg: CLIPConfig = CLIPConfig()) -> dict[str, Any]:
    """CLIP (ViT-B/32 by default; random weights): {"image": frames, "text": texts (context_length
    tokens)} each measured by `runner.measure` (rows_per_s, flops_per_row, ...) on this machine."""
    from eao_jax.extract.runner import measure  # noqa: PLC0415

    model = CLIP(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    image = Runner(model.visual, lambda m, x: m(x), batch_size, compute_dtype=compute_dtype)
    pixels = rng.integers(0, 256, (image.batch_size, cfg.image_resolution, cfg.image_resolution, 3), np.uint8)
    text = Runner(model.textual, lambda m, ids: m(ids), batch_size, compute_dtype=compute_dtype)
    ids = rng.integers(1, cfg.vocab_size, (text.batch_size, cfg.context_length), np.int32)
    return {"backbone": "clip_vit_b32", "image": measure(image, pixels, repeats), "text": measure(text, ids, repeats)}
