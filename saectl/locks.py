"""Write locks on the store's lock files, and the probes that ask whether one is held.

A writer holds an exclusive `flock` on a lock file inside the artifact (`.lock`, or a harvest
shard's `.lock.<shard>`); the kernel drops it when the process dies, so a killed run never
leaves a stale lock. Three things make this safe on a store that several people and machines
share:

- Lock files are opened with O_NOFOLLOW: a lock file planted as a symbolic link is refused,
  never truncated through (it would otherwise overwrite whatever it points to).
- After the lock is taken, the file is checked to still be the one at the path: if `saectl gc`
  moved the artifact away while we waited, the caller starts again on a fresh folder instead
  of writing into one on its way to deletion (`acquire` returns None).
- Probes (`held`) open the file read-only and ask for a *shared* lock. On Linux NFS, flock is
  emulated with fcntl byte-range locks, where an exclusive lock on a read-only descriptor fails
  with EBADF; a shared one works, and needs only read access, so a lock file another user
  owns can be probed too. A filesystem that cannot lock at all (ENOLCK: NFS without lockd)
  is one line naming it (`NoLocks`), never a traceback.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from saectl.errors import ArtifactError

# errnos that mean "this filesystem cannot do flock", not "someone holds it".
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF, errno.EINVAL}


class NoLocks(ArtifactError):
    """The filesystem under the store refuses file locks."""


def _no_locks(path: Path, err: OSError) -> NoLocks:
    return NoLocks(f"the filesystem holding {path} cannot lock files ({err.strerror or err}); "
                   "saectl needs locks to keep writers apart: put the store on a local disk or "
                   "on NFS with its lock service (lockd) running")


def _open(path: Path, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise ArtifactError(f"{path} is a symbolic link where saectl keeps a lock file; "
                                "saectl never follows links in the store: remove it") from None
        raise


def same_file(fd: int, path: Path) -> bool:
    """Whether the open `fd` is still the file at `path` (not moved away or replaced)."""
    try:
        now = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


def holder(path: Path) -> str:
    try:
        fd = _open(path, os.O_RDONLY)
    except OSError:
        return "another process"
    try:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


def acquire(path: Path, wait: bool = True, what: str = "") -> int | None:
    """An fd holding an exclusive lock on `path` (created if missing), with this process named
    in it; None when the file was moved or removed while we waited, so the caller starts
    again. Raises BlockingIOError when it is held and not `wait`, FileNotFoundError when its
    folder is gone."""
    fd = _open(path, os.O_RDWR | os.O_CREAT)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise
            from saectl.console import info  # deferred: console pulls in rich

            info(f"waiting for {holder(path)}, which is writing {what or path}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        if not same_file(fd, path):
            os.close(fd)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        return fd
    except OSError as e:
        os.close(fd)
        if e.errno in _NO_LOCKS:
            raise _no_locks(path, e) from None
        raise


@contextmanager
def flock(path: Path, wait: bool = True, what: str = ""):
    """An exclusive lock on `path` for as long as the block runs. With wait=False a held lock
    is an ArtifactError naming its holder."""
    while True:
        try:
            fd = acquire(Path(path), wait, what)
        except BlockingIOError:
            raise ArtifactError(f"{what or path} is being written by {holder(path)}; wait for "
                                "it or run again without --no-wait") from None
        except FileNotFoundError:
            raise ArtifactError(f"{what or path} was removed (by `saectl gc`?) while this "
                                "command waited for it; run the command again") from None
        if fd is not None:
            break
    try:
        yield
    finally:
        os.close(fd)  # closing drops the lock


def held(path: Path) -> bool:
    """True if some process holds the lock on `path` right now (a missing file: False)."""
    try:
        fd = _open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError as e:
        if e.errno in _NO_LOCKS:
            raise _no_locks(path, e) from None
        raise
    finally:
        os.close(fd)
    return False
