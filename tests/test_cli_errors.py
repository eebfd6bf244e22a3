"""Command-line errors: each bad input ends the command with exit status 1 and one line on stderr
naming the thing that is wrong (no traceback unless EAO_TRACEBACK=1 or --verbosity=1), and no NaN
weights or embeddings are ever written (convert refuses NaN tensors, embed a NaN checkpoint)."""

import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch_format

from eao_jax import checkpoint, convert, torch_pickle

REPO = pathlib.Path(__file__).resolve().parents[1]


def run(module: str, *args: str, cwd: pathlib.Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"eao_jax.{module}", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The command's single stderr line (asserting exit status 1 and no traceback)."""
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def converted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_errors") / "tva"
    convert.convert(str(data_dir / "tva_small.pth"), str(out))
    return out


@pytest.fixture(scope="module")
def inputs(data_dir):
    with np.load(data_dir / "tva_small.npz") as z:
        return {k: z[k] for k in z.files if k.startswith("input/")}


# ------------------------------------------------------------------------------------------- convert


def test_convert_text_file(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a checkpoint\n")
    line = one_line_error(run("convert", "--torch_checkpoint=notes.txt", "--output=out", cwd=tmp_path))
    assert line.startswith("convert: cannot read torch checkpoint notes.txt: not a torch.save file")
    assert not (tmp_path / "out").exists()


def test_traceback_on_request(tmp_path):
    (tmp_path / "notes.txt").write_text("this is not a checkpoint\n")
    proc = run("convert", "--torch_checkpoint=notes.txt", "--output=out", cwd=tmp_path, env={"EAO_TRACEBACK": "1"})
    assert proc.returncode == 1 and "Traceback (most recent call last)" in proc.stderr
    assert "TorchFormatError" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("convert: cannot read torch checkpoint notes.txt")


def test_convert_twice_into_one_output(data_dir, tmp_path):
    pth = str(data_dir / "tva_small.pth")
    convert.convert(pth, str(tmp_path / "out"))
    line = one_line_error(run("convert", f"--torch_checkpoint={pth}", "--output=out", cwd=tmp_path))
    assert line == ("convert: --output out is not empty (it holds checkpoint step(s) 78000): choose a new directory, "
                    "or pass --overwrite to replace an earlier convert output")
    proc = run("convert", f"--torch_checkpoint={pth}", "--output=out", "--overwrite", cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["78000", convert.CONVERT_MARKER]
    model, _, step = checkpoint.load_model(tmp_path / "out")
    assert step == 78000 and np.isfinite(np.asarray(model.masking_token[...])).all()
    # --overwrite replaces an earlier convert output only, never a directory holding anything else.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(convert.ConversionError, match=r"holds more than a convert output \(notes\.txt\)"):
        convert.convert(pth, str(tmp_path / "mine"), overwrite=True)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_convert_refuses_nan_weights(data_dir, tmp_path):
    ckpt = torch_pickle.load(data_dir / "tva_small.pth")
    ckpt["state_dict"] = dict(ckpt["state_dict"])
    bad = ckpt["state_dict"]["module.fusion.blocks.0.attn.qkv.weight"].copy()
    bad[0, :3] = [np.nan, np.inf, np.nan]
    ckpt["state_dict"]["module.fusion.blocks.0.attn.qkv.weight"] = bad
    torch_format.save(ckpt, tmp_path / "nan.pth")
    line = one_line_error(run("convert", "--torch_checkpoint=nan.pth", "--output=out", cwd=tmp_path))
    assert line == (f"convert: cannot convert checkpoint: tensors holding NaN or Inf: fusion.blocks.0.attn.qkv.weight "
                    f"(3 of {bad.size} values)")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- embed


def test_embed_zero_items(converted, inputs, tmp_path):
    np.savez(tmp_path / "in.npz", **{k: v[:0] for k, v in inputs.items()})
    line = one_line_error(run("embed", f"--checkpoint={converted}", "--input=in.npz", "--output=out.npz",
                              cwd=tmp_path))
    assert line == "embed: input holds 0 items (the leading dimension of 'text', 'video', 'audio')"
    assert not (tmp_path / "out.npz").exists()


def test_embed_short_audio_nframes(converted, inputs, tmp_path):
    short = dict(inputs, **{"input/audio_STFT_nframes": inputs["input/audio_STFT_nframes"][:5]})
    np.savez(tmp_path / "in.npz", **short)
    line = one_line_error(run("embed", f"--checkpoint={converted}", "--input=in.npz", "--output=out.npz",
                              cwd=tmp_path))
    assert line == ("embed: input 'audio_STFT_nframes' has 5 values (shape (5,)), expected one per item (6)")
    assert not (tmp_path / "out.npz").exists()


def test_embed_refuses_a_checkpoint_with_nan_weights(converted, inputs, tmp_path, monkeypatch):
    model, config, step = checkpoint.load_model(converted)
    variables = checkpoint.model_variables(model)
    bias = np.array(variables["proj"]["audio"]["cg"]["bias"])
    bias[:2] = np.nan
    variables["proj"]["audio"]["cg"]["bias"] = bias
    with monkeypatch.context() as m:  # written as a broken tool might: past the finite check of every save
        m.setattr(checkpoint, "check_finite", lambda tree, what: None)
        checkpoint.save_model(tmp_path / "nan_ckpt", step, variables, config)
    np.savez(tmp_path / "in.npz", **inputs)
    line = one_line_error(run("embed", "--checkpoint=nan_ckpt", "--input=in.npz", "--output=out.npz",
                              cwd=tmp_path))
    assert line == (f"embed: refusing to use the checkpoint {tmp_path / 'nan_ckpt'} at step 78000: 1 arrays hold NaN "
                    "or Inf values (proj/audio/cg/bias)")
    assert not (tmp_path / "out.npz").exists()


# ---------------------------------------------------------------------------------------------- main


@pytest.mark.parametrize("override, message", [
    ("train.nope=1", "train.nope: unknown config field (fields of train: b1, b2, epochs, eps, log_every, lr, "
                     "lr_decay, num_steps, steps_per_epoch, use_eval_mode_always)"),
    ("train.num_step=3", "train.num_step: unknown config field; did you mean train.num_steps?"),
    ("model.davenet.widht=(8,)", "model.davenet.widht: unknown config field; did you mean model.davenet.width"),
])
def test_main_unknown_override_names_the_field(tmp_path, override, message):
    line = one_line_error(run("main", f"--config={REPO / 'configs' / 'demo.py'}:tiny", "--workdir=w",
                              f"--config.{override}", cwd=tmp_path))
    assert line.startswith(f"Config error: {message}")
    assert not (tmp_path / "w").exists()


def test_main_other_errors_are_one_line_too(tmp_path):
    line = one_line_error(run("main", f"--config={REPO / 'configs' / 'demo.py'}:tiny", "--workdir=w",
                              "--config.data.dataset=howto100m", f"--config.data.data_dir={tmp_path / 'nodata'}",
                              "--progress_bar=false", cwd=tmp_path))
    assert line.startswith(f"main: {tmp_path / 'nodata' / 'howto100m'}: dataset 'howto100m' is not prepared in ")


# ------------------------------------------------------------------------------------------- prepare


def test_prepare_names_the_file_and_the_code_it_refuses(tmp_path):
    from fixtures_data import item_list, write_pickle  # noqa: PLC0415

    items = item_list(3)
    items[1]["caption"][0] = torch_format.Call(torch_format.Global("os", "system"), "touch PWNED")
    write_pickle(tmp_path / "m" / "msrvtt_jsfusion_test.pkl", items)
    line = one_line_error(run("prepare", "--dataset=msrvtt", "--manual_dir=m", "--data_dir=d", cwd=tmp_path))
    assert line.startswith("prepare: ") and line.endswith(
        "m/msrvtt_jsfusion_test.pkl: refusing to load os.system: only numpy arrays, pandas data frames, torch "
        "tensors and plain containers (dict, list, tuple, numbers, strings) are read from a dataset pickle, so that "
        "loading it cannot run code"), line
    assert not (tmp_path / "PWNED").exists()
# ----------------------------------------------------------------------- flags and --config files (every CLI)


@pytest.mark.parametrize("module, extra", [("main", ("--workdir=w",)), ("bench", ())])
def test_config_file_argument_error_names_the_argument_and_the_choices(tmp_path, module, extra):
    demo = REPO / "configs" / "demo.py"
    line = one_line_error(run(module, f"--config={demo}:tinyy", *extra, cwd=tmp_path))
    assert line == (f"{module}: flag --config={demo}:tinyy: config argument 'tinyy': unknown key 'tinyy'; "
                    "known: tiny=False, evaluate=False")
    howto = REPO / "configs" / "howto100m.py"
    line = one_line_error(run(module, f"--config={howto}:variant=cls_tokn", *extra, cwd=tmp_path))
    assert line.startswith(f"{module}: flag --config={howto}:variant=cls_tokn: unknown variant 'cls_tokn'; "
                           "known: tv_only, no_transformer, "), line
    assert ", cls_token, " in line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("module, extra", [("main", ("--workdir=w",)), ("bench", ())])
def test_missing_config_file_is_named(tmp_path, module, extra):
    line = one_line_error(run(module, "--config=configs/nope.py:tiny", "--config.seed=3", *extra, cwd=tmp_path))
    assert line == f"{module}: flag --config=configs/nope.py:tiny: no config file at configs/nope.py"
    (tmp_path / "empty.py").write_text("SEED = 1\n")
    line = one_line_error(run(module, "--config=empty.py", *extra, cwd=tmp_path))
    assert line == f"{module}: flag --config=empty.py: empty.py defines no get_config()"


def test_bench_unknown_override_names_the_field(tmp_path):
    line = one_line_error(run("bench", f"--config={REPO / 'configs' / 'bench_cpu.py'}", "--config.train.num_step=3",
                              cwd=tmp_path))
    assert line == "Config error: train.num_step: unknown config field; did you mean train.num_steps?"


@pytest.mark.parametrize("module, args, message", [
    ("main", ("--nope=1",), "main: Unknown command line flag 'nope'"),
    ("convert", (), "convert: flag --torch_checkpoint=None: Flag --torch_checkpoint must have a value other than "
                    "None."),
    ("prepare", ("--dataset=synthetic",), "prepare: flag --data_dir=None: Flag --data_dir must have a value other "
                                          "than None."),
])
def test_flag_errors_are_one_line(tmp_path, module, args, message):
    line = one_line_error(run(module, *args, cwd=tmp_path))
    assert line == f"{message} (--helpshort lists the flags)"


# ------------------------------------------------------------------------------------------- embed --input


def test_embed_input_that_is_not_an_npz_is_named(tmp_path):
    (tmp_path / "notes.txt").write_text("video 1 2 3\n")
    np.savez(tmp_path / "objects.npz", video=np.array([{"a": 1}, None], dtype=object), video_mask=np.ones((2, 1)))
    np.save(tmp_path / "one.npy", np.zeros((2, 3, 4), np.float32))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "objects.npz").read_bytes()[:100])
    expected = {
        "notes.txt": "embed: cannot read --input notes.txt: not an .npz archive",
        "objects.npz": "embed: cannot read --input objects.npz: array 'video': Object arrays cannot be loaded "
                       "when allow_pickle=False",
        "one.npy": "embed: cannot read --input one.npy: a single .npy array, not an .npz archive of named arrays",
        "cut.npz": "embed: cannot read --input cut.npz: a damaged .npz archive (File is not a zip file)",
        "missing.npz": "embed: cannot read --input missing.npz: No such file or directory",
    }
    for name, message in expected.items():
        line = one_line_error(run("embed", "--checkpoint=ckpt", f"--input={name}", "--output=out.npz", cwd=tmp_path))
        assert line == message
    assert not (tmp_path / "out.npz").exists()


# ------------------------------------------------------------------------------------------------- Ctrl-C


def interrupt(args: list[str], cwd: pathlib.Path, started: pathlib.Path, pattern: str) -> tuple[int, str]:
    """Starts `python -m <args>`, waits until `started` holds a `pattern` entry, then sends SIGINT (as Ctrl-C
    does) and waits for the command to end. Returns its exit status and stderr."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not list(started.glob(pattern)):
            assert proc.poll() is None, "".join(err)[-3000:]
            assert time.monotonic() < deadline, "the command never started its work"
            time.sleep(0.02)
        # Again while nothing says "interrupted": CPython drops a KeyboardInterrupt raised while a gc callback
        # runs (JAX registers one), and a command that did stop must not get a second one.
        while proc.poll() is None and f"{args[0].split('.')[-1]}: interrupted" not in "".join(err):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
        proc.wait(timeout=120)
        reader.join(timeout=10)
        return proc.returncode, "".join(err)
    finally:
        if proc.poll() is None:
            proc.kill()


def interrupted_line(rc: int, stderr: str) -> str:
    """The last stderr line (progress bars end their lines with \\r), asserting exit status 130 and no traceback."""
    assert rc == 130, (rc, stderr[-3000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


def test_prepare_interrupted(tmp_path):
    where = tmp_path / "d" / "synthetic" / "default"
    rc, err = interrupt(["eao_jax.prepare", "--dataset=synthetic", "--config=default", "--data_dir=d"], tmp_path,
                        where, "incomplete.*")
    assert interrupted_line(rc, err) == ("prepare: interrupted; a dataset is kept only once complete (its partial "
                                         "files are removed): rerun the same command to prepare it")
    assert sorted(p.name for p in where.iterdir()) == [".prepare.lock"]  # no dataset, no temporary directory


def test_main_interrupted_before_training(tmp_path):
    # Interrupted while it prepares the synthetic data; 1000 videos per batch would fail right after that.
    where = tmp_path / "w" / "data" / "synthetic" / "default"
    rc, err = interrupt(["eao_jax.main", f"--config={REPO / 'configs' / 'demo.py'}:tiny", "--workdir=w",
                         "--config.data.tfds_config=default", "--config.data.videos_per_batch=1000"], tmp_path,
                        where, "incomplete.*")
    assert interrupted_line(rc, err) == ("main: interrupted; rerun the same command to resume from the newest "
                                         "complete checkpoint in its workdir (or to start over without one)")
    assert not list((tmp_path / "w").glob("checkpoints/[0-9]*"))


def test_ctrl_c_inside_a_discarded_callback_is_raised_again(monkeypatch):
    """A KeyboardInterrupt raised where Python discards exceptions (JAX's gc callback, a `__del__`) is not
    printed as "Exception ignored" and lost: console.run's hook raises it again in the main thread."""
    import time

    from eao_jax import console

    printed = []
    monkeypatch.setattr(sys, "unraisablehook", console._redeliver_interrupts(printed.append))

    class Interrupted:
        def __del__(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        obj = Interrupted()
        del obj
        for _ in range(200):
            time.sleep(0.01)
    assert printed == []

    class Failing:
        def __del__(self):
            raise ValueError("other errors still reach the previous hook")

    obj = Failing()
    del obj
    assert [u.exc_type for u in printed] == [ValueError]
