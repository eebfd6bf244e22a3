"""Tokenisation, the word2vec binary reader and the word-vector table."""

import numpy as np
import pytest
from fixtures_data import write_word2vec

from eao_jax.data import text as text_lib


def test_tokenize_like_the_original():
    assert text_lib.tokenize("Don't stir-fry the Onion, now!") == ["Don't", "stir", "fry", "the", "Onion", "now"]
    assert text_lib.tokenize(None) == ["None"]  # str(sentence), as the original
    assert text_lib.tokenize("café naïve_x 3.5") == ["café", "naïve_x", "3", "5"]
    assert text_lib.tokenize("") == []


def test_read_word2vec_tiny_fixture(data_dir):
    path = data_dir / "youcook_e2e" / "word2vec_tiny.bin"
    words, vecs = text_lib.read_word2vec_binary(path)
    raw = path.read_bytes()
    count, dim = (int(x) for x in raw.split(b"\n", 1)[0].split())
    assert (len(words), vecs.shape) == (count, (count, dim)) == (31, (31, 10))
    # independent parse of the first and last entries
    pos = raw.index(b"\n") + 1
    sp = raw.index(b" ", pos)
    assert words[0] == raw[pos:sp].decode()
    np.testing.assert_array_equal(vecs[0], np.frombuffer(raw[sp + 1:sp + 1 + 4 * dim], "<f4"))
    np.testing.assert_array_equal(vecs[-1], np.frombuffer(raw[-4 * dim - 1:-1], "<f4"))
    sub_words, sub = text_lib.read_word2vec_binary(path, wanted={words[3], words[7], "absent"})
    assert sub_words == [words[3], words[7]]
    np.testing.assert_array_equal(sub, vecs[[3, 7]])


def test_word2vec_without_newlines_and_duplicates(tmp_path):
    vecs = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_word2vec(tmp_path / "a.bin", ["x", "y", "x", "zé"], vecs, newline=False)
    words, got = text_lib.read_word2vec_binary(tmp_path / "a.bin")
    assert words == ["x", "y", "zé"]  # the first duplicate wins (gensim keeps the first)
    np.testing.assert_array_equal(got, vecs[[0, 1, 3]])


def test_truncated_word2vec_is_an_error(tmp_path):
    vecs = np.ones((3, 4), np.float32)
    write_word2vec(tmp_path / "a.bin", ["a", "b", "c"], vecs)
    data = (tmp_path / "a.bin").read_bytes()
    (tmp_path / "t.bin").write_bytes(data[:-6])
    with pytest.raises(ValueError, match=r"t\.bin: truncated word2vec file at word 2 of 3"):
        text_lib.read_word2vec_binary(tmp_path / "t.bin")


def test_encode_drops_oov_then_truncates():
    table = text_lib.WordTable(["a", "b", "c"], np.eye(3, dtype=np.float32))
    text, mask = table.encode("x a y b c a b c", max_words=4)
    np.testing.assert_array_equal(mask, [1, 1, 1, 1])
    np.testing.assert_array_equal(text.argmax(1), [0, 1, 2, 0])
    text, mask = table.encode("x y", max_words=4)
    assert not mask.any() and not text.any()
    assert text.shape == (4, 3) and text.dtype == np.float32


def test_table_save_load_and_missing_table(tmp_path):
    table = text_lib.WordTable(["a", "b"], np.ones((2, 5), np.float32))
    table.save(tmp_path / "t.npz")
    back = text_lib.WordTable.load(tmp_path / "t.npz")
    assert back.words == ["a", "b"] and back.dim == 5
    with pytest.raises(FileNotFoundError, match="--word2vec"):
        text_lib.WordTable.load(tmp_path / "none.npz")
