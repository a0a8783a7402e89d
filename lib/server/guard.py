"""A pure ASGI middleware in front of MONAI Label's FastAPI app (installed by lib.server.install).

For every HTTP request it
1. reads the body once into a spooled temporary file (bounded by `max_body` bytes -> 413) and parses
   the JSON body or multipart form with Starlette, so lib.server.rules can check query and fields
   before MONAI Label sees them; the body is then replayed unchanged;
2. records the temporary files MONAI Label's endpoints create for uploads and removes them when the
   request ends, whatever the outcome (MONAI Label only removes them after a successful answer);
3. turns exceptions caused by the input (MONAI Label's invalid-input and not-found errors, bad JSON,
   over-long names) into 4xx answers, and any other one into a 500 that names no file;
4. replaces absolute server paths (studies, app, train and temp folders, the Python prefix) in JSON,
   text and multipart answers by placeholders such as `<studies>`.
"""
from __future__ import annotations

import contextvars
import errno
import json
import logging
import os
import shutil
import tempfile
from urllib.parse import parse_qsl

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from lib.server import rules

logger = logging.getLogger(__name__)

UPLOADS: contextvars.ContextVar[list | None] = contextvars.ContextVar("sdfsmis_uploads", default=None)
SCRUB_TYPES = (b"application/json", b"text/", b"multipart/form-data")
MAX_SCRUB = 32 << 20


class TrackingTempfile:
    """Stands in for the `tempfile` module of MONAI Label's endpoints: records NamedTemporaryFile names."""

    def __getattr__(self, name):
        return getattr(tempfile, name)

    @staticmethod
    def NamedTemporaryFile(*args, **kwargs):  # noqa: N802 - the tempfile name
        f = tempfile.NamedTemporaryFile(*args, **kwargs)
        uploads = UPLOADS.get()
        if uploads is not None:
            uploads.append(f.name)
        return f


def _remove(paths) -> None:
    for p in paths:
        try:
            if os.path.isdir(p):
                shutil.rmtree(p, ignore_errors=True)
            elif os.path.lexists(p):
                os.unlink(p)
        except OSError:
            pass


def error_status(err: BaseException) -> tuple[int, str]:
    """An exception from an endpoint -> (status, message) for the client."""
    from monailabel.interfaces.exception import (ImageNotFoundException, LabelNotFoundException,
                                                 MONAILabelError, MONAILabelException)

    if isinstance(err, HTTPException):
        return err.status_code, str(err.detail)
    if isinstance(err, (ImageNotFoundException, LabelNotFoundException)):
        return 404, err.msg
    if isinstance(err, MONAILabelException):
        return (400, err.msg) if err.error == MONAILabelError.INVALID_INPUT else (500, "internal server error")
    if isinstance(err, json.JSONDecodeError):
        return 400, f"invalid JSON: {err.msg}"
    if isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        return 400, "a name in the request is too long"
    return 500, f"internal server error ({type(err).__name__})"


class Scrubber:
    """Absolute server folders -> placeholders, longest first."""

    def __init__(self, roots: dict):
        pairs = {}
        for path, label in roots.items():
            if path:
                for p in {os.path.abspath(str(path)), os.path.realpath(str(path))}:
                    if len(p) > 1:
                        pairs[p.encode()] = label.encode()
        self.pairs = sorted(pairs.items(), key=lambda kv: -len(kv[0]))

    def __call__(self, data: bytes) -> bytes:
        for path, label in self.pairs:
            data = data.replace(path, label)
        return data

    def text(self, message: str) -> str:
        return self(message.encode()).decode(errors="replace")


class Guard:
    def __init__(self, app, monai_app, scrub: Scrubber, max_body: int):
        self.app = app
        self.monai_app = monai_app
        self.scrub = scrub
        self.max_body = int(max_body)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        token = UPLOADS.set([])
        try:
            await self._handle(scope, receive, send)
        finally:
            _remove(UPLOADS.get() or [])
            UPLOADS.reset(token)

    async def _answer(self, send, status: int, message: str, head: bool = False) -> None:
        body = json.dumps({"detail": self.scrub.text(message)}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if head else body})

    async def _read_body(self, receive, spool) -> int:
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ConnectionError("client went away")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                raise HTTPException(413, f"request body larger than {self.max_body:,} bytes")
            spool.write(chunk)
            if not message.get("more_body", False):
                return size

    async def _parse(self, scope, spool) -> dict | list | None:
        headers = dict(scope.get("headers") or [])
        ctype = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        spool.seek(0)
        if ctype == b"multipart/form-data" or ctype == b"application/x-www-form-urlencoded":
            async def replay():
                return {"type": "http.request", "body": spool.read(), "more_body": False}

            try:
                form = await Request(scope, replay).form(max_files=16, max_fields=64)
            except HTTPException:
                raise
            except Exception as err:  # noqa: BLE001 - a malformed form is the client's
                raise HTTPException(400, f"malformed form data ({type(err).__name__})") from None
            out: dict = {}
            try:
                for key, value in form.multi_items():
                    item = (value.filename or "",) if isinstance(value, UploadFile) else value
                    out[key] = out[key] + [item] if isinstance(out.get(key), list) else (
                        [out[key], item] if key in out else item)
            finally:
                await form.close()
            return out
        raw = spool.read(8 << 20)
        if not raw.strip():
            return None
        if ctype in (b"application/json", b""):
            try:
                return json.loads(raw)
            except ValueError as err:
                if ctype == b"application/json":
                    raise HTTPException(400, f"the JSON body is not valid: {err}") from None
        return None

    async def _handle(self, scope, receive, send):
        method = scope["method"]
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        head = method == "HEAD"
        spool = tempfile.SpooledTemporaryFile(max_size=4 << 20)
        try:
            try:
                size = await self._read_body(receive, spool)
                body = await self._parse(scope, spool) if size else None
                rules.check(self.monai_app, method, scope.get("path", "/"), query, body)
            except HTTPException as err:
                return await self._answer(send, err.status_code, str(err.detail), head)
            except ConnectionError:
                return None
            except Exception as err:  # noqa: BLE001 - checking must never turn into a 500 for the client
                status, message = error_status(err)
                logger.warning(f"request check failed: {type(err).__name__}: {err}")
                return await self._answer(send, 400 if status == 500 else status, message, head)
            spool.seek(0)
            await self._forward(scope, spool, receive, send, head)
        finally:
            spool.close()

    async def _forward(self, scope, spool, receive, send, head):
        done = False

        async def replay():
            nonlocal done
            if done:
                return await receive()
            chunk = spool.read(1 << 20)
            more = spool.tell() < spool_size
            done = not more
            return {"type": "http.request", "body": chunk, "more_body": more}

        spool.seek(0, os.SEEK_END)
        spool_size = spool.tell()
        spool.seek(0)
        state = {"held": None, "parts": [], "sent": False, "error": False}

        async def flush():
            start, body = state["held"], b"".join(state["parts"])
            state["held"], state["parts"] = None, []
            body = self._scrub_body(start, body)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            headers.append((b"content-length", str(len(body)).encode()))
            state["sent"] = True
            await send(dict(start, headers=headers))
            await send({"type": "http.response.body", "body": body})

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                ctype = headers.get(b"content-type", b"").lower()
                length = int(headers.get(b"content-length", b"0") or 0)
                state["error"] = message["status"] >= 500   # held until the app returns or raises
                if state["error"] or (ctype.startswith(SCRUB_TYPES) and length <= MAX_SCRUB):
                    state["held"] = message
                    return
                state["sent"] = True
                return await send(message)
            if message["type"] == "http.response.body" and state["held"] is not None:
                state["parts"].append(message.get("body", b""))
                if not message.get("more_body", False) and not state["error"]:
                    await flush()
                return
            return await send(message)

        try:
            await self.app(scope, replay, send_wrapper)
        except Exception as err:  # noqa: BLE001 - answer instead of a bare 500
            if state["sent"]:
                raise
            status, message = error_status(err)
            if status >= 500:
                logger.exception(f"{scope['method']} {scope.get('path')} failed")
            else:
                logger.info(f"{scope['method']} {scope.get('path')}: {status} {message}")
            return await self._answer(send, status, message, head)
        if state["held"] is not None:
            await flush()

    def _scrub_body(self, start: dict, body: bytes) -> bytes:
        headers = dict(start.get("headers") or [])
        ctype = headers.get(b"content-type", b"")
        if ctype.lower().startswith(b"multipart/form-data") and b"boundary=" in ctype:
            boundary = b"--" + ctype.split(b"boundary=")[1].split(b";")[0].strip(b'"')
            first = body.find(boundary)
            second = body.find(boundary, first + len(boundary)) if first >= 0 else -1
            cut = second if second >= 0 else len(body)
            return self.scrub(body[:cut]) + body[cut:]
        if ctype.lower().startswith(SCRUB_TYPES):
            return self.scrub(body)
        return body
