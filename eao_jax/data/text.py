"""Text: tokenisation, word2vec binary reader, and the per-dataset word-vector table.

The original tokenises with the regex "runs of word characters or
apostrophes" on `str(sentence)`, keeps case, drops words missing from word2vec *before* truncating
to `max_words`, and zero-pads. The word-vector table stored beside a prepared dataset holds exactly
the dataset's words that exist in the word2vec file, so membership in the table is membership in
word2vec for every text of that dataset.

Table file (`word_vectors.npz` in the dataset directory): `words` (N,) str, `vectors` (N, D) float32.
"""

from __future__ import annotations

import mmap
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

_TOKEN_RE = re.compile(r"[\w']+")

WORD_VECTORS_FILE = "word_vectors.npz"
TOKENS_FILE = "tokens.txt"


def tokenize(sentence: object) -> list[str]:
    """Splits `str(sentence)` into runs of word characters or apostrophes (no lower-casing)."""
    return _TOKEN_RE.findall(str(sentence))


class WordTable:
    """A word -> vector table with the original's text featurisation.

    Attributes:
      words: (N,) list of words.
      vectors: (N, D) float32 word vectors.
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray):
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(
                f"word table: vectors must be (N, D) with N = len(words) = {len(words)}, got {vectors.shape}")
        self.words = list(words)
        self.vectors = vectors
        self.index: dict[str, int] = {}
        for i, w in enumerate(self.words):
            self.index.setdefault(w, i)  # first occurrence wins, as gensim keeps the first duplicate

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def ids(self, words: Iterable[str]) -> list[int]:
        """Row ids of the in-vocabulary words, in order (out-of-vocabulary words dropped)."""
        index = self.index
        return [index[w] for w in words if w in index]

    def encode_words(self, words: Sequence[str], max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """Words -> (text (max_words, D) float32, mask (max_words,) float32).

        Out-of-vocabulary words are dropped first, then the first `max_words` are kept.
        """
        ids = self.ids(words)[:max_words]
        text = np.zeros((max_words, self.dim), np.float32)
        mask = np.zeros((max_words,), np.float32)
        if ids:
            text[: len(ids)] = self.vectors[ids]
            mask[: len(ids)] = 1.0
        return text, mask

    def encode(self, sentence: object, max_words: int) -> tuple[np.ndarray, np.ndarray]:
        """Sentence -> (text (max_words, D), mask (max_words,)); see `encode_words`."""
        return self.encode_words(tokenize(sentence), max_words)

    def save(self, path: str | os.PathLike) -> None:
        """Writes the table atomically (temporary file, then rename)."""
        path = os.fspath(path)
        tmp = path + ".tmp.npz"
        np.savez(tmp, words=np.asarray(self.words, dtype=str), vectors=self.vectors)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WordTable:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{path}: no word-vector table. Prepare the dataset with --word2vec=FILE "
                "(python -m eao_jax.prepare ... --word2vec=GoogleNews-vectors-negative300.bin); "
                "running prepare again on an existing dataset only adds the table.")
        with np.load(path, allow_pickle=False) as z:
            words = [str(w) for w in z["words"]]
            vectors = z["vectors"]
        return cls(words, vectors)


class TruncatedWord2Vec(ValueError):
    """A word2vec binary file ends inside entry `index`."""

    def __init__(self, index: int):
        super().__init__(f"truncated at word {index}")
        self.index = index


def word2vec_entries(mm: Any, size: int, pos: int, count: int, dim: int) -> Iterator[tuple[str, int]]:
    """(word, byte offset of its `dim` float32 values) of the `count` entries of a word2vec binary
    file's bytes `mm` (size bytes), starting at `pos` (after the header). Newlines before a word are
    skipped (gensim's layout writes one after each vector). Raises TruncatedWord2Vec."""
    nbytes = 4 * dim
    for i in range(count):
        while pos < size and mm[pos] == 0x0A:
            pos += 1
        sp = mm.find(b" ", pos)
        if sp < 0 or sp + 1 + nbytes > size:
            raise TruncatedWord2Vec(i)
        yield mm[pos:sp].decode("utf-8", errors="replace"), sp + 1
        pos = sp + 1 + nbytes


def read_word2vec_binary(path: str | os.PathLike, wanted: Iterable[str] | None = None,
                         ) -> tuple[list[str], np.ndarray]:
    """Reads a word2vec binary file (GoogleNews layout), optionally only the `wanted` words.

    Layout: an ASCII header "<count> <dim>\\n", then per word: the word's UTF-8 bytes, a space,
    `dim` little-endian float32 values, and (usually) a newline. As gensim does, newlines before a
    word are ignored and the first of duplicated words is kept.

    Returns:
      (words, vectors (N, dim) float32) in file order.
    """
    path = os.fspath(path)
    wanted_set = None if wanted is None else set(wanted)
    words: list[str] = []
    rows: list[np.ndarray] = []
    seen: set[str] = set()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise ValueError(f"{path}: empty word2vec file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            eol = mm.find(b"\n")
            try:
                count, dim = (int(x) for x in mm[:eol].split())
            except ValueError:
                raise ValueError(f"{path}: bad word2vec header {mm[:max(eol, 0)][:80]!r}") from None
            try:
                for word, start in word2vec_entries(mm, size, eol + 1, count, dim):
                    if (wanted_set is None or word in wanted_set) and word not in seen:
                        seen.add(word)
                        words.append(word)
                        rows.append(np.frombuffer(mm[start:start + 4 * dim], dtype="<f4").copy())
            except TruncatedWord2Vec as e:
                raise ValueError(f"{path}: truncated word2vec file at word {e.index} of {count}") from None
        finally:
            mm.close()
    vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), np.float32)
    return words, vectors


def build_word_table(word2vec_path: str | os.PathLike, tokens: Iterable[str]) -> WordTable:
    """The subset of a word2vec binary file holding the given dataset tokens."""
    words, vectors = read_word2vec_binary(word2vec_path, wanted=tokens)
    return WordTable(words, vectors)


def write_tokens(path: str | os.PathLike, tokens: Iterable[str]) -> None:
    """Writes the dataset's distinct tokens, one per line, sorted (atomic)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for t in sorted(set(tokens)):
            f.write(t + "\n")
    os.replace(tmp, path)


def read_tokens(path: str | os.PathLike) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.rstrip("\n")]
