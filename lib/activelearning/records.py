"""The last infer result of each image, kept in the datastore image info (survives restarts)."""
from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)

RESULT_KEY = "sdfsmis_result"   # image info: summary of the last infer result on the image
SCORE_KEY = "sdfsmis_score"     # image info: what the scoring method stored


def summary(params: dict) -> dict:
    """The infer result's params -> the part worth keeping: uncertainty, next slices, organs, time."""
    return {"uncertainty": params.get("uncertainty"), "next_slice": params.get("next_slice", {}),
            "organs": params.get("organs", []), "support": (params.get("support") or {}).get("kind"),
            "ts": int(time.time())}


def remember(datastore, image_id: str, params: dict) -> bool:
    """Store `summary(params)` under RESULT_KEY in the image's info; False when the datastore cannot."""
    try:
        datastore.update_image_info(image_id, {RESULT_KEY: summary(params)})
        return True
    except Exception as err:  # noqa: BLE001 - a datastore without writable info (DICOMweb) only loses the hint
        logger.warning(f"could not record the result of image {image_id!r}: {type(err).__name__}")
        return False
