"""The ONE segmentation path: a support annotation -> organ masks, used by the app's infer and batch
tasks and by the evaluation's `sdfsmis` method alike, so evaluation measures what the app serves.

- options.py   PropagateOptions: resolved values (threshold a float, never None), merge rules, walkers
- step.py      the step: align -> resize -> encode support -> predict -> resize back -> prior edits
- register_step.py the step's interface by registration alone (the `registration` walker inside one volume)
- walk.py      chained walks (slice by slice from an annotation, several at once), seeded across volumes
- propagate.py volumes (H, W, Z) + a label map -> a multi-organ uint8 label map
- confidence.py per-slice confidence, the slice to annotate next, the image uncertainty
- appearance.py across volumes: the step's result (place) fused with pretrained features (appearance)
- refine.py    place x intensity log-odds: the fusion's last pass, and the chained result inside one volume

Imports flow one way: tasks -> pipeline -> lib.model / lib.transforms.
"""
from lib.pipeline.options import MERGE_RULES, WALKERS, PropagateOptions
from lib.pipeline.propagate import AnnotationError, PropagationResult, propagate

__all__ = ["AnnotationError", "MERGE_RULES", "PropagateOptions", "PropagationResult", "WALKERS", "propagate"]
