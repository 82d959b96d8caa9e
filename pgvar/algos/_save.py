"""Atomic saving and a clear error for files that are not models, shared by pgvar's algorithms."""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import tempfile
import warnings
import zipfile
from collections.abc import Callable
from typing import IO, Any

__all__ = ["atomic_save", "check_model_archive"]

#: Entries every SB3 / pgvar model archive holds (``BaseAlgorithm.save``).
REQUIRED_ENTRIES = ("data", "policy.pth")


def _final_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """Where SB3's ``save_to_zip_file`` would write ``path``: ``.zip`` appended when there is no suffix, and
    ``<path>_2`` (with a warning) when ``path`` is a folder."""
    final = pathlib.Path(path)
    if final.suffix == "":
        final = final.with_name(final.name + ".zip")
    if final.is_dir():
        warnings.warn(f"Path '{final}' is a folder. Will save instead to {final}_2", stacklevel=3)
        final = pathlib.Path(f"{final}_2")
    return final


def _default_file_mode() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_save(write: Callable[[IO[bytes]], None], path: str | os.PathLike[str] | io.BufferedIOBase) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it over ``path`` in one step.

    ``os.replace`` is atomic on POSIX and Windows, so a reader sees either the old file or the complete new one;
    if ``write`` raises (or the process dies), the old file is left untouched and the temporary file is removed
    (when Python gets the chance). File objects are written directly.

    :param write: writes the whole archive into the given binary file object
    :param path: destination path (``.zip`` is appended when it has no suffix, as SB3 does) or a file object
    """
    if not isinstance(path, (str, os.PathLike)):
        write(path)  # type: ignore[arg-type]
        return
    final = _final_path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(tmp_name, _default_file_mode())
        os.replace(tmp_name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def check_model_archive(path: str | os.PathLike[str] | io.BufferedIOBase) -> None:
    """Raise ``ValueError`` unless ``path`` is a zip archive with the entries of an SB3 / pgvar model.

    A missing file is left to SB3's loader (``FileNotFoundError``), which also tries ``path + ".zip"``.

    :param path: path or readable, seekable binary file object
    """
    names: list[str]
    if isinstance(path, (str, os.PathLike)):
        source: Any = pathlib.Path(path)
        if not source.exists() and pathlib.Path(f"{source}.zip").exists():
            source = pathlib.Path(f"{source}.zip")
        if not source.is_file():
            return
        if not zipfile.is_zipfile(source):
            raise ValueError(
                f"{str(path)!r} is not a zip archive, so it is not a pgvar / stable-baselines3 model "
                "(models are the .zip files written by model.save())"
            )
        with zipfile.ZipFile(source) as archive:
            names = archive.namelist()
    else:
        start = path.tell()
        try:
            if not zipfile.is_zipfile(path):
                raise ValueError(
                    f"{path!r} is not a zip archive, so it is not a pgvar / stable-baselines3 model "
                    "(models are the .zip files written by model.save())"
                )
            path.seek(start)
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        finally:
            path.seek(start)
    missing = [entry for entry in REQUIRED_ENTRIES if entry not in names]
    if missing:
        shown = ", ".join(repr(n) for n in names[:10]) + (", ..." if len(names) > 10 else "")
        raise ValueError(
            f"{str(path)!r} is a zip archive but not a pgvar / stable-baselines3 model: it has no "
            f"{', '.join(repr(m) for m in missing)} entry (entries: {shown or 'none'})"
        )
