"""booth.atomic: complete-or-absent files, stale temporaries, a full disk told apart, one process per run folder."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from booth.atomic import DiskFull, atomic_path, clean_stale, disk_full, locked, write_text
from booth.errors import BoothError


def test_a_temporary_carries_its_writers_pid_and_an_interrupted_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "model.safetensors") as tmp:
        assert tmp.parent == tmp_path and f".{os.getpid()}." in tmp.name
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    long = "x" * 250 + ".png"  # the final name fits in 255 bytes; its temporary must too
    write_text(tmp_path / long, "ok")
    assert (tmp_path / long).read_text() == "ok"


def test_stale_temporaries_go_and_live_ones_stay(tmp_path):
    """A process killed during a write (kill -9) leaves its temporary; the next start removes it."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        nested = tmp_path / "ckpts"
        nested.mkdir()
        dead = nested / ".step-000004.safetensors.99999999.k2j3h4g5.tmp"
        live = nested / f".step-000008.safetensors.{child.pid}.k2j3h4g5.tmp"
        mine = tmp_path / f".args.yaml.{os.getpid()}.k2j3h4g5.tmp"
        old = tmp_path / ".metrics.jsonl.k2j3h4g5.tmp"  # booth 0.1: no pid in the name
        young_old = tmp_path / ".prompt.txt.a2b3c4d5.tmp"
        other = tmp_path / ".notes.tmp"  # not booth's pattern
        for p in (dead, live, mine, old, young_old, other):
            p.write_bytes(b"x")
        os.utime(old, (time.time() - 7200,) * 2)
        assert clean_stale(tmp_path) == []  # only the folder itself, and only pid-named ones
        assert sorted(clean_stale(tmp_path, recursive=True)) == sorted(
            [dead, old]
        )  # a run folder: all booth's
        assert all(p.exists() for p in (live, mine, young_old, other))
    finally:
        child.kill()
        child.wait()
    assert clean_stale(tmp_path, recursive=True) == [live], "its writer is gone now"


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(28, "No space left on device"), True),
        (OSError(122, "Disk quota exceeded"), True),
        (
            RuntimeError(
                'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })'
            ),
            True,
        ),
        (PermissionError(13, "Permission denied"), False),
        (RuntimeError("CUDA error: an illegal memory access"), False),
    ],
)
def test_disk_full_is_told_from_other_errors(tmp_path, error, full):
    assert disk_full(error, tmp_path) is full


def test_torch_saves_file_write_failed_counts_as_full_only_when_the_disk_is(tmp_path, monkeypatch):
    """torch.save's RuntimeError does not say why a write failed; the free space does."""
    error = RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
                         "data/0: file write failed")  # fmt: skip
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("booth.atomic.shutil.disk_usage", lambda p: usage._replace(free=1 << 20))
    assert disk_full(error, tmp_path)
    monkeypatch.setattr("booth.atomic.shutil.disk_usage", lambda p: usage._replace(free=100 << 30))
    assert not disk_full(error, tmp_path)


def test_a_full_disk_during_an_atomic_write_is_diskfull_and_leaves_nothing(tmp_path):
    with (
        pytest.raises(
            DiskFull, match="the disk is full .*a.bin.*free some space, then run the command again"
        ),
        atomic_path(tmp_path / "a.bin") as tmp,
    ):
        tmp.write_bytes(b"part")
        raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_one_process_per_folder(tmp_path):
    script = f"""
import sys, time
from pathlib import Path
from booth.atomic import locked
with locked(Path({str(tmp_path)!r}), "a test"):
    print("held", flush=True)
    time.sleep(60)
"""
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(
                BoothError, match=f"{tmp_path} is in use by booth process {holder.pid} \\(a test\\)"
            ),
            locked(tmp_path, "another"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with locked(tmp_path, "after a kill -9, the lock is free again"):
        pass
