"""What the app adds in front of MONAI Label's HTTP server: safety (docs/app.md, "Deploying") and
responsiveness.

- validate.py: plain ids / tags, infer params, train options (ClientError = HTTP 4xx);
- files.py: image / label files checked from their header and one data stream before they are read;
- datastore.py: the local datastore, confined to the studies folder;
- rules.py + guard.py: an ASGI middleware checking every MONAI Label endpoint before it runs,
  removing upload temp files, mapping input errors to 4xx and hiding server paths;
- trainer_lock.py: one trainer at a time, across server restarts;
- workers.py: infers and uploads in worker threads, so the event loop keeps answering.

`install(app)` puts it in place; it does something only in the server process (MONAI Label's
FastAPI module loaded), not in train / batch subprocesses or unit tests.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

logger = logging.getLogger(__name__)

ENDPOINT_MODULES = ("infer", "datastore", "session", "model")


def install(app) -> bool:
    """Wrap MONAI Label's FastAPI middleware stack with the Guard (server process only) -> installed?"""
    module = sys.modules.get("monailabel.app")
    fastapi_app = getattr(module, "app", None)
    if fastapi_app is None or getattr(fastapi_app, "middleware_stack", None) is None:
        return False
    from starlette.middleware.cors import CORSMiddleware

    from lib.server import trainer_lock
    from lib.server.guard import Guard, Scrubber, TrackingTempfile

    for name in ENDPOINT_MODULES:
        endpoint = sys.modules.get(f"monailabel.endpoints.{name}")
        if endpoint is not None and hasattr(endpoint, "tempfile"):
            endpoint.tempfile = TrackingTempfile()
    cfg = app.cfg
    train_dir = cfg.train_folder(app.app_dir)
    roots = {train_dir: "<train_dir>", app.studies: "<studies>", app.app_dir: "<app>",
             os.path.dirname(os.path.dirname(os.path.abspath(app.app_dir))): "<repo>",
             tempfile.gettempdir(): "<tmp>", sys.prefix: "<python>", sys.base_prefix: "<python>",
             os.path.expanduser("~"): "~"}
    for key in ("checkpoint", "sd_path", "dino_path"):
        if getattr(cfg, key, None):
            roots[getattr(cfg, key)] = f"<{key}>"
    max_body = max(64 << 20, cfg.max_voxels * 8 + (16 << 20))
    stack = fastapi_app.middleware_stack
    node = stack
    while node is not None and not isinstance(node, CORSMiddleware):
        node = getattr(node, "app", None)
    if node is not None:   # inside CORS, so refusals carry its headers; outside nothing else of ours
        node.app = Guard(node.app, app, Scrubber(roots), max_body)
    else:
        fastapi_app.middleware_stack = Guard(stack, app, Scrubber(roots), max_body)
    orphan = trainer_lock.stop_orphan(train_dir)
    if orphan:
        logger.warning(f"stopped trainer pid {orphan} left running by a previous server")
    logger.info(f"request guard installed (max_voxels {cfg.max_voxels:,}, max request body {max_body:,} bytes)")
    return True
