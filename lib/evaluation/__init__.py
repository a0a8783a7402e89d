"""Evaluation harness: the RPT few-shot protocol, propagation mode, metrics, baselines, reports.

Entry point: `python -m lib.evaluate` (lib/evaluate.py calls cli.main). Modules: cli (arguments,
run), protocol (folds, support slices, chunks, job plans), dataset (checked folder + volume cache),
metrics (Dice/HD95/ASSD with monai.metrics), methods (sdfsmis in-process, copy, registration),
server + server_api (a MONAI Label app through batch infer), runner, report (JSON/Markdown/PNG),
paper (the paper's numbers).
"""
from lib.evaluation.protocol import (
    DEFAULT_ORGANS, Group, Job, ProtocolError, organ_slices, propagation_plan, protocol_plan, query_chunks,
    rpt_folds, split_fold, support_slice_positions,
)

__all__ = [
    "DEFAULT_ORGANS", "Group", "Job", "ProtocolError", "organ_slices", "propagation_plan", "protocol_plan",
    "query_chunks", "rpt_folds", "split_fold", "support_slice_positions",
]
