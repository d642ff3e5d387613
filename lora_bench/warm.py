"""A warm worker: training jobs fork from a process that has already imported torch and transformers.

Every training job is its own ``python -m lora_bench train`` process, so Snakemake keeps its semantics (one
record per run, each run resumable and re-run on its own). But a fresh process spends about 2.5 s of a 5 s
set-up importing torch, transformers' model code and datasets before it can load anything. A warm worker pays
that once: it imports them and waits on a Unix socket; each ``train`` command connects, hands over its argv,
working folder, environment and its stdin/stdout/stderr (SCM_RIGHTS), and the worker forks a child that runs
the command exactly as the process would have (same code, same arguments; the run seeds everything itself), writes
to the job's own log, and exits with its code, which the command then exits with. The command still *is* the
job for Snakemake: killing it kills the child (the worker watches the connection), and a child killed by a
signal makes the command die by the same signal.

When it is used (``LORA_BENCH_WARM=1``, which the Snakefile sets; anything else keeps one process per run):

- only on a machine without an NVIDIA device: a forked child cannot use CUDA once its parent touched the
  driver, and importing transformers can touch it;
- not under fault injection (``LORA_BENCH_FAULT``): the reliability tests kill a run's own process group;
- the worker is keyed by the Python executable and the size and modification time of every file of the
  package, so editing the code starts a new worker instead of running stale code; it exits after
  ``IDLE_SECONDS`` without work.

The first job finds no worker, starts one in the background and runs in its own process; later jobs fork.
``timing.setup_s`` still counts from the start of the job's own command (``PROCESS_STARTED_ENV``), and the
record's ``timing.warm_worker`` says which way a run went.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ENABLE_ENV = "LORA_BENCH_WARM"
PROCESS_STARTED_ENV = "LORA_BENCH_PROCESS_STARTED"
IN_WORKER_ENV = "LORA_BENCH_IN_WARM_WORKER"
IDLE_SECONDS = 120.0
CONNECT_TIMEOUT_S = 2.0
# What a training job imports before its first step; importing them here is the whole saving.
PRELOAD = ("torch", "transformers", "datasets", "numpy", "lora_bench.run.train", "lora_bench.run.causal_lm",
           "lora_bench.run.record", "lora_bench.run.checkpoint", "transformers.models.bert.modeling_bert",
           "transformers.models.distilbert.modeling_distilbert", "transformers.models.roberta.modeling_roberta",
           "transformers.models.llama.modeling_llama")
_PACKAGE = Path(__file__).resolve().parent


def worker_key() -> str:
    """A digest of the interpreter and the package's files (path, size, mtime): a code edit changes it."""
    digest = hashlib.sha256(f"{sys.executable}:{_PACKAGE}".encode())
    for path in sorted(_PACKAGE.rglob("*")):
        if path.is_file() and path.suffix in (".py", ".yaml", ".json", ".j2"):
            stat = path.stat()
            digest.update(f"{path.relative_to(_PACKAGE)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def socket_path() -> Path:
    """Where this code's worker listens: the temp folder (a Unix socket path must stay under ~100 bytes)."""
    return Path(tempfile.gettempdir()) / f"lora-bench-warm-{os.getuid()}-{worker_key()}.sock"


def wanted() -> bool:
    """Whether this command should use a warm worker (see the module docstring)."""
    return (os.environ.get(ENABLE_ENV) == "1" and IN_WORKER_ENV not in os.environ
            and "LORA_BENCH_FAULT" not in os.environ and not Path("/dev/nvidiactl").exists())


def own_start_time(fallback: float | None = None) -> float:
    """``time.time()`` at which this process started (Linux /proc), else ``fallback`` (default: now)."""
    try:
        with open("/proc/self/stat") as stat:
            start_ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time() if fallback is None else fallback


def delegate(argv: list[str], path: Path | None = None) -> int | None:
    """Run ``argv`` (a ``lora_bench`` command line) in the warm worker and return its exit code.

    None when no worker is listening (one is then started in the background for the next job) or the
    connection fails before the command started: the caller runs the command itself. ``path``: the worker's
    socket, by default this code's (``socket_path``).
    """
    explicit = path is not None
    path = path or socket_path()
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(CONNECT_TIMEOUT_S)
    try:
        connection.connect(str(path))
        payload = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ),
                              "started": own_start_time()}).encode()
        socket.send_fds(connection, [len(payload).to_bytes(8, "little") + payload], [0, 1, 2])
        connection.settimeout(None)
        reply = _read_all(connection)
    except (FileNotFoundError, ConnectionRefusedError):
        connection.close()
        if not explicit:
            start_worker(path)
        return None
    except OSError:
        connection.close()
        return None
    connection.close()
    if not reply:
        # The worker died under the child; the child may have done anything, so this is a failure, not a retry.
        print("lora-bench: the warm worker went away during the run", file=sys.stderr)
        return 1
    outcome = json.loads(reply)
    if outcome.get("signal"):
        # Die the way the run died, so that Snakemake (and the kill/resume guarantees) see the same thing.
        if outcome["signal"] not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(outcome["signal"], signal.SIG_DFL)
        os.kill(os.getpid(), outcome["signal"])
    return int(outcome.get("code", 1))


def _read_all(connection: socket.socket) -> bytes:
    chunks = []
    while chunk := connection.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def start_worker(path: Path) -> None:
    """Start a worker for ``path`` in the background unless another job is starting one right now."""
    lock = open(str(path) + ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return
    if path.exists():
        # A socket file nobody answers on: a worker that was killed. Its lock is free, so it is gone.
        path.unlink(missing_ok=True)
    # The lock passes to the worker (inherited descriptor) and is released when it exits.
    # The worker must import this very package (not whatever ``-m lora_bench`` finds first on its path).
    command = (f"import sys; sys.path.insert(0, {str(_PACKAGE.parent)!r}); from lora_bench.cli import main; "
               f"sys.exit(main(['warm-serve', '--socket', {str(path)!r}]))")
    subprocess.Popen([sys.executable, "-c", command],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, pass_fds=(lock.fileno(),), close_fds=True,
                     env={**os.environ, IN_WORKER_ENV: "1"})
    lock.close()


def serve(path: str | Path, run: Callable[[list[str]], int], idle_seconds: float = IDLE_SECONDS,
          preload: tuple[str, ...] = PRELOAD) -> None:
    """Import ``preload``, listen on ``path`` and fork ``run(argv)`` for each connection until idle.

    Single-threaded on purpose: forking a process with threads running is unsafe, so the loop uses
    ``select`` and non-blocking ``waitpid``, and the worker never runs a torch operation itself (no
    OpenMP pool exists to be broken in the children).
    """
    path = Path(path)
    with open(str(path) + ".lock", "a") as lock:
        # Who is listening (tests and `stop_worker` read it); the spawning job holds the lock open for us.
        lock.truncate(0)
        lock.write(str(os.getpid()))
    for module in preload:
        try:
            importlib.import_module(module)
        except ImportError:
            pass  # an optional architecture or extra: the child imports what it needs
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    staging = path.with_name(f"{path.name}.{os.getpid()}")
    listener.bind(str(staging))
    listener.listen(16)
    # Appears under its name only now that the imports are done: a job connects to a ready worker or none.
    os.replace(staging, path)
    mine = path.stat()
    children: dict[int, socket.socket] = {}
    last_active = time.monotonic()
    try:
        while children or time.monotonic() - last_active < idle_seconds:
            readable, _, _ = select.select([listener, *children.values()], [], [], 0.5)
            for ready in readable:
                if ready is listener:
                    connection, _ = listener.accept()
                    pid = _fork_child(connection, listener, children, run)
                    if pid:
                        children[pid] = connection
                elif not ready.recv(1, socket.MSG_PEEK):
                    # The job's command was killed: so is its run, as it would be without the worker.
                    pid = next(p for p, c in children.items() if c is ready)
                    os.kill(pid, signal.SIGKILL)
            for pid in list(children):
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    connection = children.pop(pid)
                    outcome = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
                               else {"code": os.WEXITSTATUS(status)})
                    try:
                        connection.sendall(json.dumps(outcome).encode())
                    except OSError:
                        pass
                    connection.close()
                    last_active = time.monotonic()
            if not path.exists():
                break  # removed (a clean-up, or a newer worker took over): stop taking work
    finally:
        listener.close()
        try:
            if os.path.samestat(mine, path.stat()):
                path.unlink()  # only our own socket: a newer worker may have taken the name
        except OSError:
            pass


def _fork_child(connection: socket.socket, listener: socket.socket, children: dict,
                run: Callable[[list[str]], int]) -> int | None:
    """Receive one job and fork its child; the child never returns from here."""
    connection.settimeout(CONNECT_TIMEOUT_S)
    try:
        message, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
        size = int.from_bytes(message[:8], "little")
        while len(message) < 8 + size:
            message += connection.recv(8 + size - len(message))
        job = json.loads(message[8:8 + size])
    except (OSError, ValueError):
        connection.close()
        return None
    connection.settimeout(None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        return pid
    code = 1
    try:
        listener.close()
        for other in children.values():
            other.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        os.environ[PROCESS_STARTED_ENV] = repr(job["started"])
        os.environ[IN_WORKER_ENV] = "1"
        sys.argv = ["lora_bench", *job["argv"]]
        code = run(job["argv"])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must always exit here, never return into the worker loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 1)



def worker_pid(path: Path | None = None) -> int | None:
    """The pid of the worker serving ``path`` (default: this code's), if one is running."""
    lock = Path(str(path or socket_path()) + ".lock")
    try:
        pid = int(lock.read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_worker(path: Path | None = None) -> None:
    """Ask the worker serving ``path`` to stop taking work: removing its socket makes it exit after its runs."""
    Path(path or socket_path()).unlink(missing_ok=True)
