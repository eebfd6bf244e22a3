"""The synthetic dataset is learnable: a linear probe on training clips retrieves its retrieval split."""

import dataclasses

import numpy as np

from eao_jax.data import howto
from eao_jax.data import video as video_lib
from tfds_builders.synthetic import world as synthetic


def test_world_is_deterministic_and_shaped():
    spec = synthetic.SPECS["tiny"]
    a = next(synthetic.train_videos(synthetic.World(spec)))
    b = next(synthetic.train_videos(synthetic.World(spec)))
    for k in ("features_2d", "features_3d", "audio", "caption_start"):
        np.testing.assert_array_equal(a[k], b[k])
    d = a["features_2d"].shape[0]
    assert a["features_3d"].shape == (int(1.5 * d), spec.dim_3d) and a["audio"].shape == (40, 100 * d)
    assert (np.diff(a["caption_start"]) > 0).all() and (a["caption_end"] > a["caption_start"]).all()
    world = synthetic.World(spec)
    vids = list(synthetic.train_videos(world))
    gaps = [np.diff(v["caption_start"]).max(initial=0) for v in vids]
    assert max(gaps) > 8  # some stretches without narration
    loc = list(synthetic.localization_videos(world))
    for v in loc:  # each step annotated once, steps in canonical order
        first = [np.flatnonzero(v["annotation"][:, k])[0] for k in range(v["annotation"].shape[1])]
        assert first == sorted(first) and v["annotation"].shape[0] == v["features_2d"].shape[0]


def test_linear_probe_retrieval_far_above_chance():
    # A smaller version of the `default` world: same events, noise and vocabulary sizes.
    spec = dataclasses.replace(synthetic.SPECS["default"], train_videos=100, retrieval_items=200)
    world = synthetic.World(spec)
    table = world.table
    rng = np.random.default_rng(0)
    x, y = [], []
    for v in synthetic.train_videos(world):  # training clips through the HowTo clip construction
        out = howto.video_clips({"start": v["caption_start"], "end": v["caption_end"], "text": v["caption_text"]},
                                v["audio"].astype(np.float16), v["features_2d"], v["features_3d"], rng, table, 10,
                                misaligned=True)
        for i in range(10):
            k = int(out["text_mask"][i].sum())
            if k == 0:
                continue
            ids = [int(np.argmin(((table.vectors - w) ** 2).sum(1))) for w in out["text"][i, :k]]
            x.append(np.bincount(ids, minlength=len(table)))
            y.append(out["video"][i][out["video_mask"][i] > 0].mean(0))
    x, y = np.asarray(x, float), np.asarray(y)
    w = np.linalg.solve(x.T @ x + np.eye(x.shape[1]), x.T @ y)  # ridge: bag of words -> mean video token
    q, g = [], []
    for it in synthetic.retrieval_items(world):
        q.append(np.bincount(table.ids(it["caption"].split())[:20], minlength=len(table)) @ w)
        v, m = video_lib.video_tokens(it["features_2d"], it["features_3d"], 48, "clip")
        g.append(v[m > 0].mean(0))
    q = np.asarray(q) / np.linalg.norm(q, axis=1, keepdims=True)
    g = np.asarray(g) / np.linalg.norm(g, axis=1, keepdims=True)
    sims = q @ g.T
    ranks = (sims > np.diag(sims)[:, None]).sum(1)
    r10 = (ranks < 10).mean()
    chance = 10 / spec.retrieval_items
    print(f"linear probe R@10 {r10:.3f} (chance {chance:.3f})")
    assert r10 >= 10 * chance, (r10, chance)
