"""The 2D ResNet and 3D ResNeXt backbones, their converters and recipes against the reference code.

Fixtures in tests/data/extract/ were made with the reference code, not with ours:
antoine77340/video_feature_extractor @ 4e6c728408047d6460710a5ab21821bfdeed4ba4 (videocnn/models/
resnext.py, preprocessing.py, video_loader.py decoding through ffmpeg-python 0.2.0 + ffmpeg 5.1.9,
model.py's GlobalAvgPool, extract.py's F.normalize) and torchvision's models/resnet.py from
pytorch/vision @ f50e776b051ddf007b90d7bc8f70b0708c12d008, run with torch 2.13.0 (CPU). The models
are reduced instances of the reference classes (fewer blocks; narrower stages built with the
classes' own `_make_layer`; ResNeXt cardinality 8) with seeded random weights and random BatchNorm
affine parameters and running statistics, saved with torch.save (resnet2d_small.pth in its legacy,
non-zip format, as torchvision's 2017 checkpoint; resnext3d_small.pth as zip); `reference_outputs.json` records
the decoding (commands, ffmpeg version, its scale filter's interpolation) and which frames are kept.
The tests need no torch.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_format
from flax import nnx

from eao_jax.extract import frames, resnet, resnext
from eao_jax.extract.runner import Runner
from eao_jax.extract.weights import StateDict, WeightsError, load_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def extract_dir(data_dir):
    return data_dir / "extract"


@pytest.fixture(scope="module")
def ref(extract_dir):
    with np.load(extract_dir / "reference_outputs.npz") as f:
        return dict(f)


@pytest.fixture(scope="module")
def meta(extract_dir):
    return json.loads((extract_dir / "reference_outputs.json").read_text())


def _pooled_and_features(pooled_fn):
    # One compiled program per backbone gives both: (N, 2C) = [pooled | L2-normalised].
    def apply(model, x):
        p = pooled_fn(model, x)
        return jnp.concatenate([p, resnet.l2_normalize(p)], axis=-1)
    return apply


@pytest.fixture(scope="module")
def model2d(extract_dir):
    return resnet.load(extract_dir / "resnet2d_small.pth")


@pytest.fixture(scope="module")
def model3d(extract_dir):
    return resnext.load(extract_dir / "resnext3d_small.pth")


@pytest.fixture(scope="module")
def run2d(model2d):
    # Split over (fake) devices, padded batches: 5 frames run as one batch of 8.
    return Runner(model2d, _pooled_and_features(resnet.pooled), batch_size=8)


@pytest.fixture(scope="module")
def run3d(model3d):
    return Runner(model3d, _pooled_and_features(resnext.pooled), batch_size=2, devices=jax.local_devices()[:2])


def _check(out, pooled_ref, features_ref, tol):
    c = pooled_ref.shape[1]
    pooled, feats = out[:, :c], out[:, c:]
    assert feats.shape == features_ref.shape and feats.dtype == np.float32
    assert np.abs(feats - features_ref).max() <= tol
    # The un-normalised pooled features too, relative to their scale.
    assert np.abs(pooled - pooled_ref).max() <= tol * np.abs(pooled_ref).max()


def test_fixture_specs(model2d, model3d):
    """Blocks per stage, widths and group counts come from the state dicts."""
    assert model2d.spec == resnet.Spec(ndim=2, stem_width=64, stem_stride=(2, 2), groups=1, stages=(
        resnet.Stage(2, 16, 128), resnet.Stage(1, 16, 128), resnet.Stage(1, 32, 256), resnet.Stage(1, 64, 512)))
    assert model3d.spec == resnet.Spec(ndim=3, stem_width=64, stem_stride=(1, 2, 2), groups=8, stages=(
        resnet.Stage(2, 16, 128), resnet.Stage(1, 16, 128), resnet.Stage(1, 32, 256), resnet.Stage(1, 64, 512)))


@pytest.mark.parametrize("spec", ["RESNET152", "RESNEXT101"])
def test_full_size_specs_inferred(spec):
    """ResNet-152's [3, 8, 36, 3] and ResNeXt-101's [3, 4, 23, 3] (cardinality 32) are read from
    state dicts of their shapes (zero-stride arrays: nothing allocated)."""
    target = getattr(resnet, spec, None) or getattr(resnext, spec)
    shapes = resnet.torch_layout(target)
    state = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
    state["fc.weight"] = np.zeros((400, 2048), np.float32)
    assert resnet.infer_spec(StateDict(state, "x.pth"), target.ndim, target.stem_stride) == target
    assert shapes["layer4.0.conv2.weight"] == ((512, 512, 3, 3) if target.ndim == 2 else (1024, 32, 3, 3, 3))
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    n_stats = sum(int(np.prod(s)) for k, s in shapes.items() if "running" in k)
    # The reference classes' parameter counts (torch), less their classifier `fc`: torchvision's
    # resnet152 60,192,808 with a 2,049,000 fc; resnext.resnet101(num_classes=400, ...) 48,340,816
    # with a 819,600 fc.
    assert n_params - n_stats == (60_192_808 - 2_049_000 if target.ndim == 2 else 48_340_816 - 819_600)


def test_2d_parity_random_input(run2d, ref):
    """Odd-sized input (61 x 83: stride and padding rounding), N(0, 1) values."""
    _check(run2d(ref["random_2d_input"].astype(np.float32)), ref["random_2d_pooled"], ref["random_2d_features"], 1e-5)


def test_2d_recipe_on_decoded_video(run2d, ref, meta):
    """bigbuckbunny.mp4 at fps=1, 224 x 398 (decoded by the reference's loader): our recipe from
    those frames equals the reference features within 1e-5 in float32."""
    video = ref["video_2d_frames"]
    assert video.shape == (5, 224, 398, 3) and video.dtype == np.uint8
    assert (224, 398) == frames.output_size(720, 1280, frames.RECIPE_2D.size)
    assert meta["decoder"]["scale_interpolation"] == "bicubic"
    _check(run2d(frames.frames_2d(video)), ref["video_2d_pooled"], ref["video_2d_features"], 1e-5)


def test_3d_recipe_on_decoded_video(run3d, ref):
    """The last 31 of bigbuckbunny's 127 frames at fps=24 (112 x 112 centre crop): two clips, the
    second padded with one zero frame before the mean is subtracted, equal the reference's last two."""
    video = ref["video_3d_frames"]
    assert video.shape == (31, 112, 112, 3)
    clips = frames.clips_3d(video)
    assert clips.shape == (2, 16, 112, 112, 3)
    _check(run3d(clips), ref["video_3d_pooled"], ref["video_3d_features"], 1e-5)


def test_3d_parity_needs_padding_before_the_mean(run3d, ref):
    """Zero frames appended after the mean subtraction (a plausible mistake) give another last clip."""
    clips = frames.clips_3d(ref["video_3d_frames"])
    clips[1, 15] = 0.0
    out = run3d(clips)
    c = ref["video_3d_features"].shape[1]
    assert np.abs(out[0, c:] - ref["video_3d_features"][0]).max() <= 1e-5
    assert np.abs(out[1, c:] - ref["video_3d_features"][1]).max() > 1e-3


@pytest.mark.parametrize("reset", ["running_stats", "affine"])
def test_batchnorm_statistics_matter(extract_dir, ref, reset):
    """The fixtures' BatchNorm statistics and affine parameters are far from the defaults: a converter
    that ignored either would miss the reference by far more than the tolerance."""
    model = resnet.load(extract_dir / "resnet2d_small.pth")
    for _, m in nnx.iter_graph(model):
        if isinstance(m, resnet.BatchNorm):
            a, b = ("mean", "var") if reset == "running_stats" else ("bias", "scale")
            getattr(m, a)[...] = jnp.zeros_like(getattr(m, a)[...])
            getattr(m, b)[...] = jnp.ones_like(getattr(m, b)[...])
    x = ref["random_2d_input"].astype(np.float32)
    feats = np.asarray(jax.jit(resnet.features)(model, x))
    assert np.abs(feats - ref["random_2d_features"]).max() > 1e-2


def test_bfloat16_option(model2d, ref):
    """compute_dtype=bfloat16 (for accelerators) runs the same network: float32 output close to it."""
    run = Runner(model2d, resnet.features, batch_size=2, compute_dtype=jnp.bfloat16, devices=jax.local_devices()[:1])
    x = ref["random_2d_input"].astype(np.float32)
    out = run(x)
    assert out.dtype == np.float32 and out.shape == ref["random_2d_features"].shape
    err = np.abs(out - ref["random_2d_features"]).max()
    assert 1e-6 < err < 0.05  # bf16 rounding is visible, the features are the same


# ------------------------------------------------------------------------------------------------
# Converters: errors name the entry, in one line


@pytest.fixture(scope="module")
def state2d(extract_dir):
    return load_state_dict(extract_dir / "resnet2d_small.pth")


@pytest.fixture(scope="module")
def state3d(extract_dir):
    return load_state_dict(extract_dir / "resnext3d_small.pth")


def _error(build, state) -> str:
    with pytest.raises(WeightsError) as e:
        build(StateDict(state, "ckpt.pth"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("ckpt.pth: ")
    return msg


@pytest.mark.parametrize("key", ["layer4.0.bn2.running_var", "layer2.0.downsample.0.weight", "layer3.0.conv3.weight",
                                 "bn1.bias"])
def test_missing_entry_named(state2d, key):
    state = {k: v for k, v in state2d.items() if k != key}
    assert f"missing entry '{key}'" in _error(resnet.from_state_dict, state)


def test_missing_stage_named(state3d):
    state = {k: v for k, v in state3d.items() if not k.startswith("layer3.")}
    assert "missing entry 'layer3.0.conv1.weight'" in _error(resnext.from_state_dict, state)


@pytest.mark.parametrize("key", ["layer1.1.downsample.0.weight", "layer2.0.se.fc.weight", "head.bias",
                                 "layer5.0.conv1.weight"])
def test_unexpected_entry_named(state3d, key):
    state = dict(state3d)
    state[key] = np.zeros((4, 4), np.float32)
    assert f"unexpected entries {key}" in _error(resnext.from_state_dict, state)


@pytest.mark.parametrize(("key", "shape", "expected"), [
    ("layer1.0.bn3.running_mean", (127,), "(128,)"),
    ("layer3.0.conv2.weight", (32, 32, 3, 3), "(32, 4, 3, 3, 3)"),  # a 2-D kernel; 32 channels in 8 groups
    ("layer2.0.conv1.weight", (16, 64, 1, 1, 1), "(16, 128, 1, 1, 1)"),  # inputs != the previous stage's outputs
    ("layer4.0.downsample.0.weight", (512, 256, 1, 1, 1, 1), "(512, 256, 1, 1, 1)"),
    ("layer1.0.conv2.weight", (16, 2, 3, 3), "5 dimensions"),  # read to infer the group count
])
def test_misshaped_entry_named(state3d, key, shape, expected):
    state = dict(state3d)
    state[key] = np.zeros(shape, np.float32)
    assert f"{key} has shape {shape}, expected {expected}" in _error(resnext.from_state_dict, state)


def test_non_finite_entry_named(state2d):
    state = dict(state2d)
    state["layer3.0.bn2.running_var"] = state["layer3.0.bn2.running_var"].copy()
    state["layer3.0.bn2.running_var"][5] = np.nan
    assert "layer3.0.bn2.running_var holds NaN or Inf values" in _error(resnet.from_state_dict, state)


def test_wrong_kind_of_network_named(state2d, state3d):
    """A 2D state dict given as the 3D one (and back) is refused at conv1.weight's shape."""
    assert "conv1.weight has shape (64, 3, 7, 7), expected 5 dimensions" in _error(resnext.from_state_dict, state2d)
    assert "conv1.weight has shape (64, 3, 7, 7, 7), expected 4 dimensions" in _error(resnet.from_state_dict, state3d)


def test_groups_that_do_not_divide_named(state3d):
    state = dict(state3d)
    state["layer1.0.conv2.weight"] = np.zeros((16, 3, 3, 3, 3), np.float32)
    assert "layer1.0.conv2.weight" in _error(resnext.from_state_dict, state)


def test_wrapped_checkpoint_reads(state3d, tmp_path, model3d):
    """resnext101.pth as 3D-ResNets training saves it: {'state_dict': {'module.<key>': ...}, 'epoch': ...}
    (written without torch), read through the restricted reader."""
    path = tmp_path / "resnext101.pth"
    torch_format.save({"epoch": 200, "arch": "resnext-101",
                       "state_dict": {f"module.{k}": v for k, v in state3d.items()}}, path)
    model = resnext.load(path)
    assert model.spec == model3d.spec
    a, b = nnx.state(model), nnx.state(model3d)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool(jnp.array_equal(x, y)), a, b))


# ------------------------------------------------------------------------------------------------
# Recipes


def test_output_size_rule():
    assert frames.output_size(720, 1280, 224) == (224, 398)
    assert frames.output_size(720, 1280, 112) == (112, 199)
    assert frames.output_size(272, 640, 224) == (224, 527)
    assert frames.output_size(1280, 720, 224) == (398, 224)  # portrait: h >= w
    assert frames.output_size(480, 480, 112) == (112, 112)
    assert frames.crop_offsets(112, 199, 112) == (43, 0)  # ffmpeg's crop offset for the 720p video
    assert frames.crop_offsets(263, 112, 112) == (0, 75)


def test_frames_2d_values():
    x = np.array([0, 255, 128], np.uint8).reshape(1, 1, 3, 1).repeat(3, -1)
    out = frames.frames_2d(x)
    mean, std = np.float32(frames.IMAGENET_MEAN), np.float32(frames.IMAGENET_STD) + np.float32(1e-8)
    assert out.dtype == np.float32 and out.shape == (1, 1, 3, 3)
    np.testing.assert_array_equal(out[0, 0, 0], (0 - mean) / std)
    np.testing.assert_array_equal(out[0, 0, 1], (np.float32(1.0) - mean) / std)
    np.testing.assert_array_equal(out[0, 0, 2], (np.float32(128) / np.float32(255) - mean) / std)


@pytest.mark.parametrize(("n", "clips"), [(1, 1), (16, 1), (17, 2), (31, 2), (32, 2)])
def test_clips_3d_pads_before_the_mean(n, clips):
    rng = np.random.default_rng(n)
    video = rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8)
    out = frames.clips_3d(video)
    assert out.shape == (clips, 16, 4, 5, 3) and out.dtype == np.float32
    flat = out.reshape(-1, 4, 5, 3)
    mean = np.float32(frames.KINETICS_MEAN)
    np.testing.assert_array_equal(flat[:n], video.astype(np.float32) - mean)
    np.testing.assert_array_equal(flat[n:], np.broadcast_to(-mean, flat[n:].shape))  # padding frames hold -mean


def test_recipe_rates():
    """1 feature per second for 2D, 24 / 16 = 1.5 for 3D (the benchmark's accounting is checked
    against these in test_bench_command_prints_numbers)."""
    assert frames.RECIPE_2D.fps / frames.RECIPE_2D.frames_per_feature == 1.0
    assert frames.RECIPE_3D.fps / frames.RECIPE_3D.frames_per_feature == 1.5
    assert (frames.RECIPE_2D.size, frames.RECIPE_2D.center_crop) == (224, False)
    assert (frames.RECIPE_3D.size, frames.RECIPE_3D.center_crop) == (112, True)


@pytest.mark.parametrize("bad", [np.zeros((2, 8, 8, 3), np.float32), np.zeros((8, 8, 3), np.uint8),
                                 np.zeros((2, 8, 8, 4), np.uint8), np.zeros((0, 8, 8, 3), np.uint8)])
def test_bad_frames_refused(bad):
    for fn in (frames.frames_2d, frames.clips_3d):
        with pytest.raises(ValueError, match="frames"):
            fn(bad)


def test_small_clip_refused(model3d):
    with pytest.raises(ValueError, match=r"smaller than the \(1, 4, 4\) average pool"):
        jax.eval_shape(lambda x: resnext.features(model3d, x), jax.ShapeDtypeStruct((1, 16, 64, 64, 3), jnp.float32))


# ------------------------------------------------------------------------------------------------
# Benchmark command


def test_bench_command_prints_numbers():
    """Every backbone (reduced instances) and the audio recipe: each entry's numbers, and the recipes'
    FLOPs per second of video as units per second of video times FLOPs per unit."""
    video = pathlib.Path(REPO) / "tests" / "data" / "extract" / "plain.mp4"  # 2 s at 25 fps with audio
    cmd = [sys.executable, "-m", "eao_jax.extract.bench", "--tiny", "--repeats=2", "--matmul_size=128",
           "--matmul_repeats=1", f"--decode_videos={video}"]
    env = dict(os.environ, XLA_FLAGS="")  # one host device, as the command runs by default
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(res["backbones"]) == {"resnet152", "resnext101", "s3d", "clip_image"} and res["tiny"] is True
    (dec,) = res["decode"]
    assert (dec["source_frames"], dec["2d_frames"], dec["3d_frames"]) == (50, 2, 48) and len(dec["cpu_s_all"]) == 2
    assert dec["source_frames_per_cpu_s"] > 0 and dec["peak_rss_mib"] > 0 and dec["audio_samples"] > 30000
    assert f"decode {video} " in proc.stderr
    per_unit = {"resnet152": ("frame", "2d", 1.0), "resnext101": ("clip", "3d", 1.5), "s3d": ("clip", "s3d", 1.0),
                "clip_image": ("frame", "clip", 1.0)}
    for name, (unit, recipe, rate) in per_unit.items():
        r = res["backbones"][name]
        assert (r["unit"], r["recipe"], r["units_per_video_second"]) == (unit, recipe, rate)
        assert len(r["times_s"]) == 2
        for key in ("flops_per_unit", "units_per_s", "achieved_flops_per_s", "peak_fraction", "peak_fraction_cpu_time",
                    "flops_per_video_second"):
            assert r[key] > 0, (name, key)
        assert r["achieved_flops_per_s"] == pytest.approx(r["flops_per_unit"] * r["units_per_s"])
        assert r["peak_fraction"] == pytest.approx(r["achieved_flops_per_s"] / res["matmul_peak_flops_per_s"])
        assert r["flops_per_video_second"] == pytest.approx(rate * r["flops_per_unit"])
        assert f"{name}: " in proc.stderr
    assert frames.RECIPE_3D.fps / frames.RECIPE_3D.frames_per_feature == per_unit["resnext101"][2]
    audio = res["audio"]
    assert audio["logmel_audio_seconds_per_cpu_second"] > 0 and audio["flops_per_audio_second"] > 0
    expected = {per_unit[n][1]: r["flops_per_video_second"] for n, r in res["backbones"].items()}
    expected["audio"] = audio["flops_per_audio_second"]
    expected["total"] = sum(expected.values())
    assert res["recipe_flops_per_video_second"] == pytest.approx(expected)
    assert "GFLOP per second of video" in proc.stderr and "audio (log-mel, host CPU)" in proc.stderr


def test_bench_unknown_backbone_one_line():
    proc = subprocess.run([sys.executable, "-m", "eao_jax.extract.bench", "--backbones=resnet152,s4d"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("extract.bench: unknown backbone(s) s4d; known: resnet152, "
                                                    "resnext101, s3d, clip_image")
