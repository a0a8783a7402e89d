"""Batch infer over the datastore that works on a CPU-only server and survives per-image failures.

MONAI Label 0.8.5's BatchInferTask defaults to multi_gpu=true and then divides by the number of GPUs
(ZeroDivisionError without one); here multi_gpu is forced off when no GPU is visible. One image that
cannot be segmented (e.g. no annotation and no `support_image`) is logged and reported as
{"error": ...} instead of aborting the whole batch.
"""
from __future__ import annotations

import logging

import torch
from monailabel.interfaces.tasks.batch_infer import BatchInferTask

logger = logging.getLogger(__name__)


class SDFSMISBatchInfer(BatchInferTask):
    def __call__(self, request, datastore, infer):
        request = dict(request)
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            request["multi_gpu"] = False
            request["device"] = "cpu"

        def safe_infer(req, ds):
            try:
                return infer(req, ds)
            except Exception as err:  # noqa: BLE001 - report and go on with the next image
                detail = getattr(err, "detail", None) or str(err)
                logger.warning(f"batch infer: image {req.get('image')!r} failed: {detail}")
                return {"error": detail}

        return super().__call__(request, datastore, safe_infer)
