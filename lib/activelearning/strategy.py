"""`LeastCertain`: "Next Sample" picks the image whose annotation helps most, with the slices to draw.

Candidates are the images without a label under the label tag, or every image once all have one
(in this app a labelled image usually has a few annotated slices and can take more). Ranking:
an image never segmented first (its uncertainty unknown), the least like the labelled ones first
(novelty, lib.activelearning.scoring); then the highest uncertainty of the last result (expected
fraction of wrong organ voxels, lib.pipeline.confidence). Ties: the one served least recently.
"""
from __future__ import annotations

import logging

from monailabel.interfaces.tasks.strategy import Strategy

from lib.activelearning.records import RESULT_KEY, SCORE_KEY

logger = logging.getLogger(__name__)


def rank_key(info: dict, strategy: str) -> tuple:
    """Image info -> sort key, largest first."""
    last = info.get(RESULT_KEY) or {}
    score = info.get(SCORE_KEY) or {}
    served = (info.get("strategy") or {}).get(strategy, {}).get("ts", 0)
    if last.get("uncertainty") is None:
        return (1, float(score.get("novelty") or 0.0), -served)
    return (0, float(last["uncertainty"]), -served)


class LeastCertain(Strategy):
    def __init__(self, label_tag: str = "final"):
        super().__init__("SD-FSMIS: the least certain image (never segmented: the least like the labelled ones), "
                         "with the slice to annotate next per organ")
        self.label_tag = label_tag

    def __call__(self, request, datastore):
        tag = request.get("label_tag") or self.label_tag
        images = datastore.get_unlabeled_images(tag) or datastore.list_images()
        if not images:
            return None
        strategy = request.get("strategy", "")
        infos = {i: datastore.get_image_info(i) for i in images}
        best = max(sorted(images), key=lambda i: rank_key(infos[i], strategy))
        last = infos[best].get(RESULT_KEY) or {}
        novelty = (infos[best].get(SCORE_KEY) or {}).get("novelty")
        logger.info(f"{strategy}: selected {best} (uncertainty {last.get('uncertainty')}, novelty {novelty})")
        return {"id": best, "uncertainty": last.get("uncertainty"), "novelty": novelty,
                "next_slice": last.get("next_slice", {})}
