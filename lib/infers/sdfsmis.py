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

from lib.configs.app_config import MERGE_RULES, WALKERS, AppConfig
from lib.configs.fields import OptionError, default_first
from lib.configs.model_store import ModelStore
from lib.configs.request import infer_options
from lib.infers.errors import bad_request
from lib.infers.support import REQUEST_KEY, Support
from lib.infers.volume_io import read_image, read_volume, to_array, write_label
from lib.pipeline import AnnotationError, PropagateOptions, propagate
from lib.server.validate import check_infer_request

logger = logging.getLogger(__name__)


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
                "merge": default_first(cfg.merge, MERGE_RULES),
                "chain": cfg.chain,
                "gate": cfg.gate,
                "largest": cfg.largest,
                "appearance": cfg.appearance,
                "intensity": cfg.intensity,
                "walker": default_first(cfg.walker, WALKERS),
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
        try:
            return infer_options(request, self.cfg)
        except OptionError as err:
            raise bad_request(str(err)) from None

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
            if opts["ignore"] and label.dtype.kind in "biuf":
                label = np.where(np.isin(label, opts["ignore"]), 0, label)
            pre = time.perf_counter()
            with self.store.lock:
                model = self.store.get()
                run = PropagateOptions.for_model(model, opts["threshold"], batch_size=opts["batch_size"],
                                                 merge=opts["merge"], chain=opts["chain"], gate=opts["gate"],
                                                 largest=opts["largest"], appearance=opts["appearance"],
                                                 intensity=opts["intensity"], walker=opts["walker"])
                result = propagate(model, image, label, run, support_image=support_image)
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
            "confidence": {str(k): [None if not np.isfinite(c) else round(float(c), 3) for c in v]
                           for k, v in result.confidence.items()},
            "next_slice": {str(k): v for k, v in result.next_slice.items()},
            "next_slices": {str(k): v for k, v in result.next_slices.items()},
            "uncertainty": round(result.uncertainty, 4),
            "threshold": run.threshold,
            "merge": run.merge,
            "chain": run.chain,
            "gate": run.gate,
            "largest": run.largest,
            "appearance": run.appearance,
            "intensity": run.intensity,
            "walker": run.walker,
            "model": served,
            "latencies": {
                "pre": round(pre - start, 3), "infer": round(infer - pre, 3), "post": round(end - infer, 3),
                "total": round(end - start, 3),
            },
        }
