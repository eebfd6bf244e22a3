"""The training loader's worker processes: shared memory named per run and removed (after a finished
run, and after a kill -9 of the whole process group at the next start), a worker that dies while
starting reported in one line instead of a hang."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from eao_jax.data import workers
from tfds_builders import synthetic

pytestmark = pytest.mark.skipif(not workers.shared_memory_available(), reason="/dev/shm and /proc: Linux")

# Runs a 2-worker loader over the synthetic dataset: prints its process prefix, then "batch" per batch.
_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import ml_collections
    import numpy as np
    from eao_jax.data import pipelines, workers

    def config(data_dir, split, n_workers):
        return ml_collections.ConfigDict(dict(seed=0, data=dict(
            dataset="synthetic", data_dir=data_dir, tfds_config="tiny", split=split, videos_per_batch=4,
            clips_per_video=2, n_video_tokens=12, max_words=20, n_stft=768, min_time=8.0,
            text_audio_misaligned=True, num_workers=n_workers, read_threads=1, prefetch=2)))

    def exit_while_starting(loader, index, count):  # a worker that announces itself, then ends with status 0
        real(loader, index, count)
        with open(os.environ["EXIT_TIME_FILE"], "w") as f:
            f.write(str(time.time()))
        sys.exit(0)

    if __name__ == "__main__":  # grain's worker processes import this file again
        data_dir, split, n, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
        prefix = workers.process_prefix()
        print("prefix", prefix, flush=True)
        if mode == "exit0":
            real, workers.in_worker_process = workers.in_worker_process, exit_while_starting
        it = pipelines.make_train_iterator(config(data_dir, split, 2), process_index=0, process_count=1)
        if mode == "exit0":
            try:
                next(it)
            except RuntimeError as e:
                exited = float(open(os.environ["EXIT_TIME_FILE"]).read())
                print(json.dumps(dict(error=str(e), after_exit_s=time.time() - exited)))
            sys.exit(0)
        ref = pipelines.make_train_iterator(config(data_dir, split, 0), process_index=0, process_count=1)
        same = True
        for _ in range(n):
            b, r = next(it), next(ref)
            same &= all(np.array_equal(b[k], r[k]) for k in r)
            print("batch", flush=True)
        psm = sum("/dev/shm/psm_" in line for line in open("/proc/self/maps"))
        it.close()
        left = [x for x in os.listdir(workers.SHM_DIR) if x.startswith(prefix)]
        print(json.dumps(dict(same=bool(same), psm_mapped=psm, left_after_close=left)))
""")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("workers")
    synthetic.ensure_prepared(d / "data", "tiny")
    script = d / "loader.py"
    script.write_text(_SCRIPT)
    return d, script


def _run(syn, *args, timeout=300, **env):
    d, script = syn
    return subprocess.run([sys.executable, str(script), str(d / "data"), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONPATH=os.getcwd(), **env))


def _ours(prefix: str) -> list[str]:
    """Files in /dev/shm of the run with this process prefix (segments, markers, semaphores)."""
    return [n for n in os.listdir(workers.SHM_DIR) if n.startswith((prefix, "sem." + prefix))]


def _shm_files_of_group(pgid: int) -> set[str]:
    """The /dev/shm files the processes of a process group map or hold open (those still linked)."""
    paths = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) != pgid:
                continue
            with open(f"/proc/{p.pid}/maps") as f:
                paths += [line.split(None, 5)[-1].strip() for line in f if "/dev/shm/" in line]
            paths += [os.readlink(f"/proc/{p.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{p.pid}/fd")]
        except (OSError, psutil.Error):
            pass
    return {p[len("/dev/shm/"):] for p in paths if p.startswith("/dev/shm/") and not p.endswith(" (deleted)")}


def _finished(r: subprocess.CompletedProcess) -> tuple[str, dict]:
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert "leaked" not in r.stderr, r.stderr[-3000:]  # the resource tracker found nothing to clean up
    return lines[0].split()[1], json.loads(lines[-1])


def test_kill_9_of_the_process_group_and_a_finished_run_leave_nothing(syn):
    d, script = syn
    p = subprocess.Popen([sys.executable, str(script), str(d / "data"), "train", "100000", "run"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
                         env=dict(os.environ, PYTHONPATH=os.getcwd()))
    try:
        prefix = p.stdout.readline().split()[1]
        for _ in range(2):  # batches flowing
            assert p.stdout.readline().startswith("batch")
        held = _shm_files_of_group(p.pid)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=60)
    # every file the run used is named after it (no `psm_` / `sem.mp-` of grain or multiprocessing)
    assert held and [n for n in held if not n.startswith((prefix, "sem." + prefix))] == []
    time.sleep(0.5)
    left = _ours(prefix)
    assert left  # the killed run's semaphores and segments in flight ...
    # The next start: a finished run of fine-tuning batches (items layout) built in the workers' shared
    # memory, as those of a 0-worker loader, nothing copied by grain into its own `psm_` segments.
    restart, res = _finished(_run(syn, "retrieval", 3, "run"))
    assert _ours(prefix) == []  # ... are removed when the next loader starts
    assert not held & set(os.listdir(workers.SHM_DIR))
    assert res == dict(same=True, psm_mapped=0, left_after_close=[])  # nothing left by the finished run ...
    assert _ours(restart) == []  # ... nor after it exited


def test_a_worker_that_exits_while_starting_is_reported_in_one_line_within_seconds(syn, tmp_path):
    # grain waits forever for a worker that ended with status 0 (it only checks non-zero ones)
    r = _run(syn, "train", 1, "exit0", timeout=180, EXIT_TIME_FILE=str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr[-3000:]
    prefix, res = r.stdout.splitlines()[0].split()[1], json.loads(r.stdout.splitlines()[-1])
    assert res["error"].startswith("data loader: worker process ") and "exited" in res["error"]
    assert "\n" not in res["error"] and res["after_exit_s"] < 5
    assert _ours(prefix) == []  # removed at exit
