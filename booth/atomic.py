"""Files that are either complete or absent, and the folders they go in: atomic writes (a crash, Ctrl-C or a full
disk never leaves a partial file under the final name), the clean-up of temporaries a killed process left, a full
disk reported as such, run folders, and a lock that keeps two processes out of one run folder."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import BoothError

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

# .NAME.PID.RANDOM.tmp, NAME cut so that the temporary's name stays within the 255 bytes file systems allow
_TEMP = re.compile(r"\..*\.(\d+)\.[a-z0-9_]{8}\.tmp")
_OLD_TEMP = re.compile(r"\..*\.[a-z0-9_]{8}\.tmp")  # booth 0.1's temporaries carried no process id
_DISK_FULL = ("no space left", "storagefull", "disk quota exceeded", "file write failed")


class DiskFull(BoothError):
    """The disk filled up while `path` was written; the message says what to do (`then`)."""

    def __init__(self, path: Path, then: str = "run the command again"):
        self.path = path
        super().__init__(f"the disk is full (while writing {path}): free some space, then {then}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name[:200]}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the mode a plain open() would
        os.replace(tmp, path)
    except BaseException as e:
        full = isinstance(e, Exception) and disk_full(e, path.parent)  # before the temporary frees its space
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if full:
            raise DiskFull(path) from None
        raise


def disk_full(error: BaseException, folder: Path) -> bool:
    """Whether `error` (an OSError, or what safetensors and torch.save raise instead) means the disk is full."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(error).lower()
    if not any(s in text for s in _DISK_FULL):
        return False
    if "file write failed" not in text:  # torch.save says only this; then the free space decides
        return True
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free < 64 << 20
    return False


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def clean_stale(folder: Path, recursive: bool = False) -> list[Path]:
    """Remove the temporaries of writers that no longer run (a kill -9 during a save leaves a 2-10 GB one); a
    temporary of a live process is left alone. `recursive` is for booth's own run folders, where booth 0.1's
    temporaries (no pid in the name) older than an hour go too. Returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for p in folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"):
        if p.is_file() and stale(p, legacy=recursive):
            with contextlib.suppress(OSError):
                p.unlink()
                removed.append(p)
    return removed


def stale(p: Path, legacy: bool = False) -> bool:
    """Whether `p` is a temporary (file or folder) of a writer that no longer runs."""
    if m := _TEMP.fullmatch(p.name):
        return not _alive(int(m.group(1)))
    with contextlib.suppress(OSError):
        return legacy and bool(_OLD_TEMP.fullmatch(p.name)) and time.time() - p.stat().st_mtime > 3600
    return False


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def locked(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block (`what`: what the holder does, for the others' message): a second booth
    process on the same folder gets a one-line error. The lock is the kernel's (flock), so a killed process never
    leaves it taken."""
    if fcntl is None:
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another booth process"
            raise BoothError(f"{folder} is in use by booth process {holder}; wait for it to finish or stop it "
                             "first") from None  # fmt: skip
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()} ({what})")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def check_writable(out: Path) -> None:
    """BoothError unless `out` is, or can be made as, a folder this process can write in."""
    probe = out
    try:
        while not probe.exists():
            probe = probe.parent
    except OSError as e:  # a name longer than the file system allows, say
        raise BoothError(f"cannot use {out} as an output folder: {e.strerror or e}") from None
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise BoothError(f"cannot write to output folder {out} ({probe} is not a writable folder)")


def new_run_dir(out: Path) -> Path:
    """OUT/runK with the next free K, created atomically so two runs never share a folder."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        taken = [int(m.group(1)) for p in out.iterdir() if (m := re.fullmatch(r"run(\d+)", p.name))]
    except OSError as e:
        raise BoothError(f"cannot create output folder {out}: {e.strerror or e}") from None
    k = max(taken, default=-1) + 1
    while True:
        try:
            (out / f"run{k}").mkdir()
            return out / f"run{k}"
        except FileExistsError:
            k += 1
        except OSError as e:
            raise BoothError(f"cannot write to {out}: {e.strerror or e}") from None
