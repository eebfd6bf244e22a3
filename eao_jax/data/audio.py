"""Audio: time <-> STFT frame mapping, crop and pad of log-mel spectrograms, cut into clips.

Spectrograms are (40, T) at 100 frames/s (librosa, sr 16000, hop 160, n_fft 400). The original maps
seconds to frames with librosa's `time_to_frames`, i.e. `(int(t * 16000) - 200) // 160` (it can be
negative and is clamped to 0 where it starts a crop), and frames to seconds with
`frames_to_time`, i.e. `(n * 160 + 200) / 16000`.
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400


def time_to_frame(t: float) -> int:
    """librosa.time_to_frames(t, sr=16000, hop_length=160, n_fft=400) for one time (seconds)."""
    samples = int(np.float64(t) * SAMPLE_RATE)  # astype(int): truncation toward zero
    return (samples - N_FFT // 2) // HOP


def frame_to_time(n: int) -> float:
    """librosa.frames_to_time(n, sr=16000, hop_length=160, n_fft=400)."""
    return (n * HOP + N_FFT // 2) / SAMPLE_RATE


def crop(mel: np.ndarray, start: float, end: float) -> np.ndarray:
    """Frames [max(0, frame(start)), frame(end)) of a (40, T) spectrogram (Python slice rules)."""
    return mel[:, max(0, time_to_frame(start)): time_to_frame(end)]


def pad(mel: np.ndarray, n_frames: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Crops or zero-pads a (40, T) spectrogram to (40, n_frames).

    Returns:
      audio (40, n_frames) float32, mask (n_frames,) float32 (1 on real frames), and the number of
      real frames min(T, n_frames).
    """
    n = min(int(mel.shape[1]), n_frames)
    audio = np.zeros((mel.shape[0], n_frames), np.float32)
    mask = np.zeros((n_frames,), np.float32)
    audio[:, :n] = mel[:, :n]
    mask[:n] = 1.0
    return audio, mask, n


def cut_into_clips(video: np.ndarray, video_mask: np.ndarray, audio: np.ndarray, audio_mask: np.ndarray,
                   nframes: int, n_clips: int) -> dict[str, np.ndarray]:
    """Cuts one long input into `n_clips` consecutive clips (the "cut into clips and average" strategy).

    Args:
      video: (n_clips * Nv, Dv), video_mask: (n_clips * Nv,), audio: (40, n_clips * Ta),
      audio_mask: (n_clips * Ta,), nframes: real audio frames of the whole input.

    Returns:
      video (n_clips, Nv, Dv), video_mask (n_clips, Nv), audio (n_clips, 40, Ta), audio_mask (n_clips, Ta),
      audio_STFT_nframes (n_clips,) int32 and keep (n_clips,) bool. A clip after the first is dropped
      (keep False, the original's id "-1") when its real audio frames are <= 70 % of Ta; the decision
      uses audio only. Kept embeddings of one item are averaged by the evaluator.
    """
    ta = audio_mask.shape[0] // n_clips
    nv = video_mask.shape[0] // n_clips
    out_audio = audio.reshape(audio.shape[0], n_clips, ta).transpose(1, 0, 2)
    out_amask = audio_mask.reshape(n_clips, ta)
    out_video = video.reshape(n_clips, nv, video.shape[-1])
    out_vmask = video_mask.reshape(n_clips, nv)
    nfr = np.zeros((n_clips,), np.int32)
    keep = np.zeros((n_clips,), bool)
    for i in range(n_clips):
        left = nframes - i * ta
        if i == 0 or left > 0.7 * ta:
            nfr[i] = min(ta, left)
            keep[i] = True
        else:
            nfr[i] = ta
    return dict(video=np.ascontiguousarray(out_video), video_mask=np.ascontiguousarray(out_vmask),
                audio=np.ascontiguousarray(out_audio), audio_mask=np.ascontiguousarray(out_amask),
                audio_STFT_nframes=nfr, keep=keep)
