"""Shared builder for the step-localisation datasets CrossTask and Mining YouTube.

Two layouts of the manual directory are read (every location overridable with `paths=` / the prepare
flags named in brackets).

Preprocessed layout (CrossTask and Mining YouTube), detected by `steps.json`:
  videos.csv                    columns `video_id` (and `task` for CrossTask)            [--csv]
  features/<vid>_2d.npy         (T2, 2048) ResNet-152 at 1/s                             [--features_path]
  features/<vid>_3d.npy         (T3, 2048) ResNeXt-101 at 1.5/s; fallback features/<vid>.npz key `features`
  audio/<vid>.npz               key `arr_0`, (40, T) log-mel spectrogram at 100 frames/s [--features_path_audio]
  annotations/<task>_<vid>.npy  CrossTask: binary (T, K), one row per second             [--annot_path]
  annotations/<vid>.npy         Mining YouTube
  steps.json                    CrossTask: task id -> K step texts; Mining YouTube: video id -> steps
                                                                                         [--steps_path]

Official CrossTask release (crosstask_release.zip of the CrossTask authors, unpacked in the manual
directory or its files placed there directly), detected by `tasks_primary.txt` (or a --steps_path
ending in .txt):
  crosstask_release/tasks_primary.txt   blocks of 5 lines: task id, task name, URL, number of steps K,
                                        the K comma-separated step texts; a blank line between blocks
  crosstask_release/videos.csv          lines `task,video_id,url` (no header)            [--csv]
  crosstask_release/annotations/<task>_<vid>.csv
                                        lines `step,start,end`: 1-based step, seconds    [--annot_path]
  features/, audio/                     as in the preprocessed layout (see below)
  The benchmark is every video of videos.csv whose task is in tasks_primary.txt and which has an
  annotation file (the related tasks' videos have none; both kinds left out are counted in the prepare
  report). A video's T is its number of 2D feature rows (one per second); a step segment covers the
  seconds floor(start) .. ceil(end) - 1, cut at T. `--csv=crosstask_release/videos_val.csv` (same
  format) evaluates the release's validation subset only.
  The release's own features (crosstask_features.zip: one 3200-d I3D + ResNet-152 + VGGish vector per
  second) are not what the model reads: the 2D / 3D features and the spectrograms above are extracted
  from the videos with the same extractors as for HowTo100M (2D ResNet-152 at 1/s and 3D ResNeXt-101
  at 1.5/s, 2048-d each; a 40-band log-mel spectrogram of the 16 kHz audio at 100 frames/s).

One record per video (layout "localization") in the split `test`, in the order of the video list.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass

import numpy as np

from tfds_builders import common
from tfds_builders import validate as V

OFFICIAL_TASKS_FILE = "tasks_primary.txt"
OFFICIAL_DIR = "crosstask_release"  # the folder crosstask_release.zip unpacks to
PRIMARY_TASK_COUNT = 18  # CrossTask's annotated primary tasks


def localization_configs() -> list[common.FeatureConfig]:
    return [common.FeatureConfig(name="resnet", description="ResNet-152 (2D) + ResNeXt-101 (3D)",
                                 use_2d=True, use_3d=True, dim_2d=2048, dim_3d=2048)]


def read_task_steps(path: str | os.PathLike) -> dict[str, list[str]]:
    """tasks_primary.txt (or tasks_related.txt) of the CrossTask release -> {task id: K step texts}.

    Each block is five lines: task id, name, URL, K, then the K step texts separated by commas.
    """
    with open(path) as f:
        lines = [line.strip() for line in f]
    blocks, block = [], []
    for line in lines + [""]:
        if line:
            block.append(line)
        elif block:
            blocks.append(block)
            block = []
    steps: dict[str, list[str]] = {}
    for b in blocks:
        if len(b) != 5:
            raise ValueError(f"{path}: task block {b[:1]} has {len(b)} lines; expected 5 (task id, name, URL, "
                             "number of steps, comma-separated steps)")
        task, _, _, n, texts = b
        try:
            k = int(n)
        except ValueError:
            raise ValueError(f"{path}: task {task}: number of steps {n!r} is not an integer") from None
        names = [s.strip() for s in texts.split(",")]
        if k != len(names) or k == 0:
            raise ValueError(f"{path}: task {task} declares {k} steps but lists {len(names)}: {texts!r}")
        if task in steps:
            raise ValueError(f"{path}: task {task} is listed twice")
        steps[task] = names
    if not steps:
        raise ValueError(f"{path}: no task found")
    return steps


def read_video_list(path: str | os.PathLike) -> list[tuple[str, str]]:
    """videos.csv of the CrossTask release (`task,video_id,url` lines) -> [(video id, task)] in file order."""
    rows, seen = [], set()
    with open(path, newline="") as f:
        for lineno, r in enumerate(csv.reader(f), 1):
            if not r or not "".join(r).strip():
                continue
            if lineno == 1 and [c.strip() for c in r[:2]] == ["task", "video_id"]:
                continue  # a header some copies add
            if len(r) < 2:
                raise ValueError(f"{path}: line {lineno}: expected 'task,video_id,url', got {','.join(r)!r}")
            task, vid = r[0].strip(), r[1].strip()
            if (task, vid) not in seen:
                seen.add((task, vid))
                rows.append((vid, task))
    return rows


def read_step_segments(path: str | os.PathLike, item: str, num_seconds: int, num_steps: int) -> np.ndarray:
    """An annotation file of the CrossTask release (`step,start,end` lines, 1-based steps, seconds) as
    the binary (T, K) per-second matrix: rows floor(start) .. ceil(end) - 1 of the step's column."""
    y = np.zeros((num_seconds, num_steps), np.uint8)
    if not os.path.exists(path):
        raise V.BadItem(V.MISSING_FILE, item, path)
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(",")
            try:
                if len(parts) != 3:
                    raise ValueError
                step, start, end = int(parts[0]), float(parts[1]), float(parts[2])
            except ValueError:
                raise V.BadItem(V.BAD_ANNOTATION, item, path,
                                f"line {lineno}: expected 'step,start,end', got {line!r}") from None
            if not 1 <= step <= num_steps:
                raise V.BadItem(V.BAD_ANNOTATION, item, path,
                                f"line {lineno}: step {step} is outside 1..{num_steps}")
            if not (math.isfinite(start) and math.isfinite(end) and 0 <= start <= end):
                raise V.BadItem(V.BAD_ANNOTATION, item, path,
                                f"line {lineno}: segment {start}..{end} s is not 0 <= start <= end")
            y[int(math.floor(start)):int(math.ceil(end)), step - 1] = 1
    return y


@dataclass(frozen=True)
class _Official:
    """Where the files of the official CrossTask release are."""

    tasks_file: str
    csv: str
    annotations: str


class LocalizationBuilder(common.EaoBuilder):
    MINING = False
    PATH_OPTIONS = ("csv", "features_path", "features_path_audio", "annot_path", "steps_path")

    def _layout_fields(self):
        return dict(common.LOCALIZATION_FIELDS)

    def manual_files(self) -> list[str]:
        files = ["videos.csv", "steps.json", "features/", "audio/", "annotations/"]
        if not self.MINING:
            files[-1] += f" (or the official release's {OFFICIAL_DIR}/{OFFICIAL_TASKS_FILE} layout)"
        return files

    def _official_release(self, dl_manager) -> _Official | None:
        """The official CrossTask layout's files, or None for the preprocessed layout."""
        if self.MINING:
            return None
        given = self._paths.get("steps_path")
        if given is not None:
            if not given.endswith(".txt"):
                return None
            tasks_file = self._path(dl_manager, "steps_path", given)
        else:
            manual = os.fspath(dl_manager.manual_dir)
            if os.path.exists(os.path.join(manual, "steps.json")):
                return None
            candidates = [os.path.join(manual, OFFICIAL_TASKS_FILE),
                          os.path.join(manual, OFFICIAL_DIR, OFFICIAL_TASKS_FILE)]
            tasks_file = next((p for p in candidates if os.path.exists(p)), None)
            if tasks_file is None:
                return None
        if not os.path.exists(tasks_file):
            raise FileNotFoundError(f"{tasks_file}: CrossTask task list not found (option `steps_path`)")
        root = os.path.dirname(tasks_file)
        return _Official(tasks_file=tasks_file,
                         csv=self._path(dl_manager, "csv", os.path.join(root, "videos.csv")),
                         annotations=self._path(dl_manager, "annot_path", os.path.join(root, "annotations")))

    def _read_official(self, release: _Official) -> list[tuple[str, str]]:
        """The annotated primary-task videos of the official release; sets the step texts."""
        if not os.path.exists(release.csv):
            raise FileNotFoundError(f"{release.csv}: video list not found (option `csv`)")
        self._steps = read_task_steps(release.tasks_file)
        self._steps_file = release.tasks_file
        rows, related, unannotated = [], 0, []
        for vid, task in read_video_list(release.csv):
            if task not in self._steps:
                related += 1
            elif not os.path.exists(os.path.join(release.annotations, f"{task}_{vid}.csv")):
                unannotated.append(vid)
            else:
                rows.append((vid, task))
        notes = self._report.notes
        notes.append(f"official CrossTask layout: {release.tasks_file}, {release.csv}, {release.annotations}")
        if related:
            notes.append(f"left out {related} videos of tasks not in {OFFICIAL_TASKS_FILE} (related tasks, "
                         "which have no annotation)")
        if unannotated:
            notes.append(f"left out {len(unannotated)} primary-task videos without an annotation file, e.g. "
                         f"{unannotated[:5]}")
        present = sorted({t for _, t in rows})
        if len(present) < PRIMARY_TASK_COUNT:
            notes.append(f"{len(present)} of the {PRIMARY_TASK_COUNT} CrossTask primary tasks have annotated "
                         f"videos: {present}")
        return rows

    def _read_preprocessed(self, dl_manager) -> list[tuple[str, str]]:
        csv_path = self._path(dl_manager, "csv", "videos.csv")
        if not os.path.exists(csv_path):
            raise FileNotFoundError(f"{csv_path}: video list not found (option `csv`)")
        need = ["video_id"] if self.MINING else ["video_id", "task"]
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
                raise ValueError(f"{csv_path}: needs columns {need}, got {reader.fieldnames}")
            rows = [(r["video_id"], "" if self.MINING else str(r["task"])) for r in reader]
        if not rows:
            raise V.PrepareError(f"{csv_path}: the video list is empty")
        self._steps_file = self._path(dl_manager, "steps_path", "steps.json")
        if not os.path.exists(self._steps_file):
            raise FileNotFoundError(
                f"{self._steps_file}: steps file not found (option `steps_path`)"
                + ("" if self.MINING else f"; nor is the official release's {OFFICIAL_TASKS_FILE} in the "
                   f"manual directory or its {OFFICIAL_DIR}/ folder"))
        with open(self._steps_file) as f:
            self._steps = json.load(f)
        return rows

    def _split_generators(self, dl_manager):
        release = self._official_release(dl_manager)
        self._release = release
        rows = self._read_official(release) if release is not None else self._read_preprocessed(dl_manager)
        self._feat = self._path(dl_manager, "features_path", "features")
        self._audio = self._path(dl_manager, "features_path_audio", "audio")
        self._annot = self._path(dl_manager, "annot_path", "annotations")
        self.info.metadata["layouts"]["test"] = "localization"
        self._set_complete_size("test", len(rows))
        return {"test": self._generate_examples(rows)}

    def _annotation(self, vid: str, task: str, num_steps: int, ex: dict) -> np.ndarray:
        """The (T, K) 0/1 annotation of one video, validated."""
        if self._release is not None:
            path = os.path.join(self._release.annotations, f"{task}_{vid}.csv")
            if ex["features_2d"].shape[0]:  # T: the 1-per-second 2D feature rows
                num_seconds = ex["features_2d"].shape[0]
            else:
                num_seconds = int(math.ceil(ex["features_3d"].shape[0] / self.builder_config.fps_3d))
            ann = read_step_segments(path, vid, num_seconds, num_steps)
        else:
            path = os.path.join(self._annot, (vid if self.MINING else f"{task}_{vid}") + ".npy")
            ann = V.load_npy(path, vid)
            if ann.ndim != 2 or ann.shape[0] == 0 or ann.shape[1] != num_steps:
                raise V.BadItem(V.BAD_ANNOTATION, vid, path,
                                f"annotation must be (T > 0, K = {num_steps} steps), got shape {ann.shape}")
            if not np.isin(ann, (0, 1)).all():
                raise V.BadItem(V.BAD_ANNOTATION, vid, path, "annotation values must be 0 or 1")
        if not ann.any():  # its recall would be undefined: the evaluation could not score it
            raise V.BadItem(V.BAD_ANNOTATION, vid, path,
                            f"no step is annotated within the video's {ann.shape[0]} seconds")
        return ann.astype(np.uint8)

    def _generate_examples(self, rows):
        def build(vid: str, task: str):
            ex = {"id": vid, "task": task}
            p2 = os.path.join(self._feat, vid + "_2d.npy")
            f2 = V.load_npy(p2, vid) if self.builder_config.use_2d else None
            p3 = os.path.join(self._feat, vid + "_3d.npy")
            if self.builder_config.use_3d:
                if os.path.exists(p3):
                    f3 = V.load_npy(p3, vid)
                else:
                    p3 = os.path.join(self._feat, vid + ".npz")
                    f3 = V.load_npz_key(p3, "features", vid)
            else:
                f3 = None
            ex["features_2d"] = self._features("2d", f2, vid, p2)
            ex["features_3d"] = self._features("3d", f3, vid, p3)
            pa = os.path.join(self._audio, vid + ".npz")
            ex["audio"] = self._spectrogram(V.load_npz_key(pa, "arr_0", vid), vid, pa)
            step_key = vid if self.MINING else task
            if step_key not in self._steps:
                raise V.BadItem(V.NO_CAPTION, vid, self._steps_file, f"no steps for {step_key!r}")
            steps = [self._usable_caption(s, vid, self._steps_file, "step") for s in self._steps[step_key]]
            ex["annotation"] = self._annotation(vid, task, len(steps), ex)
            ex["steps"] = steps
            self._add_text(*steps)
            return ex

        return self._validated("test", ((i, lambda v=v, t=t: build(v, t)) for i, (v, t) in enumerate(rows)))
