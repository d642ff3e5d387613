"""The one atomic writer: every file the suite writes (records, tables, checkpoints, caches, figures, the report),
and every folder it publishes whole (the tokenized caches: ``atomic_folder``).

A file appears complete or not at all: the content goes to a temporary file beside the target, is fsynced and
renamed over it in one step, so a reader (Snakemake, a browser reloading the report, a colleague's script)
never sees half a file, and a crash, a kill or a full disk leaves the previous version in place. The result has
the permissions a plain ``open()`` would give (``0o666`` less the umask): ``mkstemp`` creates temporaries
private (0600), and a record or table readable only by its writer is useless on a shared cluster. Temporary
files are named ``.<name>.<host>-<pid>.<random>.tmp`` so that the next writer of the same path removes those
of writers that were killed on this machine.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pandas is imported by the callers that have tables; a training job need not pay for it
    import pandas as pd


class NotWritable(OSError):
    """A results folder that cannot be written (read-only checkout, permissions); the message names it."""


def ensure_writable(folder: str | Path) -> Path:
    """Create ``folder`` if needed and prove a file can be written in it, or raise ``NotWritable`` naming it.

    Called before training, so a read-only results folder costs a second, not a finished run.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise NotWritable(exc.errno or errno.EACCES,
                          f"cannot write to the results directory {folder}: {exc.strerror or exc} "
                          f"({exc.filename or folder}); make it writable or write the results elsewhere "
                          "(results_dir in the study, --out on the command line)") from exc
    return folder


def _host_tag() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def temporary_prefix(path: Path) -> str:
    """``.<name>.<host>-<pid>.``: tells a later writer whose temporary file it finds (a process id means
    nothing on another node of a cluster sharing the folder)."""
    return f".{path.name}.{_host_tag()}-{os.getpid()}."


def remove_stale_temporaries(path: str | Path) -> None:
    """Delete temporary files (and folders) of ``path`` left by writers on this machine that were killed."""
    path = Path(path)
    host = _host_tag()
    for tmp in path.parent.glob(glob.escape(f".{path.name}.{host}-") + "*.tmp"):
        pid = tmp.name[len(path.name) + len(host) + 3:].split(".", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
        except OSError:
            pass


@contextlib.contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` for the block to write; when the block succeeds, the file is
    fsynced and renamed over ``path``. A failure removes the temporary file and leaves ``path`` as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp")
    os.close(fd)
    try:
        yield Path(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``path`` for the block to fill; when the block succeeds it is renamed to
    ``path`` in one step, so parallel jobs never see half a folder. For caches whose content is a function of
    their name: when another writer published ``path`` first, theirs is kept (it is identical) and ours removed.
    A failure removes the temporary folder and leaves ``path`` as it was. ``path`` must not be on another
    filesystem than its parent folder (it never is: the temporary folder is created beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    temporary = Path(tempfile.mkdtemp(dir=path.parent, prefix=temporary_prefix(path), suffix=".tmp"))
    try:
        yield temporary
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o777 & ~umask)  # mkdtemp makes it private (0700), useless on a shared cluster
        try:
            os.rename(temporary, path)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not path.is_dir():
                raise
            shutil.rmtree(temporary, ignore_errors=True)  # another job published the same cache first
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def replace_atomically(path: str | Path, write_temporary: Callable[[str], object]) -> None:
    """Have ``write_temporary(tmp_path)`` write the temporary file (for writers that want a file name:
    ``torch.save``, pandas, matplotlib), then publish it as ``atomic_output`` does."""
    with atomic_output(path) as temporary:
        write_temporary(str(temporary))


def write_text(text: str, path: str | Path) -> None:
    """``path`` holds ``text`` (UTF-8), written atomically."""
    with atomic_output(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_table(table: pd.DataFrame, path: str | Path) -> None:
    """``path`` (``.parquet``, else CSV) holds ``table`` without its index, written atomically."""
    with atomic_output(path) as temporary:
        if Path(path).suffix == ".parquet":
            table.to_parquet(temporary, index=False)
        else:
            table.to_csv(temporary, index=False)


def write_named_tables(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> dict[str, Path]:
    """Each table as ``<out_dir>/<name>.parquet`` and ``.csv`` (for reading by hand), atomically; returns the
    parquet paths by name."""
    out_dir = Path(out_dir)
    written = {}
    for name, table in tables.items():
        for suffix in (".parquet", ".csv"):
            write_table(table, out_dir / f"{name}{suffix}")
        written[name] = out_dir / f"{name}.parquet"
    return written
