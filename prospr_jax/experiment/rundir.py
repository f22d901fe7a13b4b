"""The run directory (``--out``): writability probe, the one-run-at-a-time lock, ``run.json``.

The lock is ``fcntl.flock`` on ``<out>/.lock``, taken without waiting and held by the open file for
the whole run. The kernel releases it when the process ends, however it ends (exit, exception,
SIGKILL, a crash), so a lock is never stale and there is nothing to clean up. The file itself stays
(an unlocked ``.lock`` means nothing); it holds the pid of the last run that took it, which the
refusal message of a second run quotes. flock is advisory and local: it does not exclude a run on
another machine writing the same directory over NFS.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from typing import Any, Iterator, Optional

from prospr_jax.experiment.config import RunConfig, UsageError
from prospr_jax.experiment.results import dumps

LOCK_FILE = ".lock"
RUN_FILE = "run.json"


def check_writable(out: str) -> None:
    """Create ``out`` if needed and check that files can be written in it (a probe file).

    Raises:
      UsageError: ``out`` is not a directory, cannot be created, or is not writable.
    """
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"`--out` {out!r} exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"`--out` {out!r} cannot be created: {e.strerror or e}") from None
    probe = os.path.join(out, f".write-probe-{os.getpid()}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, b"probe\n")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"`--out` {out!r} is not writable: {e.strerror or e}") from None


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``<out>/.lock`` (see the module docstring).

    Use as a context manager or call :meth:`acquire` / :meth:`release`.

    Args:
      out: the run directory (must exist).
    """

    def __init__(self, out: str):
        self.path = os.path.join(out, LOCK_FILE)
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock.

        Raises:
          UsageError: another process holds it (the message gives its pid when known).
        """
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UsageError(f"`--out` {os.path.dirname(self.path)!r}: cannot lock {LOCK_FILE}: {e.strerror}") from None
            holder = _read_pid(self.path)
            who = f"another run (pid {holder})" if holder else "another run"
            raise UsageError(
                f"`--out` {os.path.dirname(self.path)!r} is in use by {who}: wait for it to finish or "
                "choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Give the lock back (closing the file releases it)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class NoLock:
    """The lock of a process that is not process 0 of a multi-process run: it holds nothing (process
    0 holds the run's lock for all of them)."""

    def acquire(self) -> "NoLock":
        return self

    def release(self) -> None:
        pass

    def __enter__(self) -> "NoLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def _read_pid(path: str) -> Optional[int]:
    with contextlib.suppress(OSError, ValueError):
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    return None


def read_run(out: str) -> Optional[dict]:
    """The contents of ``<out>/run.json`` (``None`` if there is none).

    Raises:
      UsageError: the file exists but is not a stored run.
    """
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        RunConfig.from_dict(run["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"`--out` {out!r}: {RUN_FILE} is not a stored run ({e}); move it away to start a new run") from None
    return run


def stored_config(run: dict) -> RunConfig:
    """The configuration of a run read by :func:`read_run`."""
    return RunConfig.from_dict(run["config"])


@contextlib.contextmanager
def _atomic_write(path: str) -> Iterator[Any]:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_run(out: str, config: RunConfig, command: list[str]) -> None:
    """Store the run's resolved configuration in ``<out>/run.json`` (what ``--resume`` alone reloads)."""
    run = {
        "config": config.as_dict(),
        "config_id": config.config_id,
        "command": list(command),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "pid": os.getpid(),
    }
    with _atomic_write(os.path.join(out, RUN_FILE)) as f:
        f.write(dumps(run) + "\n")


__all__ = ["LOCK_FILE", "RUN_FILE", "RunLock", "check_writable", "read_run", "stored_config", "write_run"]
