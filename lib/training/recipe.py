"""Training recipes: the optimisation settings of each preset, kept apart from the model's config.

A `Recipe` is what a run optimises with (learning rates, weight decay, batch, iterations, warm-up,
clipping, schedule). `recipe_for(preset)` gives a preset's defaults; `Recipe.override` applies a
run's explicit choices (None = keep the recipe's).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class Recipe:
    """How a preset is trained (paper values for `sd15`)."""

    lr_unet: float = 1e-5          # AdamW learning rate of the UNet [1e-5]
    lr_new: float = 5e-5           # AdamW learning rate of the MLP and new layers [5e-5]
    lr_vae: float = 1e-3           # --stage vae: learning rate of the VAE
    lr_prior: float = 1e-5         # the pretrained prior's backbone, where the preset fine-tunes it (train_prior)
    weight_decay: float = 1e-2     # AdamW [1e-2]
    batch_size: int = 1            # episodes per step [1]
    iterations: int = 15000        # planned iterations [15k]
    warmup: int = 100              # linear learning-rate warm-up, iterations
    grad_clip: float = 1.0         # gradient-norm clipping (0 = off)
    schedule: str = "constant"     # after warm-up: constant [paper] | cosine (to 10% at the end)

    def __post_init__(self):
        for name in ("lr_unet", "lr_new", "lr_vae", "lr_prior", "weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, not {value!r}")
        if self.iterations < 1 or self.batch_size < 1:
            raise ValueError("iterations and batch_size must be >= 1")
        if self.warmup < 0:
            raise ValueError("warmup must be >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")

    def override(self, **values) -> "Recipe":
        """A copy with every non-None value in `values` that names a recipe field (others ignored)."""
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in values.items() if k in names and v is not None})

    def to_dict(self) -> dict:
        return asdict(self)


RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))

_WARM_START = Recipe(lr_unet=1e-4, lr_new=3e-4, batch_size=4, iterations=1500, schedule="cosine")
RECIPES: dict[str, Recipe] = {
    "sd15": Recipe(),                                                     # the paper
    "mini": Recipe(lr_unet=3e-4, lr_new=3e-4, batch_size=4, iterations=2500),   # from scratch, CPU
    # warm start from the mini checkpoint (lib.training.publish.warm_start): a shorter, gentler fine-tune
    "mini-lite2": _WARM_START,
    "mini-lite2-ft": _WARM_START,   # the same run; its backbone group takes lr_prior (1e-5)
    "tiny": Recipe(lr_unet=1e-3, lr_new=1e-3, batch_size=2, iterations=20),     # tests
}


def recipe_for(preset: str) -> Recipe:
    """A preset's recipe; a preset without one (a custom architecture) gets the paper's."""
    return RECIPES.get(preset, RECIPES["sd15"])


def describe(name: str) -> str:
    """A recipe field's defaults for --help: 'the preset's: sd15 15000, mini 2500, tiny 20' or '100'."""
    shown = {p: f"{v:g}" if isinstance(v, (int, float)) else str(v) for p, v in
             ((p, getattr(r, name)) for p, r in RECIPES.items())}
    if len(set(shown.values())) == 1:
        return next(iter(shown.values()))
    return "the preset's: " + ", ".join(f"{p} {v}" for p, v in shown.items())


def lr_factor(it: int, iterations: int, warmup: int, schedule: str = "constant") -> float:
    """Learning-rate multiplier at iteration `it` (1-based): linear warm-up over `warmup` iterations,
    then 1 (constant) or a cosine from 1 down to 0.1 at `iterations` (cosine)."""
    if warmup > 0 and it < warmup:
        return it / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, iterations - max(warmup, 0))
    done = min(1.0, max(0.0, (it - max(warmup, 0)) / span))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * done))
