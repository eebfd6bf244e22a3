"""What the extraction job reads and writes: the video list, the released HowTo100M layout, atomic
deterministic npz files, the list CSV and the captions `prepare --dataset=howto100m` reads.

Layout of `--output` (the directory `prepare --dataset=howto100m --manual_dir=OUTPUT` reads):
  features/<path>/<vid>_2d.npz          key `features`, (T, D) float16, one row per second
  features/<path>/<vid>_3d.npz          key `features`, (T, D) float16, one row per 16 frames at 24 fps
  audio_features/<path>/<vid>_spec.npz  key `arr_0`, (40, T) float16 log-mel, 100 frames per second
  videos.csv                            column `path`: every video whose requested outputs all exist
  caption.pickle                        given captions: video id -> {start, end, text}
  extract_report.json                   counts, failures, notes (merged over the processes)
  extract_parts/                        each process's report and finished list (merged into the above)
`<path>` is the video's path relative to the input folder (or list), without its extension, with
`/` separators; `<vid>` is its last component (HowTo100M's `category/subfolder/video_id`).

Every file is written to a temporary name beside its final one and renamed (on object stores, where an
upload appears whole, directly), so a killed job leaves no partial file under a final name; npz files
carry a fixed zip timestamp, so the same features give the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import uuid
import zipfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from etils import epath

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mkv", ".webm", ".avi", ".mov", ".flv", ".mpg", ".mpeg", ".ts",
                            ".m2ts", ".mts", ".3gp", ".wmv", ".ogv", ".vob"})
LIST_FILE = "videos.csv"
CAPTION_FILE = "caption.pickle"
REPORT_FILE = "extract_report.json"
PARTS_DIR = "extract_parts"
_TMP_RE = re.compile(r"^(?P<final>.+)\.[0-9a-f]{32}\.tmp$")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest zip timestamp: a fixed one makes files reproducible


class ListError(ValueError):
    """The video list (or folder) cannot be used; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class Video:
    """One input video: `source` (absolute local path or URL) and `path` (its relative output path,
    `/`-separated, no extension)."""

    source: str
    path: str

    @property
    def vid(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def is_remote(path: str) -> bool:
    return "://" in path


def _clean_relative(rel: str, where: str) -> str:
    parts = rel.replace("\\", "/").split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ListError(f"{where}: output path {rel!r} has an empty, '.' or '..' component")
    path = "/".join(parts)
    if "None/" in path:  # the HowTo100M list reader removes every "None/" (the released list's prefix)
        raise ListError(f"{where}: output path {path!r} contains 'None/', which prepare's HowTo100M list "
                        "reader removes; rename that folder")
    return path


def _strip_suffix(rel: str) -> str:
    stem, dot, suffix = rel.rpartition(".")
    return stem if dot and "/" not in suffix and stem and not stem.endswith("/") else rel


def walk_videos(root: str) -> list[Video]:
    """The video files under the folder `root` (by suffix, case-insensitive; names starting with '.'
    skipped, e.g. macOS's `._x.mp4`), sorted by relative path."""
    base = epath.Path(root)
    found: list[tuple[str, str]] = []
    if is_remote(root):
        files = [p for p in base.rglob("*") if p.is_file()]
        rels = [(str(p), os.path.relpath(str(p), str(base)).replace(os.sep, "/")) for p in files]
    else:
        rels = []
        for dirpath, dirnames, filenames in os.walk(os.path.abspath(root)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                full = os.path.join(dirpath, name)
                rels.append((full, os.path.relpath(full, os.path.abspath(root)).replace(os.sep, "/")))
    for full, rel in rels:
        name = rel.rsplit("/", 1)[-1]
        if name.startswith(".") or os.path.splitext(name)[1].lower() not in VIDEO_SUFFIXES:
            continue
        found.append((rel, full))
    found.sort()
    return [Video(full, _clean_relative(_strip_suffix(rel), f"{root}/{rel}")) for rel, full in found]


def read_list(list_file: str) -> list[Video]:
    """The videos of a list file: a CSV with a `video` column (and optionally `path`, the output path),
    or plain text with one video per line ('#' comments and blank lines skipped). Relative video paths
    are relative to the list file's folder; the output path defaults to the video's path relative to
    that folder without its extension (the file name alone for a video outside it)."""
    p = epath.Path(list_file)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ListError(f"{list_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    base = os.path.dirname(list_file) if is_remote(list_file) else os.path.dirname(os.path.abspath(list_file))
    rows: list[tuple[str, str, str | None]] = []  # (where, video, path)
    if list_file.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        if reader.fieldnames is None or "video" not in reader.fieldnames:
            raise ListError(f"{list_file}: a CSV video list needs a `video` column (and optionally `path`), "
                            f"got {reader.fieldnames}")
        for i, row in enumerate(reader, start=2):
            video = (row.get("video") or "").strip()
            if not video:
                raise ListError(f"{list_file} line {i}: empty `video`")
            rows.append((f"{list_file} line {i}", video, (row.get("path") or "").strip() or None))
    else:
        for i, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                rows.append((f"{list_file} line {i}", line, None))
    videos = []
    sep = "/" if is_remote(base) else os.sep
    for where, video, path in rows:
        if is_remote(video) or os.path.isabs(video):
            source = video
        else:
            source = f"{base}/{video}" if is_remote(base) else os.path.normpath(os.path.join(base, video))
        if path is None:
            inside = source.startswith(base.rstrip(sep) + sep)
            rel = source[len(base.rstrip(sep)) + 1:] if inside else source.replace(os.sep, "/").rsplit("/", 1)[-1]
            path = _strip_suffix(rel.replace(os.sep, "/"))
        videos.append(Video(source, _clean_relative(path, where)))
    return videos


def list_videos(videos: str) -> list[Video]:
    """`videos` is a folder (walked) or a list file; duplicate output paths are refused by name."""
    p = epath.Path(videos)
    if not p.exists():
        raise ListError(f"{videos}: no such folder or list file")
    out = walk_videos(videos) if p.is_dir() else read_list(videos)
    if not out:
        raise ListError(f"{videos}: no videos found" + (f" (suffixes: {', '.join(sorted(VIDEO_SUFFIXES))})"
                                                        if p.is_dir() else ""))
    seen: dict[str, str] = {}
    for v in out:
        if v.path in seen:
            raise ListError(f"{videos}: {seen[v.path]} and {v.source} both give the output path {v.path!r} "
                            "(give a CSV list with a `path` column)")
        seen[v.path] = v.source
    return out


def process_block(n: int, process_id: int, num_processes: int) -> tuple[int, int]:
    """[start, stop) of process `process_id`'s contiguous block of `n` videos (sizes differ by <= 1)."""
    return n * process_id // num_processes, n * (process_id + 1) // num_processes


# ------------------------------------------------------------------------------------------------ files


def relative_file(subdir: str, suffix: str, path: str) -> str:
    """`subdir/<path>/<vid><suffix>`, `/`-separated, relative to the output root."""
    vid = path.rsplit("/", 1)[-1]
    return f"{subdir}/{path}/{vid}{suffix}"


def join(root: str, rel: str) -> str:
    return f"{root.rstrip('/')}/{rel}" if is_remote(root) else os.path.join(root, *rel.split("/"))


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """`np.savez` of `arrays` (uncompressed, the same members and headers), with a fixed timestamp."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.external_attr = 0o600 << 16  # what zipfile gives a member opened by name, as np.savez does
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(value), allow_pickle=False)
    return buf.getvalue()


def write_atomic(target: str, data: bytes) -> None:
    """Writes `data` to `target` whole or not at all (parent folders created)."""
    if is_remote(target):
        p = epath.Path(target)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)  # an object store shows an upload only once it is complete
        return
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_npz(target: str, key: str, array: np.ndarray) -> None:
    write_atomic(target, npz_bytes({key: array}))


def scan(root: str, subdirs: Iterable[str]) -> tuple[set[str], list[str]]:
    """(finished files, leftover temporary files) under `root`'s `subdirs`, as `/`-separated paths
    relative to `root`: one listing, not a check per file (which on an object store costs a request each)."""
    files: set[str] = set()
    temps: list[str] = []
    for sub in sorted(set(subdirs)):
        top = join(root, sub)
        if is_remote(root):
            p = epath.Path(top)
            names = [str(q)[len(root.rstrip("/")) + 1:] for q in p.rglob("*")] if p.exists() else []
        else:
            names = []
            for dirpath, _, filenames in os.walk(top):
                rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
                names.extend(f"{rel_dir}/{n}" for n in filenames)
        for name in names:
            m = _TMP_RE.match(name)
            if m:
                temps.append(name)
            else:
                files.add(name)
    return files, temps


def temp_target(temp: str) -> str:
    """The final name a temporary file was written for."""
    m = _TMP_RE.match(temp)
    if m is None:
        raise ValueError(f"{temp} is not a temporary file of write_atomic")
    return m.group("final")


def remove(root: str, rel: str) -> None:
    p = join(root, rel)
    if is_remote(p):
        epath.Path(p).unlink(missing_ok=True)
    elif os.path.exists(p):
        os.unlink(p)


# ------------------------------------------------------------------------------------------------ lists


def list_csv(paths: Sequence[str]) -> bytes:
    """The video list prepare reads: a `path` column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path"])
    for p in paths:
        w.writerow([p])
    return buf.getvalue().encode("utf-8")


def read_list_csv(data: bytes) -> list[str]:
    return [row["path"] for row in csv.DictReader(io.StringIO(data.decode("utf-8")))]


def write_json(target: str, obj: Any) -> None:
    write_atomic(target, (json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n").encode("utf-8"))


def read_json(target: str) -> Any:
    return json.loads(epath.Path(target).read_text(encoding="utf-8"))


def part_name(kind: str, process_id: int, num_processes: int, ext: str) -> str:
    return f"{PARTS_DIR}/{kind}-{process_id:05d}-of-{num_processes:05d}.{ext}"


# ------------------------------------------------------------------------------------------------ captions


class CaptionError(ValueError):
    """A captions file that cannot be read; the message names the file and the entry."""


def _segments(vid: str, value: Any, where: str) -> dict[str, Any]:
    if isinstance(value, dict):
        try:
            rows = list(zip(value["start"], value["end"], value["text"], strict=True))
        except (KeyError, TypeError, ValueError) as e:
            raise CaptionError(f"{where}: video {vid!r}: expected start / end / text lists of one length "
                               f"({type(e).__name__}: {e})") from None
    elif isinstance(value, list):
        try:
            rows = [(s["start"], s["end"], s["text"]) for s in value]
        except (KeyError, TypeError) as e:
            raise CaptionError(f"{where}: video {vid!r}: expected a list of {{start, end, text}} segments "
                               f"({type(e).__name__}: {e})") from None
    else:
        raise CaptionError(f"{where}: video {vid!r}: expected segments, got a {type(value).__name__}")
    try:
        rows = [(float(s), float(e), "" if t is None else str(t)) for s, e, t in rows]
    except (TypeError, ValueError) as e:
        raise CaptionError(f"{where}: video {vid!r}: segment times must be numbers ({e})") from None
    if not all(np.isfinite([s for s, _, _ in rows] + [e for _, e, _ in rows])):
        raise CaptionError(f"{where}: video {vid!r}: a segment time is NaN or infinite")
    rows.sort(key=lambda r: r[0])  # prepare needs them by start time
    return {"start": np.asarray([r[0] for r in rows], np.float64), "end": np.asarray([r[1] for r in rows], np.float64),
            "text": [r[2] for r in rows]}


def read_captions(captions_file: str) -> dict[str, Any]:
    """Video id -> {start, end, text} (HowTo100M's caption.pickle layout) from
    - `.json`: {video_id: [{"start": s, "end": e, "text": t}, ...]} or {video_id: {"start": [...], ...}},
    - `.csv`: columns video_id, start, end, text (one segment per row),
    - `.pickle` / `.pkl`: the released caption.pickle (read as prepare reads it)."""
    p = epath.Path(captions_file)
    if not p.exists():
        raise CaptionError(f"{captions_file}: captions file not found")
    low = captions_file.lower()
    if low.endswith((".pickle", ".pkl")):
        from tfds_builders import validate  # noqa: PLC0415 (prepare's reader: torch tensors as numpy, no code run)

        data = validate.load_pickle(captions_file)
        if not hasattr(data, "items"):
            raise CaptionError(f"{captions_file}: expected a dict video_id -> caption, got {type(data).__name__}")
        return dict(data.items())
    if low.endswith(".json"):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise CaptionError(f"{captions_file}: not JSON ({e})") from None
        if not isinstance(data, dict):
            raise CaptionError(f"{captions_file}: expected an object video_id -> segments, got {type(data).__name__}")
        return {str(vid): _segments(str(vid), v, captions_file) for vid, v in data.items()}
    if low.endswith(".csv"):
        reader = csv.DictReader(io.StringIO(p.read_text(encoding="utf-8")))
        need = ("video_id", "start", "end", "text")
        if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
            raise CaptionError(f"{captions_file}: needs columns {', '.join(need)}, got {reader.fieldnames}")
        grouped: dict[str, list[dict[str, str]]] = {}
        for row in reader:
            grouped.setdefault(row["video_id"], []).append(row)
        return {vid: _segments(vid, rows, captions_file) for vid, rows in grouped.items()}
    raise CaptionError(f"{captions_file}: captions must be .json, .csv or .pickle / .pkl")


def caption_pickle(captions: dict[str, Any], vids: Sequence[str]) -> tuple[bytes, list[str]]:
    """(caption.pickle holding the captions of `vids`, the vids without captions)."""
    import pickle  # noqa: PLC0415

    part = {v: captions[v] for v in vids if v in captions}
    return pickle.dumps(part, protocol=pickle.HIGHEST_PROTOCOL), [v for v in vids if v not in captions]
