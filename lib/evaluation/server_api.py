"""The MONAI Label calls the server mode needs beyond monailabel.client: batch infer, its status,
label removal, and a label download that waits for the server to see a label written by the batch task.

MONAI Label runs `POST /batch/infer/<model>` in a subprocess; its labels reach the server's datastore
when the server reloads the datastore file (a file watcher), so a download right after the task ends
may briefly answer 404.
"""
from __future__ import annotations

import json
import time
from urllib.parse import quote_plus

from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException, MONAILabelUtils

FINISHED = ("DONE", "ERROR", "STOPPED")


class ServerError(RuntimeError):
    """The server refused a request or a batch task did not finish."""


class AppClient(MONAILabelClient):
    """monailabel.client plus batch infer (start, wait), label removal and a patient label download."""

    poll_s = 1.0

    def _call(self, method: str, selector: str, body=None):
        status, response, _, _ = MONAILabelUtils.http_method(method, self._server_url, selector, body,
                                                             headers=dict(self._headers))
        text = response.decode(errors="replace") if isinstance(response, bytes) else str(response)
        return status, text

    def batch_infer(self, model: str, params: dict) -> dict:
        """Start a batch infer task over the datastore (params name the images); -> the task."""
        status, text = self._call("POST", f"/batch/infer/{quote_plus(model)}", params)
        if status != 200:
            raise ServerError(f"POST /batch/infer/{model}: HTTP {status}: {text[:500]}")
        return json.loads(text)

    def batch_task(self, task_id: str) -> dict | None:
        """The batch task with this id from GET /batch/infer?all=true (None: not listed)."""
        status, text = self._call("GET", "/batch/infer?all=true")
        if status != 200:
            raise ServerError(f"GET /batch/infer: HTTP {status}: {text[:300]}")
        tasks = json.loads(text)
        return next((t for t in (tasks if isinstance(tasks, list) else [tasks]) if t.get("id") == task_id), None)

    def run_batch(self, model: str, params: dict, timeout_s: float = 24 * 3600) -> dict:
        """Start a batch task (waiting while another one runs) and poll GET /batch/infer until it ends."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                task = self.batch_infer(model, params)
                break
            except ServerError as err:
                if "HTTP 429" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(self.poll_s)       # another batch task is running
        while task.get("status") not in FINISHED:
            if time.monotonic() > deadline:
                raise ServerError(f"batch infer task {task.get('id')} did not finish in {timeout_s:.0f} s")
            time.sleep(self.poll_s)
            task = self.batch_task(task["id"]) or task
        if task["status"] != "DONE":
            details = "\n".join(list(task.get("details") or [])[-10:])
            raise ServerError(f"batch infer task {task['id']} ended {task['status']}:\n{details}")
        return task

    def fetch_label(self, image_id: str, tag: str, wait_s: float = 30.0) -> str | None:
        """GET /datastore/label -> a local file; None when the server has no such label after `wait_s`."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.download_label(image_id, tag)
            except MONAILabelClientException as err:
                if err.status_code != 404:
                    raise
            if time.monotonic() > deadline:
                return None
            time.sleep(min(self.poll_s, 0.5))

    def remove_label(self, image_id: str, tag: str) -> bool:
        """DELETE /datastore/label; False when it was not there."""
        status, text = self._call("DELETE", f"/datastore/label?id={quote_plus(image_id)}&tag={quote_plus(tag)}")
        if status not in (200, 404):
            raise ServerError(f"DELETE /datastore/label {image_id} {tag}: HTTP {status}: {text[:300]}")
        return status == 200
