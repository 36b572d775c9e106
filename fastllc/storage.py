"""Files on disk that are whole or absent, however a process ends and however many write at once.

Every file or directory is first written under a hidden temporary name beside its destination,
``.<name>.tmp-<pid>-<n>``, and renamed into place only when complete. The pid in the name lets a later
process tell the temporaries of a process that died (removed by ``remove_stale_temporaries``) from those
of one still writing (kept). When several processes produce the same file or directory, the first
complete one wins and the others adopt it (``publish_file_once``, ``publish_directory``).

An OSError while writing (a full disk, a read-only or missing place) becomes a one-line
``FastLLCError`` naming the destination, and the temporary is removed.
"""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import FastLLCError

_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)(?:-\d+)?$")
_serial = itertools.count()  # two temporaries of one process never share a name


def fastllc_home() -> Path:
    """Where fastllc caches what it makes (runs, compiled kernels): $FASTLLC_HOME, else the user cache dir."""
    if os.environ.get("FASTLLC_HOME"):
        return Path(os.environ["FASTLLC_HOME"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastllc"


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` that carries this process's pid."""
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{next(_serial)}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine). A zombie counts as alive."""
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to another user
        return True
    except OverflowError:
        return False
    return True


def remove(path: Path) -> None:
    """Remove a file or a directory tree if present. Never raises: cleanup must not hide the real error."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in ``folder`` whose writing process no longer exists; return them.

    Temporaries of live processes are kept: they are still being written. (A pid is only meaningful on
    this machine; processes on other machines writing to one network folder are not told apart.)
    """
    try:
        entries = list(Path(folder).iterdir())
    except OSError:  # no such folder (yet), or unreadable: nothing of ours to clean
        return []
    stale = [e for e in entries if (match := _TEMPORARY.match(e.name)) and not pid_alive(int(match[1]))]
    for entry in stale:
        remove(entry)
    return stale


def disk_error(path: Path, err: OSError) -> FastLLCError:
    """The one-line error for an OSError while writing ``path``."""
    if err.errno == errno.ENOSPC:
        return FastLLCError(f"no space left on device while writing {path}: free space and rerun "
                            "(nothing half-written was kept)")
    if err.errno == errno.EDQUOT:
        return FastLLCError(f"disk quota exceeded while writing {path}: free space and rerun "
                            "(nothing half-written was kept)")
    return FastLLCError(f"cannot write {path}: {(err.strerror or str(err)).lower()}")


@contextmanager
def writing(path: Path):
    """Turn an OSError inside the block into the one-line error that names ``path``."""
    try:
        yield
    except OSError as err:
        raise disk_error(path, err) from None


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file (the one place that writes bytes: tests inject a full disk here)."""
    with open(path, "xb") as file:
        file.write(data)


def write_new_file(path: Path, data: bytes) -> None:
    """Write a file inside a temporary directory of ours (it needs no temporary of its own)."""
    _write_file(path, data)


def _write_temporary(path: Path, data: bytes | str) -> Path:
    """A complete temporary sibling of ``path`` holding ``data`` (text is UTF-8); nothing left on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        _write_file(tmp, data.encode() if isinstance(data, str) else data)
    except BaseException:
        remove(tmp)
        raise
    return tmp


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Replace ``path`` with ``data`` (text is UTF-8) in one step: readers see the old file or the new one."""
    path = Path(path)
    with writing(path):
        tmp = _write_temporary(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            remove(tmp)
            raise


def publish_file_once(path: str | os.PathLike, data: bytes | str) -> bool:
    """Write ``path`` unless it exists: the first complete writer wins. True if this call wrote it."""
    path = Path(path)
    with writing(path):
        tmp = _write_temporary(path, data)
        try:
            os.link(tmp, path)  # fails if path exists, unlike rename
            return True
        except FileExistsError:
            return False
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
                raise
            if path.exists():  # a file system without hard links: check, then rename (a narrow race)
                return False
            os.replace(tmp, path)
            return True
        finally:
            remove(tmp)


def publish_directory(tmp: Path, path: Path) -> bool:
    """Rename the complete directory ``tmp`` to ``path`` (absent or empty). False, and ``tmp`` removed,
    when another process has published a non-empty ``path`` first."""
    with writing(path):
        try:
            os.rename(tmp, path)
            return True
        except OSError as err:
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and path.is_dir():
                remove(tmp)
                return False
            raise


def move_aside(path: Path, why: str = "damaged") -> Path | None:
    """Rename ``path`` to ``<name>.<why>-<time>`` beside it, keeping it for inspection; None if it is gone
    (another process moved it first)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = path.with_name(f"{path.name}.{why}-{stamp}-{os.getpid()}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise FastLLCError(f"cannot move {path} aside: {(err.strerror or str(err)).lower()}; remove it and rerun") from None
    return aside


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_can_create_in(path: Path, folder: Path, name: str) -> None:
    """Raise unless entries can be created in ``folder`` (probed with a directory removed at once)."""
    if not folder.is_dir():
        raise FastLLCError(f"cannot write {name}: {folder} is not a directory")
    probe = folder / f".fastllc-probe.tmp-{os.getpid()}-{next(_serial)}"
    try:
        os.mkdir(probe)
    except OSError as err:
        reason = "not a file system one can write to" if err.errno == errno.ENOENT else (err.strerror or str(err)).lower()
        raise FastLLCError(f"cannot write {name}: {folder} is not writable ({reason})") from None
    os.rmdir(probe)


def _named(path: Path, option: str | None) -> str:
    return f"{option} {path}" if option else str(path)


def check_writable_dir(path: str | os.PathLike, option: str | None = None) -> None:
    """Raise a one-line error naming ``path`` (and the ``option`` that gave it, e.g. ``--out``) unless it
    is, or can be created as, a writable directory. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FastLLCError(f"cannot write {_named(path, option)}: it exists and is not a directory")
    _check_can_create_in(path, _nearest_existing(path), _named(path, option))


def check_writable_file(path: str | os.PathLike, option: str | None = None) -> None:
    """Raise a one-line error naming ``path`` (and ``option``) unless it is a writable file or can be
    created as one. Creates nothing (and leaves an existing file as it is)."""
    path = Path(path)
    name = _named(path, option)
    if path.is_dir():
        raise FastLLCError(f"cannot write {name}: it is a directory; give a file name")
    if path.exists():
        try:
            open(path, "ab").close()  # appending nothing changes nothing
        except OSError as err:
            raise FastLLCError(f"cannot write {name}: {(err.strerror or str(err)).lower()}") from None
        return
    _check_can_create_in(path, _nearest_existing(path.parent), name)
