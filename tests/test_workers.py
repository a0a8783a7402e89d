"""The worker-thread middleware (lib.server.workers): a request that blocks its thread, as MONAI Label's
infer endpoint does, leaves the event loop free for other requests, and infers finish in arrival order."""
from __future__ import annotations

import asyncio
import threading

import httpx
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from lib.server.workers import Offload, route_kind


def _app(release: threading.Event, started: list, finished: list) -> Starlette:
    async def infer(request):          # synchronous work inside a coroutine, like MONAI Label 0.8.5's endpoint
        started.append(request.path_params["model"])
        release.wait(20)
        finished.append(request.path_params["model"])
        return JSONResponse({"model": request.path_params["model"], "thread": threading.current_thread().name})

    async def info(request):
        return JSONResponse({"status": "up"})

    return Starlette(routes=[Route("/infer/{model}", infer, methods=["POST"]), Route("/info/", info)])


def test_route_kinds():
    http = {"type": "http", "method": "POST"}
    assert route_kind({**http, "path": "/infer/sdfsmis"}) == "model"
    assert route_kind({**http, "path": "/activelearning/random"}) == "model"
    assert route_kind({**http, "method": "PUT", "path": "/datastore/label"}) == "io"
    assert route_kind({**http, "method": "GET", "path": "/info/"}) is None
    assert route_kind({"type": "lifespan"}) is None


def test_a_blocking_infer_leaves_the_loop_free_and_infers_run_in_arrival_order():
    release, started, finished = threading.Event(), [], []
    app = Offload(_app(release, started, finished))

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
            infers = []
            for name in ("a", "b", "c"):
                infers.append(asyncio.create_task(client.post(f"/infer/{name}")))
                await asyncio.sleep(0.05)
            while not started:
                await asyncio.sleep(0.01)
            info = await asyncio.wait_for(client.get("/info/"), 10)   # answered while "a" still blocks
            assert info.json() == {"status": "up"}
            assert not any(task.done() for task in infers) and started == ["a"]   # one model worker: b, c queue
            release.set()
            answers = [(await task).json() for task in infers]
        assert [a["model"] for a in answers] == ["a", "b", "c"] and finished == ["a", "b", "c"]
        assert all(a["thread"].startswith("sdfsmis-model") for a in answers)

    asyncio.run(main())
