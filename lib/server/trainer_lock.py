"""One trainer at a time, even across a server restart: `<train_dir>/trainer.lock` names its owner.

The lock holds the owner's pid and process start time (so a reused pid is not mistaken for it).
- `acquire(folder)` (the train task, before its loop) creates it atomically; a live owner -> RuntimeError,
  a dead one (stale lock) is replaced.
- `owner(folder)` -> the live owner's pid or None (the guard answers 409 to a second POST /train).
- `stop_orphan(folder)` (server start-up): a live owner that is not a child of this server was left by a
  server that died (kill -9); it is asked to stop (STOP file and SIGTERM: it saves a checkpoint),
  then killed after `wait_s`.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

LOCK_FILE = "trainer.lock"


def _path(folder) -> Path:
    return Path(folder) / LOCK_FILE


def _me() -> dict:
    p = psutil.Process()
    return {"pid": p.pid, "started": p.create_time()}


def _read(folder) -> dict | None:
    try:
        return json.loads(_path(folder).read_text())
    except (OSError, ValueError):
        return None


def _process(record: dict | None):
    """The live process named by a lock record, or None (dead, or its pid reused by another process)."""
    if not isinstance(record, dict):
        return None
    try:
        proc = psutil.Process(int(record["pid"]))
        if abs(proc.create_time() - float(record["started"])) > 1.0 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except (psutil.Error, KeyError, TypeError, ValueError):
        return None


def _ended(proc, timeout: float) -> bool:
    """Wait until `proc` has ended (a zombie counts as ended: its parent, not us, reaps it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.1)
    return False


def owner(folder) -> int | None:
    proc = _process(_read(folder))
    return proc.pid if proc is not None else None


def acquire(folder) -> None:
    """Take the lock for this process; RuntimeError when another live trainer holds it."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    me = _me()
    for _ in range(3):
        try:
            fd = os.open(_path(folder), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            record = _read(folder)
            proc = _process(record)
            if proc is not None and proc.pid != me["pid"]:
                raise RuntimeError(f"another SD-FSMIS training is running (pid {proc.pid}); stop it first")
            if proc is not None:
                return
            logger.warning(f"removing a stale trainer lock (pid {(record or {}).get('pid')} is gone)")
            _path(folder).unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise RuntimeError("could not take the trainer lock")


def release(folder) -> None:
    """Drop the lock when this process holds it."""
    record = _read(folder)
    if record is not None and record.get("pid") == os.getpid():
        _path(folder).unlink(missing_ok=True)


def stop_orphan(folder, stop_file: str = "STOP", wait_s: float = 30.0) -> int | None:
    """At server start-up: stop a trainer left running by a previous server; -> its pid or None."""
    record = _read(folder)
    proc = _process(record)
    if proc is None:
        if record is not None:
            _path(folder).unlink(missing_ok=True)
        return None
    if proc.pid == os.getpid() or proc in psutil.Process().children(recursive=True):
        return None
    logger.warning(f"a trainer (pid {proc.pid}) outlived its server: stopping it")
    (Path(folder) / stop_file).touch()     # the loop saves a checkpoint on STOP or SIGTERM, then returns
    try:
        children = proc.children(recursive=True)
        proc.terminate()
        if not _ended(proc, wait_s):
            proc.kill()
            _ended(proc, 5.0)
        for child in children:
            if child.is_running():
                child.kill()
    except psutil.Error:
        pass
    _path(folder).unlink(missing_ok=True)
    (Path(folder) / stop_file).unlink(missing_ok=True)
    return proc.pid
