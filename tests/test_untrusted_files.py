"""Files from the internet never run code and never make us read or allocate beyond what they hold:
dataset pickles that name code are refused by name with nothing executed (prepare of msrvtt,
youcook2, howto100m); numpy state that would forge object pointers is refused; tensor views and
archive entries outside their bounds are refused before anything is allocated (convert's reader).

The reads that would crash or allocate without the checks run in a child process under a 1 GiB
address-space limit, which reports the error and its peak traced memory."""

import json
import os
import re
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch_format as tf
from fixtures_data import item_list, write_howto, write_pickle

from eao_jax import torch_pickle
from eao_jax.prepare import prepare
from tfds_builders.validate import PrepareError, load_pickle

G, C = tf.Global, tf.Call
MIB = 1 << 20


def _payload(kind: str, marker) -> tuple[C, str]:
    """A call that would create `marker`, and the global that must be refused first."""
    return {
        "os.system": (C(G("os", "system"), f"touch {marker}"), "os.system"),
        "builtins.eval": (C(G("builtins", "eval"), f"open({str(marker)!r}, 'w')"), "builtins.eval"),
        "getattr": (C(C(G("builtins", "getattr"), C(G("builtins", "__import__"), "os"), "system"), f"touch {marker}"),
                    "builtins.getattr"),
        "subprocess": (C(G("subprocess", "check_call"), ["touch", str(marker)]), "subprocess.check_call"),
    }[kind]


def _released_files(manual, dataset: str, payload, nested: bool):
    """The dataset's released pickle holding `payload`: nested deep inside otherwise valid content, or as
    the whole file. Returns the pickle's path."""
    if dataset == "howto100m":
        captions = {vid: v["caption"] for vid, v in write_howto(manual, n_videos=3).items()}
        captions[sorted(captions)[1]]["text"][1] = payload
        path = manual / "caption.pickle"
        write_pickle(path, captions if nested else payload)
        return path
    keys = dict(key_2d="2d_full", key_3d="3d_full") if dataset == "youcook2" else {}
    items = item_list(5, torch_audio=True, **keys)
    items[3]["caption"][1] = payload
    path = manual / "resnet" / ("youcook_val.pkl" if dataset == "youcook2" else "msrvtt_jsfusion_test.pkl")
    write_pickle(path, items if nested else payload)
    return path


@pytest.mark.parametrize("dataset", ["msrvtt", "youcook2", "howto100m"])
@pytest.mark.parametrize("kind,nested", [("os.system", False), ("os.system", True), ("builtins.eval", True),
                                         ("getattr", True), ("subprocess", True)])
def test_code_in_a_dataset_pickle_is_refused_not_run(tmp_path, monkeypatch, dataset, kind, nested):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "PWNED"
    payload, refused = _payload(kind, marker)
    path = _released_files(tmp_path / "m", dataset, payload, nested)
    config = "resnet_fp32" if dataset == "howto100m" else None
    with pytest.raises(PrepareError) as err:
        prepare(dataset, tmp_path / "d", tmp_path / "m", config=config, feature_dims=(6, 5))
    msg = str(err.value)
    assert re.fullmatch(rf".*{re.escape(path.name)}: refusing to load {re.escape(refused)}: only numpy arrays, pandas "
                        r"data frames, torch tensors and plain containers .* are read from a dataset pickle, so that "
                        r"loading it cannot run code", msg), msg
    assert not marker.exists()


def test_code_inside_a_pickled_tensor_storage_is_refused_not_run(tmp_path, monkeypatch):
    """A plain pickle's tensor storage is itself a (legacy torch.save) pickle: the same allow-list."""
    monkeypatch.chdir(tmp_path)
    storage = C(G("torch.storage", "_load_from_bytes"), tf._legacy_bytes(_payload("os.system", "PWNED")[0]))
    write_pickle(tmp_path / "a.pkl", [{"id": "v", "audio": C(G("torch._utils", "_rebuild_tensor_v2"), storage, 0,
                                                             (2,), (1,), False, {})}])
    with pytest.raises(PrepareError) as err:
        load_pickle(tmp_path / "a.pkl")
    assert str(err.value).startswith(f"{tmp_path / 'a.pkl'}: a pickled storage: refusing to load os.system: only "
                                     "tensors, storages and plain containers"), err.value
    assert not (tmp_path / "PWNED").exists()


def test_state_outside_the_allow_list_is_refused(tmp_path):
    """BUILD (`__setstate__`) applies only to numpy arrays / dtypes and an OrderedDict's attributes."""
    write_pickle(tmp_path / "a.pkl", [1, tf.Build(G("collections", "OrderedDict"), {"__init__": None})])
    with pytest.raises(PrepareError, match=r"a\.pkl: refusing to set the state of a type \(only numpy arrays"):
        load_pickle(tmp_path / "a.pkl")
    write_pickle(tmp_path / "b.pkl", tf.Build(C(G("collections", "OrderedDict")), {"_metadata": {"": {"version": 1}}}))
    assert load_pickle(tmp_path / "b.pkl")._metadata == {"": {"version": 1}}  # as torch state dicts carry it


def test_numpy_content_reads_as_pickle_reads_it(tmp_path):
    """Arrays of every allowed kind (big-endian, Fortran order, strings, objects), scalars and
    containers in a plain pickle, protocols 2 to 5: read as `pickle.load` reads them (our own data)."""
    import pickle

    obj = {"f": np.arange(6, dtype=">f8").reshape(2, 3), "fortran": np.asfortranarray(np.arange(6).reshape(2, 3)),
           "u": np.array(["ab", "c"]), "s": np.array([b"x", b"yz"]), "o": np.array(["a", None, 3], dtype=object),
           "b": np.array([True, False]), "c": np.array([1 + 2j]), "scalar": np.float32(2.5), "i8": np.int64(-3),
           "empty": np.zeros((0, 4), np.float16), "text": ["a", ("b", 1.5), b"", b"\xff"], "set": {1, 2}}
    for protocol in (2, 3, 4, 5):
        data = pickle.dumps(obj, protocol=protocol)
        (tmp_path / "x.pkl").write_bytes(data)
        back, want = load_pickle(tmp_path / "x.pkl"), pickle.loads(data)
        assert back.keys() == want.keys()
        for k, v in want.items():
            assert type(back[k]) is type(v), (protocol, k)
            if isinstance(v, np.ndarray):
                assert back[k].dtype == v.dtype and back[k].flags.f_contiguous == v.flags.f_contiguous, (protocol, k)
                np.testing.assert_array_equal(back[k], v)
            else:
                assert back[k] == v, (protocol, k)


# -------------------------------------------------------------------- reads that could crash or allocate

_CHILD = textwrap.dedent("""
    import json, resource, sys, tracemalloc
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
    from etils import epath
    from eao_jax import torch_pickle
    from tfds_builders.validate import load_pickle
    epath.Path(sys.argv[2]).stat()  # (epath's lazy imports, before tracing)
    tracemalloc.start()
    try:
        obj = (torch_pickle.load if sys.argv[1] == "torch" else load_pickle)(sys.argv[2])
        repr(obj)  # uses what was read: forged object pointers would crash here
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    print(json.dumps(dict(error=error, peak=tracemalloc.get_traced_memory()[1])))
""")


def _read_in_child(reader: str, path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, reader, str(path)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])  # -11: it read memory it does not own
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_numpy_state_forging_object_pointers_is_refused(tmp_path):
    """An object dtype whose flags say 'no objects' makes numpy take raw bytes from the file as object
    pointers (a crash, or code) when the array is used."""
    dtype = tf.Build(C(G("numpy", "dtype"), "O8", False, True), (3, "|", None, None, None, -1, -1, 0))
    forged = tf.Build(C(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"b"),
                      (1, (2,), dtype, False, b"\x41" * 16))
    items = item_list(3)
    items[1]["audio"] = forged
    write_pickle(tmp_path / "m.pkl", items)
    out = _read_in_child("pickle", tmp_path / "m.pkl")
    assert out["error"] == (f"PrepareError: {tmp_path / 'm.pkl'}: numpy object array of shape (2,) without a list of "
                            "its 2 items")


F32 = np.arange(4, dtype=np.float32)  # a 16-byte storage


def _legacy_with_numel(path, numel: int) -> None:
    """A legacy-format file whose one storage declares `numel` elements (it holds 4)."""
    tf.save_legacy({"w": F32}, path)
    data = bytearray(path.read_bytes())
    data[-16 - 8:-16] = struct.pack("<q", numel)
    path.write_bytes(bytes(data))


SHARED = np.zeros(MIB // 4, np.float32)
VIEWS = {  # name: (writer(path), error, peak traced bytes at most)
    "negative stride": (lambda p: tf.save({"w": tf.View(F32, 0, (8,), (-1000,))}, p),
                        r"tensor of size \(8,\) and stride \(-1000,\) at offset 0: sizes, strides and offset must be "
                        r"non-negative", MIB),
    "stride -2**40": (lambda p: tf.save({"w": tf.View(F32, 3, (2,), (-2**40,))}, p),
                      rf"tensor of size \(2,\) and stride \({-2**40},\) at offset 3: sizes, strides", MIB),
    "zero strides, huge shape": (lambda p: tf.save({"w": tf.View(F32, 0, (8192, 8192), (0, 0))}, p),
                                 r"tensor of size \(8192, 8192\) and stride \(0, 0\) at offset 0 repeats elements "
                                 r"\(zero or overlapping strides\) into 268435456 bytes, more than its storage \(16\) "
                                 r"and 67108864", MIB),
    "huge stride": (lambda p: tf.save({"w": tf.View(F32, 0, (2,), (2**62,))}, p),
                    r"tensor of size \(2,\) and stride \(4611686018427387904,\) at offset 0 overruns its storage of 4 "
                    r"elements", MIB),
    "one storage viewed 200 times": (
        lambda p: tf.save({f"t{i}": tf.View(SHARED, 0, SHARED.shape, (1,)) for i in range(200)}, p),
        r"tensor of size \(262144,\) .* would take 1048576 bytes, over the 67108864 bytes a file of this size may "
        r"materialise \(8x its size, at least 67108864\)", 70 * MIB),
    "zip bomb (3 MB -> 3 GiB)": (lambda p: tf.save({"w": tf.Zeros(3 << 28)}, p),
                                 r"archive entry x/data/0 \(\d+ bytes compressed\) would take 3221225472 bytes, over "
                                 r"the 67108864 bytes", 4 * MIB),
    "legacy format, negative stride": (lambda p: tf.save_legacy({"w": tf.View(F32, 0, (8,), (-1000,))}, p),
                                       r"tensor of size \(8,\) and stride \(-1000,\) at offset 0: sizes", MIB),
    "legacy format, storage longer than the file": (lambda p: _legacy_with_numel(p, 2**40),
                                                    r"storage 0 declares 1099511627776 elements, 16 bytes are left in "
                                                    r"the file", MIB),
}


@pytest.mark.parametrize("case", list(VIEWS))
def test_tensor_views_and_entries_outside_their_bounds_are_refused(tmp_path, case):
    write, error, peak = VIEWS[case]
    path = tmp_path / "x.pth"
    write(path)
    if case.startswith("zip bomb"):
        assert path.stat().st_size < 4 * MIB
    out = _read_in_child("torch", path)
    assert out["error"] is not None and re.fullmatch(rf"TorchFormatError: {re.escape(str(path))}: {error}.*",
                                                     out["error"]), out["error"]
    assert out["peak"] < peak, out


def test_valid_views_read_as_torch_reads_them(tmp_path):
    """Offsets, transposes, broadcasts (stride 0 within the cap), a size-1 dimension with any stride
    (it never steps), scalars and empty tensors: the elements torch's view addresses."""
    w = np.arange(24, dtype=np.float32)
    views = {"offset": (tf.View(w, 5, (3, 2), (4, 1)), w[5:17].reshape(3, 4)[:, :2]),
             "transposed": (tf.View(w, 0, (4, 6), (1, 4)), w.reshape(6, 4).T),
             "size-1 dimension": (tf.View(w, 2, (1, 3), (2**62, 1)), w[None, 2:5]),
             "broadcast": (tf.View(w, 1, (3, 4), (0, 1)), np.broadcast_to(w[1:5], (3, 4))),
             "scalar": (tf.View(w, 23, (), ()), np.array(23, np.float32)),
             "empty": (tf.View(w, 0, (0, 5), (5, 1)), np.zeros((0, 5), np.float32))}
    tf.save({k: v for k, (v, _) in views.items()}, tmp_path / "x.pth")
    got = torch_pickle.load(tmp_path / "x.pth")
    for k, (_, want) in views.items():
        assert got[k].dtype == np.float32 and got[k].shape == want.shape and got[k].flags.writeable, k
        np.testing.assert_array_equal(got[k], want, err_msg=k)


def test_a_memo_index_allocates_nothing(tmp_path):
    """pickle's C unpickler sizes its memo by the largest index a file names: 9 bytes would take 32 GB."""
    (tmp_path / "a.pkl").write_bytes(b"\x80\x02N" + b"r" + (2**31 - 1).to_bytes(4, "little") + b".")
    out = _read_in_child("pickle", tmp_path / "a.pkl")
    assert out["error"] is None and out["peak"] < MIB, out


def test_declared_sizes_are_read_only_as_far_as_the_bytes_go(tmp_path):
    """A pickle length (bytes, frame) larger than the file is an error after reading what is there,
    not an allocation of the declared size."""
    import tracemalloc

    data = b"\x80\x04" + b"\x8e" + struct.pack("<Q", 1 << 40) + b"x" * 100  # BINBYTES8 of 1 TiB, 100 bytes follow
    (tmp_path / "a.pkl").write_bytes(data)
    tracemalloc.start()
    try:
        with pytest.raises(PrepareError, match=r"a\.pkl: cannot unpickle \(UnpicklingError: truncated: 1099511627776 "
                                               r"bytes declared, 100 left in the file\)"):
            load_pickle(tmp_path / "a.pkl")
        assert tracemalloc.get_traced_memory()[1] < 4 * MIB
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_outputs_read_as_torch_reads_them(tmp_path, zip_format):
    """What torch itself writes (zip and legacy formats): a module's state dict (an OrderedDict with
    `_metadata`, set by BUILD), views with an offset, transposed and expanded (stride 0), bfloat16."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    state = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4)).state_dict()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"state_dict": state, "view": base[1:, 2:5], "t": base.t(), "expanded": base[0].expand(3, 6),
           "bf16": base.to(torch.bfloat16), "scalar": torch.tensor(7, dtype=torch.int64), "config": {"lr": 0.1}}
    torch.save(obj, tmp_path / "x.pth", _use_new_zipfile_serialization=zip_format)
    got = torch_pickle.load(tmp_path / "x.pth")
    assert list(got["state_dict"]) == list(state) and got["state_dict"]._metadata == state._metadata
    for k, t in [*(("state_dict." + k, v) for k, v in state.items()), *((k, obj[k]) for k in obj if k not in (
            "state_dict", "config"))]:
        mine = got["state_dict"][k[len("state_dict."):]] if k.startswith("state_dict.") else got[k]
        want = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert mine.dtype == want.dtype and mine.shape == want.shape, k
        np.testing.assert_array_equal(mine, want, err_msg=k)
    assert got["config"] == {"lr": 0.1}
