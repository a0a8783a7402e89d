"""Active annotation for MONAI Label: which image, and which slice in it, to annotate next.

- records.py   the last infer result's summary per image in the datastore image info (the app writes it)
- scoring.py   `SliceUncertainty` (ScoringMethod): each image's uncertainty and novelty into its image info
- strategy.py  `LeastCertain` (Strategy): the image with the most expected wrong voxels, else the least
               like the annotated ones; its suggested slices come with it

The per-slice confidence itself is computed in lib.pipeline.confidence (shared with the evaluation).
"""
from lib.activelearning.records import RESULT_KEY, SCORE_KEY, remember, summary
from lib.activelearning.scoring import SliceUncertainty
from lib.activelearning.strategy import LeastCertain

__all__ = ["LeastCertain", "RESULT_KEY", "SCORE_KEY", "SliceUncertainty", "remember", "summary"]
