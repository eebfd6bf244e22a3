"""Converter errors: each malformed checkpoint fails with a message naming the problem. The .pth files
are read (eao_jax.torch_pickle) and the edited ones written (tests/torch_format.py) without torch; a
file that names anything but tensors and plain containers is refused without running it."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch_format

from eao_jax import checkpoint, convert, torch_pickle


@pytest.fixture(scope="module")
def original(data_dir):
    return torch_pickle.load(data_dir / "tva_small.pth")


def write(tmp_path, ckpt, name="x.pth"):
    path = tmp_path / name
    torch_format.save(ckpt, path)
    return str(path)


def edited(original, edit):
    ckpt = dict(original)
    ckpt["state_dict"] = dict(original["state_dict"])
    ckpt["config"] = {**original["config"], "arch": {**original["config"]["arch"],
                                                     "args": dict(original["config"]["arch"]["args"])}}
    edit(ckpt)
    return ckpt


def test_unexpected_key_is_named(original, tmp_path):
    ckpt = edited(original, lambda c: c["state_dict"].__setitem__("module.video_extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(convert.ConversionError, match="unexpected keys: video_extra.weight"):
        convert.convert(write(tmp_path, ckpt), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_missing_key_is_named(original, tmp_path):
    ckpt = edited(original, lambda c: c["state_dict"].pop("module.audio_proj.cg.fc.bias"))
    with pytest.raises(convert.ConversionError, match="missing .*proj/audio/cg/bias"):
        convert.convert(write(tmp_path, ckpt), str(tmp_path / "out"))


def test_shape_mismatch_is_named(original, tmp_path):
    bad = np.zeros(7, np.float32)
    ckpt = edited(original, lambda c: c["state_dict"].__setitem__("module.text_norm_layer.bias", bad))
    with pytest.raises(convert.ConversionError, match=r"text_norm_layer.bias \(7,\)"):
        convert.convert(write(tmp_path, ckpt), str(tmp_path / "out"))


def test_head_count_needed_without_config(original, tmp_path):
    ckpt = edited(original, lambda c: c.pop("config"))
    path = write(tmp_path, ckpt)
    with pytest.raises(convert.ConversionError, match="--num_heads"):
        convert.convert(path, str(tmp_path / "out"))
    cfg = convert.convert(path, str(tmp_path / "out2"), num_heads=4)
    assert cfg.model.num_heads == 4
    assert checkpoint.restore_config(tmp_path / "out2").model.num_heads == 4


def test_contradicting_head_count(original, tmp_path):
    with pytest.raises(convert.ConversionError, match="contradicts"):
        convert.convert(write(tmp_path, dict(original)), str(tmp_path / "out"), num_heads=8)


def test_bare_state_dict_accepted(original, tmp_path):
    cfg = convert.convert(write(tmp_path, dict(original["state_dict"])), str(tmp_path / "out"), num_heads=4)
    assert cfg.model.embed_dim == 32


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(convert.ConversionError, match="cannot read torch checkpoint"):
        convert.convert(str(bad), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError):
        convert.convert(str(tmp_path / "absent.pth"), str(tmp_path / "out"))


def test_unknown_architecture(original, tmp_path):
    ckpt = edited(original, lambda c: c["config"]["arch"].__setitem__("type", "AVLnetBaselineModel"))
    with pytest.raises(convert.ConversionError, match="AVLnetBaselineModel"):
        convert.convert(write(tmp_path, ckpt), str(tmp_path / "out"))


def test_command_line(data_dir, tmp_path):
    out = tmp_path / "ckpt"
    res = subprocess.run([sys.executable, "-m", "eao_jax.convert", f"--torch_checkpoint={data_dir / 'tva_small.pth'}",
                          f"--output={out}"], capture_output=True, text=True, check=True)
    assert "embed_dim=32 depth=1 heads=4" in res.stdout
    assert checkpoint.latest_step(out) == 78000


@pytest.mark.parametrize("payload", [
    torch_format.Call(torch_format.Global("os", "system"), "touch PWNED"),  # the classic
    torch_format.Call(torch_format.Global("builtins", "eval"), "open('PWNED', 'w')"),
    torch_format.Call(torch_format.Global("torch", "load"), "other.pth"),  # not a tensor rebuild either
])
def test_code_in_a_checkpoint_is_refused_not_run(original, tmp_path, monkeypatch, payload):
    monkeypatch.chdir(tmp_path)
    ckpt = dict(original)
    ckpt["monitor_best"] = payload
    path = write(tmp_path, ckpt)
    name = f"{payload.func.module}.{payload.func.name}"
    with pytest.raises(convert.ConversionError, match=rf"refusing to load {name}: only tensors"):
        convert.convert(path, "out")
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "out").exists()


def test_relative_paths(original, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path, original, "released.pth")
    cfg = convert.convert("released.pth", "ckpt/tva")
    assert checkpoint.latest_step("ckpt/tva") == 78000 and cfg.model.embed_dim == 32
    assert not list(tmp_path.glob("ckpt/**/*.orbax-checkpoint-tmp*"))  # nothing half-written left behind
    model, _, step = checkpoint.load_model("ckpt/tva")
    assert step == 78000 and model.masking_token.shape == (32,)


def test_overwrite_replaces_only_a_convert_output(data_dir, tmp_path):
    pth = str(data_dir / "tva_small.pth")
    convert.convert(pth, str(tmp_path / "out"))
    # A training run's checkpoints folder holds step directories alone, as a convert output once did: never replaced.
    ckpts = tmp_path / "work" / "checkpoints"
    for step in (35, 36):
        shutil.copytree(tmp_path / "out" / "78000", ckpts / str(step))
    for output, why in [(ckpts, r"holds checkpoint step\(s\) 35, 36 that convert did not write \(it has no "
                                r"eao_convert\.json\): refusing to overwrite it"),
                        (ckpts.parent, r"holds more than a convert output \(checkpoints\)")]:
        with pytest.raises(convert.ConversionError, match=why):
            convert.convert(pth, str(output), overwrite=True)
    assert checkpoint.latest_step(ckpts) == 36 and sorted(p.name for p in ckpts.iterdir()) == ["35", "36"]
    # An earlier convert output is replaced.
    assert convert.convert(pth, str(tmp_path / "out"), overwrite=True).model.embed_dim == 32
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["78000", convert.CONVERT_MARKER]
