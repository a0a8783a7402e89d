"""What a client may send: plain ids and tags, bounded numbers, label lists, train options.

Every check raises `ClientError` (an HTTP 4xx with a message); the guard (lib.server.guard) runs them
before MONAI Label sees a request, and the infer task runs `check_infer_params` again on its own request.
"""
from __future__ import annotations

import os
import tempfile

from fastapi import HTTPException

from lib.configs.fields import OptionError, as_float, as_name
from lib.configs.request import REQUEST_KEY, infer_options

UPLOAD_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")       # image and label files the app reads
RESERVED_PARAMS = {"image", "label", "file", "model", "session", "session_id", "description"}
NAME_PARAMS = ("support_image", "support_tag", "label_tag", "client_id")


class ClientError(HTTPException):
    """A request refused because of its input: 400 bad, 403 not allowed, 404 unknown, 409 busy, 413 too big."""

    def __init__(self, message: str, status_code: int = 400):
        super().__init__(status_code=status_code, detail=message)

    def __str__(self) -> str:
        return f"{self.status_code}: {self.detail}"


def _show(value, n: int = 60) -> str:
    """A client value for a message; paths are not echoed."""
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return "(a path)"
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def plain_name(value, what: str = "id") -> str:
    """An image id, label tag or session id (lib.configs.fields.as_name) or ClientError 400."""
    try:
        return as_name(what, value)
    except OptionError as err:
        raise ClientError(str(err)) from None


def upload_name(filename, what: str = "file") -> tuple[str, str]:
    """An uploaded file's name -> (id, extension); only NIfTI / NRRD files with plain names."""
    name = filename or ""
    ext = next((e for e in UPLOAD_EXTENSIONS if name.lower().endswith(e)), None)
    if ext is None:
        raise ClientError(f"{what} {_show(name)} is not supported: upload a {' | '.join(UPLOAD_EXTENSIONS)} file "
                          "(detached headers such as .nhdr / .hdr / .mhd and binary labels are refused)", 415)
    name = name.replace("\\", "/").rsplit("/", 1)[-1]   # clients may send a full path: its base name counts
    stem = name[: -len(ext)]
    return (plain_name(stem, f"{what} name") if stem else ""), ext


def is_upload_path(path) -> bool:
    """A file the server received with this request (MONAI Label writes uploads to the temp folder)."""
    if not isinstance(path, str) or not path:
        return False
    tmp = os.path.realpath(tempfile.gettempdir())
    return os.path.dirname(os.path.realpath(path)) == tmp


def _path_like(value: str) -> bool:
    v = value.replace("\\", "/")
    return v.startswith(("/", "~")) or "../" in v or v.endswith("/..") or v == ".." or "\x00" in v


def check_infer_params(params: dict) -> dict:
    """The infer request's own options, before any file is read (400 on a bad one); returns params."""
    if not isinstance(params, dict):
        raise ClientError(f"params {_show(params)} must be a JSON object")
    for key in NAME_PARAMS:
        if params.get(key) not in (None, ""):
            plain_name(params[key], key)
    try:
        infer_options(params)   # the infer task's own parser: the same rules, checked before any file is read
    except OptionError as err:
        raise ClientError(str(err)) from None
    if params.get("timeout") not in (None, ""):
        try:
            as_float("timeout", params["timeout"], 1, 3600)
        except OptionError as err:
            raise ClientError(str(err)) from None
    for key, value in params.items():
        if isinstance(value, str) and _path_like(value):
            raise ClientError(f"{key} {_show(value)} looks like a server path: paths are not accepted")
    return params


def check_client_params(params, reserved=RESERVED_PARAMS) -> dict:
    """A client's params object (infer, batch infer): no keys the server sets itself, valid options."""
    if not isinstance(params, dict):
        raise ClientError(f"params {_show(params)} must be a JSON object")
    bad = sorted(k for k in params if k in reserved or str(k).startswith("_"))
    if bad:
        raise ClientError(f"params may not set {', '.join(bad)}: the server sets these itself")
    return check_infer_params(params)


def check_train_options(options) -> dict:
    """The sdfsmis train options (docs/app.md), checked before the task is submitted: the train task's
    own parser (lib.training.request_options), its OptionError as a 400."""
    from lib.configs.fields import OptionError
    from lib.training.options import request_options

    try:
        request_options(options)
    except OptionError as err:
        raise ClientError(str(err)) from None
    return options


def check_infer_request(request: dict, max_voxels: int | None = None) -> None:
    """The infer task's one call: its options (check_infer_params), then its files (lib.server.files):
    the image, the support annotation and the support image, each checked from its header and data
    stream before a voxel is read, and the annotation on the grid of the image it belongs to."""
    from lib.server.files import DEFAULT_MAX_VOXELS, check_file, check_same_grid

    check_infer_params({k: v for k, v in request.items() if k not in RESERVED_PARAMS and not str(k).startswith("_")})
    limit = int(max_voxels or DEFAULT_MAX_VOXELS)
    image = check_file(request["image"], limit, "image") if isinstance(request.get("image"), str) else None
    support = request.get(REQUEST_KEY) or {"label": request.get("label")}
    if not isinstance(support, dict) or not isinstance(support.get("label"), str):
        return
    label = check_file(support["label"], limit, "annotation")
    if support.get("image"):
        reference, what = check_file(support["image"], limit, "support image"), "support annotation"
    else:
        reference, what = image, "annotation"
    if reference is not None and len(reference.size) == 3 or (reference is not None and reference.size[3:] == (1,)):
        check_same_grid(label, reference, what)
