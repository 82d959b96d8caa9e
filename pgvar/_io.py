"""Atomic file writes: a reader sees the old file or the complete new one, never a torn file.

The one writer every pgvar file goes through (model zips, replay buffers, the CLI's JSON and PNG files). It writes
to a temporary file in the destination's folder, flushes and fsyncs it, and moves it over the destination with
``os.replace`` (atomic on POSIX and Windows), so a crash, a kill or a full disk at any moment leaves the previous
file untouched. On top of that it behaves like a plain ``open(path, "w")``:

* a symlink at ``path`` is kept: the link's target is replaced, the link stays a link;
* an existing file keeps its permission bits (a ``0600`` file stays ``0600``); a new file gets the mode ``open()``
  gives under the process umask (``0666 & ~umask``), not ``mkstemp``'s ``0600``; a file the process may not write
  raises ``PermissionError`` and stays as it is;
* no temporary file is left behind when the write raises; the temporary file of a save that was killed
  (``.<name>.pgvar-tmp-<pid>-<random>``) is removed by the next write to the same path, once the process that
  made it is gone.

Limits: the owner and group of a replaced file become the writer's (as with any replace-by-rename); the stale
temporary file check reads process ids, so it is meant for writers on one host.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import tempfile
import threading
from collections.abc import Callable
from typing import IO

__all__ = ["TEMP_MARKER", "atomic_write", "atomic_write_bytes", "atomic_write_text", "remove_stale_temp_files"]

#: Part of every temporary file's name: ``.<name>.pgvar-tmp-<pid>-<random>``.
TEMP_MARKER = "pgvar-tmp"

_active_lock = threading.Lock()
_active: set[str] = set()  # temporary files this process is writing right now (never "stale")


def _destination(path: str | os.PathLike[str]) -> pathlib.Path:
    """The file to replace: ``path``, or the final target of the symlink(s) at ``path``."""
    destination = pathlib.Path(path)
    if destination.is_symlink():
        return pathlib.Path(os.path.realpath(destination))
    return destination


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0666`` minus the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _temp_prefix(destination: pathlib.Path) -> str:
    return f".{destination.name}.{TEMP_MARKER}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # exists but not ours, or the check is not supported: keep the file
        return True
    return True


def remove_stale_temp_files(path: str | os.PathLike[str]) -> list[pathlib.Path]:
    """Remove the temporary files that killed writes to ``path`` left behind; return the removed paths.

    A temporary file is stale when the process that created it (the pid in its name) no longer runs, or when it
    is this process's own and no write of this process is using it. Files of running writers are kept.

    :param path: the destination (a symlink is followed, like :func:`atomic_write` does)
    """
    destination = _destination(path)
    prefix = _temp_prefix(destination)
    removed = []
    try:
        candidates = [entry for entry in os.scandir(destination.parent) if entry.name.startswith(prefix)]
    except FileNotFoundError:
        return []
    for entry in candidates:
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        with _active_lock:
            in_use = entry.path in _active
        if in_use or (pid != os.getpid() and _process_alive(pid)):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            removed.append(pathlib.Path(entry.path))
    return removed


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> pathlib.Path:
    """Call ``write(file)`` on a temporary binary file next to ``path``, then move it over ``path`` in one step.

    See the module doc for the guarantees (atomic replace, symlink and permission bits kept, temporary files
    cleaned). The folder of ``path`` must exist, as for ``open()``.

    :param path: destination file (or a symlink to it)
    :param write: writes the whole content into the given binary file object (its return value is ignored)
    :return: the file that was replaced or created (the symlink's target when ``path`` is a symlink)
    """
    destination = _destination(path)
    remove_stale_temp_files(destination)
    try:
        mode = os.stat(destination).st_mode & 0o7777
    except FileNotFoundError:
        mode = _new_file_mode()
    else:  # a write-protected file stays protected, as with open(path, "w")
        if not os.access(destination, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(destination))
    prefix = f"{_temp_prefix(destination)}{os.getpid()}-"
    fd, temp_name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=destination.parent)
    with _active_lock:
        _active.add(temp_name)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(file.fileno(), mode)
            else:  # Windows
                os.chmod(temp_name, mode)
            os.fsync(file.fileno())
        os.replace(temp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    finally:
        with _active_lock:
            _active.discard(temp_name)
    _fsync_folder(destination.parent)
    return destination


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> pathlib.Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write`)."""
    return atomic_write(path, lambda file: file.write(data))


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> pathlib.Path:
    """Write ``text`` to ``path`` atomically (:func:`atomic_write`), encoded with ``encoding``."""
    return atomic_write_bytes(path, text.encode(encoding))
