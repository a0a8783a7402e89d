"""`SliceUncertainty`: each image's uncertainty from its last result, and how unlike the annotated images it is.

MONAI Label runs scoring methods at start-up, after training and after each "Next Sample" (in a
subprocess), or on `POST /scoring/sdfsmis_uncertainty`. Nothing here runs the network: the
uncertainty is the one the last infer result recorded (lib.activelearning.records); novelty is
1 - the best histogram overlap of the image's intensities with those of the labelled images.
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.tasks.scoring import ScoringMethod

from lib.activelearning.records import RESULT_KEY, SCORE_KEY

logger = logging.getLogger(__name__)
BINS = 32
HIST_KEY = "sdfsmis_histogram"


def histogram(path: str) -> list[float] | None:
    """A local volume file -> its normalised intensity histogram (BINS,), or None when unreadable."""
    from lib.infers.volume_io import read_volume
    from lib.transforms import normalize_volume

    try:
        arr, _ = read_volume(path)
    except Exception:  # noqa: BLE001 - an unreadable image gets no novelty, not a failed scoring
        return None
    h, _ = np.histogram(normalize_volume(arr.astype(np.float32)), bins=BINS, range=(0.0, 1.0))
    return (h / max(h.sum(), 1)).round(5).tolist()


def novelty(hist, labelled: list) -> float | None:
    """1 - max over labelled images of the histogram overlap sum(min(h, g)); 1 with nothing labelled."""
    if hist is None:
        return None
    if not labelled:
        return 1.0
    h = np.asarray(hist)
    return float(1.0 - max(np.minimum(h, np.asarray(g)).sum() for g in labelled))


class SliceUncertainty(ScoringMethod):
    """Stores {uncertainty, novelty, next_slice, ts} under SCORE_KEY in every image's info."""

    def __init__(self, label_tag: str = "final"):
        super().__init__("SD-FSMIS: each image's uncertainty from its last result, and its novelty")
        self.label_tag = label_tag

    def __call__(self, request, datastore):
        tag = request.get("label_tag") or self.label_tag
        local = isinstance(datastore, LocalDatastore)
        if local and hasattr(datastore, "_init_from_datastore_file"):
            datastore._init_from_datastore_file()   # a scoring subprocess: the results recorded since it started
        images = datastore.list_images()
        labelled = set(datastore.get_labeled_images(tag))
        hists = {}
        for image_id in images:
            info = datastore.get_image_info(image_id)
            hist = info.get(HIST_KEY)
            if hist is None:
                uri = datastore.get_image_uri(image_id) if local else None   # DICOMweb: no download for a hint
                hist = histogram(uri) if uri and os.path.isfile(uri) else None
                if hist is not None:
                    datastore.update_image_info(image_id, {HIST_KEY: hist})
            hists[image_id] = hist
        scores = {}
        for image_id in images:
            last = datastore.get_image_info(image_id).get(RESULT_KEY) or {}
            others = [hists[i] for i in labelled if i != image_id and hists.get(i) is not None]
            score = {"uncertainty": last.get("uncertainty"), "novelty": novelty(hists[image_id], others),
                     "next_slice": last.get("next_slice", {}), "labelled": image_id in labelled,
                     "ts": int(time.time())}
            datastore.update_image_info(image_id, {SCORE_KEY: score})
            scores[image_id] = score
        logger.info(f"sdfsmis scoring: {len(scores)} image(s) scored")
        return scores
