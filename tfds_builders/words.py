"""Prepare-time text checks: the word2vec file is validated before any record is written, and a
caption with no usable word (only punctuation, or only words missing from word2vec) is a bad item.

`KnownWords.scan` reads the whole word2vec binary once, up front (the layout of
`eao_jax.data.text.read_word2vec_binary`; GoogleNews' 3 M words take seconds), so a truncated or
malformed file stops the prepare before the pass over the videos rather than after it. It keeps the
vocabulary as sorted 64-bit hashes (24 MB for GoogleNews instead of ~300 MB of Python strings), small
enough to ship to every HowTo100M shard worker; a hash collision could only let an unusable caption
through, never refuse a good one.

Without --word2vec only the punctuation rule applies (the vocabulary is unknown then).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath

from eao_jax.data import text as text_lib
from tfds_builders import validate as V

# Reasons (keys of the prepare report's counts).
NO_WORDS = "caption without words"
NO_KNOWN_WORDS = "caption without known words"

_FLOAT = re.compile(rb"^-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _hash(word: str) -> int:
    return int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little")


def _looks_like_text_format(line: bytes, dim: int) -> bool:
    parts = line.split()
    return len(parts) == dim + 1 and all(_FLOAT.match(p) for p in parts[1:])


class KnownWords:
    """Membership in a word2vec vocabulary (hashes of the words, sorted)."""

    def __init__(self, hashes: np.ndarray, source: str = ""):
        self.hashes = np.unique(np.asarray(hashes, np.uint64))
        self.source = source

    def __len__(self) -> int:
        return int(self.hashes.size)

    def __contains__(self, word: str) -> bool:
        h = _hash(word)
        i = int(np.searchsorted(self.hashes, np.uint64(h)))
        return i < self.hashes.size and int(self.hashes[i]) == h

    def any_known(self, tokens: Iterable[str]) -> bool:
        return any(t in self for t in tokens)

    def save(self, path: str | os.PathLike) -> None:
        with epath.Path(path).open("wb") as f:
            np.save(f, self.hashes)

    @classmethod
    def load(cls, path: str | os.PathLike) -> KnownWords:
        with epath.Path(path).open("rb") as f:
            return cls(np.load(f), os.fspath(path))

    @classmethod
    def scan(cls, path: str | os.PathLike) -> KnownWords:
        """Validates a word2vec binary file (header, every entry present, not the text format) and
        returns its vocabulary. Raises PrepareError naming the file and what is wrong."""
        path = os.fspath(path)
        where = f"--word2vec {path}"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{where}: file not found")
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise V.PrepareError(f"{where}: empty file")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            try:
                eol = mm.find(b"\n", 0, 256)
                try:
                    if eol < 0:
                        raise ValueError
                    count, dim = (int(x) for x in mm[:eol].split())
                    if count <= 0 or dim <= 0:
                        raise ValueError
                except ValueError:
                    head = mm[:eol if eol >= 0 else 40][:40]
                    raise V.PrepareError(f"{where}: not a word2vec binary file (the first line should be "
                                         f"'<words> <dim>', got {head!r})") from None
                first_eol = mm.find(b"\n", eol + 1)
                first = mm[eol + 1:first_eol if first_eol >= 0 else size]
                if _looks_like_text_format(first, dim):
                    raise V.PrepareError(f"{where}: this is the text word2vec format; give the binary one (e.g. "
                                         "GoogleNews-vectors-negative300.bin; gensim converts with binary=True)")
                hashes = np.empty(count, np.uint64)
                try:
                    for i, (word, _) in enumerate(text_lib.word2vec_entries(mm, size, eol + 1, count, dim)):
                        hashes[i] = _hash(word)
                except text_lib.TruncatedWord2Vec as e:
                    raise V.PrepareError(f"{where}: truncated at word {e.index} of {count} ({size} bytes; "
                                         f"header '{count} {dim}')") from None
            finally:
                mm.close()
        return cls(hashes, path)


def caption_problem(tokens: Sequence[str], known: KnownWords | None) -> str | None:
    """The reason a caption's tokens give the model no text (NO_WORDS / NO_KNOWN_WORDS), else None."""
    if not tokens:
        return NO_WORDS
    if known is not None and not known.any_known(tokens):
        return NO_KNOWN_WORDS
    return None


def bad_caption(reason: str, text: str, item: str, file, known: KnownWords | None, what: str = "caption"
                ) -> V.BadItem:
    shown = text if len(text) <= 60 else text[:57] + "..."
    why = ("has no word (only punctuation or symbols)" if reason == NO_WORDS
           else f"has no word in the word2vec vocabulary ({os.path.basename(known.source) if known else ''})")
    return V.BadItem(reason, item, file, f"{what} {shown!r} {why}")


def check_segments(segment_tokens: Sequence[Sequence[str]], texts: Sequence[str], item: str, file,
                   known: KnownWords | None) -> int:
    """HowTo100M ASR segments: the number without a usable word (kept: their clips have no text, as in
    the original). Raises BadItem when a video has segments and none of them has one (it would only
    ever train without text)."""
    problems = [caption_problem(t, known) for t in segment_tokens]
    unusable = sum(p is not None for p in problems)
    if problems and unusable == len(problems):
        reason = NO_KNOWN_WORDS if NO_KNOWN_WORDS in problems else NO_WORDS
        example = texts[problems.index(reason)]
        err = bad_caption(reason, example, item, file, known, "caption segment")
        raise V.BadItem(reason, item, file, f"none of its {len(problems)} caption segments has a usable word "
                        f"(e.g. {err.detail})")
    return unusable
