"""Options of the segmentation pipeline, resolved once by the caller (the infer task, the evaluation)."""
from __future__ import annotations

from dataclasses import dataclass, replace

MERGE_RULES = ("probability", "order")   # how a voxel claimed by several organs is resolved
WALKERS = ("network", "registration")   # what steps a chained walk inside one volume (lib.pipeline.register_step)


@dataclass(frozen=True)
class PropagateOptions:
    """The defaults are the app's (lib.configs.app_config takes them from here).

    threshold: mask threshold on the decoded [0, 1] map (resolved: never None); batch_size: query
    slices (or support/query pairs) per forward pass; merge: MERGE_RULES; chain: walk slice by slice
    from the annotation; gate: intensity gate (lib.transforms.postprocess); largest: keep each organ's
    largest 3D connected component; appearance: across volumes, the weight of the place term when each
    result from another volume's support is fused with pretrained appearance (lib.pipeline.appearance;
    0 = off; 0.35 chosen on fold 0 of both datasets, docs/evaluation.md); locate: with appearance, move
    the other volume's support onto each query slice by feature template matching first (off: the
    support where it is, for ablations); intensity: refine with the intensity log-odds of the annotated
    organ, then of the query's own (lib.pipeline.refine): across volumes inside the appearance fusion,
    inside one volume on the chained walk's result (off: for ablations); walker: WALKERS, what makes
    each step of a walk inside one volume (registration, the default: the neighbour's mask registered
    onto the slice, lib.pipeline.register_step, measured above the embedded network's walk in a third of
    its time, docs/evaluation.md; network: the model's step; across volumes the network always segments)."""

    threshold: float
    batch_size: int = 8
    merge: str = "probability"
    chain: bool = True
    gate: bool = True
    largest: bool = True
    appearance: float = 0.35
    locate: bool = True
    intensity: bool = True
    walker: str = "registration"

    def __post_init__(self):
        if self.merge not in MERGE_RULES:
            raise ValueError(f"unknown merge rule {self.merge!r}: choose one of {' | '.join(MERGE_RULES)}")
        if self.walker not in WALKERS:
            raise ValueError(f"unknown walker {self.walker!r}: choose one of {' | '.join(WALKERS)}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise ValueError(f"threshold {self.threshold!r} must be between 0 and 1")
        if not float(self.appearance) >= 0.0:
            raise ValueError(f"appearance {self.appearance!r} must be 0 (off) or a positive weight")

    @classmethod
    def for_model(cls, model, threshold: float | None = None, **values) -> "PropagateOptions":
        """The one place where "no threshold given" becomes the model's own default."""
        return cls(threshold=float(model.config.threshold if threshold is None else threshold), **values)

    def but(self, **values) -> "PropagateOptions":
        return replace(self, **values)
