"""The extraction job: video files -> the released HowTo100M feature layout (`eao_jax.extract.outputs`).

One process of the job (of `num_processes`, e.g. one per host under jax.distributed) takes its
contiguous block of the video list and:

1. lists what its block already has under the output (one listing, not a request per file): a video
   whose requested outputs all exist is done and skipped; a partial one is redone for its missing
   outputs only; temporary files a killed run left for the block's videos are removed.
2. decodes each remaining video ONCE in a worker process (`decode.VideoDecoder`: every frame recipe and
   the 16 kHz audio from one pass, streamed in chunks), which groups the frames into the backbones'
   units (a frame, or a 16-frame clip) and turns the audio into the log-mel spectrogram;
3. here, packs the units of all videos in flight into fixed-shape batches (one per feature and frame
   size; the last one of a video zero-padded only when nothing else is waiting), runs them on the
   local devices (`runner.Runner`; normalisation inside the jitted call) while the workers decode the
   next videos, and collects the rows of each video;
4. writes a video's files (float16, atomically: temporary name + rename) once all its rows are in.

A video the decoder refuses (`decode.DecodeError`: unreadable, truncated, empty, no video stream...)
is a named, counted failure in the report, never a crash and never a partial file; a video without
audio gets its video features and a silent spectrogram, with a note saying so. Killing the job loses
only the videos in flight: the rerun skips every video whose files exist.

At the end each process writes its report and finished list to `extract_parts/`; after a barrier
process 0 merges them into `extract_report.json` and `videos.csv` (and, given captions,
`caption.pickle`), the files `prepare --dataset=howto100m` reads.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import re
import resource
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from eao_jax.extract import decode, logmel, outputs
from eao_jax.extract.features import AUDIO, Feature, Window

_POLL_S = 0.2  # how often a blocked wait checks that the workers (or the parent) are alive
_TASKS_PER_WORKER = 2  # one decoding, one queued: a worker never waits for its next video


@dataclasses.dataclass(frozen=True)
class Settings:
    """How to extract.

    output: the output root (local or gs://). features: registry entries to write. batch_size: frames /
    clips per device call. workers: decoding processes (0: one per CPU core this process may use, less
    one). interpolation: the scale filter's (`decode.INTERPOLATIONS`). compute_dtype: "float32" or
    "bfloat16". captions: a captions file (`outputs.read_captions`) for caption.pickle. progress: show a
    progress bar (process 0). chunk_frames: frames per decoded chunk (bounds a worker's memory).
    """

    output: str
    features: tuple[Feature, ...]
    batch_size: int = 32
    workers: int = 0
    interpolation: str = "bicubic"
    compute_dtype: str = "float32"
    captions: str | None = None
    progress: bool = True
    chunk_frames: int = 32

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.interpolation not in decode.INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r}: one of {', '.join(decode.INTERPOLATIONS)}")
        if self.compute_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"compute_dtype must be float32 or bfloat16, got {self.compute_dtype!r}")
        if not self.features:
            raise ValueError("no feature types to extract")

    def worker_count(self) -> int:
        if self.workers:
            return self.workers
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return max(cores - 1, 1)


def failure_category(reason: str) -> str:
    """The counted kind of a failure: its reason up to the first ':' or '(' ("truncated",
    "no video stream", "empty file", ...)."""
    return re.split(r"[:(]", reason, maxsplit=1)[0].strip() or "error"


# ------------------------------------------------------------------------------------------------ workers


def _local_copy(source: str, tmpdir: str) -> str:
    """A video on an object store, copied to a local file (FFmpeg reads files)."""
    if not epath.Path(source).exists():
        raise decode.DecodeError(source, "no such file")
    target = os.path.join(tmpdir, "video" + os.path.splitext(source)[1])
    with epath.Path(source).open("rb") as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    return target


def _silent_spectrogram(seconds: float) -> np.ndarray:
    """The spectrogram of `seconds` of silence as the recipe makes it: 0 dB everywhere (every frame is
    at the file's maximum, the power floor)."""
    samples = max(int(round(seconds * logmel.SAMPLE_RATE)), 1)
    return logmel.logmel(np.zeros(samples, np.int16))


class _Windows:
    """Streams one feature's rows out of its frames (`features.Window`), holding only the frames a
    window still needs."""

    def __init__(self, window: Window):
        self.w = window
        self.buf: np.ndarray | None = None
        self.base = 0  # frame index of buf[0]
        self.next = 0  # start frame of the next window
        self.rows = 0

    def add(self, frames: np.ndarray) -> np.ndarray | None:
        w = self.w
        if w.frames == 1 and w.stride == 1:
            self.rows += len(frames)
            return frames
        self.buf = frames if self.buf is None else np.concatenate([self.buf, frames])
        starts = []
        while self.next + w.frames <= self.base + len(self.buf):
            starts.append(self.next - self.base)
            self.next += w.stride
        out = np.stack([self.buf[s:s + w.frames] for s in starts]) if starts else None
        keep = min(self.next - self.base, len(self.buf))
        self.buf, self.base = self.buf[keep:], self.base + keep
        self.rows += len(starts)
        return out

    def finish(self) -> np.ndarray | None:
        """The windows that reach past the end, completed as `Window.pad` says."""
        w = self.w
        if self.buf is None or not len(self.buf):
            return None
        end = self.base + len(self.buf)
        out = []
        while self.next < end:
            part = self.buf[self.next - self.base:]
            fill = part[-1:] if w.pad == "repeat" else np.zeros_like(part[:1])
            out.append(np.concatenate([part, np.repeat(fill, w.frames - len(part), axis=0)]))
            self.next += w.stride
        self.rows += len(out)
        return np.stack(out) if out else None


def _extract_one(source: str, needs: Sequence[str], cfg: dict, send: Callable[[tuple], None]) -> dict:
    """Decodes one video, sending ("units", feature, array) messages; returns the end summary.
    `cfg["streams"]`: feature name -> (its decode.FrameRecipe, its features.Window) of the device features."""
    streams = cfg["streams"]
    fan: dict[str, list[str]] = {}  # decoded stream -> the features reading it (2D and CLIP share theirs)
    first: dict[decode.FrameRecipe, str] = {}
    for n in needs:
        if n in streams:
            fan.setdefault(first.setdefault(streams[n][0], n), []).append(n)
    recipes = {n: streams[n][0] for n in fan}
    windows = {n: _Windows(streams[n][1]) for names in fan.values() for n in names}
    want_audio = AUDIO in needs
    audio_parts: list[np.ndarray] = []
    frames_seen = {name: 0 for name in recipes}
    with tempfile.TemporaryDirectory(prefix="eao_extract_") as tmp:
        path = _local_copy(source, tmp) if outputs.is_remote(source) else source
        with decode.VideoDecoder(path, recipes, audio=want_audio, interpolation=cfg["interpolation"], threads=1,
                                 chunk_frames=cfg["chunk_frames"]) as decoder:
            info = decoder.info
            for chunk in decoder:
                if chunk.stream == "audio":
                    audio_parts.append(logmel.to_int16(chunk.data))  # 16 kHz mono, the -4 dB gain
                    continue
                frames_seen[chunk.stream] += len(chunk.data)
                for name in fan[chunk.stream]:
                    units = windows[name].add(chunk.data)
                    if units is not None and len(units):
                        send(("units", name, units))
        for name, w in windows.items():
            units = w.finish()
            if units is not None:
                send(("units", name, units))
    duration = info.duration
    if duration is None or duration <= 0:
        duration = max((n / recipes[k].fps for k, n in frames_seen.items()), default=0.0)
    spec, note = None, ""
    if want_audio:
        if audio_parts and sum(map(len, audio_parts)):
            spec = logmel.logmel(np.concatenate(audio_parts))
        else:
            what = info.audio_note or "the audio stream holds no samples"
            if not streams:  # only the audio was asked for
                raise decode.DecodeError(source, f"{what}: no audio to extract")
            spec = _silent_spectrogram(duration)
            note = (f"{what}: wrote a silent spectrogram ({spec.shape[1]} frames of 0 dB for {duration:.2f} s, what "
                    "the recipe gives a silent track) beside the video features")
    return {"rows": {n: w.rows for n, w in windows.items()}, "spec": spec, "note": note, "duration": float(duration)}


def _peak_rss_mib() -> float:
    """This process's peak resident memory: Linux's VmHWM (getrusage's maxrss would count the parent's
    pages that the fork before a spawn's exec shared), else maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_main(tasks: Any, results: Any, parent: int, cfg: dict) -> None:
    """A decoding process: takes (index, source, needs) tasks from `tasks` until None, answers on `results`
    (pipes of its own: a process that dies mid-message breaks only its own pipe)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the workers; Ctrl-C is for it
    try:
        while True:
            if not tasks.poll(_POLL_S * 5):
                if os.getppid() != parent:
                    return
                continue
            task = tasks.recv()
            if task is None:
                return
            index, source, needs = task
            cpu0 = time.process_time()
            try:
                end = _extract_one(source, needs, cfg, lambda m, i=index: results.send((m[0], i, *m[1:])))
            except (BrokenPipeError, EOFError, ConnectionError):
                raise
            except decode.DecodeError as e:
                results.send(("error", index, e.reason))
            except Exception as e:  # noqa: BLE001 (a video must never end the run: named and counted)
                results.send(("error", index, f"error: {type(e).__name__}: {e}".splitlines()[0]))
            else:
                end["cpu_s"] = time.process_time() - cpu0
                end["peak_rss_mib"] = _peak_rss_mib()
                results.send(("end", index, end))
    except (KeyboardInterrupt, BrokenPipeError, EOFError, ConnectionError):
        return  # the parent is gone or stopping


class _Workers:
    """The decoding processes, each with its own task and result pipes (so a dead worker's videos are
    known, and a message it was writing when it died cannot block the others)."""

    def __init__(self, count: int, cfg: dict):
        import multiprocessing  # noqa: PLC0415

        # spawn: the parent holds JAX's threads, which a fork would copy in an unusable state.
        self._ctx = multiprocessing.get_context("spawn")
        self._cfg = cfg
        self._procs: list[Any] = [None] * count
        self._tasks: list[Any] = [None] * count
        self.results: list[Any] = [None] * count
        self.assigned = [collections.deque() for _ in range(count)]
        for wid in range(count):
            self._start(wid)

    def _start(self, wid: int) -> None:
        task_r, task_w = self._ctx.Pipe(duplex=False)
        result_r, result_w = self._ctx.Pipe(duplex=False)
        p = self._ctx.Process(target=_worker_main, args=(task_r, result_w, os.getpid(), self._cfg), daemon=True,
                              name=f"eao-extract-decoder-{wid}")
        p.start()
        task_r.close()  # the child's ends: held only by the child, so its death shows as EOF here
        result_w.close()
        self._procs[wid], self._tasks[wid], self.results[wid] = p, task_w, result_r

    def free_slots(self) -> list[int]:
        return [w for w, a in enumerate(self.assigned) if len(a) < _TASKS_PER_WORKER]

    def submit(self, wid: int, index: int, source: str, needs: tuple[str, ...]) -> None:
        self.assigned[wid].append(index)
        self._tasks[wid].send((index, source, needs))

    def finished(self, wid: int, index: int) -> None:
        if index in self.assigned[wid]:
            self.assigned[wid].remove(index)

    def receive(self, timeout: float) -> tuple[list[tuple[int, tuple]], list[tuple[int | None, list[int], int]]]:
        """(messages (worker, message) ready within `timeout`, dead workers: (the video it was decoding,
        its queued videos, exit code)); dead workers are restarted."""
        from multiprocessing import connection  # noqa: PLC0415

        ready = connection.wait([c for c in self.results], timeout)
        messages, dead = [], []
        for conn in ready:
            wid = self.results.index(conn)
            try:
                messages.append((wid, conn.recv()))
            except (EOFError, OSError):
                dead.append(self._restart(wid))
        return messages, dead

    def reap(self) -> list[tuple[int | None, list[int], int]]:
        """Dead workers (as `receive`) that no pipe has reported yet."""
        return [self._restart(w) for w, p in enumerate(self._procs) if p.exitcode is not None]

    def _restart(self, wid: int) -> tuple[int | None, list[int], int]:
        p = self._procs[wid]
        p.join(5)
        if p.exitcode is None:  # its pipe broke but it lives on: end it
            p.kill()
            p.join(5)
        held = list(self.assigned[wid])
        self.assigned[wid].clear()
        self.results[wid].close()
        self._tasks[wid].close()
        self._start(wid)
        return (held[0] if held else None, held[1:], p.exitcode)

    def close(self) -> None:
        for conn in self._tasks:
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 5
        for p in self._procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(1)
        for conn in self._tasks + self.results:
            conn.close()


# ------------------------------------------------------------------------------------------------ the device side


@dataclasses.dataclass
class _Video:
    index: int
    video: outputs.Video
    needs: tuple[str, ...]
    partial: bool
    rows: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    received: dict[str, int] = dataclasses.field(default_factory=dict)
    end: dict | None = None


class _Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self._lock = threading.Lock()

    def add(self, key: str, seconds: float) -> None:
        with self._lock:
            self.seconds[key] += seconds


class _Device:
    """Fixed-shape batches per (feature, unit shape), dispatched asynchronously, results by video row."""

    def __init__(self, runners: dict[str, Any], timer: _Timer, max_in_flight: int = 2):
        self.runners = runners
        self.timer = timer
        self.max_in_flight = max_in_flight
        self.pending: dict[tuple, list[tuple[int, int, np.ndarray]]] = {}  # (feature, shape) -> (video, row, unit)
        self.in_flight: collections.deque = collections.deque()
        self.dims: dict[str, int] = {}

    def add(self, feature: str, video: int, first_row: int, units: np.ndarray) -> list[tuple]:
        key = (feature, units.shape[1:])
        batch = self.pending.setdefault(key, [])
        done = []
        for i, unit in enumerate(units):
            batch.append((video, first_row + i, unit))
            if len(batch) == self.runners[feature].batch_size:
                done += self._dispatch(key)
                batch = self.pending.setdefault(key, [])
        return done

    def _dispatch(self, key: tuple) -> list[tuple]:
        batch = self.pending.pop(key)
        t0 = time.perf_counter()
        out, n = self.runners[key[0]].dispatch(np.stack([u for _, _, u in batch]))
        self.in_flight.append((key[0], out, n, [(v, r) for v, r, _ in batch]))
        self.timer.add("device", time.perf_counter() - t0)
        done = []
        while len(self.in_flight) > self.max_in_flight:
            done.append(self._resolve())
        return done

    def _resolve(self) -> tuple:
        feature, out, n, tags = self.in_flight.popleft()
        t0 = time.perf_counter()
        rows = np.asarray(out)[:n]
        self.timer.add("device", time.perf_counter() - t0)
        self.dims.setdefault(feature, int(rows.shape[1]))
        return feature, rows, tags

    def flush(self, videos: set[int] | None = None) -> list[tuple]:
        """Dispatches the partial batches holding units of `videos` (all when None) and waits for
        every batch in flight."""
        done = []
        for key in [k for k, b in self.pending.items() if videos is None or any(v in videos for v, _, _ in b)]:
            done += self._dispatch(key)
        return done + [self._resolve() for _ in range(len(self.in_flight))]

    def drop(self, video: int) -> None:
        for key in list(self.pending):
            self.pending[key] = [u for u in self.pending[key] if u[0] != video]
            if not self.pending[key]:
                del self.pending[key]


class Stopped(Exception):
    """The job received SIGTERM / SIGINT; what was finished is kept (rerun to resume)."""


def _runners(settings: Settings, models: dict[str, Any]) -> dict[str, Any]:
    import jax.numpy as jnp  # noqa: PLC0415

    from eao_jax.extract.runner import Runner  # noqa: PLC0415

    dtype = jnp.bfloat16 if settings.compute_dtype == "bfloat16" else jnp.float32
    out = {}
    for f in settings.features:
        if f.on_device:
            if f.name not in models:
                raise ValueError(f"no backbone for feature type {f.name!r} (give --{f.checkpoint_flag})")
            out[f.name] = Runner(models[f.name], f.apply, settings.batch_size, compute_dtype=dtype)
    return out


def _postfix(timer: _Timer, wall: float) -> dict[str, str]:
    s = timer.seconds
    wall = max(wall, 1e-9)
    return {"decode": f"{s['decode_cpu'] / wall:.1f} cores", "device": f"{100 * s['device'] / wall:.0f}%",
            "wait_decode": f"{100 * s['input_wait'] / wall:.0f}%", "write": f"{100 * s['write'] / wall:.0f}%"}


def extract_block(videos: Sequence[outputs.Video], settings: Settings, models: dict[str, Any], *,
                  process_id: int = 0, num_processes: int = 1) -> tuple[dict, list[str]]:
    """Extracts this process's block of `videos`; returns (its report, the block's finished paths in
    list order). See the module docstring."""
    t_start, cpu_start = time.perf_counter(), time.process_time()
    start, stop = outputs.process_block(len(videos), process_id, num_processes)
    block = list(videos[start:stop])
    root = settings.output
    feats = settings.features
    existing, temps = outputs.scan(root, {f.subdir for f in feats})
    wanted = {f.file(v.path) for v in block for f in feats}
    for t in temps:
        if outputs.temp_target(t) in wanted:
            outputs.remove(root, t)
    todo: list[_Video] = []
    already = 0
    for i, v in enumerate(block):
        needs = tuple(f.name for f in feats if f.file(v.path) not in existing)
        if not needs:
            already += 1
        else:
            todo.append(_Video(i, v, needs, partial=len(needs) < len(feats)))

    timer = _Timer()
    report: dict[str, Any] = {
        "process_id": process_id, "num_processes": num_processes, "videos": len(block), "first_video": start,
        "features": [f.name for f in feats], "already_done": already, "extracted": 0, "completed_partial": 0,
        "failed": 0, "failure_counts": {}, "failures": [], "notes": [], "video_seconds": 0.0, "dims": {},
        "worker_peak_rss_mib": 0.0, "interrupted": False}
    finished = [False] * len(block)
    for i, v in enumerate(block):
        finished[i] = all(f.file(v.path) in existing for f in feats)

    def fail(item: _Video, reason: str) -> None:
        report["failed"] += 1
        cat = failure_category(reason)
        report["failure_counts"][cat] = report["failure_counts"].get(cat, 0) + 1
        report["failures"].append({"video": item.video.source, "path": item.video.path, "reason": reason})

    if todo:
        try:
            _run(todo, settings, models, timer, report, finished, fail, process_id, num_processes, len(block),
                 already)
        except Stopped:
            report["interrupted"] = True
    report["dims"] = {k: v for k, v in sorted(report["dims"].items())}
    wall = time.perf_counter() - t_start
    report["seconds"] = {"wall": round(wall, 3), "main_cpu": round(time.process_time() - cpu_start, 3),
                         **{k: round(v, 3) for k, v in sorted(timer.seconds.items())}}
    report["videos_per_hour"] = report["extracted"] * 3600 / wall if wall > 0 else 0.0
    done_paths = [v.path for v, ok in zip(block, finished, strict=True) if ok]
    return report, done_paths


def _run(todo: list[_Video], settings: Settings, models: dict[str, Any], timer: _Timer, report: dict,
         finished: list[bool], fail: Callable[[_Video, str], None], process_id: int, num_processes: int,
         total: int, already: int) -> None:
    from tqdm import tqdm  # noqa: PLC0415

    device = _Device(_runners(settings, models), timer)
    n_workers = min(settings.worker_count(), len(todo))
    feats = {f.name: f for f in settings.features}
    cfg = {"interpolation": settings.interpolation, "chunk_frames": settings.chunk_frames,
           "streams": {f.name: (f.frames, f.window) for f in settings.features if f.on_device}}
    waiting = collections.deque(todo)
    live: dict[int, _Video] = {}
    writes: dict[concurrent.futures.Future, _Video] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="eao-extract-write")
    bar = tqdm(total=total, initial=already, unit="video", dynamic_ncols=True,
               desc="extract" if num_processes == 1 else f"extract {process_id + 1}/{num_processes}",
               disable=not (settings.progress and process_id == 0))
    t0 = time.perf_counter()
    stop = threading.Event()

    def on_signal(signum, frame):  # noqa: ARG001
        stop.set()

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    workers = _Workers(n_workers, cfg)

    def write(item: _Video) -> None:
        t = time.perf_counter()
        for name in item.needs:
            f = feats[name]
            if f.on_device:
                rows = item.rows[name]
                arr = np.stack([rows[r] for r in range(len(rows))]).astype(np.float16)
            else:
                arr = item.end["spec"].astype(np.float16)
            outputs.write_npz(outputs.join(settings.output, f.file(item.video.path)), f.key, arr)
        timer.add("write", time.perf_counter() - t)

    def complete(item: _Video) -> bool:
        return item.end is not None and all(
            len(item.rows.get(n, ())) == item.end["rows"][n] for n in item.needs if feats[n].on_device)

    def take_results(results: list[tuple]) -> None:
        for feature, rows, tags in results:
            report["dims"].setdefault(feature, int(rows.shape[1]))
            for (index, row), vec in zip(tags, rows, strict=True):
                item = live.get(index)
                if item is not None:
                    item.rows.setdefault(feature, {})[row] = vec
                    if complete(item):
                        start_write(item)

    def start_write(item: _Video) -> None:
        del live[item.index]
        writes[pool.submit(write, item)] = item

    def collect_writes(wait: bool = False) -> None:
        done = [f for f in writes if f.done() or wait]
        for fut in done:
            item = writes.pop(fut)
            try:
                fut.result()
            except Exception as e:  # noqa: BLE001 (a full disk or a lost bucket is named per video)
                fail(item, f"writing failed: {type(e).__name__}: {e}")
            else:
                finished[item.index] = True
                report["extracted"] += 1
                report["completed_partial"] += item.partial
                report["video_seconds"] += item.end["duration"]
                if item.end["note"]:
                    report["notes"].append({"video": item.video.source, "path": item.video.path,
                                            "note": item.end["note"]})
            bar.update(1)
            bar.set_postfix(_postfix(timer, time.perf_counter() - t0), refresh=False)

    def assign() -> None:
        for wid in workers.free_slots():
            while waiting and len(workers.assigned[wid]) < _TASKS_PER_WORKER:
                item = waiting.popleft()
                live[item.index] = item
                workers.submit(wid, item.index, item.video.source, item.needs)

    def on_dead(dead: list[tuple[int | None, list[int], int]]) -> None:
        for current, queued, code in dead:
            if current is not None and current in live:
                item = live.pop(current)
                device.drop(current)
                why = f"killed by signal {-code} (out of memory?)" if code and code < 0 else f"exit status {code}"
                fail(item, f"decoder process died: {why}")
                bar.update(1)
            for q in reversed(queued):
                if q in live:
                    waiting.appendleft(live.pop(q))
        if dead:
            assign()

    def handle(wid: int, msg: tuple) -> None:
        kind, index = msg[0], msg[1]
        item = live.get(index)
        if item is None:
            return
        if kind == "units":
            feature, units = msg[2], msg[3]
            first = item.received.get(feature, 0)
            item.received[feature] = first + len(units)
            take_results(device.add(feature, index, first, units))
            return
        workers.finished(wid, index)
        if kind == "end":
            item.end = msg[2]
            timer.add("decode_cpu", item.end["cpu_s"])
            report["worker_peak_rss_mib"] = max(report["worker_peak_rss_mib"], round(item.end["peak_rss_mib"], 1))
            if complete(item):
                start_write(item)
        else:  # "error"
            live.pop(index)
            device.drop(index)
            fail(item, msg[2])
            bar.update(1)
        assign()

    try:
        assign()
        last_reap = time.monotonic()
        while live or waiting or writes:
            if stop.is_set():
                raise Stopped
            collect_writes()
            if time.monotonic() - last_reap > 1.0:
                last_reap = time.monotonic()
                on_dead(workers.reap())
            messages, dead = workers.receive(0)
            if not messages and not dead:
                # Nothing decoded right now: run the partial batches of the videos that finished decoding
                # (the device would idle otherwise), then wait for the workers.
                ended = {i for i, item in live.items() if item.end is not None}
                if ended or device.in_flight:
                    take_results(device.flush(ended))
                    for i in ended & set(live):  # every unit of these was run: rows cannot still come
                        fail(live.pop(i), "error: rows missing after the device ran every batch (a bug)")
                        bar.update(1)
                    continue
                if not live and not waiting:
                    collect_writes(wait=bool(writes))
                    continue
                t = time.perf_counter()
                messages, dead = workers.receive(_POLL_S)
                timer.add("input_wait", time.perf_counter() - t)
            for wid, msg in messages:
                handle(wid, msg)
            on_dead(dead)
        collect_writes(wait=True)
    except Stopped:
        collect_writes(wait=True)  # files being written are finished, not left as temporaries
        raise
    finally:
        workers.close()
        pool.shutdown(wait=True)
        bar.set_postfix(_postfix(timer, time.perf_counter() - t0), refresh=False)
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)


# ------------------------------------------------------------------------------------------------ the whole job


def _merge(settings: Settings, num_processes: int) -> dict:
    root = settings.output
    parts = [outputs.read_json(outputs.join(root, outputs.part_name("report", p, num_processes, "json")))
             for p in range(num_processes)]
    paths: list[str] = []
    for p in range(num_processes):
        data = epath.Path(outputs.join(root, outputs.part_name("videos", p, num_processes, "csv")))
        paths += outputs.read_list_csv(data.read_bytes())
    merged: dict[str, Any] = {"videos": 0, "already_done": 0, "extracted": 0, "completed_partial": 0, "failed": 0,
                              "video_seconds": 0.0}
    for part in parts:
        for k in merged:
            merged[k] += part[k]
    counts: dict[str, int] = {}
    for part in parts:
        for k, n in part["failure_counts"].items():
            counts[k] = counts.get(k, 0) + n
    dims: dict[str, int] = {}
    for part in parts:
        dims.update(part["dims"])
    merged.update(
        features=[f.name for f in settings.features], finished=len(paths), failure_counts=dict(sorted(counts.items())),
        failures=[x for part in parts for x in part["failures"]], notes=[x for part in parts for x in part["notes"]],
        dims=dict(sorted(dims.items())), interrupted=any(p["interrupted"] for p in parts),
        processes=[{k: p[k] for k in ("process_id", "videos", "already_done", "extracted", "failed", "seconds",
                                      "videos_per_hour", "worker_peak_rss_mib")} for p in parts],
        list_file=outputs.LIST_FILE)
    outputs.write_atomic(outputs.join(root, outputs.LIST_FILE), outputs.list_csv(paths))
    if settings.captions:
        captions = outputs.read_captions(settings.captions)
        vids = [p.rsplit("/", 1)[-1] for p in paths]
        seen: dict[str, str] = {}
        for p, v in zip(paths, vids, strict=True):
            if v in seen:
                raise outputs.CaptionError(f"videos {seen[v]!r} and {p!r} share the video id {v!r}, the key of "
                                           "caption.pickle: give them distinct file names")
            seen[v] = p
        data, missing = outputs.caption_pickle(captions, vids)
        outputs.write_atomic(outputs.join(root, outputs.CAPTION_FILE), data)
        merged["caption_file"] = outputs.CAPTION_FILE
        merged["without_captions"] = missing
    outputs.write_json(outputs.join(root, outputs.REPORT_FILE), merged)
    return merged


def run(videos: Sequence[outputs.Video], settings: Settings, models: dict[str, Any], *, process_id: int = 0,
        num_processes: int = 1, barrier: Callable[[str], None] | None = None) -> dict:
    """Extracts `videos` (this process's block; all of them when single-process) and, on process 0,
    merges the processes' parts. Returns the merged report on process 0, this process's elsewhere.
    `barrier(name)` must wait for every process (required when `num_processes` > 1).

    Raises `Stopped` after SIGTERM / SIGINT (its report written, marked interrupted).
    """
    if num_processes > 1 and barrier is None:
        raise ValueError("a multi-process extraction needs a barrier")
    root = settings.output
    report, done = extract_block(videos, settings, models, process_id=process_id, num_processes=num_processes)
    outputs.write_json(outputs.join(root, outputs.part_name("report", process_id, num_processes, "json")), report)
    outputs.write_atomic(outputs.join(root, outputs.part_name("videos", process_id, num_processes, "csv")),
                         outputs.list_csv(done))
    if report["interrupted"]:
        raise Stopped(f"stopped by a signal after {report['extracted']} videos; the report is in "
                      f"{outputs.join(root, outputs.part_name('report', process_id, num_processes, 'json'))}; "
                      "rerun the same command to go on")
    if barrier is not None:
        barrier("eao_jax extract: every process wrote its part")
    if process_id != 0:
        return report
    return _merge(settings, num_processes)
