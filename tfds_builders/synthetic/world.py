"""A learnable synthetic dataset in the released layouts, the project's default.

The world: `n_events` latent events z_e (latent_dim); each modality sees the current event through
its own fixed random projection plus noise: 2D features (1/s), 3D features (1.5/s), log-mel frames
(100/s, 40 bins). Every event owns a few words; narration and captions mix the current event's words
with filler words and a few out-of-vocabulary words (absent from the word-vector table, so the
pipeline's OOV filter is exercised). A word-vector table for the vocabulary is generated and stored
like the real word2vec subset, so the pipeline path is identical.

Splits (all from the same world):
  train          HowTo100M layout ("howto"): videos made of event runs, ASR-like caption segments
                 (start / end / text) with gaps without narration, some videos without any. It goes
                 through the same HowTo clip pipeline as HowTo100M.
  retrieval      eval-item layout ("items"), like YouCook2 / MSR-VTT: short clips of 1-3 events with one
                 caption (plus a second wording in `captions` for fine-tuning).
  localization   CrossTask layout ("localization"): videos of a task whose K steps happen in order
                 among background events, a per-second (T, K) annotation matrix and the K step texts.

Builder configs (sizes; dims 2D 32 + 3D 32, words 16-d, 40 mel bins, audio stored as float16):
  tiny      12 events;  train 24 videos of 16-40 s; retrieval 32 clips of 6-20 s;
            localization 4 videos of 24-36 s (2 tasks x 4 steps). Prepares in about a second (tests).
  default   32 events;  train 400 videos of 30-60 s; retrieval 500 clips of 8-30 s;
            localization 40 videos of 30-60 s (4 tasks x 5 steps). The demo's dataset (~0.25 GB,
            about 5 s to prepare).
  paper_dims  2D 2048 + 3D 2048 (float16), words 300-d; 64 train videos of 60-120 s. For the loader
            benchmark (the released HowTo100M record sizes), not for training.
Chance levels on `retrieval`: R@k = k / n_items (default: R@10 = 2 %).

The builder (`tfds_builders.synthetic.Synthetic`) writes these splits; `ensure_prepared` in this
package prepares them into a data_dir when missing (the demo's training run calls it first).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from eao_jax.data.text import WordTable

FILLERS = ("the", "a", "now", "we", "and", "then", "so", "you", "it", "this", "is", "okay", "just",
           "going", "to", "with", "your", "some", "here", "let's")
OOV = ("um", "uh", "hmm", "X1", "blah")  # never in the word-vector table
_CONS = "bdfgklmnprstvz"
_VOW = "aeiou"


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    """Sizes and noise of one synthetic builder config (documented in the module docstring)."""

    seed: int
    n_events: int
    train_videos: int
    train_seconds: tuple[int, int]
    retrieval_items: int
    retrieval_seconds: tuple[int, int]
    localization_videos: int
    localization_seconds: tuple[int, int]
    n_tasks: int
    steps_per_task: int
    words_per_event: int = 5
    latent_dim: int = 16
    dim_2d: int = 32
    dim_3d: int = 32
    word_dim: int = 16
    noise: float = 1.0  # per-dimension noise std (signal std is about 1)
    event_seconds: tuple[int, int] = (6, 14)
    no_caption_fraction: float = 0.05
    feature_dtype: str = "float32"  # storage dtype of the video features


SPECS = {
    "tiny": SyntheticSpec(seed=0, n_events=12, train_videos=24, train_seconds=(16, 40), retrieval_items=32,
                          retrieval_seconds=(6, 20), localization_videos=4, localization_seconds=(24, 36),
                          n_tasks=2, steps_per_task=4),
    "default": SyntheticSpec(seed=0, n_events=32, train_videos=400, train_seconds=(30, 60),
                             retrieval_items=500, retrieval_seconds=(8, 30), localization_videos=40,
                             localization_seconds=(30, 60), n_tasks=4, steps_per_task=5),
    # The released HowTo100M sizes (2048-d 2D and 3D features in float16, 300-d words), for the loader
    # benchmark; not meant for training.
    "paper_dims": SyntheticSpec(seed=0, n_events=32, train_videos=64, train_seconds=(60, 120), retrieval_items=16,
                                retrieval_seconds=(8, 30), localization_videos=2, localization_seconds=(30, 40),
                                n_tasks=2, steps_per_task=4, dim_2d=2048, dim_3d=2048, word_dim=300,
                                feature_dtype="float16"),
}

_SPLIT_CODE = {"train": 1, "retrieval": 2, "localization": 3}


class World:
    """The fixed latent events, projections and vocabulary of a spec."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        rng = np.random.default_rng([spec.seed, 0])
        s = spec
        self.z = rng.standard_normal((s.n_events, s.latent_dim)).astype(np.float32)
        scale = 1.0 / np.sqrt(s.latent_dim)
        self.p2 = (rng.standard_normal((s.latent_dim, s.dim_2d)) * scale).astype(np.float32)
        self.p3 = (rng.standard_normal((s.latent_dim, s.dim_3d)) * scale).astype(np.float32)
        self.pa = (rng.standard_normal((s.latent_dim, 40)) * scale).astype(np.float32)
        words: list[str] = []
        taken = set(FILLERS) | set(OOV)
        while len(words) < s.n_events * s.words_per_event:
            w = "".join(rng.choice(list(_CONS)) + rng.choice(list(_VOW)) for _ in range(rng.integers(2, 4)))
            if w not in taken:
                taken.add(w)
                words.append(w)
        self.event_words = [words[e * s.words_per_event:(e + 1) * s.words_per_event] for e in range(s.n_events)]
        vocab = list(FILLERS) + words
        vectors = rng.standard_normal((len(vocab), s.word_dim)).astype(np.float32) * 0.5
        self.table = WordTable(vocab, vectors)
        # Localisation tasks: ordered step events, disjoint across tasks.
        perm = rng.permutation(s.n_events)
        self.tasks = [perm[t * s.steps_per_task:(t + 1) * s.steps_per_task].tolist() for t in range(s.n_tasks)]

    # -- modalities of an event sequence -----------------------------------------------------
    def modalities(self, events: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """events: (D,) event id per second -> features_2d (D, d2), features_3d (1.5 D, d3), audio (40, 100 D)."""
        s = self.spec
        d = len(events)
        zt = self.z[events]  # (D, L)
        style = rng.standard_normal((1, s.latent_dim)).astype(np.float32) * 0.3  # per-video nuisance
        f2 = (zt + style) @ self.p2 + s.noise * rng.standard_normal((d, s.dim_2d)).astype(np.float32)
        n3 = int(d * 1.5)
        e3 = events[np.minimum((np.arange(n3) / 1.5).astype(int), d - 1)]
        f3 = (self.z[e3] + style) @ self.p3 + s.noise * rng.standard_normal((n3, s.dim_3d)).astype(np.float32)
        na = 100 * d
        ea = events[np.minimum(np.arange(na) // 100, d - 1)]
        base = (self.z @ self.pa)[ea]  # (na, 40)
        mel = base + s.noise * rng.standard_normal((na, 40)).astype(np.float32)
        audio = (mel.T - 4.0).astype(np.float32)  # a dB-like offset; values are arbitrary units
        return dict(features_2d=f2.astype(np.float32), features_3d=f3.astype(np.float32), audio=audio)

    def sentence(self, events, rng: np.random.Generator, n_event_words=(2, 4)) -> str:
        words: list[str] = []
        for e in np.atleast_1d(events):
            k = int(rng.integers(n_event_words[0], n_event_words[1] + 1))
            words += list(rng.choice(self.event_words[int(e)], size=k, replace=True))
        words += list(rng.choice(FILLERS, size=int(rng.integers(1, 4))))
        if rng.random() < 0.3:
            words.append(str(rng.choice(OOV)))
        rng.shuffle(words)
        return " ".join(words)

    def event_runs(self, seconds: int, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.spec.event_seconds
        events = np.zeros((seconds,), np.int64)
        t = 0
        prev = -1
        while t < seconds:
            n = int(rng.integers(lo, hi + 1))
            e = int(rng.integers(self.spec.n_events))
            while e == prev:
                e = int(rng.integers(self.spec.n_events))
            events[t:t + n] = e
            prev = e
            t += n
        return events


def _rng(spec: SyntheticSpec, split: str, i: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, _SPLIT_CODE[split], i])


def train_videos(world: World) -> Iterator[dict]:
    """HowTo100M-layout videos: id, features_2d, features_3d, audio, caption_start/end/text."""
    s = world.spec
    for i in range(s.train_videos):
        rng = _rng(s, "train", i)
        d = int(rng.integers(s.train_seconds[0], s.train_seconds[1] + 1))
        events = world.event_runs(d, rng)
        ex = world.modalities(events, rng)
        starts, ends, texts = [], [], []
        if rng.random() >= s.no_caption_fraction:
            t = float(rng.uniform(0, 2))
            while t < d - 1:
                if rng.random() < 0.2:  # a stretch without narration
                    t += float(rng.uniform(3, 10))
                    continue
                n = float(rng.uniform(1.5, 5.0))
                end = min(t + n, float(d))
                mid = int(min((t + end) / 2, d - 1))
                starts.append(round(t, 2))
                ends.append(round(end, 2))
                texts.append(world.sentence(events[mid], rng, (1, 3)))
                t = end + float(rng.uniform(-0.3, 1.0))  # ASR segments may overlap a little
                t = max(t, starts[-1] + 0.5)
        ex.update(id=f"syn_train_{i:05d}", caption_start=np.asarray(starts, np.float64),
                  caption_end=np.asarray(ends, np.float64), caption_text=texts)
        yield ex


def retrieval_items(world: World) -> Iterator[dict]:
    """Eval-item-layout clips: id, features, audio, caption, captions, item_index."""
    s = world.spec
    for i in range(s.retrieval_items):
        rng = _rng(s, "retrieval", i)
        d = int(rng.integers(s.retrieval_seconds[0], s.retrieval_seconds[1] + 1))
        k = int(rng.integers(1, 4))
        evs = rng.choice(s.n_events, size=k, replace=False)
        cuts = np.sort(rng.choice(np.arange(1, d), size=min(k - 1, d - 1), replace=False)) if k > 1 else []
        events = np.zeros((d,), np.int64)
        bounds = [0, *list(cuts), d]
        for j in range(len(bounds) - 1):
            events[bounds[j]:bounds[j + 1]] = evs[j]
        ex = world.modalities(events, rng)
        cap = world.sentence(evs, rng)
        ex.update(id=f"syn_ret_{i:05d}", caption=cap, captions=[cap, world.sentence(evs, rng)], item_index=i)
        yield ex


def localization_videos(world: World) -> Iterator[dict]:
    """CrossTask-layout videos: id, task, steps, annotation (T, K), features, audio."""
    s = world.spec
    step_texts = [[" ".join(world.event_words[e][:2]) for e in task] for task in world.tasks]
    step_events = {e for task in world.tasks for e in task}
    background = [e for e in range(s.n_events) if e not in step_events] or [0]
    for i in range(s.localization_videos):
        rng = _rng(s, "localization", i)
        t_id = i % s.n_tasks
        task = world.tasks[t_id]
        d = int(rng.integers(s.localization_seconds[0], s.localization_seconds[1] + 1))
        events = np.asarray(background, np.int64)[world.event_runs(d, rng) % len(background)]
        ann = np.zeros((d, len(task)), np.uint8)
        # Steps in canonical order, 2-5 s each, in K ordered slots of the video.
        slot = d // len(task)
        for k, e in enumerate(task):
            n = int(rng.integers(2, min(5, slot) + 1))
            a = k * slot + int(rng.integers(0, slot - n + 1))
            events[a:a + n] = e
            ann[a:a + n, k] = 1
        ex = world.modalities(events, rng)
        ex.update(id=f"syn_loc_{i:04d}", task=f"task{t_id}", steps=step_texts[t_id], annotation=ann)
        yield ex

