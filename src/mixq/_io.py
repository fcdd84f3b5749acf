"""Atomic file writes: write to a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "unwritable_reason"]


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path``; on success it replaces ``path`` in one rename.

    On any exception (or if the process dies) the previous file at ``path`` is untouched and the
    temporary file is removed (or, after a hard kill, left under a ``.tmp`` name, never the final one).
    The file gets the permissions ``open()`` would give it (an existing file's own, else 0o666 minus the
    umask), not ``mkstemp``'s private 0600.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write supports modes 'w' and 'wb', got {mode!r}")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    permissions = _mode_for(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            _chmod(f.fileno(), tmp, permissions)  # mkstemp makes 0600, and the rename would keep it
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _mode_for(target: Path) -> int:
    """The permissions ``open(target, "w")`` would leave: an existing file keeps its own, a new one gets
    0o666 minus the umask."""
    try:
        return stat.S_IMODE(target.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux: /proc), else by setting and
    restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # briefly the strictest common mask, never a looser one
    os.umask(mask)
    return mask


def _chmod(fd: int, path: str, mode: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, mode)
    else:  # Windows: only the read-only bit exists
        os.chmod(path, mode)


def unwritable_reason(path: str | os.PathLike, folder: bool) -> str | None:
    """Why ``path`` cannot be written (``folder``: a folder mixq creates and fills; else a file), or None when it
    can. Checked without leaving anything behind: a path under a file, a folder that is a file (or the reverse),
    and a probe file created and removed in the nearest existing folder (which catches read-only file systems,
    ``/proc``, missing permissions)."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        return "is a folder, not a file" if not folder else "is a file, not a folder"
    existing = target if folder else target.parent
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so nothing can be created under it"
    try:
        fd, probe = tempfile.mkstemp(prefix=".mixq-write-check.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"cannot create files in {existing} ({e.strerror or e})"
    return None
