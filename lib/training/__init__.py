"""Self-supervised training of SD-FSMIS, by job:

options  TrainOptions, the generated `python -m lib.train` parser, a train request's options
recipe   per-preset optimisation settings (learning rates, batch, iterations, schedule)
data     episodes from the images' supervoxels, as batches
losses   the episode loss and the VAE stage's loss
publish  the output folder: atomic checkpoints, optimizer state, resume
loop     set-up (DDP), optimiser, steps, logging: `train(opts, progress, should_stop)`

The light parts (options, recipe) import without the loop; `train` and `TrainResult` load it on use.
"""
from lib.training.options import INIT_CHOICES, TrainOptions, parse_args, request_options
from lib.training.recipe import RECIPES, Recipe, lr_factor, recipe_for

_LOOP = ("train", "TrainResult", "main")

__all__ = ["INIT_CHOICES", "RECIPES", "Recipe", "TrainOptions", "lr_factor", "parse_args", "recipe_for",
           "request_options", *_LOOP]


def __getattr__(name):
    if name in _LOOP:
        from lib.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'lib.training' has no attribute {name!r}")
