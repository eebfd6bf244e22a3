"""Decoding for feature extraction: one pass over a video file gives, streamed in bounded chunks, the frames
of every frame recipe (the 2D recipe's 1 fps at short side 224, the 3D recipe's 24 fps at short side 112
centre-cropped to 112×112) and the audio as 16 kHz mono float64 (before the recipe's gain).

The frames are the ones the reference extractor got from the ffmpeg command line
(`ffmpeg -i IN -vf fps=N,scale=W:H[,crop=S:S:X:Y] -f rawvideo -pix_fmt rgb24 -`), pixel for pixel:

- Selection follows ffmpeg's `fps` filter (round to nearest): a frame's time, measured from the container's
  start as the command line measures it, is rounded to the output rate's tick; output tick n shows the
  last frame whose tick is <= n; ticks repeat a frame when the source is slower; the last frame lasts
  until the rounded end of its duration. Ticks before the first video frame show the first output frame
  (the command line's constant-frame-rate output for rawvideo pads them so, in ffmpeg 4.2 as in 5.1;
  5.1 also drops the last frame of such a video). One deviation: a video so short
  that the rule gives no frame (under half an output tick) gives its one frame, where the reference
  gave an empty array and dropped the video.
- Scaling runs the same `scale` filter (libswscale) in a libavfilter graph, with the command line's
  default interpolation, bicubic (`interpolation` sets another). The output size comes from the displayed
  frame size (after rotation) by `output_size`; the sample aspect ratio is ignored, as the reference did.
- Rotation metadata (display matrix) is applied as the command line's autorotation does (transpose for
  ±90°, both flips for 180°, `rotate` for other angles; mirroring in the matrix is ignored, as ffmpeg 4.2
  ignores it). The reference took the scale size from the stored (unrotated) size and so squashed
  videos turned by 90°; here the size follows the rotated frame.

Audio is decoded from the same pass and goes through the audio recipe's first steps
(`logmel.mix_to_mono`: each channel on the 16-bit grid of the reference's wav, channels averaged with
equal weights as `sox ... channels 1` does; libswresample's own downmix weights 5.1 channels unequally),
then libsoxr's streaming resampler to 16 kHz (`logmel.resampler_16k`: sox's own resampler, within 1 LSB
of the reference's `sox rate 16000`; libswresample was 6 LSB off).

Bad inputs raise `DecodeError` naming the file and the reason. A truncated file (its video ends before the
duration its container declares) is refused at the end of iteration: chunks already yielded must be
discarded, never kept as a partial result.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
import types
from collections.abc import Iterator, Mapping
from fractions import Fraction

import av
import numpy as np

from eao_jax.extract import logmel

INTERPOLATIONS = ("bicubic", "bilinear", "fast_bilinear", "neighbor", "area", "bicublin", "gauss", "sinc",
                  "lanczos", "spline")
AUDIO_RATE = 16000
_AV_TIME_BASE = Fraction(1, 1_000_000)


@dataclasses.dataclass(frozen=True)
class FrameRecipe:
    """Frames at `fps` per second, scaled so the short side is `short_side` (aspect kept); `crop`: then the
    centre `short_side` × `short_side` square."""

    fps: int
    short_side: int
    crop: bool = False


FRAMES_2D = FrameRecipe(fps=1, short_side=224)
FRAMES_3D = FrameRecipe(fps=24, short_side=112, crop=True)
DEFAULT_RECIPES = types.MappingProxyType({"2d": FRAMES_2D, "3d": FRAMES_3D})
MAX_ASPECT = 10  # a longer side over 10 times the shorter is refused: its 2D frames would be huge


class DecodeError(Exception):
    """A video that cannot give its frames: `path` and a one-line `reason`."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def output_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(height, width) with the short side `short_side`, aspect kept, the long side truncated as the
    reference did: a 720 x 1280 frame -> (224, 398) at 224, (112, 199) at 112; 272 x 640 -> (224, 527)."""
    if height >= width:
        return int(height * short_side / width), short_side
    return short_side, int(width * short_side / height)


def crop_offsets(height: int, width: int, size: int) -> tuple[int, int]:
    """(x, y) of the centre `size` x `size` crop of a (height, width) frame: int((w - size) / 2),
    int((h - size) / 2), as the reference's crop filter."""
    return int((width - size) / 2.0), int((height - size) / 2.0)


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    path: str
    codec: str
    pix_fmt: str
    width: int  # displayed size, after rotation
    height: int
    rotation: int  # degrees clockwise the stored frames are turned for display
    frame_rate: Fraction | None  # the container's average rate
    duration: float | None  # seconds the container declares for the video
    audio_codec: str | None
    audio_channels: int
    audio_rate: int
    audio_note: str  # "" when audio is decoded, else why not (e.g. "no audio stream")


@dataclasses.dataclass(frozen=True)
class Chunk:
    """`stream` is a recipe name with `data` (n, h, w, 3) uint8 frames, or "audio" with (n,) float64
    16 kHz mono samples."""

    stream: str
    data: np.ndarray


def _rescale_near(value: int, src: Fraction, dst: Fraction) -> int:
    """av_rescale_q_rnd(value, src, dst, AV_ROUND_NEAR_INF): round half away from zero, exactly."""
    num, den = value * src.numerator * dst.denominator, src.denominator * dst.numerator
    sign = -1 if num < 0 else 1
    return sign * ((abs(num) + den // 2) // den)


class FpsSelector:
    """ffmpeg's `fps` filter (round=near, eof_action=round) plus the command line's padding of the ticks
    before the first frame, on ticks: `push(tick)` for each frame in decode order returns how many times
    the previously pushed frame is output now; `finish(end_tick)` returns the count for the last one."""

    def __init__(self) -> None:
        self._next: int | None = None  # the next output tick
        self._held = False
        self.emitted = 0

    def push(self, tick: int) -> int:
        if not self._held:
            self._held = True
            if self._next is None:
                self._next = tick
            return 0
        return self._advance(tick)

    def finish(self, end_tick: int) -> int:
        if not self._held:
            return 0
        count = self._advance(end_tick)
        if not self.emitted:
            # A video shorter than half a tick gives no frame by the rule: keep its one frame.
            count = self._emit(1, self._next)
        return count

    def _advance(self, tick: int) -> int:
        first = self._next
        count = max(tick - first, 0)
        self._next += count
        return self._emit(count, first)

    def _emit(self, count: int, first_tick: int) -> int:
        if count and not self.emitted:
            # The command line's constant-rate output repeats the first output frame from tick 0 on.
            count += max(first_tick, 0)
        self.emitted += count
        return count


def _display_rotation(frame: av.VideoFrame) -> float:
    """The counter-clockwise rotation of the frame's display matrix in degrees, as av_display_rotation_get
    computes it (PyAV's `rotation` rounds it to whole degrees)."""
    if av.sidedata.sidedata.Type.DISPLAYMATRIX not in frame.side_data:
        return 0.0
    m = np.frombuffer(bytes(frame.side_data[av.sidedata.sidedata.Type.DISPLAYMATRIX]), "<i4") / 65536.0
    scale0, scale1 = math.hypot(m[0], m[3]), math.hypot(m[1], m[4])
    if scale0 == 0 or scale1 == 0:
        return 0.0
    return -math.degrees(math.atan2(m[1] / scale1, m[0] / scale0))


def _rotation_filters(rotation_ccw: float) -> list[tuple[str, str | None]]:
    """The filters ffmpeg's command line inserts for a display matrix (autorotate)."""
    theta = -rotation_ccw
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
    if abs(theta - 90) < 1:
        return [("transpose", "clock")]
    if abs(theta - 180) < 1:
        return [("hflip", None), ("vflip", None)]
    if abs(theta - 270) < 1:
        return [("transpose", "cclock")]
    if abs(theta) > 1:
        return [("rotate", f"{theta:f}*PI/180")]
    return []


class _Scaler:
    """One recipe's pixels: buffer -> [autorotation] -> scale=W:H -> rgb24 -> [crop] in a libavfilter graph."""

    def __init__(self, recipe: FrameRecipe, height: int, width: int, rotation: list, interpolation: str,
                 threads: int):
        # height, width: the displayed (rotated) size, which the output size follows.
        self.recipe = recipe
        self.rotation = rotation
        self.interpolation = interpolation
        self.threads = threads
        out_h, out_w = output_size(height, width, recipe.short_side)
        self.scale_args = f"{out_w}:{out_h}:flags={interpolation}"
        self.crop_args = None
        if recipe.crop:
            s = recipe.short_side
            self.crop_args = f"{s}:{s}:" + ":".join(map(str, crop_offsets(out_h, out_w, s)))
        self.shape = (recipe.short_side, recipe.short_side, 3) if recipe.crop else (out_h, out_w, 3)
        self._key = None
        self._graph = None

    def _build(self, frame) -> None:
        graph = av.filter.Graph()
        graph.threads = self.threads
        src = graph.add("buffer", video_size=f"{frame.width}x{frame.height}", pix_fmt=str(frame.format.name),
                        time_base="1/1", pixel_aspect="1/1", colorspace=str(frame.colorspace),
                        range=str(frame.color_range))
        chain = [src, *(graph.add(name, args) for name, args in self.rotation),
                 graph.add("scale", self.scale_args), graph.add("format", "rgb24")]
        if self.crop_args:
            chain.append(graph.add("crop", self.crop_args))
        chain.append(graph.add("buffersink"))
        graph.link_nodes(*chain)
        graph.configure()
        self._graph = graph

    def __call__(self, frame) -> np.ndarray:
        key = (frame.width, frame.height, frame.format.name, frame.colorspace, frame.color_range)
        if key != self._key:
            self._build(frame)
            self._key = key
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()


class _Frames:
    """Collects one recipe's output frames into chunks of at most `chunk_frames`."""

    def __init__(self, name: str, scaler: _Scaler, chunk_frames: int):
        self.name = name
        self.scaler = scaler
        self.buf = np.empty((chunk_frames, *scaler.shape), np.uint8)
        self.n = 0

    def add(self, frame, count: int) -> Iterator[Chunk]:
        if not count:
            return
        img = self.scaler(frame)
        while count:
            take = min(count, len(self.buf) - self.n)
            self.buf[self.n : self.n + take] = img
            self.n += take
            count -= take
            if self.n == len(self.buf):
                yield self.flush()

    def flush(self) -> Chunk:
        chunk = Chunk(self.name, self.buf[: self.n].copy())
        self.n = 0
        return chunk


class VideoDecoder:
    """Opens `path` (checks it has a decodable video stream; raises DecodeError) and, iterated, decodes it
    once, yielding `Chunk`s of each recipe's frames and of the audio in decode order.

    interpolation: the scale filter's algorithm (`INTERPOLATIONS`); bicubic is the ffmpeg command line's
      default, which the reference used.
    threads: decoder and filter threads (1: one process per core is the efficient layout; 0: automatic).
    chunk_frames / chunk_samples: the most frames / audio samples one chunk holds.

    Packets the decoders reject are skipped, as ffmpeg's command line skips them, and counted in
    `skipped_packets` ({"video": n, "audio": n}) for the caller to report; `decoded_frames` counts the
    video frames decoded.
    """

    def __init__(self, path: os.PathLike | str, recipes: Mapping[str, FrameRecipe] = DEFAULT_RECIPES, *,
                 audio: bool = True, interpolation: str = "bicubic", threads: int = 1, chunk_frames: int = 32,
                 chunk_samples: int = 8 * AUDIO_RATE):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}: one of {', '.join(INTERPOLATIONS)}")
        self.path = os.fspath(path)
        self.recipes = dict(recipes)
        self.interpolation = interpolation
        self.threads = threads
        self.chunk_frames = chunk_frames
        self.chunk_samples = chunk_samples
        self._iterated = False
        self.skipped_packets = {"video": 0, "audio": 0}
        self.decoded_frames = 0
        if not os.path.exists(self.path):
            raise DecodeError(self.path, "no such file")
        if os.path.isdir(self.path):
            raise DecodeError(self.path, "is a directory")
        if os.path.getsize(self.path) == 0:
            raise DecodeError(self.path, "empty file (0 bytes)")
        try:
            # "file:" and the whitelist: a name like "concat:a|b" or "http:x" is a local file, never a protocol.
            self._container = av.open(f"file:{self.path}", options={"protocol_whitelist": "file"},
                                      metadata_errors="ignore")
        except av.error.FFmpegError as e:
            raise DecodeError(self.path, f"not a readable media file ({_ffmpeg_reason(e)})") from None
        try:
            self._open_streams(audio)
        except BaseException:
            self._container.close()
            raise

    def _open_streams(self, audio: bool) -> None:
        container = self._container
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise DecodeError(self.path, f"no video stream (streams: {', '.join(kinds)})")
        self._video = container.streams.video[0]
        vctx = self._video.codec_context
        if vctx is None:
            raise DecodeError(self.path, "the video stream's codec has no decoder in this build")
        vctx.thread_count = self.threads
        if self.threads != 1:
            vctx.thread_type = "AUTO"
        self._audio = None
        audio_note = "no audio stream"
        audio_codec, channels, rate = None, 0, 0
        if container.streams.audio:
            stream = container.streams.audio[0]
            channels, rate = stream.channels, stream.sample_rate
            audio_codec = stream.codec_context.name if stream.codec_context is not None else None
            if stream.codec_context is None:
                audio_note = "audio stream has no decoder here"
            elif not audio:
                audio_note = "audio not requested"
            else:
                self._audio, audio_note = stream, ""
        # The command line measures time from the container's start (the earliest stream's).
        self._start = Fraction(container.start_time or 0) * _AV_TIME_BASE
        duration = None
        if self._video.duration is not None:
            duration = float(self._video.duration * self._video.time_base)
        elif container.duration is not None:
            duration = float(Fraction(container.duration) * _AV_TIME_BASE - self._start)
        self._duration_is_stream = self._video.duration is not None
        # The display matrix comes with the decoded frames: read the first one now (keeping the packets
        # read on the way) so the output geometry is known before iteration.
        self._packets = container.demux(*[s for s in (self._video, self._audio) if s is not None])
        self._pending: list = []
        self._first = None
        for packet in self._packets:
            if packet.stream is self._video:
                frames = self._decode_video(packet)
                if frames:
                    self._first = frames
                    break
            else:
                self._pending.append(packet)
        if self._first is None:
            self._first = self._decode_video(None)
            if not self._first:
                raise DecodeError(self.path, "no video frame could be decoded")
        rotation = _display_rotation(self._first[0])
        self._rotation = _rotation_filters(rotation)
        width, height = self._first[0].width, self._first[0].height
        if any(name == "transpose" for name, _ in self._rotation):
            width, height = height, width
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise DecodeError(self.path, f"frame size {width}x{height}: aspect ratio beyond {MAX_ASPECT}:1")
        self.info = VideoInfo(
            path=self.path, codec=vctx.name, pix_fmt=self._first[0].format.name, width=width, height=height,
            rotation=round(-rotation) % 360, frame_rate=self._video.average_rate, duration=duration,
            audio_codec=audio_codec, audio_channels=channels, audio_rate=rate, audio_note=audio_note)

    def _decode_video(self, packet) -> list:
        try:
            frames = self._video.decode(packet)
        except av.error.EOFError:
            return []  # already flushed by the demuxer's end-of-stream packet
        except av.error.FFmpegError:
            self.skipped_packets["video"] += 1
            return []
        self.decoded_frames += len(frames)
        return frames

    def __enter__(self) -> VideoDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._container.close()

    def __iter__(self) -> Iterator[Chunk]:
        if self._iterated:
            raise RuntimeError("a VideoDecoder decodes its file once")
        self._iterated = True
        try:
            yield from self._chunks()
        except av.error.FFmpegError as e:
            raise DecodeError(self.path, f"decoding failed ({_ffmpeg_reason(e)})") from None
        finally:
            self.close()

    def _chunks(self) -> Iterator[Chunk]:
        tb = self._video.time_base
        start = _rescale_near(self._start.numerator, Fraction(1, self._start.denominator), tb)
        outs = []
        for name, recipe in self.recipes.items():
            scaler = _Scaler(recipe, self.info.height, self.info.width, self._rotation, self.interpolation,
                             self.threads)
            outs.append((_Frames(name, scaler, self.chunk_frames), FpsSelector(), Fraction(1, recipe.fps)))
        audio = _AudioMono(self._audio, self.path) if self._audio is not None else None
        pending_samples: list[np.ndarray] = []
        held = None
        end = None  # the decoded video's end, in stream ticks from the container's start
        default_duration = (int(round(1 / (self._video.guessed_rate * tb))) if self._video.guessed_rate
                            else 0)

        def video(frames):
            nonlocal held, end
            for frame in frames:
                pts = frame.best_effort_timestamp
                if pts is None:
                    continue  # the fps filter discards frames without a timestamp
                pts -= start
                for out, selector, out_tb in outs:
                    count = selector.push(_rescale_near(pts, tb, out_tb))
                    if held is not None:
                        yield from out.add(held, count)
                held = frame
                end = pts + (frame.duration or default_duration)

        def audio_samples(packet):
            for samples in audio.decode(packet, self.skipped_packets):
                pending_samples.append(samples)
            if sum(map(len, pending_samples)) >= self.chunk_samples:
                yield from flush_audio()

        def flush_audio():
            if pending_samples:
                data = np.concatenate(pending_samples)
                pending_samples.clear()
                for i in range(0, len(data), self.chunk_samples):
                    yield Chunk("audio", data[i : i + self.chunk_samples])

        yield from video(self._first)
        for packet in self._pending:
            yield from audio_samples(packet)
        self._pending = []
        for packet in self._packets:
            if packet.stream is self._video:
                yield from video(self._decode_video(packet))
            else:
                yield from audio_samples(packet)
        yield from video(self._decode_video(None))
        if audio is not None:
            yield from audio_samples(None)
            yield from flush_audio()
        self._check_complete(end * tb if end is not None else None)
        for out, selector, out_tb in outs:
            yield from out.add(held, selector.finish(_rescale_near(end, tb, out_tb)))
            if out.n:
                yield out.flush()

    def _check_complete(self, decoded_end: Fraction | None) -> None:
        declared = self.info.duration
        if declared is None or decoded_end is None:
            return
        # A container duration may cover a longer audio stream: allow more slack than for the video's own.
        slack = 0.5 if self._duration_is_stream else 2.0 + 0.05 * declared
        if float(decoded_end) < declared - slack:
            raise DecodeError(self.path, f"truncated: video decoded to {float(decoded_end):.2f} s of the "
                                         f"{declared:.2f} s the container declares")


class _AudioMono:
    """Decodes an audio stream to 16 kHz mono float64 (the audio recipe's mix and resampler, streamed)."""

    def __init__(self, stream, path: str):
        self.stream, self.path = stream, path
        self.resampler = None
        self.rate = None

    def decode(self, packet, skipped: dict[str, int]) -> Iterator[np.ndarray]:
        try:
            frames = self.stream.decode(packet)
        except av.error.EOFError:
            frames = []  # already flushed by the demuxer's end-of-stream packet
        except av.error.FFmpegError:
            skipped["audio"] += 1
            frames = []
        for frame in frames:
            if frame.sample_rate != self.rate:  # a new resampler when the rate changes mid-stream
                yield from self._flush()
                self.rate = frame.sample_rate
                self.resampler = logmel.resampler_16k(frame.sample_rate)
            data = frame.to_ndarray()
            if not frame.format.is_planar:
                data = data.reshape(-1, len(frame.layout.channels)).T
            mono = logmel.mix_to_mono(_as_float(data), f"{self.path}: audio")
            out = self.resampler.resample_chunk(mono)
            if len(out):
                yield out
        if packet is None:
            yield from self._flush()

    def _flush(self) -> Iterator[np.ndarray]:
        if self.resampler is not None:
            out = self.resampler.resample_chunk(np.zeros(0), last=True)
            self.resampler = None
            if len(out):
                yield out


def _as_float(data: np.ndarray) -> np.ndarray:
    """Samples as float32 in [-1, 1] (integer formats scaled as FFmpeg converts them)."""
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - 128) / 128
    if data.dtype.kind == "i":
        return data.astype(np.float32) / 2 ** (8 * data.dtype.itemsize - 1)
    return data.astype(np.float32)


def _ffmpeg_reason(e: Exception) -> str:
    return getattr(e, "strerror", None) or str(e)


def decode_video(path: os.PathLike | str, recipes: Mapping[str, FrameRecipe] = DEFAULT_RECIPES,
                 **kwargs) -> tuple[VideoInfo, dict[str, np.ndarray]]:
    """The whole video in memory (for short videos and tests): info and {recipe name or "audio": array}."""
    with VideoDecoder(path, recipes, **kwargs) as decoder:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in recipes}
        parts["audio"] = []
        for chunk in decoder:
            parts[chunk.stream].append(chunk.data)
        info = decoder.info
    out = {name: np.concatenate(parts[name]) for name in recipes}  # every recipe gives at least one frame
    out["audio"] = np.concatenate(parts["audio"]) if parts["audio"] else np.zeros(0, np.float64)
    return info, out


def bench_decode(path: os.PathLike | str, recipes: Mapping[str, FrameRecipe] = DEFAULT_RECIPES, *,
                 threads: int = 1, audio: bool = True, **kwargs) -> dict:
    """Decodes `path` once for all `recipes` and reports source frames and output frames per CPU-second
    (this process's user + system time, all its threads), wall seconds and the process's peak RSS."""
    usage0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    counts = {name: 0 for name in recipes}
    counts["audio_samples"] = 0
    with VideoDecoder(path, recipes, threads=threads, audio=audio, **kwargs) as decoder:
        for chunk in decoder:
            counts["audio_samples" if chunk.stream == "audio" else chunk.stream] += len(chunk.data)
        info = decoder.info
    usage1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall0
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    source_frames = decoder.decoded_frames
    return {
        "path": os.fspath(path), "size": f"{info.width}x{info.height}", "threads": threads,
        "cpu_s": cpu, "wall_s": wall, "source_frames": source_frames,
        "source_frames_per_cpu_s": source_frames / cpu if cpu else float("inf"),
        **{f"{name}_frames": counts[name] for name in recipes},
        **{f"{name}_frames_per_cpu_s": counts[name] / cpu if cpu else float("inf") for name in recipes},
        "audio_samples": counts["audio_samples"],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
