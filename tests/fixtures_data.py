"""Writers of tiny fixtures in the released file layouts (HowTo100M, MSR-VTT/YouCook2 pickles,
CrossTask / Mining YouTube, word2vec binary), for the builder and pipeline tests."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import pickle
from collections.abc import Sequence

import numpy as np
import torch_format

WORDS = ("cut", "the", "onion", "add", "salt", "stir", "pan", "heat", "oil", "mix", "don't", "we")


def write_word2vec(path: os.PathLike, words: Sequence[str], vectors: np.ndarray, newline: bool = True) -> None:
    """GoogleNews binary layout: "<count> <dim>\\n", then word, space, float32 LE vector, newline."""
    vectors = np.asarray(vectors, "<f4")
    with open(path, "wb") as f:
        f.write(f"{len(words)} {vectors.shape[1]}\n".encode())
        for w, v in zip(words, vectors, strict=True):
            f.write(w.encode("utf-8") + b" " + v.tobytes() + (b"\n" if newline else b""))


def word2vec_fixture(tmp: pathlib.Path, dim: int = 7, seed: int = 0) -> tuple[pathlib.Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((len(WORDS), dim)).astype(np.float32)
    path = tmp / "w2v.bin"
    write_word2vec(path, WORDS, vecs)
    return path, dict(zip(WORDS, vecs, strict=True))


def sentence(rng: np.random.Generator, n: int) -> str:
    vocab = list(WORDS) + ["OOV", "zzz"]
    return " ".join(rng.choice(vocab, size=n))


def random_video(rng: np.random.Generator, seconds: int, d2: int, d3: int, fps_3d: float = 1.5) -> dict:
    return dict(f2=rng.standard_normal((seconds, d2)).astype(np.float32),
                f3=rng.standard_normal((int(seconds * fps_3d), d3)).astype(np.float32),
                spec=(rng.standard_normal((40, 100 * seconds)) - 3).astype(np.float32))


def write_howto(manual: pathlib.Path, n_videos: int = 4, *, d2: int = 6, d3: int = 5, seed: int = 0,
                fallback_paths: bool = False) -> dict[str, dict]:
    """HowTo100M layout under `manual`: csv, caption.pickle, features/…_2d/_3d.npz, audio_features/…_spec.npz.

    Returns video_id -> dict(path, f2, f3, spec, caption) of what was written.
    """
    rng = np.random.default_rng(seed)
    manual.mkdir(parents=True, exist_ok=True)
    videos, captions = {}, {}
    for i in range(n_videos):
        vid = f"vid{i:03d}"
        path = f"cat_{i % 2}/video_{i}/{vid}"
        v = random_video(rng, int(rng.integers(20, 40)), d2, d3)
        n_seg = int(rng.integers(2, 6))
        starts = np.sort(rng.uniform(0, len(v["f2"]) - 4, n_seg))
        cap = dict(start=starts, end=starts + rng.uniform(1, 4, n_seg),
                   text=[sentence(rng, int(rng.integers(1, 6))) for _ in range(n_seg)])
        captions[vid] = cap
        v.update(path=path, caption=cap)
        videos[vid] = v
        d = manual / "features" / path
        d.mkdir(parents=True, exist_ok=True)
        if fallback_paths and i == 0:
            np.savez(manual / "features" / f"{path}_2d.npz", features=v["f2"])
            np.savez(d / f"{vid}.npz", features=v["f3"])
        else:
            np.savez(d / f"{vid}_2d.npz", features=v["f2"])
            np.savez(d / f"{vid}_3d.npz", features=v["f3"])
        a = manual / "audio_features" / path
        a.mkdir(parents=True, exist_ok=True)
        np.savez(a / f"{vid}_spec.npz", v["spec"].astype(np.float16))
    with open(manual / "HowTo100M_1166_videopaths.txt", "w") as f:
        f.write("path\n")
        for i, v in enumerate(videos.values()):
            f.write(("None/" if i == 1 else "") + v["path"] + "\n")
    with open(manual / "caption.pickle", "wb") as f:
        pickle.dump(captions, f)
    return videos


def howto_file(manual: pathlib.Path, videos: dict, vid: str, kind: str) -> pathlib.Path:
    """Path of one released file of a HowTo fixture video (kind: 2d, 3d, spec)."""
    p = videos[vid]["path"]
    if kind == "spec":
        return manual / "audio_features" / p / f"{vid}_spec.npz"
    return manual / "features" / p / f"{vid}_{kind}.npz"


def item_list(n: int, *, d2: int = 6, d3: int = 5, seed: int = 0, key_2d: str = "2d", key_3d: str = "3d",
              torch_audio: bool = False, eval_caption: bool = True) -> list[dict]:
    """Items in the released MSR-VTT / YouCook2 pickle layout."""
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        v = random_video(rng, int(rng.integers(5, 40)), d2, d3)
        audio = v["spec"]
        if torch_audio:
            audio = torch_format.Tensor(audio)
        it = {"id": f"clip{i}", key_2d: v["f2"], key_3d: v["f3"], "audio": audio,
              "caption": [sentence(rng, int(rng.integers(2, 8))) for _ in range(3)]}
        if eval_caption:
            it["eval_caption"] = sentence(rng, int(rng.integers(2, 8)))
        items.append(it)
    return items


def pandas_frame(columns: dict[str, list]) -> torch_format.Build:
    """A pandas DataFrame of float and str columns as pandas 0.2x pickled one (`pickle.dump` of the frame
    writes its BlockManager's state: axes, then a float block and an object block with their column
    positions), for `write_pickle`; pandas >= 1.3 files are in tests/data/pandas_captions."""
    G, C, New = torch_format.Global, torch_format.Call, torch_format.New
    names = list(columns)
    floats = [k for k in names if not isinstance(columns[k][0], str)]
    texts = [k for k in names if isinstance(columns[k][0], str)]
    rows = len(columns[names[0]])
    blocks = [{"values": np.array([columns[k] for k in floats], np.float64),
               "mgr_locs": np.array([names.index(k) for k in floats], np.int64)},
              {"values": np.array([columns[k] for k in texts], object), "mgr_locs": slice(len(floats), len(names), 1)}]
    new_index = G("pandas.core.indexes.base", "_new_Index")
    axes = [C(new_index, G("pandas.core.indexes.base", "Index"), {"data": np.array(names, object), "name": None}),
            C(new_index, G("pandas.core.indexes.range", "RangeIndex"), {"name": None, "start": 0, "stop": rows,
                                                                         "step": 1})]
    state = (axes, [b["values"] for b in blocks], [floats, texts], {"0.14.1": {"axes": axes, "blocks": blocks}})
    manager = torch_format.Build(New(G("pandas.core.internals.managers", "BlockManager")), state)
    return torch_format.Build(New(G("pandas.core.frame", "DataFrame")),
                              {"_data": manager, "_typ": "dataframe", "_metadata": []})


def write_pickle(path: pathlib.Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch_format.dump_plain(obj, f)  # pickle.dump, with torch_format.Tensor values written as torch tensors


def write_localization(manual: pathlib.Path, n_videos: int = 3, *, mining: bool = False, d2: int = 6, d3: int = 5,
                       seed: int = 0, tasks: tuple[str, str] = ("t1", "t2")) -> dict[str, dict]:
    """CrossTask (or Mining YouTube) preprocessed layout: videos.csv, features/*.npy, audio/*.npz,
    annotations/*.npy, steps.json. Even videos belong to tasks[0] (3 steps), odd ones to tasks[1] (2)."""
    rng = np.random.default_rng(seed)
    for sub in ("features", "audio", "annotations"):
        (manual / sub).mkdir(parents=True, exist_ok=True)
    steps_by_task = {tasks[0]: ["cut onion", "add salt", "stir the pan"], tasks[1]: ["heat oil", "mix"]}
    videos, steps_json, rows = {}, {}, []
    for i in range(n_videos):
        vid = f"v{i}"
        task = tasks[i % 2]
        v = random_video(rng, int(rng.integers(10, 20)), d2, d3)
        steps = steps_by_task[task] if not mining else [sentence(rng, 3) for _ in range(int(rng.integers(2, 4)))]
        ann = np.zeros((len(v["f2"]), len(steps)), np.float32)
        for k in range(len(steps)):
            a = int(rng.integers(0, len(v["f2"]) - 2))
            ann[a:a + 2, k] = 1
        np.save(manual / "features" / f"{vid}_2d.npy", v["f2"])
        if i == 0:
            np.savez(manual / "features" / f"{vid}.npz", features=v["f3"])  # the fallback file
        else:
            np.save(manual / "features" / f"{vid}_3d.npy", v["f3"])
        np.savez(manual / "audio" / f"{vid}.npz", v["spec"])
        np.save(manual / "annotations" / (f"{vid}.npy" if mining else f"{task}_{vid}.npy"), ann)
        steps_json[vid if mining else task] = steps
        rows.append((vid, task))
        v.update(task=task, steps=steps, annotation=ann)
        videos[vid] = v
    with open(manual / "steps.json", "w") as f:
        json.dump(steps_json, f)
    with open(manual / "videos.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video_id"] if mining else ["video_id", "task"])
        for vid, task in rows:
            w.writerow([vid] if mining else [vid, task])
    return videos


def step_segments(annotation: np.ndarray) -> list[tuple[int, float, float]]:
    """(1-based step, start s, end s) of each run of annotated seconds, with fractional times that
    floor / ceil back to the run's first second and one past its last."""
    out = []
    for k in range(annotation.shape[1]):
        col = np.concatenate(([0], (annotation[:, k] > 0).astype(np.int8), [0]))
        starts, ends = np.flatnonzero(np.diff(col) == 1), np.flatnonzero(np.diff(col) == -1)
        out += [(k + 1, a + 0.25, b - 0.5) for a, b in zip(starts, ends, strict=True)]
    return sorted(out, key=lambda s: s[1])


def write_crosstask_official(preprocessed: pathlib.Path, manual: pathlib.Path) -> None:
    """The official CrossTask release layout of a `write_localization` CrossTask fixture (same videos,
    steps and annotations): crosstask_release/{tasks_primary.txt, videos.csv, annotations/<task>_<vid>.csv}
    plus the same features/ and audio/. videos.csv also lists a related-task video and a primary-task
    video without annotation, which prepare leaves out."""
    import shutil

    release = manual / "crosstask_release"
    (release / "annotations").mkdir(parents=True, exist_ok=True)
    for sub in ("features", "audio"):
        shutil.copytree(preprocessed / sub, manual / sub)
    steps = json.loads((preprocessed / "steps.json").read_text())
    with open(release / "tasks_primary.txt", "w") as f:
        for task, names in steps.items():
            f.write(f"{task}\nTask {task}\nhttps://www.wikihow.com/Task-{task}\n{len(names)}\n{','.join(names)}\n\n")
    with open(preprocessed / "videos.csv", newline="") as f:
        rows = [(r["video_id"], r["task"]) for r in csv.DictReader(f)]
    with open(release / "videos.csv", "w") as f:
        for i, (vid, task) in enumerate(rows):
            f.write(f"{task},{vid},https://www.youtube.com/watch?v={vid}\n")
            if i == 0:
                f.write(f"99999,related{i},https://www.youtube.com/watch?v=related{i}\n")
        f.write(f"{rows[0][1]},unannotated,https://www.youtube.com/watch?v=unannotated\n")
    for vid, task in rows:
        ann = np.load(preprocessed / "annotations" / f"{task}_{vid}.npy")
        with open(release / "annotations" / f"{task}_{vid}.csv", "w") as f:
            for k, start, end in step_segments(ann):
                f.write(f"{k},{start:.2f},{end:.2f}\n")
