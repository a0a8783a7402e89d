"""Per-endpoint checks of MONAI Label's HTTP API as this app serves it (run by lib.server.guard).

`check(app, method, path, query, body)` raises ClientError (4xx) for a request MONAI Label would
mishandle: ids / tags / session ids that are not plain names, unknown ids and models, params that
are not JSON objects or set server-side keys, unsupported upload types, bad train options, a second
trainer. `body` is the parsed JSON body or multipart form (dict of field -> str | (filename,)).
Endpoints that let a client replace the served model, reload the app or read the server log are refused.
"""
from __future__ import annotations

import json
import re

from lib.server import trainer_lock
from lib.server.validate import (ClientError, check_client_params, check_train_options, plain_name,
                                 upload_name)

REFUSED = [
    (("PUT", "DELETE"), re.compile(r"^/model/[^/]+/?$"), "replacing or deleting the served model over HTTP"),
    (("POST",), re.compile(r"^/reload/?$"), "reloading the app over HTTP"),
    (("GET",), re.compile(r"^/logs(/.*)?$"), "reading the server log over HTTP (it names server paths)"),
]


def _json_field(body: dict, name: str) -> dict:
    raw = body.get(name)
    if raw in (None, ""):
        return {}
    if not isinstance(raw, str):
        raise ClientError(f"form field {name!r} must be JSON text")
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise ClientError(f"form field {name!r} is not valid JSON: {err.msg} at position {err.pos}") from None
    if not isinstance(value, dict):
        raise ClientError(f"form field {name!r} must be a JSON object")
    return value


def _known_image(app, image_id, what: str = "image") -> str:
    plain_name(image_id, f"{what} id")
    ds = app.datastore()
    if not ds.get_image_uri(image_id):
        raise ClientError(f"{what} {image_id!r} is not in the datastore", 404)
    return image_id


def _known_label(app, label_id, tag) -> None:
    plain_name(tag, "label tag")
    _known_image(app, label_id, "label")
    if tag not in app.datastore().get_labels_by_image_id(label_id):
        raise ClientError(f"no label {label_id!r} under tag {tag!r}", 404)


def _file(body: dict, name: str):
    value = body.get(name)
    return value[0] if isinstance(value, tuple) else None


def _is_dicomweb(app) -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore

    return isinstance(app.datastore(), DICOMWebDatastore)


def _trainer_busy(app) -> None:
    from monailabel.utils.async_tasks import utils

    running = [t for t in utils.tasks("train") if t.get("status") in ("SUBMITTED", "RUNNING")]
    pid = None
    for trainer in app._trainers.values():
        out = getattr(trainer, "out", None)
        pid = pid or (trainer_lock.owner(out) if out is not None else None)
    if running or utils.processes("train") or pid:
        who = f" (pid {pid})" if pid else ""
        raise ClientError(f"a training is already running{who}: wait for it or stop it (DELETE /train/)", 409)


# ---- endpoints -------------------------------------------------------------------------------------
def _infer(app, model, query, body):
    if model not in app._infers:
        raise ClientError(f"model {model!r} is not served: choose one of {', '.join(sorted(app._infers))}", 404)
    image, session = query.get("image", ""), query.get("session_id", "")
    if session:
        plain_name(session, "session_id")
    if query.get("output") == "dicom_seg" and not _is_dicomweb(app):
        raise ClientError("output=dicom_seg needs a DICOMweb datastore")
    params = check_client_params(_json_field(body, "params"))
    upload = _file(body, "file")
    if upload is not None:
        upload_name(upload, "image file")
    elif image:
        _known_image(app, image)
    elif not session:
        raise ClientError("no image: give an image id (?image=...), upload a `file`, or a session_id")
    if _file(body, "label") is not None:
        upload_name(_file(body, "label"), "label file")
    elif body.get("label") not in (None, ""):
        raise ClientError("label must be an uploaded file")
    if params.get("support_image"):
        _known_image(app, params["support_image"], "support_image")


def _datastore(app, method, rest, query, body):
    if method == "PUT" and rest in ("image", ""):
        if query.get("image"):
            plain_name(query["image"], "image id")
        _json_field(body, "params")
        name = _file(body, "file")
        if name is None:
            raise ClientError("no image file: upload it as form field `file`")
        stem, _ = upload_name(name, "image file")
        if not query.get("image") and not stem:
            raise ClientError("no image id: give ?image=<id> or a file name")
    elif method == "PUT" and rest == "label":
        _known_image(app, query.get("image"))
        plain_name(query.get("tag") or "final", "label tag")
        _json_field(body, "params")
        if _file(body, "label") is None:
            raise ClientError("no label file: upload it as form field `label`")
        upload_name(_file(body, "label"), "label file")
    elif method == "DELETE" and rest in ("image", ""):
        _known_image(app, query.get("id"))
    elif method == "DELETE" and rest == "label":
        _known_label(app, query.get("id"), query.get("tag"))
    elif rest in ("image", "image/info"):
        _known_image(app, query.get("image"))
        if method == "PUT":
            _json_field(body, "info")
    elif rest in ("label", "label/info", "updatelabelinfo"):
        label = query.get("label", query.get("image"))
        _known_label(app, label, query.get("tag"))
        if method == "PUT":
            _json_field(body, "info" if rest == "label/info" else "params")


def _train(app, model, body):
    if body is not None and not isinstance(body, dict):
        raise ClientError("train options must be a JSON object")
    body = body or {}
    if model:
        if model not in app._trainers:
            raise ClientError(f"trainer {model!r} is not available: choose one of {', '.join(sorted(app._trainers))}", 404)
        check_train_options(body)
    else:
        for name in app._trainers:
            check_train_options(body.get(name) or {})
    _trainer_busy(app)


def _batch(app, model, body):
    if model not in app._infers:
        raise ClientError(f"model {model!r} is not served: choose one of {', '.join(sorted(app._infers))}", 404)
    params = check_client_params(body if body is not None else {})
    if params.get("support_image"):
        _known_image(app, params["support_image"], "support_image")
    for key in ("max_batch_size", "max_workers"):
        if params.get(key) is not None and (not isinstance(params[key], int) or not 0 <= params[key] <= 1024):
            raise ClientError(f"{key} must be an integer between 0 and 1024")
    if params.get("device") is not None and not isinstance(params["device"], str):
        raise ClientError("device must be a string such as cpu or cuda")


def _session(method, rest, query, body):
    if method == "PUT" and rest == "":
        if str(query.get("uncompress", "false")).lower() in ("1", "true", "yes", "on"):
            raise ClientError("uncompress is not accepted: upload the image files themselves")
        files = body.get("files") if isinstance(body.get("files"), list) else [body.get("files")]
        names = [f[0] for f in files if isinstance(f, tuple)]
        if not names:
            raise ClientError("no files: upload the image as form field `files`")
        for name in names:
            upload_name(name, "session file")
    elif rest:
        plain_name(rest.strip("/"), "session_id")


def check(app, method: str, path: str, query: dict, body) -> None:
    """Raise ClientError when this request must not reach MONAI Label (see the module docstring)."""
    path = "/" + path.strip("/")
    for methods, pattern, what in REFUSED:
        if method in methods and pattern.match(path):
            raise ClientError(f"{what} is disabled on this server", 403)
    parts = path.strip("/").split("/")
    head, rest = parts[0], "/".join(parts[1:])
    form = body if isinstance(body, dict) else {}
    if head == "infer" and method == "POST":
        if len(parts) != 2:
            raise ClientError("this app serves 3D volumes only: whole-slide (wsi) inference is not available", 404)
        _infer(app, parts[1], query, form)
    elif head == "datastore":
        _datastore(app, method, rest, query, form)
    elif head == "train" and method == "POST":
        _train(app, rest, body)
    elif head == "batch" and method == "POST" and len(parts) == 3 and parts[1] == "infer":
        _batch(app, parts[2], body)
    elif head == "activelearning" and method == "POST":
        if rest not in app._strategies:
            raise ClientError(f"strategy {rest!r} is not available: choose one of {', '.join(sorted(app._strategies))}", 404)
        if body is not None and not isinstance(body, dict):
            raise ClientError("activelearning params must be a JSON object")
        if isinstance(body, dict) and body.get("label_tag") is not None:
            plain_name(body["label_tag"], "label_tag")
    elif head == "scoring" and method == "POST" and rest:
        if rest not in app._scoring_methods:
            raise ClientError(f"scoring method {rest!r} is not available", 404)
        if isinstance(body, dict) and body.get("label_tag") is not None:
            plain_name(body["label_tag"], "label_tag")
    elif head == "session":
        _session(method, rest, query, form)
    elif head == "proxy" and not _is_dicomweb(app):
        raise ClientError("the DICOMweb proxy needs a DICOMweb datastore", 404)
    elif head == "model" and method == "GET":
        name = parts[-1]
        if name not in app._infers and name not in app._trainers:
            raise ClientError(f"model {name!r} is not available", 404)
