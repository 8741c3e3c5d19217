"""The workdir of a training run: an exclusive lock, so two runs never write into one workdir.

`WorkdirLock(workdir)` (a context manager) takes `<workdir>/.lock` for the run's lifetime:

  - where the filesystem supports it, an `fcntl.flock` on that file: the OS releases it when the
    process ends, however it ends, so a crashed run never leaves a stale lock;
  - elsewhere (flock not supported), the file is created with O_EXCL and removed on release; a lock
    left by a process that is gone (same host, pid not alive) is stale and taken over.

The file holds JSON {"pid", "host", "started"} naming the holder. A second run on the same workdir
gets `WorkdirLockedError` with one line naming the holder's pid and host and what to do. With several
processes only process 0 takes the lock (the caller decides; see experiments/pretrain.py).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".lock"
_NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class WorkdirLockedError(RuntimeError):
  """The workdir is in use by another run."""


def _body() -> str:
  return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      return json.loads(f.read() or "{}")
  except (OSError, ValueError):
    return {}


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self._exclusive_file = False  # the O_EXCL fallback: remove the file on release

  def _refuse(self, holder: dict):
    who = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    since = f" (started {holder['started']})" if "started" in holder else ""
    raise WorkdirLockedError(f"workdir {self.workdir} is in use by another run: {who}{since}; wait for it to "
                             f"end or stop it, or use another --config.workdir (lock file {self.path})")

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      self._refuse(_read(self.path))
    except OSError as e:
      os.close(fd)
      if e.errno not in _NO_FLOCK:
        raise
      return self._acquire_exclusive_file()
    os.ftruncate(fd, 0)
    os.write(fd, _body().encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def _acquire_exclusive_file(self) -> "WorkdirLock":
    """Fallback without flock: O_EXCL create; a lock of a dead process on this host is stale."""
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = _read(self.path)
        pid = holder.get("pid")
        if (not holder or (holder.get("host") == socket.gethostname() and isinstance(pid, int)
                           and not _alive(pid))):
          os.remove(self.path)  # stale (its run is gone) or empty (left by a flock run)
          continue
        self._refuse(holder)
      os.write(fd, _body().encode())
      os.close(fd)
      self._exclusive_file = True
      return self
    self._refuse(_read(self.path))

  def release(self) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # (the holder's name goes; the OS releases the lock with the fd)
      os.close(self._fd)
      self._fd = None
    if self._exclusive_file:
      self._exclusive_file = False
      try:
        os.remove(self.path)
      except FileNotFoundError:
        pass

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
