"""The MONAI Label infer task: a few annotated slices (or another volume's annotation) -> 3D uint8 label.

Registered three times on one shared network (see apps/sdfsmis/main.py): `sdfsmis` (type annotation),
`sdfsmis_scribbles` (type scribbles: 3D Slicer's Scribbles panel uploads its labelmap as `label`) and
`sdfsmis_seg` (type segmentation: OHIF's auto-segmentation button; uses the saved label).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

from lib.configs.app_config import AppConfig, parse_bool
from lib.infers.errors import bad_request
from lib.configs.model_store import ModelStore
from lib.infers.propagate import MERGE_RULES, AnnotationError, propagate
from lib.infers.support import REQUEST_KEY, Support
from lib.infers.volume_io import RESULT_EXTENSIONS, read_image, read_volume, to_array, write_label
from lib.server.validate import check_infer_request

logger = logging.getLogger(__name__)

BACKGROUND_SCRIBBLES = "background_scribbles"   # Slicer's scribbles label_info name: not an organ


def _number(request: dict, key: str, default, cast, low, high):
    value = request.get(key)
    if value in (None, ""):
        return default
    try:
        x = cast(value)
    except (TypeError, ValueError):
        raise bad_request(f"{key} {value!r} is not a number") from None
    if not low <= x <= high:
        raise bad_request(f"{key} {value!r} must be between {low} and {high}")
    return x


def _flag(request: dict, key: str, default: bool) -> bool:
    """A boolean request option (true/false, 1/0, yes/no, on/off); absent -> default."""
    value = request.get(key)
    if value is None or value == "":
        return default
    parsed = parse_bool(value)
    if parsed is None:
        raise bad_request(f"{key} {value!r} is not valid: use true or false")
    return parsed


def ignored_values(request: dict) -> list[int]:
    """Label values that are not organs: `ignore_labels` and Slicer's background scribbles (label_info)."""
    values = request.get("ignore_labels") or []
    if isinstance(values, (int, str)):
        values = [v for v in str(values).split(",") if str(v).strip()]
    try:
        out = [int(v) for v in values]
    except ValueError:
        raise bad_request(f"ignore_labels {values!r} must be integers") from None
    for info in request.get("label_info") or []:
        if isinstance(info, dict) and info.get("name") == BACKGROUND_SCRIBBLES and info.get("id") is not None:
            out.append(int(info["id"]))
    return out


class SDFSMISInfer(InferTask):
    """One variant of the SD-FSMIS propagation task; all variants share one ModelStore."""

    def __init__(self, store: ModelStore, cfg: AppConfig, type: str = InferType.ANNOTATION,
                 description: str = "SD-FSMIS: segment every annotated organ from one annotated slice"):
        super().__init__(
            type=type,
            labels={name: value for name, value in cfg.labels},
            dimension=3,
            description=description,
            config={
                "support_image": "",
                "support_tag": cfg.label_tag,
                "threshold": cfg.threshold if cfg.threshold is not None else "",
                "batch_size": cfg.batch_size,
                "merge": list(MERGE_RULES) if cfg.merge == MERGE_RULES[0] else list(reversed(MERGE_RULES)),
                "chain": cfg.chain,
                "gate": cfg.gate,
                "result_extension": cfg.result_extension,
            },
        )
        self.store = store
        self.cfg = cfg

    def is_valid(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        d = super().info()
        d["sdfsmis_model"] = self.store.source.describe()
        return d

    def get_path(self, validate=True):
        folder = self.store.source.folder
        return f"{folder}/model.safetensors" if folder else None

    # ---- request -> result -------------------------------------------------------------------
    def _options(self, request: dict) -> dict:
        merge = request.get("merge") or self.cfg.merge
        if isinstance(merge, list):   # the config() list form: first entry is the choice
            merge = merge[0] if merge else self.cfg.merge
        if merge not in MERGE_RULES:
            raise bad_request(f"merge {merge!r} is not valid: choose one of {' | '.join(MERGE_RULES)}")
        ext = request.get("result_extension") or self.cfg.result_extension
        if ext not in RESULT_EXTENSIONS:
            raise bad_request(f"result_extension {ext!r} is not valid: choose one of {' | '.join(RESULT_EXTENSIONS)}")
        return {
            "threshold": _number(request, "threshold", self.cfg.threshold, float, 1e-6, 1 - 1e-6),
            "batch_size": _number(request, "batch_size", self.cfg.batch_size, int, 1, 4096),
            "merge": merge,
            "chain": _flag(request, "chain", self.cfg.chain),
            "gate": _flag(request, "gate", self.cfg.gate),
            "extension": ext,
        }

    def __call__(self, request) -> tuple[str | None, dict]:
        start = time.perf_counter()
        check_infer_request(request, self.cfg.max_voxels)   # options, then files from their headers
        support = request.get(REQUEST_KEY)
        support = Support(**support) if isinstance(support, dict) else None
        if support is None:   # called without the app's resolution: only an uploaded label can serve
            if not request.get("label"):
                raise bad_request("no annotation: upload a `label` with the request")
            support = Support("uploaded", request["label"])
        opts = self._options(request)
        try:
            image, reference = read_volume(request["image"], "image")
            support_image = None
            if support.image:
                support_image, _ = read_volume(support.image, f"support image {support.image_id!r}")
            label = to_array(read_image(support.label))
            ignore = ignored_values(request)
            if ignore and label.dtype.kind in "biuf":
                label = np.where(np.isin(label, ignore), 0, label)
            pre = time.perf_counter()
            with self.store.lock:
                model = self.store.get()
                result = propagate(model, image, label, support_image=support_image, batch_size=opts["batch_size"],
                                   threshold=opts["threshold"], merge=opts["merge"], chain=opts["chain"],
                                   gate=opts["gate"])
                served = self.store.info()
        except AnnotationError as err:
            raise bad_request(str(err)) from None
        infer = time.perf_counter()
        path = write_label(result.label, reference, opts["extension"])
        end = time.perf_counter()
        logger.info(f"sdfsmis: {len(result.organs)} organ(s) {result.organs} from {support.kind} support, "
                    f"{result.forward_passes} batches, {end - start:.2f}s; model: {served['kind']} {served['checkpoint']}")
        return path, {
            "support": {"kind": support.kind, "image_id": support.image_id, "tag": support.tag,
                        "slices": {str(k): v for k, v in result.support.items()}},
            "organs": result.organs,
            "copied_slices": result.copied,
            "threshold": opts["threshold"] if opts["threshold"] is not None else float(model.config.threshold),
            "merge": opts["merge"],
            "chain": opts["chain"],
            "gate": opts["gate"],
            "model": served,
            "latencies": {
                "pre": round(pre - start, 3), "infer": round(infer - pre, 3), "post": round(end - infer, 3),
                "total": round(end - start, 3),
            },
        }
