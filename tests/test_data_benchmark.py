"""The loader / prepare benchmark command runs end to end on a small fixture and reports sane numbers."""

import json
import subprocess
import sys


def test_data_benchmark_cli_small(tmp_path):
    # Relative --fixture_dir, as a user types it; 3 full-width videos, 2 videos x 2 clips per batch.
    cmd = [sys.executable, "-m", "eao_jax.data.benchmark", "--fixture_dir=fx", "--videos=3", "--batches=2",
           "--videos_per_batch=2", "--clips_per_video=2", "--workers=0", "--prepare_workers=0", "--repeats=1",
           "--videos_per_shard=2"]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["fixture"]["videos"] == 3 and (tmp_path / "fx" / "manual").is_dir()
    chunks, video = result["loader"]["howto_chunks"], result["loader"]["howto"]
    for layout in (chunks, video):
        assert layout["one_worker"]["clips_per_cpu_s"] > 0
        assert layout["workers=0"]["clips_per_batch"] == 4
        assert 0 < layout["one_worker"]["rss_bytes"] < 4 * 2**30
    # A chunked clip reads its header and the 1-3 chunks under its window, never the whole video.
    assert 1.0 <= chunks["one_worker"]["records_per_clip"] <= 4.0
    assert chunks["one_worker"]["bytes_per_clip"] < video["one_worker"]["bytes_per_clip"]
    assert result["prepare"]["howto_chunks/1 process"]["videos"] == 3
    assert "median of" in r.stdout
