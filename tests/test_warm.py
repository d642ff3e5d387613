"""The warm worker (lora_bench.warm): forked runs equal in-process runs, and the command stays the job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lora_bench import warm

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LORA_BENCH_FAULT", warm.IN_WORKER_ENV)}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **extra}


def _wait_for(predicate, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture(scope="module")
def fake_worker(tmp_path_factory):
    """A worker on its own socket whose 'command' is a tiny function: exit codes, signals, stdio and cwd."""
    path = tmp_path_factory.mktemp("worker") / "w.sock"
    script = (
        "import os, signal, sys\n"
        "from lora_bench.warm import serve\n"
        "def run(argv):\n"
        "    if argv[0] == 'die':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    if argv[0] == 'sleep':\n"
        "        open(argv[1], 'w').write(str(os.getpid())); import time; time.sleep(60)\n"
        "    started = os.environ.get('LORA_BENCH_PROCESS_STARTED') is not None\n"
        "    print('out', os.getcwd(), os.environ.get('PROBE'), started)\n"
        "    return int(argv[1])\n"
        f"serve({str(path)!r}, run, idle_seconds=60, preload=())\n"
    )
    server = subprocess.Popen([sys.executable, "-c", script], env=_env())
    assert _wait_for(path.exists), "the worker did not start"
    yield path
    warm.stop_worker(path)
    server.wait(timeout=10)


def _client(path: Path, *argv: str, cwd: Path, **env) -> subprocess.Popen:
    code = (f"import sys; from pathlib import Path; from lora_bench.warm import delegate; "
            f"sys.exit(delegate(sys.argv[1:], Path({str(path)!r})))")
    return subprocess.Popen([sys.executable, "-c", code, *argv], cwd=cwd, env=_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_command_gets_the_runs_exit_code_output_folder_and_environment(fake_worker, tmp_path):
    client = _client(fake_worker, "ok", "3", cwd=tmp_path, PROBE="seen")
    out, _ = client.communicate(timeout=30)
    assert client.returncode == 3
    assert out.split() == ["out", str(tmp_path), "seen", "True"]


def test_a_run_killed_by_a_signal_kills_its_command_by_the_same_signal(fake_worker, tmp_path):
    client = _client(fake_worker, "die", cwd=tmp_path)
    client.communicate(timeout=30)
    assert client.returncode == -signal.SIGKILL


def test_killing_the_command_kills_its_run(fake_worker, tmp_path):
    pid_file = tmp_path / "child.pid"
    client = _client(fake_worker, "sleep", str(pid_file), cwd=tmp_path)
    assert _wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30)
    child = int(pid_file.read_text())
    client.kill()
    client.wait(timeout=10)

    def gone():
        try:
            state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"

    assert _wait_for(gone, 10), "the run outlived its killed command"


def test_no_worker_means_the_command_runs_itself(tmp_path):
    assert warm.delegate(["train"], tmp_path / "nobody.sock") is None


def test_the_worker_is_keyed_by_the_code(tmp_path, monkeypatch):
    package = tmp_path / "lora_bench"
    package.mkdir()
    (package / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(warm, "_PACKAGE", package)
    before = warm.worker_key()
    (package / "a.py").write_text("x = 22\n")
    assert warm.worker_key() != before


def test_not_wanted_under_fault_injection_inside_a_worker_or_unless_asked(monkeypatch):
    monkeypatch.setenv(warm.ENABLE_ENV, "1")
    monkeypatch.delenv("LORA_BENCH_FAULT", raising=False)
    monkeypatch.delenv(warm.IN_WORKER_ENV, raising=False)
    expected = not Path("/dev/nvidiactl").exists()
    assert warm.wanted() is expected
    monkeypatch.setenv("LORA_BENCH_FAULT", "train_step")
    assert not warm.wanted()
    monkeypatch.delenv("LORA_BENCH_FAULT")
    monkeypatch.setenv(warm.IN_WORKER_ENV, "1")
    assert not warm.wanted()
    monkeypatch.delenv(warm.IN_WORKER_ENV)
    monkeypatch.setenv(warm.ENABLE_ENV, "0")
    assert not warm.wanted()


@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="the warm worker is for CPU machines")
def test_a_forked_training_run_equals_an_in_process_one(tiny_run, tmp_path, monkeypatch):
    """Same record (metrics, diagnostics, params) by both paths; the forked one says so and counts its set-up
    from its own command's start."""
    config = json.dumps(tiny_run)
    # A temp folder of its own, so the worker's socket is this test's: a study running from a checkout with the
    # same package files shares the default socket, and stopping that worker would stop the study's (a socket
    # path must stay under ~100 bytes, hence not under tmp_path).
    private = Path(tempfile.mkdtemp(prefix="lbw", dir="/tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    path = warm.socket_path()

    def train(out: Path, warm_flag: str) -> dict:
        subprocess.run([sys.executable, "-m", "lora_bench", "train", "--config-json", config, "--out", str(out)],
                       cwd=tmp_path, env=_env(LORA_BENCH_WARM=warm_flag, TMPDIR=str(private)), check=True,
                       capture_output=True)
        return json.loads(out.read_text())

    alone = train(tmp_path / "alone.json", "0")
    try:
        train(tmp_path / "first.json", "1")  # starts the worker (and runs by itself)
        assert _wait_for(path.exists, 90), "no worker started"
        forked = train(tmp_path / "forked.json", "1")
    finally:
        warm.stop_worker(path)
        shutil.rmtree(private, ignore_errors=True)
    assert forked["timing"]["warm_worker"] is True and alone["timing"]["warm_worker"] is False
    for section in ("metrics", "diagnostics", "params"):
        assert forked[section] == alone[section], section
    assert 0 < forked["timing"]["setup_s"] < forked["timing"]["wall_time_s"] + 60
