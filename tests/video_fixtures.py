"""Small video files written with PyAV's encoders, for the decoding and extraction tests.

Each frame shows a frame-index code (a left band whose grey level steps with the index), a moving
square and a gradient, so tests can tell which source frame was selected and encoders have motion to
code. Everything is deterministic for one PyAV build (encoders run single-threaded).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """The rgb24 picture of frame `i`: band grey level 8 + 24 * (i % 10), a square moving 3 px/frame."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = (x * 255 // max(width - 1, 1)).astype(np.uint8)
    img[..., 1] = (y * 255 // max(height - 1, 1)).astype(np.uint8)
    img[..., 2] = 128
    side = max(min(width, height) // 4, 2)
    x0 = (3 * i) % max(width - side, 1)
    y0 = (2 * i) % max(height - side, 1)
    img[y0 : y0 + side, x0 : x0 + side] = (250, 40, 200)
    img[:, : max(width // 5, 1)] = 8 + 24 * (i % 10)
    return img


def make_video(
    path: os.PathLike | str,
    seconds: float = 2.0,
    fps: float | Fraction = 25,
    size: tuple[int, int] = (64, 48),
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    audio: tuple[str, int] | None = None,
    audio_codec: str = "aac",
    video_start: float = 0.0,
    pts: Sequence[float] | None = None,
    rotation: float | None = None,
    color_range: int | None = None,
    colorspace: int | None = None,
    audio_tone: float = 440.0,
) -> str:
    """Writes a video of `size` = (width, height) to `path` (container from its suffix) and returns it.

    audio: (channel layout, e.g. "stereo" or "5.1", sample rate) of a sine tone whose amplitude differs
      per channel (channel c of n is scaled by (c + 1) / n), or None for no audio stream.
    video_start: seconds of the first video frame after the container's start (audio starts at 0).
    pts: explicit frame times in seconds (variable frame rate); overrides seconds / fps.
    rotation: display-matrix rotation in degrees (counter-clockwise), as phones write it.
    color_range / colorspace: tags as FFmpeg's AVColorRange / AVColorSpace numbers, e.g. 2 (full range) /
      1 (BT.709; also written as the primaries and transfer).
    """
    path = str(path)
    rate = Fraction(fps).limit_denominator(1001)
    times = list(pts) if pts is not None else [i / rate for i in range(max(int(round(seconds * rate)), 1))]
    tb = Fraction(1, 90000) if pts is not None or video_start else 1 / rate
    with av.open(path, "w") as out:
        vs = out.add_stream(codec, rate=rate)
        vs.width, vs.height = size
        vs.pix_fmt = pix_fmt
        vs.time_base = tb
        vs.codec_context.time_base = tb
        vs.thread_count = 1
        if codec == "libx264":
            vs.options = {"preset": "ultrafast", "threads": "1"}
        elif codec == "libvpx-vp9":
            vs.options = {"deadline": "realtime", "cpu-used": "8", "threads": "1"}
        elif codec == "libx265":
            vs.options = {"x265-params": "log-level=none:pools=1:frame-threads=1"}
        elif codec == "libsvtav1":
            vs.options = {"preset": "12"}
        if color_range is not None:
            vs.codec_context.color_range = color_range
        if colorspace is not None:
            vs.codec_context.colorspace = colorspace
            vs.codec_context.color_primaries = colorspace
            vs.codec_context.color_trc = colorspace
        if rotation is not None:
            vs.set_display_rotation(rotation)
        astream = None
        if audio is not None:
            layout, sample_rate = audio
            astream = out.add_stream(audio_codec, rate=sample_rate, layout=layout)
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(frame_image(i, *size), format="rgb24").reformat(format=pix_fmt)
            frame.pts = int(round((Fraction(t).limit_denominator(90000) + Fraction(video_start).limit_denominator(
                90000)) / tb))
            frame.time_base = tb
            if color_range is not None:
                frame.color_range = color_range
            if colorspace is not None:
                frame.colorspace = colorspace
            out.mux(vs.encode(frame))
        out.mux(vs.encode(None))
        if astream is not None:
            layout, sample_rate = audio
            channels = av.AudioLayout(layout).nb_channels
            total = int(round((float(times[-1]) + float(video_start) + 1 / float(rate)) * sample_rate))
            t = np.arange(total) / sample_rate
            tone = 0.5 * np.sin(2 * np.pi * audio_tone * t)
            samples = np.stack([tone * (c + 1) / channels for c in range(channels)]).astype(np.float32)
            chunk = astream.codec_context.frame_size or 1024
            for start in range(0, total, chunk):
                part = np.ascontiguousarray(samples[:, start : start + chunk])
                af = av.AudioFrame.from_ndarray(part, format="fltp", layout=layout)
                af.sample_rate = sample_rate
                af.pts = start
                af.time_base = Fraction(1, sample_rate)
                out.mux(astream.encode(af))
            out.mux(astream.encode(None))
    return path


def make_audio_only(path: str | os.PathLike, blocks: int = 10) -> str:
    """A file with one silent 16 kHz mono AAC stream and no video stream (`blocks` x 1024 samples)."""
    with av.open(os.fspath(path), "w") as out:
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for k in range(blocks):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, k * 1024
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return os.fspath(path)
