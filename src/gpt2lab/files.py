"""Writing files so that a crash, a kill or a full disk never leaves a torn one under its final name.

Every file is written to a temporary name beside its target, flushed and fsynced, then renamed over
it (a rename is atomic); a directory is filled the same way and swapped in. Running out of disk space
becomes one clear error that names the device and the file, with the temporary file removed. A run
directory is held by an exclusive OS lock, which the kernel drops when the process dies.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

from gpt2lab.errors import GPT2LabError

LOCK_FILE = ".lock"


class DiskFullError(GPT2LabError):
    """A write failed because its file system is full."""


def fsync_dir(directory: Path) -> None:
    """Flush a directory's entries (the names of new files and renames) to disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def disk_space(path: Path, need_bytes: int | None = None) -> Iterator[None]:
    """Turn "no space left on device" inside the block into a DiskFullError naming ``path``."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise DiskFullError(full_message(path, need_bytes)) from None
    except Exception as e:  # torch.save and safetensors report a failed write as their own errors
        if "No space left on device" not in str(e) and not _disk_is_full(path):
            raise
        raise DiskFullError(full_message(path, need_bytes)) from None


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None], need_bytes: int | None = None) -> None:
    """Create or replace ``path`` with what ``write(file)`` writes: all of it or nothing."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with disk_space(path, need_bytes):
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data), len(data))


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2) + "\n")


def append_line(path: str | Path, line: str) -> None:
    """Append one line; a record torn by a crash is the last line, which readers drop (``read_jsonl``)."""
    path = Path(path)
    with disk_space(path), open(path, "a", encoding="utf-8") as f:
        f.write(line.rstrip("\n") + "\n")


def read_jsonl(path: str | Path) -> tuple[list[dict], bool]:
    """The records of a JSON-lines file and whether a torn last line (cut off by a crash) was dropped.
    A bad line before the last is corruption, not a torn write: it raises GPT2LabError."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines) - 1:
                return records, True
            raise GPT2LabError(f"{path}:{i + 1} is not a JSON record; the file is corrupt") from None
        if not isinstance(record, dict):  # JSON, but not a record: written by hand, not torn by a crash
            raise GPT2LabError(f"{path}:{i + 1} is not a JSON record (an object); the file is corrupt")
        records.append(record)
    return records, False


def replace_dir(new: Path, out: Path) -> str | None:
    """Put directory ``new`` at ``out``, replacing what is there (a previous version, or nothing). Once
    ``new`` is in place the work is done: where the previous version cannot be deleted (a read-only
    directory), it is left beside ``out`` and the returned warning says where; else None."""
    if not out.exists():
        os.replace(new, out)
        fsync_dir(out.parent)
        return None
    # two renames: if the process dies between them the old version survives as .NAME.old-PID beside out,
    # which the next restore_abandoned puts back; an interrupt or an error between them puts it back now
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)
        raise
    fsync_dir(out.parent)
    try:
        shutil.rmtree(old)
    except OSError as e:
        return f"{out} is written, but its previous version could not be deleted ({e.strerror}): delete {old}"
    return None


def restore_abandoned(out: Path) -> None:
    """What a process killed between ``replace_dir``'s two renames left: the previous version of
    ``out`` as .NAME.old-PID, its process gone. Put back at ``out`` where nothing is there, else
    deleted (a newer version took its place)."""
    for entry in sorted(_abandoned(out.parent, f".{out.name}.old-")):
        if entry.is_symlink() or not entry.is_dir():
            continue
        if out.exists() or out.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            os.replace(entry, out)


def remove_abandoned(parent: Path, prefix: str) -> None:
    """Delete the entries of ``parent`` named ``prefix`` + PID + ``-...`` (temporary names) whose process is
    gone: what a killed process left. A live PID's entry, whoever's process it is now, is left alone."""
    for entry in _abandoned(parent, prefix):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with suppress(OSError):
                entry.unlink()


def _abandoned(parent: Path, prefix: str) -> Iterator[Path]:
    """The entries of ``parent`` named ``prefix`` + PID (then ``-...`` or nothing) whose process is gone."""
    for entry in parent.glob(glob.escape(prefix) + "*"):
        pid = entry.name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            yield entry


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a number no process has: keep it
        return True
    return True


def remove_dir(path: Path) -> None:
    """Rename first, then delete: a half-deleted directory never keeps its name."""
    trash = path.with_name(f".trash-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.rename(path, trash)
    shutil.rmtree(trash)


@contextmanager
def locked(directory: Path, what: str = "run") -> Iterator[None]:
    """Hold an exclusive lock on ``directory`` (created if needed) for the block; a second holder is
    refused at once with the first one's pid. The kernel releases the lock when the process ends, so a
    killed run never leaves a stale one. A directory made here that holds nothing but the lock at the end
    (a run refused before it wrote anything) is removed."""
    made = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise GPT2LabError(
                f"{directory} is in use by another {what} (pid {holder}); wait for it to finish, stop it, "
                "or use another directory"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            if made and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
                with suppress(OSError):  # another process may have just begun writing there
                    path.unlink()
                    directory.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)


def os_error_message(error: OSError) -> str:
    """One line for a path the operating system refused (``error.filename``): what went wrong where,
    and what to do. A directory that cannot be made because a file is in the way names that file
    ("File exists" or "Not a directory" alone names neither); a temporary file or directory, made
    beside what the user named to be renamed over it, names the directory it was to be made in."""
    path = Path(os.fsdecode(error.filename))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if error.errno in (errno.EEXIST, errno.ENOTDIR) and existing is not None and not existing.is_dir():
        where = "" if existing == path else f" (to make {path})"
        return f"{existing} is a file where a directory is needed{where}; choose another location"
    if path.name.startswith(".") and ".tmp" in path.name:
        return f"{error.strerror or error}: cannot write in {path.parent}; check that it exists and that you may write there"
    return f"{error.strerror or error}: {path}; check that the path exists and that you may read or write there"


def _disk_is_full(path: Path) -> bool:
    probe = path if path.is_dir() else path.parent
    try:
        stat = os.statvfs(probe)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 1 << 20


def full_message(path: Path, need_bytes: int | None = None) -> str:
    need = ""
    if need_bytes:
        size = f"{need_bytes / 1e6:,.0f} MB" if need_bytes >= 1e6 else f"{need_bytes / 1e3:,.0f} kB"
        need = f" (need about {size})"
    return f"no space left on {_device_of(path)} writing {path}{need}; free some space and run the same command again"


def _device_of(path: Path) -> str:
    """The mount point holding ``path`` (what a user knows the disk by)."""
    probe = path.resolve()
    while not probe.exists():
        probe = probe.parent
    while not os.path.ismount(probe) and probe != probe.parent:
        probe = probe.parent
    return str(probe)
