"""Shared builder for the released MSR-VTT / YouCook2 pickles.

A released pickle is a list of dicts, one per clip. The ResNet pickle (`resnet/<file>`) holds `id`,
captions, `audio` (a (40, T) torch tensor) and the ResNet/ResNeXt features; the S3D and CLIP pickles
(`s3d/<file>`, `clip/<file>`) have the same order and length and hold the other backbones' features
(keys `s3d`, `clip`). Configs select which pickle and key fill the 2D and 3D slots.

Manual directory: the original's `./data/msrvtt` or `./data/youcook` (subfolders resnet/, s3d/,
clip/; the ResNet pickles may also sit directly in the manual directory). Options `resnet_dir`,
`s3d_dir`, `clip_dir` move those folders.
"""

from __future__ import annotations

import os

from tfds_builders import common
from tfds_builders import validate as V


def item_configs(key_2d: str, key_3d: str) -> list[common.FeatureConfig]:
    return [
        common.FeatureConfig(
            name="resnet", description="ResNet-152 (2D, 1/s) + ResNeXt-101 (3D, 1.5/s)",
            use_2d=True, use_3d=True, dim_2d=2048, dim_3d=2048, fps_2d=1.0, fps_3d=1.5,
            options=dict(src_2d="resnet", key_2d=key_2d, src_3d="resnet", key_3d=key_3d)),
        common.FeatureConfig(
            name="s3d", description="S3D (3D slot, 1024-d, 1/s)", use_2d=False, use_3d=True, dim_2d=None,
            dim_3d=1024, fps_3d=1.0, options=dict(src_3d="s3d", key_3d="s3d")),
        common.FeatureConfig(
            name="clip", description="CLIP ViT-B/32 (2D slot, 512-d, 1/s)", use_2d=True, use_3d=False,
            dim_2d=512, dim_3d=None, fps_2d=1.0, options=dict(src_2d="clip", key_2d="clip")),
    ]


class PickleItemsBuilder(common.EaoBuilder):
    """Eval-item records (layout "items") from released pickles; subclasses set SPLIT_FILES."""

    SPLIT_FILES: dict[str, str] = {}
    PATH_OPTIONS = ("resnet_dir", "s3d_dir", "clip_dir")
    DATASET_NAME = ""

    def _layout_fields(self):
        return dict(common.ITEM_FIELDS)

    def manual_files(self) -> list[str]:
        opts = self.builder_config.options
        others = sorted({opts[k] for k in ("src_2d", "src_3d") if k in opts} - {"resnet"})
        names = list(self.SPLIT_FILES.values())
        names[-1] += " (any of these splits; in resnet/ or directly)"
        return names + [f"{src}/ (the same file names)" for src in others]

    def _dir(self, dl_manager, src: str) -> str:
        d = self._path(dl_manager, f"{src}_dir", src)
        if src == "resnet" and f"{src}_dir" not in self._paths and not os.path.isdir(d):
            return os.fspath(dl_manager.manual_dir)
        return d

    def _split_generators(self, dl_manager):
        opts = self.builder_config.options
        sources = {"resnet"} | {opts[k] for k in ("src_2d", "src_3d") if k in opts}
        gens = {}
        missing = []
        for split, fname in self.SPLIT_FILES.items():
            files = {src: os.path.join(self._dir(dl_manager, src), fname) for src in sources}
            absent = [f for f in files.values() if not os.path.exists(f)]
            if absent:
                missing.append(f"{split}: {', '.join(absent)}")
                continue
            gens[split] = files
        if not gens:
            raise FileNotFoundError(
                f"{self.name}/{self.builder_config.name}: no split found; looked for "
                + "; ".join(missing))
        out = {}
        for split, files in gens.items():
            data = {src: V.load_pickle(f) for src, f in files.items()}
            main = data["resnet"]
            if not isinstance(main, list):
                raise V.PrepareError(f"{files['resnet']}: expected a list of dicts, got {type(main).__name__}")
            if not main:
                raise V.PrepareError(f"{files['resnet']}: the item list is empty")
            for src, d in data.items():
                if len(d) != len(main):
                    raise V.PrepareError(f"{files[src]} has {len(d)} items but {files['resnet']} has {len(main)}; "
                                         "the backbone pickles must be parallel")
            self.info.metadata["layouts"][split] = "items"
            self._set_complete_size(split, self._complete_size(split, len(main)))
            out[split] = self._generate_examples(split, data, files)
        for m in missing:
            self._report.notes.append(f"split not prepared (files missing): {m}")
        return out

    def _complete_size(self, split: str, n: int) -> int:
        return n

    def _keep(self, item: dict) -> bool:
        return True

    def _generate_examples(self, split, data, files):
        opts = self.builder_config.options
        main = data["resnet"]
        n_dropped = 0
        dropped_captions = [0]  # training captions without a usable word, of the items written

        def build(i: int):
            it = main[i]
            if not isinstance(it, dict):
                raise V.BadItem(V.WRONG_SHAPE, f"#{i}", files["resnet"], f"item is a {type(it).__name__}, not a dict")
            name = str(it.get("id", f"#{i}"))
            ex = {"id": name, "item_index": i}
            for part in ("2d", "3d"):
                src = opts.get(f"src_{part}")
                arr, f = None, files["resnet"]
                if src is not None:
                    other = data[src][i]
                    f = files[src]
                    if src != "resnet" and "id" in other and "id" in it and str(other["id"]) != name:
                        raise V.BadItem(V.WRONG_SHAPE, name, f, f"id {other['id']!r} differs from the ResNet "
                                        f"pickle's {name!r} at position {i}")
                    key = opts[f"key_{part}"]
                    if key not in other:
                        raise V.BadItem(V.MISSING_KEY, name, f, f"no key {key!r}")
                    arr = other[key]
                ex[f"features_{part}"] = self._features(part, arr, name, f)
            if "audio" not in it:
                raise V.BadItem(V.MISSING_KEY, name, files["resnet"], "no key 'audio'")
            ex["audio"] = self._spectrogram(it["audio"], name, files["resnet"])
            caps = it.get("caption")
            caps = [caps] if isinstance(caps, (str, bytes)) else ([] if caps is None else list(caps))
            caps = [V.check_caption(c, name, files["resnet"]) for c in caps]
            # A training caption without a usable word would train on no text: dropped (and counted) as
            # long as the item keeps one; the evaluated caption must have one.
            usable = [c for c in caps if self._caption_problem(c) is None]
            ev = it.get("eval_caption")
            if ev is not None:
                ev = self._usable_caption(ev, name, files["resnet"], "eval_caption")
            elif usable:
                ev = usable[0]
            elif caps:  # raises: none of the item's captions has a usable word
                ev = self._usable_caption(caps[0], name, files["resnet"])
            else:
                raise V.BadItem(V.NO_CAPTION, name, files["resnet"], "neither 'caption' nor 'eval_caption'")
            dropped_captions[0] += len(caps) - len(usable)
            ex["caption"] = ev
            ex["captions"] = usable or [ev]
            self._add_text(ev, *usable)
            return ex

        def items():
            nonlocal n_dropped
            for i in range(len(main)):
                if isinstance(main[i], dict) and not self._keep(main[i]):
                    n_dropped += 1
                    continue
                yield i, (lambda i=i: build(i))
            self._on_dropped(split, n_dropped)
            if dropped_captions[0]:
                self._report.notes.append(f"{split}: {dropped_captions[0]} training captions without a usable word "
                                          "(only punctuation, or no word2vec word) dropped from their items")

        return self._validated(split, items())

    def _on_dropped(self, split: str, n: int) -> None:
        pass
