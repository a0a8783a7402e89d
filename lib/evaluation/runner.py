"""Running a plan: segment every group, score every job, keep a few slices for overlays."""
from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from lib.evaluation.metrics import aggregate, volume_metrics
from lib.evaluation.protocol import Plan


def run_plan(dataset, plan: Plan, method_for_fold: Callable, empty: str = "diagonal",
             overlay_slices: int = 3, progress: bool = True) -> dict:
    """-> {'records': [...], 'summary': aggregate(...), 'overlays': {organ: {...}}, 'timings': {...},
    'methods': {fold: method.describe()}}.

    method_for_fold(fold) returns the method for that fold (a per-fold checkpoint, or one method).
    A method with `prepare(dataset, jobs)` gets the fold's jobs first (the server's batch requests);
    that time counts as segmentation time.
    """
    records, overlays, methods = [], {}, {}
    timings = {"per_fold_s": {}, "segment_s": 0.0, "metrics_s": 0.0, "slices": 0, "calls": 0}
    start = time.perf_counter()
    for fold in plan.folds:
        # volume-major order: each query volume is loaded once for all its organs
        jobs = sorted((j for j in plan.jobs if j.fold == fold), key=lambda j: j.query)
        fold_start = time.perf_counter()
        method = method_for_fold(fold)
        if hasattr(method, "prepare"):
            t0 = time.perf_counter()
            method.prepare(dataset, jobs)
            timings["segment_s"] += time.perf_counter() - t0
        bar = tqdm(jobs, desc=f"fold {fold}", unit="vol", disable=not progress, leave=False)
        for job in bar:
            case = dataset.case_ids[job.query]
            bar.set_postfix_str(f"{job.organ} vol {case}")
            image, label, spacing = dataset.load(job.query)
            pred = np.zeros(label.shape, dtype=bool)
            t0 = time.perf_counter()
            for group in job.groups:
                masks = method.run_group(dataset, job, group)
                if masks.shape != (len(group.query_z), *label.shape[:2]):
                    raise RuntimeError(f"method {method.name} returned {masks.shape} for "
                                       f"{len(group.query_z)} slices of {label.shape[:2]}")
                pred[..., list(group.query_z)] = np.moveaxis(masks, 0, -1)
                timings["calls"] += 1
            t1 = time.perf_counter()
            scored = list(job.scored_z)
            gt = np.zeros(label.shape, dtype=bool)
            gt[..., scored] = label[..., scored] == job.label
            m = volume_metrics(pred, gt, spacing, empty=empty)
            t2 = time.perf_counter()
            timings["segment_s"] += t1 - t0
            timings["metrics_s"] += t2 - t1
            timings["slices"] += len(scored)
            records.append({
                "fold": fold, "query": case, "organ": job.organ, "label": job.label,
                "n_slices": len(scored), **m,
                "support": [{"volume": dataset.case_ids[g.support], "slice": g.support_z,
                             "query_slices": [g.query_z[0], g.query_z[-1]]} for g in job.groups],
                "segment_s": round(t1 - t0, 4),
            })
            if overlay_slices and job.organ not in overlays:
                overlays[job.organ] = _overlay_data(image, gt, pred, job, dataset, overlay_slices, m["dice"])
        methods[str(fold)] = method.describe()
        timings["per_fold_s"][str(fold)] = round(time.perf_counter() - fold_start, 3)
    timings["total_s"] = round(time.perf_counter() - start, 3)
    timings["segment_s"] = round(timings["segment_s"], 3)
    timings["metrics_s"] = round(timings["metrics_s"], 3)
    timings["slices_per_s"] = round(timings["slices"] / timings["segment_s"], 3) if timings["segment_s"] else None
    summary = aggregate(records, list(dict.fromkeys(j.organ for j in plan.jobs)))
    return {"records": records, "summary": summary, "overlays": overlays, "timings": timings,
            "methods": methods}


def _overlay_data(image, gt, pred, job, dataset, n, dice) -> dict:
    """n evenly spread scored slices of the job: image, ground truth, prediction (each (H, W))."""
    scored = list(job.scored_z)
    picks = sorted({scored[int(i)] for i in np.linspace(0, len(scored) - 1, n + 2)[1:-1].round()})
    return {"query": dataset.case_ids[job.query], "fold": job.fold, "dice": dice,
            "slices": [{"z": z, "image": image[..., z].copy(), "gt": gt[..., z].copy(),
                        "pred": pred[..., z].copy()} for z in picks]}
