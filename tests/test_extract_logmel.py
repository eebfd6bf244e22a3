"""The log-mel recipe against AVLnet's `audio_to_spectrograms.py` run with librosa 0.8.1, and our
16 kHz mono conversion against `sox -D` (fixtures: tests/data/extract/audio/README.md)."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest

from eao_jax.extract import logmel as L

DATA = pathlib.Path(__file__).parent / "data" / "extract" / "audio"
TOL_DB = 1e-3


@pytest.fixture(scope="module")
def bbb():
    return dict(np.load(DATA / "bigbuckbunny_16k.npz"))


@pytest.fixture(scope="module")
def syn():
    return dict(np.load(DATA / "synthetic_16k.npz"))


def _max_db(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b).max())


def test_real_video_audio_equals_avlnet_spectrogram(bbb):
    spec = L.logmel(bbb["samples"])
    assert spec.dtype == np.float32 and spec.shape == (40, 532)  # 84992 samples: 1 + 84992 // 160 frames
    assert _max_db(spec, bbb["spec"]) <= TOL_DB
    assert spec.max() == 0 and spec.min() > -80  # relative to the file's maximum; this clip stays above the floor


def test_saved_file_equals_the_float16_file_of_the_original(bbb, tmp_path):
    path = tmp_path / "bigbuckbunny_spec.npz"
    L.save_spectrogram(path, L.logmel(bbb["samples"]))
    with np.load(path) as ours, np.load(DATA / "bigbuckbunny_spec.npz") as ref:
        assert list(ours) == list(ref) == ["arr_0"]
        a, b = ours["arr_0"], ref["arr_0"]
    assert a.dtype == b.dtype == np.float16 and a.shape == b.shape
    # float32 values 1e-4 dB apart can round to neighbouring float16 values: at most one step.
    assert np.all(np.abs(a.astype(np.float32) - b) <= np.spacing(np.abs(b)))
    assert (a == b).mean() > 0.99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bigbuckbunny_spec.npz"]  # no temporary left


def test_synthetic_signal_with_dc_offset(syn):
    assert _max_db(L.logmel(syn["samples"]), syn["syn_spec"]) <= TOL_DB
    # int16 and the same samples as float (as a 16-bit wav reads) give the same spectrogram.
    as_float = syn["samples"] / 32768.0
    kept = as_float.copy()
    np.testing.assert_array_equal(L.logmel(as_float), L.logmel(syn["samples"]))
    np.testing.assert_array_equal(as_float, kept)  # the caller's array is not modified


@pytest.mark.parametrize("n", [1, 2, 150, 200, 201, 399, 400, 401])
def test_signals_shorter_than_a_frame_or_two(syn, n):
    ref = syn[f"short{n}_spec"]
    spec = L.logmel(syn["samples"][4000:4000 + n])
    assert spec.shape == ref.shape == (40, 1 + n // 160)
    assert _max_db(spec, ref) <= TOL_DB


def test_silence_is_0_db_everywhere_as_in_the_original(syn):
    spec = L.logmel(np.zeros(1000, np.int16))
    assert _max_db(spec, syn["silence_spec"]) <= TOL_DB and not spec.any()  # the original: -7.6e-6 (float32)


def test_floor_80_db_below_the_maximum(syn):
    """0.3 s of a loud 1 kHz tone, then 0.3 s of digital silence."""
    spec = L.logmel(syn["floor_samples"])
    assert _max_db(spec, syn["floor_spec"]) <= TOL_DB
    assert spec.min() == -80 and (spec[:, 35:] == -80).all()  # frames 35+ hold only silence


def test_first_and_last_frames_follow_librosa_08_reflect_padding(bbb, syn, monkeypatch):
    reflect = {"bbb": L.logmel(bbb["samples"]), "syn": L.logmel(syn["samples"])}
    refs = {"bbb": bbb["spec"], "syn": syn["syn_spec"]}
    zero_refs = {"bbb": bbb["zero_pad_edges"], "syn": syn["syn_zero_pad_edges"]}
    edges = [0, 1, 2, -3, -2, -1]
    for k in reflect:
        assert _max_db(reflect[k][:, edges], refs[k][:, edges]) <= TOL_DB
    # With zero padding (librosa >= 0.10) our STFT reproduces librosa's zero-padded edge frames, and
    # those are dB away from the recipe's: the tolerance above tells the two paddings apart.
    monkeypatch.setattr(L, "_reflect_pad", lambda y: np.pad(y, L.N_FFT // 2))
    for k in reflect:
        zero = L.logmel(bbb["samples"] if k == "bbb" else syn["samples"])
        assert _max_db(zero[:, edges], zero_refs[k]) <= TOL_DB
        first_last = np.abs(zero[:, [0, -1]] - refs[k][:, [0, -1]]).max(axis=0)
        assert (first_last > 0.3).all(), first_last  # measured: bbb 5.0 / 4.5 dB, synthetic 0.7 / 8.3 dB
        # Only the frames that overlap the padding change (frames 0-1 and the last two here).
        np.testing.assert_array_equal(zero[:, 2:-2], reflect[k][:, 2:-2])


def test_two_runs_are_bit_identical(bbb):
    a, b = L.logmel(bbb["samples"]), L.logmel(bbb["samples"])
    assert a.tobytes() == b.tobytes()


def test_chunked_stft_equals_one_pass(syn, monkeypatch):
    whole = L.logmel(syn["samples"])
    monkeypatch.setattr(L, "_FRAMES_PER_CHUNK", 7)  # 104 frames: 15 chunks, the last one partial
    np.testing.assert_array_equal(L.logmel(syn["samples"]), whole)


def test_target_length_crops_or_zero_pads_as_the_original(bbb):
    spec = L.logmel(bbb["samples"])
    np.testing.assert_array_equal(L.logmel(bbb["samples"], target_length=100), spec[:, :100])
    padded = L.logmel(bbb["samples"], target_length=2048)  # the original script's default
    assert padded.shape == (40, 2048)
    np.testing.assert_array_equal(padded[:, :532], spec)
    assert not padded[:, 532:].any()  # 0 (= as loud as the maximum), not -80: what the loaders were trained on


@pytest.mark.parametrize("call, message", [
    (lambda: L.logmel(np.zeros(0, np.int16)), "logmel: the audio is empty"),
    (lambda: L.logmel(np.array([0.1, np.nan, 0.2])), "logmel: 1 samples are NaN or Inf"),
    (lambda: L.logmel(np.array([0.1, np.inf])), "logmel: 1 samples are NaN or Inf"),
    (lambda: L.logmel(np.zeros((2, 1000), np.float32)), "logmel: expected 1-D (samples,) audio, got shape (2, 1000)"),
    (lambda: L.logmel(np.zeros(1000, np.int32)), "logmel: expected int16 or floating-point samples, got int32"),
    (lambda: L.logmel(np.zeros(1000, np.int16), sample_rate=44100), "logmel: expected 16000 Hz audio, got 44100 Hz"),
    (lambda: L.logmel(np.zeros(1000, np.int16), target_length=0), "target_length must be >= 1 or None, got 0"),
    (lambda: L.to_mono_16k(np.zeros(1000, np.int16), 48000),
     "to_mono_16k: expected 2-D (channels, samples) audio, got shape (1000,)"),
    (lambda: L.to_mono_16k(np.zeros((6, 0), np.float32), 48000), "to_mono_16k: the audio is empty"),
    (lambda: L.to_mono_16k(np.zeros((4800, 6), np.float32), 48000),
     "to_mono_16k: expected (channels, samples) audio, got 4800 channels of 6 samples (transposed?)"),
    (lambda: L.to_mono_16k(np.full((2, 10), np.nan, np.float32), 48000), "to_mono_16k: 20 samples are NaN or Inf"),
    (lambda: L.to_mono_16k(np.zeros((2, 10), np.float32), 0), "to_mono_16k: sample_rate must be a positive integer"),
    (lambda: L.to_mono_16k(np.zeros((2, 10), np.float32), 44100.0), "to_mono_16k: sample_rate must be a positive"),
    (lambda: L.save_spectrogram("x_spec.npz", np.zeros((20, 5))), "x_spec.npz: expected a (40, T) spectrogram"),
])
def test_bad_input_is_one_line_naming_the_problem(call, message):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def excerpt():
    return dict(np.load(DATA / "bigbuckbunny_6ch_excerpt.npz"))


def test_mono_16k_conversion_matches_sox_without_dither(excerpt):
    """0.42 s of the clip's 6-channel 48 kHz audio as ffmpeg writes it, against `sox -D ... gain -4
    channels 1 rate 16000`. libsoxr's HQ filter is sox's `rate` filter: before rounding our samples are
    within ~1e-3 LSB of sox's, so only values within that of a rounding tie come out 1 LSB apart
    (23 of 84,992 on the whole clip). sox's default random dither moves every sample by up to 2 LSB."""
    ours = L.to_mono_16k(excerpt["audio"], 48000)
    ref = excerpt["sox16k"]
    assert ours.dtype == np.int16 and ours.shape == ref.shape == (6667,)  # round(20001 / 3)
    diff = np.abs(ours.astype(np.int32) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    # In the spectrogram a 1-LSB step only shows where a band is at the quantisation-noise level.
    db = np.abs(L.logmel(ours) - L.logmel(ref))
    assert db.max() < 1.0 and db.mean() < 0.01
    # A decoder's float samples (int16 / 32768 here) go through the same 16-bit rounding as ffmpeg's wav.
    as_float = (excerpt["audio"] / 32768.0).astype(np.float32)
    np.testing.assert_array_equal(L.to_mono_16k(as_float, 48000), ours)
    assert L.to_mono_16k(excerpt["audio"], 48000).tobytes() == ours.tobytes()


def test_mono_16k_at_16k_only_mixes_and_applies_the_gain():
    audio = np.array([[1000, -2000, 32767], [3000, 2000, 32767]], np.int16)
    # the channel mean x 10^(-4/20), rounded: 2000 -> 1261.9, 0 -> 0, 32767 -> 20674.6
    np.testing.assert_array_equal(L.to_mono_16k(audio, 16000), [1262, 0, 20675])


def test_bench_logmel_reports_throughput_and_flops():
    out = L.bench_logmel(seconds=5.0, repeats=1)
    # Both far faster than real time on any CPU (measured ~1800x and ~500x on a 2-core machine).
    assert out["logmel_audio_seconds_per_cpu_second"] > 1.0 and out["mono_16k_audio_seconds_per_cpu_second"] > 1.0
    assert out["logmel_flops_per_cpu_second"] == pytest.approx(
        out["flops_per_audio_second"] * out["logmel_audio_seconds_per_cpu_second"])
    assert out["flops_per_audio_second"] == pytest.approx(L.flops_per_second_of_audio())
    assert 1e6 < out["flops_per_audio_second"] < 1e8
