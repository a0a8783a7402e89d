"""Annotation propagation: a few annotated slices -> a 3D multi-organ label (numpy / torch only).

Volumes are (H, W, Z) arrays, Z (the last axis) the slice axis; inside, they are turned once into
slice stacks (Z, H, W). Every non-zero annotation value is an organ, segmented 1-way with its own
support and merged into one uint8 label map.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from lib.pipeline.appearance import AppearancePrior
from lib.pipeline.confidence import next_slices, slice_confidence
from lib.pipeline.options import PropagateOptions
from lib.pipeline.refine import refine_inside
from lib.pipeline.register_step import RegistrationStep
from lib.pipeline.step import Step, decided
from lib.pipeline.walk import ChainWalk, chain, seeded_chain
from lib.transforms import normalize_volume
from lib.transforms.align import support_aligner
from lib.transforms.postprocess import chain_gate, intensity_gate, largest_component


class AnnotationError(ValueError):
    """An image or annotation the propagation cannot use (the app answers HTTP 400 with the message)."""


def check_volume(image, name: str = "image") -> np.ndarray:
    """A 3D volume (H, W, Z) with at least 2 slices -> float32 (H, W, Z) (files: lib.infers.volume_io)."""
    arr = np.asarray(image)
    if arr.ndim != 3 or arr.shape[-1] < 2:
        raise AnnotationError(
            f"{name} has shape {tuple(arr.shape)}: SD-FSMIS needs a 3D volume (H, W, Z) with at least 2 slices "
            "(2D images are not supported)"
        )
    return arr.astype(np.float32, copy=False)


def check_annotation(label, shape, name: str = "annotation") -> np.ndarray:
    """A label map of `shape` with whole values 0-255, not all zero -> uint8 (H, W, Z)."""
    arr = np.asarray(label)
    if tuple(arr.shape) != tuple(shape):
        raise AnnotationError(f"{name} shape {tuple(arr.shape)} differs from the image shape {tuple(shape)}")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind not in "biuf":
        raise AnnotationError(f"{name} has non-numeric values (dtype {arr.dtype})")
    if arr.dtype.kind == "f" and (not np.isfinite(arr).all() or not np.all(np.mod(arr, 1) == 0)):
        raise AnnotationError(f"{name} has non-integer values: label values must be whole numbers 0-255")
    if arr.min() < 0:
        raise AnnotationError(f"{name} has negative values (min {arr.min()}): label values must be 0-255")
    if arr.max() > 255:
        raise AnnotationError(f"{name} has values above 255 (max {arr.max()}): label values must be 0-255")
    if not arr.any():
        raise AnnotationError(f"{name} is empty (all zero): annotate the organ on at least one slice")
    return arr.astype(np.uint8)


def organ_values(label: np.ndarray) -> list[int]:
    """Sorted non-zero values of a label map: one organ each."""
    return [int(v) for v in np.unique(label) if v != 0]


def annotated_slices(stack: np.ndarray) -> np.ndarray:
    """(Z, H, W) -> the indices of the slices with any non-zero pixel."""
    return np.flatnonzero(np.asarray(stack).reshape(stack.shape[0], -1).any(axis=1))


def nearest_slices(query_z, support_z, n_query: int, n_support: int | None = None) -> np.ndarray:
    """For each query slice index, the nearest support slice index.

    Same volume (n_support None or == n_query): nearest by index. Another volume: nearest by relative
    position z / (n - 1) along the slice axis. Ties go to the lower support index.
    """
    query_z = np.asarray(query_z, dtype=np.int64)
    support_z = np.asarray(support_z, dtype=np.int64)
    if support_z.size == 0:
        raise AnnotationError("no annotated support slice")
    if n_support is None or n_support == n_query:
        qpos, spos = query_z.astype(np.float64), support_z.astype(np.float64)
    else:
        qpos, spos = query_z / max(n_query - 1, 1), support_z / max(n_support - 1, 1)
    return support_z[np.argmin(np.abs(qpos[:, None] - spos[None, :]), axis=1)]


def seed_slice(targets: np.ndarray, z_s: int, n_query: int, n_support: int) -> int:
    """Across volumes: the query slice (of `targets`) at the support slice's relative position: the
    nearest of them to z_s, seen from the support volume."""
    return int(nearest_slices([z_s], targets, n_support, n_query)[0])


@dataclass
class PropagationResult:
    """label: uint8 (H, W, Z); support: organ value -> support slice indices used; copied: z copied as is;
    confidence: organ value -> float (Z,) per-slice confidence in [0, 1], NaN where the organ is neither
    predicted nor annotated (lib.pipeline.confidence); next_slice: organ value -> the slice to annotate
    next (None: nothing left to suggest), next_slices: up to 3, best first; uncertainty: the expected fraction of wrong organ voxels."""

    label: np.ndarray
    organs: list[int]
    support: dict[int, list[int]] = field(default_factory=dict)
    copied: list[int] = field(default_factory=list)
    forward_passes: int = 0
    seconds: float = 0.0
    confidence: dict[int, np.ndarray] = field(default_factory=dict)
    next_slice: dict[int, int | None] = field(default_factory=dict)
    next_slices: dict[int, list[int]] = field(default_factory=dict)
    uncertainty: float = 0.0


def propagate(model, image, support_label, options: PropagateOptions, support_image=None,
              normalized: bool = False, slices=None, walks_cache: dict | None = None,
              aligner=None) -> PropagationResult:
    """Segment every organ of `support_label` in `image` (docs/app.md, "How a result is made").

    model: the SD-FSMIS model; None only for a chained walk inside one volume with walker registration
        (the evaluation's registration baseline walks so).

    image: (H, W, Z) query volume. support_label: label map on the support volume (H', W', Z').
    support_image: the support volume; None = `image` itself (inside one volume: the annotated slices
        are kept unchanged in the result, and each organ is segmented on every slice it is not annotated on).
    Each query slice is served, per organ, by the nearest slice annotated with that organ. options.chain:
        inside one volume the walk starts at each annotated slice (all organs walk at once); across
        volumes the query slice at the support slice's relative position is segmented first and the walk
        starts there. options.gate: inside one volume against the annotation; across volumes only in a
        chain, against the seed result (each volume has its own intensity scale). A model whose config
        has `align_support = "registration"` gets every support registered onto its query slice first.
        options.appearance > 0: across volumes, the other volume's support is located on every query
        slice, each slice is segmented from its located support and fused with pretrained appearance
        (lib.pipeline.appearance; options.locate off: the support as it is), in place of the seeded
        chain (fusing a chain's seed and walking from it measured 9 points worse, docs/evaluation.md).
        options.intensity (with the chain, inside one volume): each organ's walked result is refined by
        its place and the intensity log-odds of its annotated slices, then of itself (lib.pipeline.refine).
    slices: the query slice indices wanted (default all); the others stay 0. Chained walks always walk
        their whole range, so a wanted slice gets exactly what a full run gives it.
    normalized: the volumes are already scaled to [0, 1] (else lib.transforms.normalize_volume).
    walks_cache: a dict kept by the caller for one image, model and options while slices are added to its
        annotation: a chained walk from an annotated slice is reused when an earlier call walked a range
        that holds the new one (each direction of a walk depends only on its own slices, so the rows are
        the same; an added slice only narrows its neighbours' ranges).
    aligner: the registration walker's SliceAligner (default: its default parameters, one thread).
    """
    start = time.perf_counter()
    same = support_image is None
    query = check_volume(image, "image")
    support = query if same else check_volume(support_image, "support image")
    label = check_annotation(support_label, support.shape, "annotation" if same else "support annotation")
    if not normalized:
        query = normalize_volume(query)
        support = query if same else normalize_volume(support)
    q, s, lab = (np.ascontiguousarray(np.moveaxis(v, -1, 0)) for v in (query, support, label))   # (Z, H, W)
    n_query, n_support = q.shape[0], s.shape[0]
    organs = organ_values(lab)
    copied = annotated_slices(lab).tolist() if same else []
    every = np.arange(n_query)
    wanted = every if slices is None else np.intersect1d(every, np.asarray(slices, dtype=np.int64))
    if same and len(organs) == 1:
        wanted = np.setdiff1d(wanted, copied)
    registration = RegistrationStep(options.threshold, aligner) if same and options.walker == "registration" else None
    if model is None:   # the registration baseline of the evaluation: this walk, no network
        if registration is None or not options.chain:
            raise ValueError("without a model only a chained walk inside one volume by registration can segment")
        step = registration
    else:
        aligner = support_aligner(getattr(model.config, "align_support", "none"))
        step = Step(model, options.threshold, aligner.align if aligner is not None else None, options.batch_size)
    walker = registration or step   # what steps the chained walks inside one volume
    prior = None if same or not options.appearance else AppearancePrior(
        options.appearance, device=str(model.device), memo=True, locate=options.locate,
        intensity=options.intensity)   # organs share slices
    probs = {v: np.zeros(q.shape, dtype=np.float32) for v in organs}     # (Z, H, W) per organ
    agree = {v: np.full(n_query, np.nan, dtype=np.float32) for v in organs}   # per-step agreement (walk.chain)
    source = {v: np.full(n_query, -1, dtype=np.int64) for v in organs}       # serving annotated slice, same volume
    result = PropagationResult(np.zeros(query.shape, dtype=np.uint8), organs, copied=copied)
    walks, owners = [], []
    for value in organs:
        mask = lab == value
        support_z = annotated_slices(mask)
        result.support[value] = support_z.tolist()
        if wanted.size == 0:
            continue
        query_z = np.setdiff1d(every, support_z) if same else every   # its own annotated slices are kept
        assign = nearest_slices(query_z, support_z, n_query, None if same else n_support)
        if same:
            source[value][query_z], source[value][support_z] = assign, support_z
        for z_s in np.unique(assign):
            targets = query_z[assign == z_s]
            mine = np.intersect1d(targets, wanted)
            if mine.size == 0:
                continue
            if options.chain and same:
                verify = chain_gate(q, int(z_s), mask[z_s]) if options.gate else None
                lo, hi = int(min(targets.min(), z_s)), int(max(targets.max(), z_s))
                key = (value, int(z_s), hash(mask[z_s].tobytes()))
                hit = walks_cache.get(key) if walks_cache is not None else None
                if hit is not None and hit[0] <= lo and hi <= hit[1]:
                    probs[value][targets], agree[value][targets] = hit[2][targets - hit[0]], hit[3][targets - hit[0]]
                    continue
                walks.append(ChainWalk(int(z_s), mask[z_s], verify, lo, hi))
                owners.append((value, targets, key))
            elif options.chain and prior is None:
                lo, hi = int(targets.min()), int(targets.max())
                seed = seed_slice(targets, int(z_s), n_query, n_support) - lo
                _, p = seeded_chain(step, q[lo:hi + 1], seed, s[z_s], mask[z_s],
                                    chain_gate if options.gate else None)
                probs[value][targets] = p[targets - lo]
            elif prior is not None:   # located supports, the step from each, fused with appearance
                rows = np.searchsorted(targets, mine)
                near = prior.fused_rows(rows, len(targets))
                images, masks = prior.supports(q[targets], s[z_s], mask[z_s], near)
                p = step.pairs(q[targets[near]], images, masks)[0]
                fused = prior.fuse_probs(q[targets[near]], s[z_s], mask[z_s], p, step.threshold, masks, targets[near])
                probs[value][mine] = fused[np.isin(near, rows)]
            else:
                p = step.shared(q[mine], s[z_s], mask[z_s])
                if options.gate and same:
                    gated = intensity_gate(q[mine], p > options.threshold, s[z_s][None], mask[z_s][None])
                    p = np.where(gated, p, 0.0)
                probs[value][mine] = p
    agreements = []
    for (value, targets, key), wk, (_, p), a in zip(owners, walks, chain(walker, q, walks, agreement=agreements)
                                                    if walks else [], agreements):
        probs[value][targets] = p[targets]
        agree[value][targets] = a[targets]
        if walks_cache is not None:
            walks_cache[key] = (wk.lo, wk.hi, p[wk.lo:wk.hi + 1].copy(), a[wk.lo:wk.hi + 1].copy())
    if options.chain and same and walks:
        _bridge(walker, q, lab, probs, agree, source, options.gate)
    if options.chain and same and options.intensity:
        _refine(q, lab, probs, wanted, options.threshold)
    _merge(result.label, probs, wanted, options, lab if same else None)
    if copied:   # annotated pixels kept exactly; an organ not annotated on such a slice is segmented there
        result.label[..., copied] = np.where(label[..., copied] > 0, label[..., copied], result.label[..., copied])
    _confidence(result, probs, agree, source, lab if same else None)
    result.forward_passes = step.forward_passes
    result.seconds = time.perf_counter() - start
    return result


def _bridge(step: Step | RegistrationStep, q: np.ndarray, lab: np.ndarray, probs, agree, source, gate: bool) -> None:
    """Between two slices annotated with an organ the organ is there: a slice its nearer annotated slice's
    walk left empty (that walk ended early) is walked to from the other annotated slice instead.
    q, lab (Z, H, W); probs / agree / source per organ as in `propagate`, filled in place."""
    walks, owners = [], []
    for value, p in probs.items():
        mask = lab == value
        support_z = annotated_slices(mask)
        for a, b in zip(support_z[:-1], support_z[1:]):
            if b - a < 2:
                continue
            inner = np.arange(a + 1, b)
            empty = inner[~(p[inner] > step.threshold).reshape(len(inner), -1).any(axis=1)]
            for near, far in ((a, b), (b, a)):
                hole = empty[source[value][empty] == near]
                if hole.size:
                    lo, hi = (int(hole.min()), int(far)) if far > near else (int(far), int(hole.max()))
                    verify = chain_gate(q, int(far), mask[far]) if gate else None
                    walks.append(ChainWalk(int(far), mask[far], verify, lo, hi))
                    owners.append((value, hole, int(far)))
    agreements = []
    for (value, hole, far), (_, p), a in zip(owners, chain(step, q, walks, agreement=agreements) if walks else [],
                                            agreements):
        probs[value][hole], agree[value][hole], source[value][hole] = p[hole], a[hole], far


def _refine(q: np.ndarray, lab: np.ndarray, probs, wanted: np.ndarray, threshold: float) -> None:
    """Inside one volume, each organ's chained result refined by its place and the intensity log-odds of
    its annotated slices, then of itself (lib.pipeline.refine.refine_inside), on the wanted slices; its
    statistics come from every walked slice, so a wanted slice gets what a full run gives it.
    q, lab (Z, H, W); probs per organ (Z, H, W), changed in place."""
    for value, p in probs.items():
        mask = lab == value
        z = annotated_slices(mask)
        keep = refine_inside(q, p > threshold, q[z], mask[z])
        p[wanted] = decided(p[wanted], keep[wanted], threshold)


def _confidence(result: PropagationResult, probs, agree, source, annotation) -> None:
    """Per-organ confidence per slice and the slice to annotate next, on the final label map."""
    final = np.moveaxis(result.label, -1, 0)
    wrong, total = 0.0, 0
    for value in result.organs:
        mask = final == value
        conf = slice_confidence(probs[value], mask, agree[value], source[value])
        result.confidence[value] = conf
        annotated = annotated_slices(annotation == value) if annotation is not None else []
        ranked = next_slices(conf, mask, annotated, source[value] if annotation is not None else None)
        result.next_slices[value] = ranked
        result.next_slice[value] = ranked[0] if ranked else None
        area = mask.reshape(len(mask), -1).sum(axis=1)
        wrong += float(np.nansum((1.0 - conf) * area))
        total += int(area.sum())
    result.uncertainty = wrong / total if total else 0.0


def _merge(out: np.ndarray, probs: dict[int, np.ndarray], wanted: np.ndarray, options: PropagateOptions,
           annotation: np.ndarray | None) -> None:
    """Per-organ probabilities (Z, H, W) -> `out` (H, W, Z) on the wanted slices: "probability" (a voxel
    above threshold for several organs gets the most probable; ties go to the later organ) or "order"
    (later values overwrite). With `largest`, each organ first keeps its largest 3D connected component,
    its annotated slices (`annotation` (Z, H, W), inside one volume) counted as part of it."""
    best = np.full((len(wanted),) + out.shape[:2], -1.0, dtype=np.float32)
    labels = np.zeros_like(best, dtype=np.uint8)
    for value, p in probs.items():
        fg = p > options.threshold
        if options.largest:
            if annotation is not None:
                fg |= annotation == value
            fg = largest_component(fg)
        p, fg = p[wanted], fg[wanted]
        if options.merge == "probability" and len(probs) > 1:
            fg &= p >= best
            best = np.where(fg, p, best)
        labels[fg] = value
    out[..., wanted] = np.moveaxis(labels, 0, -1)
