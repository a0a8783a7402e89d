"""Keep the server's event loop free while the app segments.

MONAI Label 0.8.5 declares its endpoints `async def` and calls the (synchronous) work inside them,
so an infer blocks the event loop: `/info/`, `/datastore/` and `/train/` wait for it, and concurrent
infers all return together. `Offload` is an ASGI middleware placed in front of the running app: a
request to a model route (infer, active-learning sampling, scoring) or a datastore/session route
is handled by the very same application stack (routing, auth, MONAI Label's endpoint), but in a
worker thread with a private event loop, its ASGI messages relayed to and from the server's loop.

Model work goes to one FIFO queue of `model_workers` threads, so requests are served in arrival
order and each returns when its own result is ready; uploads and downloads go to a small I/O pool.
torch, numpy and ITK release the GIL while they compute, so the loop keeps answering meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

# path prefixes of MONAI Label 0.8.5's routes -> the pool that serves them
MODEL_PREFIXES = ("/infer/", "/activelearning/", "/scoring/")
IO_PREFIXES = ("/datastore", "/session")


def route_kind(scope) -> str | None:
    """"model", "io" or None (served on the event loop, e.g. /info/, /train/) for an ASGI scope."""
    if scope.get("type") != "http":
        return None
    path = scope.get("path", "")
    if path.startswith(MODEL_PREFIXES) and scope.get("method") == "POST":
        return "model"
    return "io" if path.startswith(IO_PREFIXES) else None


class Offload:
    """ASGI middleware: model and I/O requests run `app` in worker threads (see the module docstring)."""

    def __init__(self, app, model_workers: int = 1, io_workers: int = 4):
        self.app = app
        self.pools = {"model": ThreadPoolExecutor(model_workers, thread_name_prefix="sdfsmis-model"),
                      "io": ThreadPoolExecutor(io_workers, thread_name_prefix="sdfsmis-io")}

    async def __call__(self, scope, receive, send):
        kind = route_kind(scope)
        if kind is None:
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()

        def relay(channel):
            async def call(*args):   # in the worker's loop: run the channel on the server's loop
                return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(channel(*args), loop))
            return call

        def serve():
            asyncio.run(self.app(scope, relay(receive), relay(send)))

        await loop.run_in_executor(self.pools[kind], serve)


def install(model_workers: int = 1) -> bool:
    """In the server process (uvicorn runs `monailabel.app:app`, whose middleware stack Starlette
    builds before the app starts), put `Offload` in front of it; elsewhere (train / batch
    subprocesses, tests that build the app) do nothing. -> whether it installed."""
    module = sys.modules.get("monailabel.app")
    app = getattr(module, "app", None)
    if app is None or getattr(app, "middleware_stack", None) is None or isinstance(app.middleware_stack, Offload):
        return False
    app.middleware_stack = Offload(app.middleware_stack, model_workers=model_workers)
    logger.info(f"worker threads: infers in arrival order ({model_workers} worker(s)), datastore in an I/O pool; "
                "the event loop stays free")
    return True
