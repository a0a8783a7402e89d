"""What one training run is asked to do: `TrainOptions`, its command line, and a train request's options.

The `python -m lib.train` parser is generated from the dataclass fields (type from the annotation,
default from the field, help / choices / metavar from the field's metadata), so a new option is one
field. `request_options` reads the MONAI Label train request with the shared parsers of
lib.configs.fields; the train task and the server's request check both call it.
"""
from __future__ import annotations

import argparse
import re
import types
from dataclasses import MISSING, dataclass, field, fields
from typing import Union, get_args, get_origin, get_type_hints

from lib.configs.fields import OptionError, as_choice, as_float, as_int, read
from lib.data.episodes import SETTING2_RULES
from lib.model.config import ALIGNMENTS
from lib.model.presets import PRESETS
from lib.training.recipe import RECIPE_FIELDS, SCHEDULES, describe

STAGES = ("sdfsmis", "vae")
DESCRIPTION = "Self-supervised training of SD-FSMIS on supervoxel pseudo-labels (no ground truth)."
EPILOG = """output folder (--out):
  model/            the published checkpoint, replaced atomically
  state/            optimizer moments + iteration, for resuming
  train_log.jsonl   one JSON line per logged iteration (loss, it/s, lr)

Runs on CPU or CUDA; under `torchrun --nproc_per_node=G -m lib.train` it trains data-parallel."""


def _int_list(text: str) -> list[int]:
    """'1,2,3' -> [1, 2, 3]."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def opt(default=None, help: str = "", **cli):
    """A TrainOptions field: its default, its --help text and argparse extras (choices, metavar,
    required, parse, positional)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=dict(cli, help=help))
    return field(default=default, metadata=dict(cli, help=help))


@dataclass
class TrainOptions:
    """Everything one training run needs; None = the preset's recipe (lib.training.recipe) or the
    init checkpoint's config."""

    data: list = opt([], "dataset folders (image_K.nii.gz) and/or NIfTI images; labels unused", positional=True)
    out: str = opt("runs/train", "output folder (model/, state/, train_log.jsonl)", required=True)
    preset: str | None = opt(None, "architecture (default: --init's, else mini); with an --init of another "
                                   "preset its network takes every tensor of the init that fits (warm start, e.g. "
                                   "mini-lite2 from a mini checkpoint)", choices=tuple(PRESETS))
    init: str | None = opt(None, "checkpoint folder to start from (e.g. a trained VAE stage or the app's model)")
    stage: str = opt("sdfsmis", "'vae' trains a mini/tiny VAE first", choices=STAGES)
    iterations: int | None = opt(None, "planned iterations")
    batch_size: int | None = opt(None, "episodes per step (per process)")
    lr_unet: float | None = opt(None, "AdamW learning rate of the UNet")
    lr_new: float | None = opt(None, "AdamW learning rate of the MLP, conv_in, SII (and the trained VTCT "
                                     "encoder of mini)")
    lr_vae: float | None = opt(None, "--stage vae only: learning rate of the VAE")
    lr_prior: float | None = opt(None, "learning rate of the pretrained prior's backbone, for a preset that "
                                       "fine-tunes it (mini-lite2-ft; the others keep it frozen)")
    mask_loss_weight: float | None = opt(None, "weight of Dice + BCE on the decoded query mask, added to the "
                                               "paper's latent MSE (default: the model's config; mini 1.0, "
                                               "sd15 0 = the paper)")
    weight_decay: float | None = opt(None, "AdamW weight decay")
    grad_clip: float | None = opt(None, "gradient-norm clipping (0 = off)")
    warmup: int | None = opt(None, "linear learning-rate warm-up, iterations")
    stop_at: int | None = opt(None, "stop after iteration N (published), with the learning-rate schedule still "
                                    "planned for --iterations", metavar="N")
    schedule: str | None = opt(None, "learning rate after warm-up: constant (the paper) or cosine down to 10% "
                                     "at the last iteration", choices=SCHEDULES)
    checkpoint_every: int = opt(500, "publish a checkpoint every N iterations (and at the end)", metavar="N")
    seed: int = opt(42, "random seed of episodes, augmentation and weights")
    device: str = opt("auto", "auto | cpu | cuda | cuda:N")
    resume: bool = opt(True, "continue from --out when it holds a checkpoint (default); --no-resume starts over, "
                             "replacing --out's model")
    cache_dir: str | None = opt(None, "pseudo-label cache folder (default ~/.cache/sdfsmis/pseudolabels)")
    sd_path: str | None = opt(None, "sd15: local SD v1.5 diffusers folder")
    dino_path: str | None = opt(None, "sd15: local DINOv2-small folder")
    exclude_labels: list | None = opt(None, "Setting 2: comma-separated ground-truth ids whose slices are dropped",
                                      parse=_int_list, metavar="IDS")
    setting2_rule: str = opt("strict", "Setting 2: drop slices with any (strict) or all (rpt) of the ids",
                             choices=SETTING2_RULES)
    merge: int = opt(0, "grow each episode's supervoxel by up to N random neighbour supervoxels "
                        "(multi-scale regions; 0 = ADNet/RPT's single supervoxel)", metavar="N")
    vanish: float = opt(0.0, "share of episodes whose query slice is where the region ends (empty target); "
                             "0 = ADNet/RPT")
    gap: int = opt(1, "largest support-query slice distance of an episode, drawn uniformly from 1..N while the "
                      "supervoxel lasts; 1 = ADNet/RPT's adjacent slices", metavar="N")
    cross: float = opt(0.0, "share of episodes whose support and query come from two volumes of one dataset, "
                            "the query mask the query volume's own supervoxels under the support region carried "
                            "to the same relative position in the body box (lib.data.cross_volume); 0 = "
                            "within-volume only")
    aug_strength: float = opt(1.0, "multiply the geometric augmentation ranges (rotation, shear, translation, "
                                   "scale); 1 = RPT")
    align: str | None = opt(None, "register each episode's support onto its query before the network sees it, and "
                                  "record it in the model's config so inference does the same (default: the --init "
                                  "model's; mini recipe: registration; the paper: none)", choices=ALIGNMENTS)
    log_every: int = opt(10, "write train_log.jsonl every N iterations", metavar="N")
    threads: int | None = opt(None, "torch CPU threads (1 is fastest on a busy 2-core machine)")
    progress_bar: bool = opt(True, "show a tqdm progress bar (default)")

    def check(self) -> None:
        """Raise ValueError on a choice or bound that no run could use (before any work)."""
        for name, allowed in (("stage", STAGES), ("schedule", SCHEDULES), ("setting2_rule", SETTING2_RULES),
                              ("align", ALIGNMENTS)):
            value = getattr(self, name)
            if value is not None and value not in allowed:
                what = {"setting2_rule": "Setting 2 rule", "align": "support alignment"}.get(name, name)
                raise ValueError(f"unknown {what} {value!r}: choose one of {' | '.join(allowed)}")
        if self.mask_loss_weight is not None and self.mask_loss_weight < 0:
            raise ValueError("mask_loss_weight must be >= 0")
        if self.checkpoint_every < 1 or self.log_every < 1:
            raise ValueError("checkpoint_every and log_every must be >= 1")


def _value_type(annotation):
    """int | None -> int; list -> list."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    return annotation


def _help(f) -> str:
    text = f.metadata["help"].replace("%", "%%")
    if f.name in RECIPE_FIELDS:
        return f"{text} (default: {describe(f.name)})"
    if f.default not in (None, MISSING) and not f.metadata.get("required") and not isinstance(f.default, bool):
        return f"{text} (default: %(default)s)"
    return text


def build_parser() -> argparse.ArgumentParser:
    """The `python -m lib.train` parser: one argument per TrainOptions field."""
    ap = argparse.ArgumentParser(prog="python -m lib.train", description=DESCRIPTION, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = get_type_hints(TrainOptions)
    for f in fields(TrainOptions):
        meta, kind = f.metadata, _value_type(hints[f.name])
        if meta.get("positional"):
            ap.add_argument(f.name, nargs="+", help=_help(f))
        elif kind is bool:
            ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, action=argparse.BooleanOptionalAction,
                            default=f.default, help=_help(f))
        else:
            extra = {k: meta[k] for k in ("choices", "metavar", "required") if k in meta}
            ap.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=meta.get("parse", kind),
                            default=f.default, help=_help(f), **extra)
    return ap


def parse_args(argv=None) -> TrainOptions:
    """Command-line arguments -> TrainOptions."""
    return TrainOptions(**vars(build_parser().parse_args(argv)))


# ---- the MONAI Label train request -------------------------------------------------------------
INIT_CHOICES = ("current", "preset")   # current: fine-tune the served model; preset: start over
MAX_COUNT = 10_000_000
REQUEST_DEFAULTS = {                   # the train task's config(): None = the recipe's value
    "iterations": 200,                 # iterations added by this run
    "lr_unet": None,
    "lr_new": None,
    "batch_size": None,
    "init": INIT_CHOICES[0],
    "checkpoint_every": 50,
    "device": "auto",
}
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def as_device(key: str, value) -> str:
    """auto | cpu | cuda | cuda:N."""
    v = value.strip().lower() if isinstance(value, str) else None
    if v is None or not _DEVICE.match(v):
        shown = "(a path)" if isinstance(value, str) and ("/" in value or "\\" in value) else repr(value)[:60]
        raise OptionError(f"{key} {shown} is not valid: choose one of auto | cpu | cuda | cuda:N")
    return v


def request_options(request) -> dict:
    """A train request's options -> {key: typed value} (REQUEST_DEFAULTS for absent ones); a bad value
    raises OptionError naming its key."""
    if not isinstance(request, dict):
        raise OptionError(f"train options must be a JSON object, not {type(request).__name__}")
    d = REQUEST_DEFAULTS
    return {
        "iterations": read(request, "iterations", as_int, d["iterations"], 1, MAX_COUNT),
        "lr_unet": read(request, "lr_unet", as_float, d["lr_unet"], 0.0),
        "lr_new": read(request, "lr_new", as_float, d["lr_new"], 0.0),
        "batch_size": read(request, "batch_size", as_int, d["batch_size"], 1, MAX_COUNT),
        "init": read(request, "init", as_choice, d["init"], INIT_CHOICES, listed=True),
        "checkpoint_every": read(request, "checkpoint_every", as_int, d["checkpoint_every"], 1, MAX_COUNT),
        "device": as_device("device", request["device"]) if request.get("device") not in (None, "") else d["device"],
    }   # device: a plain string (config() offers no list for it)
