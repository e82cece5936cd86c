"""The entry scripts' decisions, run with stand-in commands (no pip, apt-get or torch): what
install_data_backends.sh reports when only root is missing (scripts/test.sh goes on at its exit 3, the backend's
tests skip) and when a build fails, and what setup.sh does with a venv holding another torch."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stand_ins(tmp_path: Path, python_body: str, pkg_config_ok: bool = False) -> dict[str, str]:
    """A bin folder first on PATH: a non-root `id`, a `sudo` that wants a password, `pkg-config`, `g++`, and a python
    whose behaviour `python_body` (bash) sets; calls are logged to calls.txt."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    log = tmp_path / "calls.txt"
    scripts = {
        "id": "echo 1000",
        "sudo": 'echo "sudo $*" >> "$LOG"; exit 1',  # `sudo -n true` fails: a password would be asked
        "pkg-config": "exit 0" if pkg_config_ok else "exit 1",
        "g++": "exit 0",
        "apt-get": 'echo "apt-get $*" >> "$LOG"; exit 0',
        "python": 'echo "python $*" >> "$LOG"\n' + python_body,
    }
    for name, body in scripts.items():
        path = bin_ / name
        path.write_text(f"#!/usr/bin/env bash\n{body}\n")
        path.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "LOG": str(log), "PYTHON": str(bin_ / "python")}


def run_script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "install_data_backends.sh"), *args],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,  # no terminal: sudo -n only
    )  # fmt: skip


NO_FFCV_DALI_OK = """case "$*" in *"import ffcv"*) exit 1 ;; *"import nvidia.dali"*) exit 0 ;; esac; exit 0"""


def test_ffcv_without_root_still_installs_dali_and_says_only_root_was_missing(tmp_path):
    env = stand_ins(tmp_path, NO_FFCV_DALI_OK)
    result = run_script(env, "all")
    assert result.returncode == 3, result.stderr  # scripts/test.sh goes on at 3: ffcv's tests skip
    assert "need root for: apt-get" in result.stderr
    assert "dali: already installed" in result.stdout  # dali was still reached
    calls = (tmp_path / "calls.txt").read_text()
    assert "apt-get" not in calls.replace("sudo -n true", "")  # nothing ran apt-get without root
    assert "-m pip" not in calls  # ffcv's pip steps never started
    assert "sudo -v" not in calls  # no terminal: no password asked for


def test_ffcv_without_apt_get_still_installs_dali_and_asks_no_password(tmp_path):
    """A system without apt-get (macOS, Fedora, Amazon Linux): one line naming what to install, no sudo asked for
    (a password prompt for a command that is not there), DALI still reached, exit 4 (scripts/test.sh goes on)."""
    env = stand_ins(tmp_path, NO_FFCV_DALI_OK)
    (tmp_path / "bin" / "apt-get").unlink()
    tools = tmp_path / "tools"  # PATH without the machine's own apt-get: only what the script itself calls
    tools.mkdir()
    for name in ("bash", "dirname"):
        (tools / name).symlink_to(shutil.which(name))
    env["PATH"] = f"{tmp_path / 'bin'}:{tools}"
    result = run_script(env, "all")
    assert result.returncode == 4, result.stderr
    assert "ffcv: no apt-get here: install libjpeg-turbo, OpenCV 4, pkg-config and g++" in result.stderr
    assert "dali: already installed" in result.stdout
    assert "sudo" not in (tmp_path / "calls.txt").read_text()


def test_an_ffcv_build_failure_stops_the_script(tmp_path):
    """Root is not the problem (the libraries are there) but pip fails: exit 1, not 3, and dali is not reached."""
    body = """case "$*" in *"-m pip"*) exit 1 ;; *"import ffcv"*) exit 1 ;; esac; exit 0"""
    result = run_script(stand_ins(tmp_path, body, pkg_config_ok=True), "all")
    assert result.returncode == 1, result.stderr
    assert "dali" not in result.stdout
    assert "need root" not in result.stderr


def test_ffcv_alone_without_root_exits_3(tmp_path):
    result = run_script(stand_ins(tmp_path, NO_FFCV_DALI_OK), "ffcv")
    assert result.returncode == 3 and "need root for: apt-get" in result.stderr


@pytest.mark.parametrize("case", ["other", "pinned", "removed", "kept"])
def test_setup_reinstalls_a_venv_torch_other_than_the_pin(tmp_path, case):
    """setup.sh, copied with its constraints into a folder whose .venv/bin/python is a stand-in: with another torch
    in the venv, or none left beside a stamp, it installs the pin (the stand-in's pip then fails it: setup stops with
    its hint); with the pinned torch (its line carrying a comment) and a fresh stamp it runs no pip; ARAT_KEEP_TORCH=1
    keeps another torch."""
    pinned, log = PINNED, tmp_path / "calls.txt"
    version = {"other": "2.11.0+cu130", "pinned": pinned, "removed": "", "kept": "2.11.0+cu130"}[case]
    root, env = setup_copy(tmp_path, "exit 1", version, log)
    lines = (REPO / "constraints/cpu.txt").read_text().splitlines()
    (root / "constraints/cpu.txt").write_text(
        "\n".join(f"{line}  # the CPU build" if line.startswith("torch==") else line for line in lines) + "\n"
    )
    (root / ".venv" / ".arat-installed").write_text(f"{root}\n")  # installed for this folder
    if case == "kept":
        env["ARAT_KEEP_TORCH"] = "1"
    result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    calls = log.read_text()
    if case in ("other", "removed"):
        assert (f".venv has torch {version}, the pin is {pinned}" in result.stderr) == (case == "other")
        assert "-m pip install" in calls and result.returncode == 1
        assert "ARAT_TORCH_INDEX=https://download.pytorch.org/whl/cpu" in result.stderr
    else:
        assert result.returncode == 0, result.stderr
        assert "-m pip install" not in calls
        assert ("keeping .venv's torch 2.11.0+cu130" in result.stderr) == (case == "kept")


@pytest.mark.parametrize("installed", ["pin", "none"])
def test_setup_on_macos_pins_torch_without_the_cpu_label(tmp_path, installed):
    """macOS's torch wheels carry no +cpu label: setup.sh (with a stand-in `uname` saying Darwin) takes a venv
    holding the unlabelled pin as installed (no pip), and installs with a constraints file whose torch line has no
    label (the stand-in pip then fails: setup stops with a macOS hint, not the download.pytorch.org one)."""
    assert PINNED.endswith("+cpu")
    plain, log = PINNED.removesuffix("+cpu"), tmp_path / "calls.txt"
    root, env = setup_copy(tmp_path, "exit 1", plain if installed == "pin" else "", log)
    if installed == "pin":
        (root / ".venv" / ".arat-installed").write_text(f"{root}\n")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "uname").write_text("#!/usr/bin/env bash\necho Darwin\n")
    (bin_ / "uname").chmod(0o755)
    env["PATH"] = f"{bin_}:{os.environ['PATH']}"
    result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    calls = log.read_text()
    if installed == "pin":
        assert result.returncode == 0 and "-m pip install" not in calls, result.stderr
        return
    assert result.returncode == 1 and "-c .venv/constraints-macos.txt" in calls
    constraints = (root / ".venv" / "constraints-macos.txt").read_text()
    assert [line for line in constraints.splitlines() if line.startswith("torch==")] == [f"torch=={plain}"]
    assert "arm64 Mac" in result.stderr and "ARAT_TORCH_INDEX" not in result.stderr


OLD_PYTHON = 'case "$*" in *version_info*) exit 1 ;; *python_version*) echo 3.8.10 ;; esac\n'
NO_ENSUREPIP = ('case "$*" in *"-m venv"*) mkdir -p .venv/bin; echo "The virtual environment was not created'
                ' successfully because ensurepip is not"; echo "available. On Debian/Ubuntu systems, ..."; exit 1 ;;'
                ' esac\n')  # fmt: skip


@pytest.mark.parametrize(
    ("python", "says"),
    [
        (None, "no python-nowhere on PATH: install Python 3.10 or newer"),
        (OLD_PYTHON, "is Python 3.8.10; the engine needs 3.10 or newer"),
        (NO_ENSUREPIP, "could not make .venv (The virtual environment was not created successfully because"),
    ],
)
def test_setup_without_a_usable_python_says_what_to_do_in_one_line(tmp_path, python, says):
    """No python, one too old, or one without its venv module (Debian's python3-venv missing): each one line, exit
    2, no half-made .venv left (these were bash's or python's own multi-line messages)."""
    root = tmp_path / "copy"
    (root / "scripts").mkdir(parents=True)
    (root / "constraints").mkdir()
    for rel in ("scripts/setup.sh", "scripts/setup_lock.sh", "constraints/cpu.txt", "pyproject.toml"):
        (root / rel).write_bytes((REPO / rel).read_bytes())
    interpreter = "python-nowhere"
    if python is not None:
        interpreter = str(tmp_path / "python3")
        Path(interpreter).write_text(f"#!/usr/bin/env bash\n{python}")
        Path(interpreter).chmod(0o755)
    env = {**os.environ, "PYTHON": interpreter, "ARAT_DATA_DIR": str(tmp_path / "d")}
    result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (root / ".venv").exists()


PINNED = next(
    line.split("==")[1].split()[0]
    for line in (REPO / "constraints/cpu.txt").read_text().splitlines()
    if line.startswith("torch==")
)


def setup_copy(
    tmp_path: Path, on_pip_install: str, version: str | None = None, log: Path | None = None
) -> tuple[Path, dict[str, str]]:
    """setup.sh copied with its constraints into a folder whose .venv/bin/python is a stand-in holding torch
    `version` (default the pin; "": none), running `on_pip_install` (bash) for the engine's pip install and logging
    its calls to `log` if given: (the copy's root, setup's environment)."""
    version = PINNED if version is None else version
    root = tmp_path / "copy"
    (root / "scripts").mkdir(parents=True)
    (root / "constraints").mkdir()
    for rel in ("scripts/setup.sh", "scripts/setup_lock.sh", "constraints/cpu.txt", "pyproject.toml"):
        (root / rel).write_bytes((REPO / rel).read_bytes())
    venv_python = root / ".venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("#!/usr/bin/env bash\n" + (f'echo "python $*" >> {log}\n' if log else "")
                           + f'case "$*" in *importlib.metadata*) [ -z "{version}" ] && exit 1; echo {version} ;;'
                           f' *"-m pip install"*" -e "*) {on_pip_install} ;;'
                           ' *prepare.py*|"- "*) exec python3 "$@" ;; esac\n')  # fmt: skip
    venv_python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "ARAT_KEEP_TORCH"} | {"ARAT_DATA_DIR": str(tmp_path / "d")}
    return root, env


def test_setup_reinstalls_the_engine_of_a_venv_copied_from_another_folder(tmp_path):
    """A .venv copied or moved with its checkout runs the other folder's engine (an editable install) until it is
    installed here: a stamp naming another folder (or an older stamp naming none) installs again, then names this."""
    log = tmp_path / "calls.txt"
    root, env = setup_copy(tmp_path, f"echo install >> {log}")
    stamp = root / ".venv" / ".arat-installed"
    for before, reinstalled in (("/elsewhere/main\n", True), ("", True), (f"{root}\n", False)):
        stamp.write_text(before)
        log.write_text("")
        result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True,
                                text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (log.read_text() == "install\n") == reinstalled, (before, result.stderr)
        said = {"/": "installed for /elsewhere/main:", "": "installed for a folder it did not record:"}
        assert said[before[:1]] in result.stderr if reinstalled else "installed for" not in result.stderr
        assert stamp.read_text().strip() == str(root.resolve())


@pytest.mark.skipif(shutil.which("flock") is None, reason="no flock(1) here: setup.sh runs without its lock")
def test_two_setups_started_together_install_once(tmp_path):
    """The demo and the tests started together on a fresh checkout: the second setup waits for the first (a lock)
    and finds its install done, instead of running pip into the same .venv at the same time."""
    log = tmp_path / "calls.txt"
    root, env = setup_copy(tmp_path, f"echo install >> {log}; sleep 1")
    setups = [subprocess.Popen(["bash", str(root / "scripts" / "setup.sh")], env=env, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]  # fmt: skip
    assert [p.wait(timeout=60) for p in setups] == [0, 0]
    assert log.read_text().splitlines() == ["install"]


FAKE_PREPARE = """import sys, time
from pathlib import Path
out = Path(sys.argv[1]) / "cifar-10-batches-py"
out.mkdir(parents=True, exist_ok=True)
(out.parents[2] / "prepared-into.txt").write_text(sys.argv[1])
for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
    (out / name).write_text(name)
"""


def test_setup_prepares_cifar10_beside_the_data_folder_then_renames_it_into_place(tmp_path):
    """CIFAR-10 was prepared in place: a run started meanwhile from another checkout on the same data folder read
    half-written files as corrupt (and told to delete them). It is now written into a staging folder inside the
    data folder and renamed into place whole, replacing one an older setup cut short (no batches.meta)."""
    root, env = setup_copy(tmp_path, "exit 0")
    prepare = tmp_path / "shared" / "data" / "cifar10" / "prepare.py"  # ../shared/data/cifar10/ from the copy
    prepare.parent.mkdir(parents=True)
    prepare.write_text(FAKE_PREPARE)
    data = Path(env["ARAT_DATA_DIR"])
    (data / "cifar-10-batches-py").mkdir(parents=True)
    (data / "cifar-10-batches-py" / "data_batch_1").write_text("cut short")
    result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0 and "could not prepare" not in result.stderr, result.stderr
    staging = Path((tmp_path / "prepared-into.txt").read_text())
    assert staging.parent == data and staging.name.startswith(".prepare-") and not staging.exists()
    final = data / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    assert sorted(p.name for p in final.iterdir()) == sorted(names)
    assert (final / "data_batch_1").read_text() == "data_batch_1"  # not the one cut short
    assert [p.name for p in data.iterdir()] == ["cifar-10-batches-py"]


def nfs_like_flock(tmp_path: Path, refuse_all: bool = False) -> str:
    """A bin folder holding a `flock` that refuses a file opened only for reading as NFS does (an exclusive flock
    is a write lock there: "Bad file descriptor"), then runs the real one; or that refuses every file (a filesystem
    without locks): the PATH to give."""
    bin_ = tmp_path / "nfs-bin"
    bin_.mkdir()
    read_only = "true" if refuse_all else "(( (8#$(awk '/^flags:/ {print $2}' /proc/$$/fdinfo/\"$1\") & 3) == 0 ))"
    (bin_ / "flock").write_text(f'#!/usr/bin/env bash\nif {read_only}; then echo "flock: $1: Bad file descriptor"'
                                f' >&2; exit 1; fi\nexec {shutil.which("flock")} "$@"\n')  # fmt: skip
    (bin_ / "flock").chmod(0o755)
    return f"{bin_}:{os.environ['PATH']}"


@pytest.mark.skipif(shutil.which("flock") is None or not Path("/proc/self/fdinfo").is_dir(), reason="flock, /proc")
def test_two_setups_on_nfs_install_once_and_a_filesystem_without_locks_goes_on(tmp_path):
    """On NFS, flock on setup.sh opened for reading fails (EBADF), and setup.sh ended there (set -e) on every run:
    it now opens the script read-write there and still installs once for two setups started together. Where no file
    locks at all, it says so in one line and goes on."""
    log = tmp_path / "calls.txt"
    root, env = setup_copy(tmp_path, f"echo install >> {log}; sleep 1")
    env["PATH"] = nfs_like_flock(tmp_path)
    setups = [subprocess.Popen(["bash", str(root / "scripts" / "setup.sh")], env=env, stderr=subprocess.PIPE,
                               text=True) for _ in range(2)]  # fmt: skip
    assert [p.wait(timeout=60) for p in setups] == [0, 0], [p.stderr.read() for p in setups]
    assert log.read_text().splitlines() == ["install"]
    assert not any("could not lock" in p.stderr.read() for p in setups)

    (root / ".venv" / ".arat-installed").unlink()  # installs again: the stamp is gone
    (tmp_path / "none").mkdir()
    env["PATH"] = nfs_like_flock(tmp_path / "none", refuse_all=True)
    result = subprocess.run(["bash", str(root / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    said = [line for line in result.stderr.splitlines() if "could not lock" in line]
    assert said == [
        "setup: could not lock scripts/setup.sh here (a filesystem without file locks, or on NFS the script not "
        "writable by you?): going on unlocked; run one setup at a time in this checkout"
    ]


def demo_folder(tmp_path: Path) -> tuple[Path, Path]:
    """scripts/demo.sh copied beside a setup.sh that does nothing and a .venv/bin/arat that logs its arguments and,
    on a second line, the hint it would give when interrupted: (the copy's root, the log)."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "demo.sh").write_bytes((REPO / "scripts" / "demo.sh").read_bytes())
    (root / "scripts" / "setup.sh").write_text("exit 0\n")
    arat = root / ".venv" / "bin" / "arat"
    arat.parent.mkdir(parents=True)
    log = tmp_path / "arat.txt"
    arat.write_text(f'#!/usr/bin/env bash\necho "$*" >> {log}\necho "$ARAT_CONTINUE_HINT" >> {log}\n')
    arat.chmod(0o755)
    return root, log


def test_demo_continues_an_interrupted_run_and_starts_anew_after_a_finished_one(tmp_path):
    """The demo in runs/demo; run again, it continues an interrupted runs/demo, or, that one finished (or given
    arguments), starts runs/demo-<date>. Interrupted, arat names the command that continues the run: the demo's
    own for runs/demo, the venv's arat (not on the demo user's PATH) for a dated run."""
    root, log = demo_folder(tmp_path)

    def demo(*args: str) -> tuple[str, str, str]:
        log.write_text("")
        result = subprocess.run(["bash", str(root / "scripts" / "demo.sh"), *args], capture_output=True, text=True,
                                timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr
        called, hint = log.read_text().splitlines()
        return called, hint, result.stdout

    assert demo() == ("train --recipe demo --out runs/demo", "`bash scripts/demo.sh` again (without arguments)", "")
    (root / "runs" / "demo").mkdir(parents=True)
    (root / "runs" / "demo" / "config.json").write_text("{}")  # started, interrupted before its results
    called, hint, said = demo()
    assert called == "train --resume runs/demo" and "continuing the interrupted run in runs/demo" in said
    assert hint == "`bash scripts/demo.sh` again (without arguments)"
    called, hint, _ = demo("--set", "train.epochs=1")  # arguments: a new run, which alone takes them
    assert called.startswith("train --recipe demo --out runs/demo-") and called.endswith("--set train.epochs=1")
    run = called.split()[4]
    assert hint == f"`.venv/bin/arat train --resume {run}`"
    (root / "runs" / "demo" / "results.json").write_text("{}")  # finished
    called, _, _ = demo()
    assert called.startswith("train --recipe demo --out runs/demo-"), called


def test_an_interrupted_train_names_the_wrappers_command_when_it_gives_one(monkeypatch, tmp_path):
    import argparse

    from engine.cli import interrupted_line

    (tmp_path / "config.json").write_text("{}")
    args = argparse.Namespace(command="train", run_dir=str(tmp_path))
    monkeypatch.delenv("ARAT_CONTINUE_HINT", raising=False)
    assert f"`arat train --resume {tmp_path}` continues the run" in interrupted_line(args)
    monkeypatch.setenv("ARAT_CONTINUE_HINT", "`bash scripts/demo.sh` again")
    assert interrupted_line(args) == (
        "arat: interrupted; `bash scripts/demo.sh` again continues the run from its last finished epoch"
    )
    # a torchrun rank: torchrun stops every rank (SIGTERM) when one fails, and the stopped ones said "interrupted" only
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert interrupted_line(args).endswith(
        "finished epoch (rank 1: if torchrun stopped this node's ranks because one failed, its error is above)"
    )


TINY = [
    "data.dataset=synthetic",
    "data.synthetic_size=64",
    "model.width=8",
    "train.batch_size=32",
    "train.epochs=1",
    "attack.num_steps=1",
    "eval.attacks=clean",
    "eval.num_examples=32",
    "eval.batch_size=32",
    "method.balance_images=32",
    "perf.device=cpu",
]


REPRODUCE_SETTINGS = ("ARCH", "DATASET", "SEEDS", "METHODS", "ABLATIONS", "SWA", "NPROC", "DATA_DIR", "ARAT_DATA_DIR",
                      "ARREST_SET", "ARAT", "TORCHRUN")  # fmt: skip


def reproduce_env(**env: str) -> dict[str, str]:
    """The test's environment without the caller's own reproduce.sh settings, plus `env`."""
    return {k: v for k, v in os.environ.items() if k not in REPRODUCE_SETTINGS} | env


def reproduce(out: Path, env: dict[str, str], *sets: str) -> subprocess.CompletedProcess:
    args = [a for s in sets for a in ("--set", s)]
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), str(out), *args]
    return subprocess.run(cmd, env=reproduce_env(**env), capture_output=True, text=True, timeout=400)


def test_reproduce_trains_every_method_then_tables_and_a_rerun_trains_nothing(tmp_path):
    """scripts/reproduce.sh on synthetic data at a tiny size: std, AT and ARREST (fine-tuning the std run), the
    table and plot; run again, every run is found done."""
    import sys

    arat = Path(sys.executable).parent / "arat"
    if not arat.exists():
        pytest.skip("no `arat` command beside this python (the package is not installed here)")
    env = {"METHODS": "std at arrest", "ARAT": str(arat), "ARREST_SET": "--set method.finetune_milestones=1"}
    out = tmp_path / "rep"
    first = reproduce(out, env, *TINY)
    assert first.returncode == 0, first.stderr[-2000:]
    for name in ("std-s0", "at-s0", "arrest-s0"):
        assert (out / name / "results.json").is_file()
    config = json.loads((out / "arrest-s0" / "config.json").read_text())
    assert config["method"]["init"] == str((out / "std-s0").resolve()) and config["method"]["finetune_milestones"]
    table = (out / "table.md").read_text()
    assert all(row in table for row in ("| Std. training |", "| AT |", "| ARREST |"))
    assert (out / "tradeoff.png").is_file()
    again = reproduce(out, env | {"PRUNE": "1"}, *TINY)
    assert again.returncode == 0 and again.stdout.count("is done") == 3 and "reproduce: training" not in again.stdout
    # PRUNE=1: each finished run's latest.pt (only needed to train it on) removed, final.pt kept, the table rebuilt
    for name in ("std-s0", "at-s0", "arrest-s0"):
        assert not (out / name / "checkpoints" / "latest.pt").exists()
        assert (out / name / "checkpoints" / "final.pt").is_file()
    assert again.stdout.count("(PRUNE=1; final.pt kept)") == 3 and (out / "table.md").is_file()


@pytest.mark.parametrize(
    ("env", "args", "says"),
    [
        ({"ARCH": "vgg16"}, [], "ARCH=vgg16: resnet18 or wrn34-10"),
        ({"METHODS": "at fgsm"}, [], "unknown method fgsm"),
        ({"DATASET": "cifar100", "ABLATIONS": "1"}, [], "CIFAR-10 recipes only"),
        ({"NPROC": "two"}, [], "NPROC=two"),
        ({"SEEDS": "0 one"}, [], "SEEDS: one is not a seed"),
        ({"SWA": "yes"}, [], "SWA=yes: 0 or 1"),
        ({"PRUNE": "true"}, [], "PRUNE=true: 0 or 1"),
        ({}, ["--sett", "a=b"], "only --set KEY=VALUE pairs"),
        ({}, ["--set"], "only --set KEY=VALUE pairs"),
    ],
)
def test_reproduce_refuses_bad_settings_in_one_line(tmp_path, env, args, says):
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), str(tmp_path / "rep"), *args]
    env = reproduce_env(ARAT="/bin/true", **env)  # a machine without arat still reaches every check
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and says in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "rep").exists()


def test_reproduce_takes_relative_paths_from_the_callers_folder(tmp_path):
    """ARAT, OUT_DIR and DATA_DIR given relative to the folder reproduce.sh is called from (it works from the
    checkout): a stand-in arat there logs its calls."""
    fake_arat(tmp_path)
    env = reproduce_env(ARAT="bin/arat", METHODS="std", DATA_DIR="mydata")
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), "out"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    train, table, plot = (tmp_path / "calls.txt").read_text().splitlines()
    assert train.startswith(f"train --out {tmp_path / 'out' / 'std-s0'} --data-dir {tmp_path / 'mydata'} ")
    assert table.startswith(f"table {tmp_path / 'out' / 'std-s0'} --out ") and "--plot" in plot


def fake_arat(folder: Path, fails: str = "") -> None:
    """bin/arat in `folder`: logs its calls to calls.txt; `train --out RUN` writes RUN/config.json (its recipe) and
    RUN/results.json, or exits 1 where the recipe starts with `fails`."""
    (folder / "bin").mkdir()
    fake = folder / "bin" / "arat"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {folder / "calls.txt"}
[ "$1" = train ] && [ "$2" = --out ] || exit 0
run=$3; recipe=$(echo "$*" | sed 's/.*--recipe \\([^ ]*\\).*/\\1/')
mkdir -p "$run"; printf '{{\\n  "recipe": "%s"\\n}}\\n' "$recipe" > "$run/config.json"
if [ -n "{fails}" ] && [[ $recipe == {fails}* ]]; then exit 1; fi
echo '{{}}' > "$run/results.json"
""")
    fake.chmod(0o755)


def test_reproduce_goes_on_past_a_failed_run_and_tables_the_finished_ones(tmp_path):
    """helper-90: one failed run stopped every later method and seed, and the table never came; now the others run,
    the table holds the finished runs, the failure is named and the exit is 1. A rerun resumes the failed run with
    only the perf.*/dist.* settings (said), and no --data-dir where none was given (its own data folder kept)."""
    fake_arat(tmp_path, fails="at-")
    env = reproduce_env(ARAT="bin/arat", METHODS="std at arat")
    sets = ["--set", "perf.compile=off", "--set", "train.epochs=2", "--set", "eval.chunk_size=16", "--set",
            "dist.sync_bn=true"]  # fmt: skip
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), "out", *sets]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "1 run(s) failed:" in result.stderr and "at-s0 (exit 1)" in result.stderr
    calls = (tmp_path / "calls.txt").read_text().splitlines()
    assert [c.split()[2].rsplit("/", 1)[1] for c in calls if c.startswith("train")] == ["std-s0", "at-s0", "arat-s0"]
    assert "--data-dir" not in calls[0]
    table = next(c for c in calls if c.startswith("table") and "--out" in c)
    runs = {Path(a).name for a in table.split()[1:] if a.startswith(str(tmp_path))}
    assert runs == {"std-s0", "arat-s0", "table.md"}  # the finished runs (and --out's table.md), not at-s0
    (tmp_path / "calls.txt").unlink()
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    resumed = next(c for c in (tmp_path / "calls.txt").read_text().splitlines() if c.startswith("train"))
    assert resumed == f"train --resume {tmp_path / 'out' / 'at-s0'} --set perf.compile=off --set eval.chunk_size=16"
    assert "train.epochs=2 dist.sync_bn=true not taken" in again.stderr and again.stdout.count("is done") == 2


def test_reproduce_stops_when_interrupted_whatever_the_run_s_exit_status(tmp_path):
    """Ctrl-C reaches the run and the script alike; under torchrun the run's status need not be 130, and the script
    then went on to the next run: it stops (130) after the interrupted one."""
    (tmp_path / "bin").mkdir()
    fake = tmp_path / "bin" / "arat"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {tmp_path / "calls.txt"}\n[ "$1" = train ] || exit 0\n'
                    'kill -INT $PPID\nexit 1\n')  # fmt: skip
    fake.chmod(0o755)
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), "out"]
    result = subprocess.run(cmd, env=reproduce_env(ARAT="bin/arat", METHODS="std at"), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 130 and len((tmp_path / "calls.txt").read_text().splitlines()) == 1


def test_reproduce_under_torchrun_keeps_the_batch_of_128(tmp_path):
    """train.batch_size is each process's: NPROC=8 trained 8 x 128 = 1,024 images per step at the recipes' rate
    (SWA averaging 2 snapshots instead of 20). The script gives each process 128/NPROC, unless the caller sets a
    batch; an NPROC that does not divide 128 is refused in one line."""
    (tmp_path / "bin").mkdir()
    calls = tmp_path / "calls.txt"
    for name in ("arat", "torchrun"):
        stand_in = tmp_path / "bin" / name
        stand_in.write_text(f'#!/usr/bin/env bash\necho "{name} $*" >> {calls}\n[ "$1" = table ] || exit 1\n')
        stand_in.chmod(0o755)
    env = {"ARAT": "bin/arat", "TORCHRUN": "bin/torchrun", "METHODS": "at"}
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), "out"]
    result = subprocess.run(cmd, env=reproduce_env(NPROC="8", **env), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert "--nproc_per_node 8 -m engine.cli train" in calls.read_text()
    assert "--set train.batch_size=16" in calls.read_text() and "8 processes x 16 images" in result.stdout
    calls.unlink()
    result = subprocess.run([*cmd, "--set", "train.batch_size=32"], env=reproduce_env(NPROC="8", **env), cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "train.batch_size=16" not in calls.read_text() and "train.batch_size=32" in calls.read_text()
    calls.unlink()
    result = subprocess.run(cmd, env=reproduce_env(NPROC="3", **env), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 2 and "NPROC=3 does not divide the recipes' batch of 128" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not calls.exists()
    result = subprocess.run(cmd, env=reproduce_env(NPROC="1", **env), cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert "arat train" in calls.read_text() and "train.batch_size" not in calls.read_text()


STAND_IN_RUN = """#!{python}
import pathlib, signal, sys, time

def stop(signum, frame):  # as arat: SIGTERM ends the command like Ctrl-C
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, stop)
log = pathlib.Path({log!r})
with log.open("a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if sys.argv[1] != "train":
    sys.exit(0)
try:
    pathlib.Path({ready!r}).touch()
    time.sleep(60)
except KeyboardInterrupt:
    with log.open("a") as f:
        f.write("saved and stopped\\n")
    sys.exit(130)
"""


@pytest.mark.parametrize(("signum", "to_group", "status"), [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)])
def test_reproduce_passes_a_signal_to_its_run_and_stops(tmp_path, signum, to_group, status):
    """SIGTERM to the script (`timeout`, `kill`, a scheduler) killed it and left its run training on, orphaned and
    holding the run's lock; Ctrl-C (SIGINT to the whole group) must still stop the run too. Either way the run is
    told to stop, the script waits for it to save, and ends without starting the next one."""
    import sys
    import time

    (tmp_path / "bin").mkdir()
    stand_in = tmp_path / "bin" / "arat"
    log, ready = tmp_path / "calls.txt", tmp_path / "ready"
    stand_in.write_text(STAND_IN_RUN.format(python=sys.executable, log=str(log), ready=str(ready)))
    stand_in.chmod(0o755)
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), "out"]
    script = subprocess.Popen(cmd, env=reproduce_env(ARAT="bin/arat", METHODS="std at"), cwd=tmp_path,
                              start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the stand-in run never started"
        if to_group:
            os.killpg(script.pid, signum)
        else:
            os.kill(script.pid, signum)
        assert script.wait(timeout=60) == status
        calls = log.read_text().splitlines()  # one run started (std), stopped, and no other
        assert len(calls) == 2 and calls[0].startswith("train --out") and calls[1] == "saved and stopped"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(script.pid, signal.SIGKILL)


def test_reproduce_starts_no_run_after_a_signal_between_runs(tmp_path):
    """A SIGTERM while the script reads a run's folder (between runs, no child to pass it to) let the next run start
    and train to its end; now no run starts after it. The signal comes from a `grep` stand-in the script calls
    while reading the interrupted run's config.json."""
    import shutil as sh

    (tmp_path / "bin").mkdir()
    calls, pid_file = tmp_path / "calls.txt", tmp_path / "pid"
    (tmp_path / "bin" / "arat").write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n')
    (tmp_path / "bin" / "grep").write_text(
        f'#!/usr/bin/env bash\n[ -e {tmp_path}/sent ] || {{ touch {tmp_path}/sent; kill -TERM "$(cat {pid_file})"; }}\n'
        f'exec {sh.which("grep")} "$@"\n'
    )
    for name in ("arat", "grep"):
        (tmp_path / "bin" / name).chmod(0o755)
    (tmp_path / "out" / "std-s0").mkdir(parents=True)
    (tmp_path / "out" / "std-s0" / "config.json").write_text('{"recipe": "std-resnet18-cifar10"}')
    env = reproduce_env(ARAT="bin/arat", METHODS="std at") | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    script = subprocess.Popen(["bash", "-c", f"echo $$ > {pid_file}; sleep 0.5; exec bash "
                               f"{REPO / 'scripts' / 'reproduce.sh'} out"], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert script.wait(timeout=60) == 143
    assert (tmp_path / "sent").exists() and not calls.exists()  # neither the resume nor the next run started


def test_reproduce_refuses_an_out_dir_holding_another_arch_s_runs(tmp_path):
    """Run folders are named by method: the same OUT_DIR for another ARCH/DATASET found every run "done" (the first
    table again) or resumed the other network; now one line, before anything runs."""
    fake_arat(tmp_path)
    env = reproduce_env(ARAT="bin/arat", METHODS="std")
    cmd = ["bash", str(REPO / "scripts" / "reproduce.sh"), "out"]
    assert subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60).returncode == 0
    other = subprocess.run(cmd, env=env | {"DATASET": "cifar100"}, cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)  # fmt: skip
    assert other.returncode == 2 and "holds a std-resnet18-cifar10 run, not std-resnet18-cifar100" in other.stderr
