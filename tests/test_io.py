"""pgvar._io.atomic_write: old-or-new content, symlinks and permission bits kept, no temporary file left behind."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys

import pytest

from pgvar._io import (
    TEMP_MARKER,
    atomic_write,
    atomic_write_bytes,
    atomic_write_text,
    remove_stale_temp_files,
)

posix_only = pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits, symlinks and process ids")


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_files(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if TEMP_MARKER in name)


def test_writes_text_and_bytes_and_returns_the_destination(tmp_path):
    assert atomic_write_text(tmp_path / "a.json", '{"x": 1}') == tmp_path / "a.json"
    assert (tmp_path / "a.json").read_text() == '{"x": 1}'
    atomic_write_bytes(tmp_path / "a.json", b"new")
    assert (tmp_path / "a.json").read_bytes() == b"new"
    assert temp_files(tmp_path) == []


def test_the_folder_must_exist_like_for_open(tmp_path):
    with pytest.raises(FileNotFoundError):
        atomic_write_text(tmp_path / "missing" / "a.json", "x")


@posix_only
def test_a_new_file_gets_the_mode_open_would_give_not_0600(tmp_path):
    old_mask = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        with open(tmp_path / "plain.json", "w") as file:
            file.write("{}")
    finally:
        os.umask(old_mask)
    mode = stat.S_IMODE((tmp_path / "new.json").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.json").stat().st_mode) == 0o640
    atomic_write_text(tmp_path / "default.json", "{}")
    assert stat.S_IMODE((tmp_path / "default.json").stat().st_mode) == 0o666 & ~umask()


@posix_only
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604])
def test_an_existing_file_keeps_its_permission_bits(tmp_path, mode):
    path = tmp_path / "secret.zip"
    path.write_bytes(b"old")
    path.chmod(mode)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == mode


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write any file")
def test_a_write_protected_file_is_refused_like_open_would(tmp_path):
    path = tmp_path / "frozen.zip"
    path.write_bytes(b"old")
    path.chmod(0o444)
    with pytest.raises(PermissionError):
        open(path, "wb")  # noqa: SIM115 (the behaviour to match)
    with pytest.raises(PermissionError):
        atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and temp_files(tmp_path) == []


@posix_only
def test_a_symlink_stays_a_link_and_its_target_is_replaced(tmp_path):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "model.zip"
    target.write_bytes(b"old")
    target.chmod(0o600)
    link = tmp_path / "latest.zip"
    link.symlink_to(target)
    second = tmp_path / "alias.zip"  # a chain of links is followed to the end
    second.symlink_to(link)
    assert atomic_write_bytes(second, b"new") == target
    assert link.is_symlink() and second.is_symlink() and os.readlink(link) == str(target)
    assert target.read_bytes() == b"new" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert temp_files(tmp_path) == [] and temp_files(tmp_path / "store") == []
    # A dangling link: the target is created, as open(link, "w") would.
    target.unlink()
    atomic_write_bytes(link, b"again")
    assert link.is_symlink() and target.read_bytes() == b"again"


def test_a_full_disk_midway_leaves_the_old_file_byte_identical_and_no_temp_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b"old content")
    payload = b"x" * 100_000

    def write_until_the_disk_is_full(file):
        file.write(payload[:50_000])
        file.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError) as raised:
        atomic_write(path, write_until_the_disk_is_full)
    assert raised.value.errno == errno.ENOSPC
    assert path.read_bytes() == b"old content"
    assert os.listdir(tmp_path) == ["results.json"]


def test_an_interrupt_also_leaves_no_temp_file(tmp_path):
    def interrupted(file):
        file.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "x.bin", interrupted)
    assert os.listdir(tmp_path) == []


@posix_only
def test_stale_temp_files_of_dead_writers_are_removed_at_the_next_write(tmp_path):
    path = tmp_path / "model.zip"
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)  # this process has exited: its temporary files are stale
    stale = tmp_path / f".model.zip.{TEMP_MARKER}-{dead_pid}-abc123.tmp"
    stale.write_bytes(b"half a model")
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".model.zip.{TEMP_MARKER}-{running.pid}-def456.tmp"  # a writer still at work
        live.write_bytes(b"being written")
        other = tmp_path / f".other.zip.{TEMP_MARKER}-{dead_pid}-ghi789.tmp"  # another destination's
        other.write_bytes(b"not ours")
        atomic_write_bytes(path, b"new")
        assert not stale.exists()
        assert live.exists() and other.exists()
    finally:
        running.kill()
        running.wait()
    assert remove_stale_temp_files(path) == [live]
    assert temp_files(tmp_path) == [other.name]


@posix_only
def test_the_cli_writes_its_json_and_png_like_open_would(tmp_path):
    from pgvar import cli

    old_mask = os.umask(0o022)
    try:
        assert cli.main(["compare", "--problem", "bandit", "--n-batches", "4", "--batch-size", "4",
                         "--output", str(tmp_path)]) == 0
    finally:
        os.umask(old_mask)
    for name in ("compare_bandit_seed0.json", "compare_bandit_seed0.png"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name  # mkstemp's 0600 before
    assert (tmp_path / "compare_bandit_seed0.png").read_bytes().startswith(b"\x89PNG")
    assert temp_files(tmp_path) == []
