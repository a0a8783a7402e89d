"""Make MONAI Label's "stop training" graceful for the SD-FSMIS trainer.

MONAI Label 0.8.5 stops a training (DELETE /train, the Stop button of OHIF and 3D Slicer) by
SIGKILLing its subprocess, so the loop never sees it. This wraps that stop: for `train` it first asks
the trainer to stop (its STOP file -> `should_stop()` -> the loop saves and publishes a checkpoint and
returns), waits up to `wait_s` for the process to end, and only then falls back to the kill.
"""
from __future__ import annotations

import logging
import time
from datetime import datetime

logger = logging.getLogger(__name__)


def install(request_stop, wait_s: float = 60.0) -> None:
    """Wrap monailabel's stop_background_task (once per process); `request_stop()` signals the trainer."""
    from monailabel.utils.async_tasks import task as task_module
    from monailabel.utils.async_tasks import utils

    original = getattr(task_module.stop_background_task, "__wrapped_original__", task_module.stop_background_task)

    def stop_background_task(method):
        running = dict(utils.processes(method)) if method == "train" else {}
        if not running:
            return original(method)
        request_stop()
        logger.info(f"asked the SD-FSMIS trainer to stop (waiting up to {wait_s:.0f} s for its checkpoint)")
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(p.poll() is None for p in running.values()):
            time.sleep(0.2)
        if any(p.poll() is None for p in running.values()):
            logger.warning("the trainer did not stop in time; killing it (its last checkpoint stays published)")
            return original(method)
        tasks = [t for t in utils.tasks(method) if t["id"] in running]
        for t in tasks:
            t["status"] = "STOPPED"
            t["end_ts"] = datetime.today().strftime("%Y-%m-%d %H:%M:%S")
        return tasks[0] if tasks else None

    stop_background_task.__wrapped_original__ = original
    task_module.stop_background_task = stop_background_task
