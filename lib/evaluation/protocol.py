"""The RPT evaluation protocol (and the propagation mode) as a list of jobs.

Follows RPT's test code (dataloaders/dataset_specifics.py get_folds, datasets.py TestDataset,
test.py): folds index the volumes sorted by id; the support is the fold's volume at position 2;
each query's organ slices are cut into 3 chunks with `np.linspace(0, C, 4).astype(int)`; chunk j
is segmented with the support's organ slice `int(p_j * Ns)`, p = (1/6, 1/2, 5/6).

A `Job` is one (query volume, organ) scored in 3D; its `Group`s are the segment() calls (query
slices that share one support slice, so the support branch runs once per group).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

# Label ids of the four benchmark organs (see the data README).
DEFAULT_ORGANS = {
    "abd-mri": {"liver": 1, "spleen": 4, "LK": 3, "RK": 2},
    "abd-ct": {"liver": 6, "spleen": 1, "LK": 3, "RK": 2},
}
DATASETS = tuple(DEFAULT_ORGANS)
N_PART = 3            # RPT's n_part: chunks per query / support slices per organ
SUPPORT_POSITION = 2  # RPT's supp_idx
MODES = ("protocol", "propagation")


class ProtocolError(ValueError):
    """Arguments the protocol cannot work with (unknown dataset/organ, too few volumes, bad fold)."""


@dataclass(frozen=True)
class Group:
    """One segment() call: query slices `query_z` of the job's query, one support slice."""

    support: int                 # index into the sorted volumes
    support_z: int               # slice index in the support volume
    query_z: tuple[int, ...]     # slice indices in the query volume


@dataclass(frozen=True)
class Job:
    """One query volume and organ, scored in 3D over `scored_z`."""

    fold: int | str
    query: int                   # index into the sorted volumes
    organ: str
    label: int                   # label id of the organ
    scored_z: tuple[int, ...]
    groups: tuple[Group, ...]


@dataclass
class Plan:
    mode: str
    folds: dict = field(default_factory=dict)    # fold -> {"volumes": [...], "support": i, "queries": [...]}
    jobs: list[Job] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- datasets / organs
def detect_dataset(folder_name: str) -> str | None:
    """'abd-mri' / 'abd-ct' from a folder name (e.g. ../shared/data/abd-mri), else None."""
    name = folder_name.lower()
    if re.search(r"mri|(^|[^a-z])mr([^a-z]|$)|chaos", name):
        return "abd-mri"
    if re.search(r"(^|[^a-z])ct([^a-z]|$)|sabs|btcv|synapse", name):
        return "abd-ct"
    return None


def parse_organs(spec: str | None, dataset: str | None) -> dict[str, int]:
    """'liver=1,spleen=4' or 'liver,spleen' (the dataset's ids) or None (the dataset's four organs)."""
    defaults = DEFAULT_ORGANS.get(dataset or "", {})
    if not spec:
        if not defaults:
            raise ProtocolError(
                "cannot tell the organ label ids: pass --dataset abd-mri|abd-ct or --organs name=id,..."
            )
        return dict(defaults)
    organs: dict[str, int] = {}
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if "=" in item:
            name, _, value = item.partition("=")
            name = name.strip()
            try:
                organs[name] = int(value)
            except ValueError:
                raise ProtocolError(f"--organs: {item!r} needs an integer label id (name=id)") from None
            if organs[name] <= 0:
                raise ProtocolError(f"--organs: {item!r}: label ids are positive (0 is background)")
        else:
            match = {k.lower(): k for k in defaults}.get(item.lower())
            if match is None:
                valid = ", ".join(defaults) or "none without --dataset"
                raise ProtocolError(f"--organs: unknown organ {item!r}; give name=id or one of: {valid}")
            organs[match] = defaults[match]
    if not organs:
        raise ProtocolError("--organs is empty")
    return organs


# ----------------------------------------------------------------------------- RPT rules
def rpt_folds(n_volumes: int) -> list[list[int]]:
    """Five folds of volume indices (sorted order), RPT's get_folds generalised to n volumes.

    stride s = n // 5; fold f = indices s*f .. s*f+s (s+1 volumes, neighbours share one);
    fold 4 = 4s .. n-1 plus index 0. s=4 (n=20) is RPT's CHAOST2 table, s=6 (n=30) its SABS table.
    Indices are kept in sorted order, as RPT's list comprehension does (fold 4 starts with 0).
    """
    stride = n_volumes // 5
    if stride < 2:
        raise ProtocolError(
            f"the 5-fold protocol needs at least 10 volumes (got {n_volumes}): every fold needs a "
            f"support at position {SUPPORT_POSITION} and queries"
        )
    folds = []
    for f in range(5):
        members = set(range(stride * f, min(stride * f + stride + 1, n_volumes)))
        if f == 4:
            members |= set(range(stride * f, n_volumes)) | {0}
        folds.append(sorted(members))
    return folds


def split_fold(volumes: list[int]) -> tuple[int, list[int]]:
    """(support index, query indices): the support is the fold's volume at position 2."""
    support = volumes[SUPPORT_POSITION]
    return support, [v for i, v in enumerate(volumes) if i != SUPPORT_POSITION]


def support_slice_positions(n_support: int, n_part: int = N_PART) -> list[int]:
    """Positions in the support's organ slices: int(p * Ns), p = 1/6, 1/2, 5/6 (RPT get_support_index)."""
    if n_part == 1:
        pcts = [0.5]
    else:
        half = 1 / (n_part * 2)
        step = (1.0 - 1.0 / n_part) / (n_part - 1)
        pcts = [half + step * i for i in range(n_part)]
    return [int(v) for v in (np.array(pcts) * n_support).astype("int")]


def query_chunks(n_query: int, n_part: int = N_PART) -> list[tuple[int, int]]:
    """[start, stop) bounds of the chunks of the query's organ slices: linspace(0, C, 4).astype(int)."""
    edges = np.linspace(0, n_query, n_part + 1).astype("int")
    return [(int(edges[j]), int(edges[j + 1])) for j in range(n_part)]


def organ_slices(label: np.ndarray, label_id: int) -> list[int]:
    """Sorted slice indices (last axis) of an (H, W, Z) label volume that contain `label_id`."""
    return [int(z) for z in np.flatnonzero((label == label_id).any(axis=(0, 1)))]


# ----------------------------------------------------------------------------- plans
def protocol_plan(slices: list[dict[str, list[int]]], organs: dict[str, int], folds: list[int],
                  case_ids: list[int]) -> Plan:
    """RPT 5-fold cross-volume plan. slices[i][organ] = organ slices of volume i (sorted order)."""
    table = rpt_folds(len(slices))
    plan = Plan("protocol")
    for f in folds:
        if not 0 <= f < 5:
            raise ProtocolError(f"fold {f} does not exist; folds are 0..4")
        support, queries = split_fold(table[f])
        plan.folds[f] = {"volumes": [case_ids[i] for i in table[f]], "support": case_ids[support],
                         "queries": [case_ids[i] for i in queries]}
        for organ, label_id in organs.items():
            s_slices = slices[support][organ]
            if not s_slices:
                plan.skipped.append(f"fold {f}: support volume {case_ids[support]} has no {organ} "
                                    f"(label {label_id}); {organ} not evaluated in this fold")
                continue
            s_z = [s_slices[p] for p in support_slice_positions(len(s_slices))]
            for q in queries:
                q_slices = slices[q][organ]
                if not q_slices:
                    plan.skipped.append(f"fold {f}: query volume {case_ids[q]} has no {organ}")
                    continue
                groups = tuple(
                    Group(support, s_z[j], tuple(q_slices[a:b]))
                    for j, (a, b) in enumerate(query_chunks(len(q_slices))) if b > a
                )
                plan.jobs.append(Job(f, q, organ, label_id, tuple(q_slices), groups))
    return plan


def propagation_plan(slices: list[dict[str, list[int]]], organs: dict[str, int],
                     volume_sets: dict, case_ids: list[int]) -> Plan:
    """In each volume the middle organ slice is the annotation; every other slice of the organ's
    extent (first..last organ slice) is segmented from it and scored.

    volume_sets: {fold or "all": [volume indices]}.
    """
    plan = Plan("propagation")
    for f, volumes in volume_sets.items():
        plan.folds[f] = {"volumes": [case_ids[i] for i in volumes]}
        for organ, label_id in organs.items():
            for v in volumes:
                zs = slices[v][organ]
                if not zs:
                    plan.skipped.append(f"volume {case_ids[v]} has no {organ}")
                    continue
                annotated = zs[len(zs) // 2]
                scored = tuple(z for z in range(zs[0], zs[-1] + 1) if z != annotated)
                if not scored:
                    plan.skipped.append(f"volume {case_ids[v]}: {organ} is on one slice only; nothing to propagate")
                    continue
                plan.jobs.append(Job(f, v, organ, label_id, scored, (Group(v, annotated, scored),)))
    return plan
