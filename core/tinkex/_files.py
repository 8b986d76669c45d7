"""Writing files so that a crash, a full disk or Ctrl-C never leaves half of one.

One way to write, used by everything that writes (run directories, checkpoints,
reports): write a temporary file next to the target, ``fsync`` it, ``os.replace``
it over the target, and ``fsync`` the directory so the rename itself survives a
power cut. On any failure the temporary file is removed and the target is left as
it was; an ``OSError`` becomes a :class:`tinkex.StorageError` that says "disk full"
when the disk is full.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from ._errors import StorageError

__all__ = [
    "aside_of",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "decode_utf8",
    "fsync_dir",
    "storage_errors",
    "swap_in_dir",
]

#: files tinkex writes are readable by everyone, like any other file the user makes
FILE_MODE = 0o644


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync`` a directory, so renames and new entries in it are durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def storage_errors(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside into a :class:`StorageError` about ``what``."""
    try:
        yield
    except StorageError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            reason = "the disk is full"
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            reason = "permission denied"
        else:
            reason = exc.strerror or type(exc).__name__
        raise StorageError(
            exc.errno, f"could not write {what}: {reason} ({exc.__class__.__name__}: {exc})"
        ) from exc


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically: ``write(tmp)`` fills a temporary file, which replaces it.

    Raises:
        StorageError: writing, syncing or renaming failed (nothing is left behind,
            and an existing ``path`` is untouched).
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    with storage_errors(os.fspath(target)):
        try:
            write(tmp)
            os.chmod(tmp, FILE_MODE)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        fsync_dir(target.parent)
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Atomically make ``path`` hold exactly ``data`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Atomically make ``path`` hold ``text``, UTF-8 encoded (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def decode_utf8(raw: bytes, path: str | os.PathLike[str], error: type[Exception], fix: str) -> str:
    """``raw`` as UTF-8 text; otherwise ``error("<path>:<line>: not UTF-8 ...; <fix>")``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise error(
            f"{os.fspath(path)}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); {fix}"
        ) from None


def aside_of(target: Path) -> Path:
    """Where :func:`swap_in_dir` keeps the previous ``target`` while it swaps."""
    return target.parent / f".{target.name}.old"


def swap_in_dir(tmp: Path, target: Path, *, is_complete: Callable[[Path], bool]) -> None:
    """Put the complete directory ``tmp`` at ``target`` so that one is always usable.

    A complete directory at ``target`` is renamed to ``.<name>.old`` first (a stale
    one there is removed: ``target`` is the newer), then ``tmp`` is renamed to
    ``target`` and ``.<name>.old`` is deleted; the parent is fsynced after each
    rename. Whatever instant a crash hits, ``target`` or ``.<name>.old`` is complete:
    a reader tries ``target``, then :func:`aside_of` it.
    """
    aside = aside_of(target)
    parent = target.parent
    moved = False
    if is_complete(target):
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
        moved = True
        fsync_dir(parent)
    elif target.exists():
        # empty or damaged: a complete .old (left by an interrupted swap) stays the
        # fallback until the new one is in place
        shutil.rmtree(target)
    try:
        os.replace(tmp, target)
    except BaseException:
        if moved and not target.exists():
            with contextlib.suppress(OSError):
                os.replace(aside, target)
        raise
    fsync_dir(parent)
    if aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
        fsync_dir(parent)


def lock_directory(path: Path, pid_file: str, *, in_use: str) -> int:
    """Take an exclusive ``flock`` on the directory ``path``; return its descriptor.

    The caller keeps the descriptor open while it owns the directory (closing it,
    or the process ending, releases the lock) and writes its pid to ``pid_file``,
    which a second process reads to say who holds the lock.

    Args:
        path: an existing directory.
        pid_file: the name of the holder's pid file in it.
        in_use: the message when another process holds the lock: ``{path}`` and
            ``{holder}`` (`` (pid N)`` or empty) are filled in.

    Raises:
        RunDirError: another process holds the lock (the message is ``in_use``), or
            the directory cannot be opened or locked.
    """
    import fcntl

    from ._errors import RunDirError

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise RunDirError(f"cannot open {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise RunDirError(f"cannot lock {path}: {exc.strerror}") from None
        holder = ""
        with contextlib.suppress(OSError, ValueError):
            holder = f" (pid {int((path / pid_file).read_text().strip())})"
        raise RunDirError(in_use.format(path=path, holder=holder)) from None
    return fd
