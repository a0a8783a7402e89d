"""The app's settings, parsed once from MONAI Label's `--conf key value` pairs (strings).

This module is the only reader of `conf`; everything else gets an `AppConfig`. The weight-folder
environment variables are read by lib.model.pretrained.weights_source, for the app and the CLIs alike. Values are parsed by lib.configs.fields, as request options are.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from lib.configs.fields import OptionError, as_bool, as_choice, as_float, as_fraction, as_int, as_name
from lib.model.pretrained import DINO_ENV, SD_ENV, weights_source
from lib.pipeline.options import MERGE_RULES, WALKERS, PropagateOptions

PRESETS = ("mini", "sd15", "tiny")
MAX_APPEARANCE = 100.0   # weight of the place term (lib.pipeline.appearance); far above this the prior changes nothing
DEVICES = ("auto", "cpu", "cuda")
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd")    # result file types the infer task writes
# the Abd-MRI (CHAOS) ids; only names for viewers: every non-zero annotation value is segmented
DEFAULT_LABELS = (("liver", 1), ("right_kidney", 2), ("left_kidney", 3), ("spleen", 4))


class ConfError(OptionError):
    """A `--conf` value that is not allowed; the message names the key and the valid choices."""


@dataclass(frozen=True)
class AppConfig:
    """Typed `--conf` settings (see docs/app.md for the table)."""

    preset: str | None = None          # mini | sd15 | tiny; None = automatic choice
    sd_path: str | None = None         # SD v1.5 folder (or SDFSMIS_SD_PATH)
    dino_path: str | None = None       # DINOv2-small folder (or SDFSMIS_DINO_PATH)
    checkpoint: str | None = None      # a checkpoint folder to serve
    device: str = "auto"               # auto | cpu | cuda
    threshold: float | None = None     # mask threshold; None = the checkpoint's
    batch_size: int = PropagateOptions.batch_size   # query slices per forward pass
    label_tag: str = "final"           # datastore tag of saved annotations used as support
    merge: str = PropagateOptions.merge  # how overlapping organs are resolved
    chain: bool = PropagateOptions.chain  # walk slice by slice from the annotation (across volumes: from a seed slice)
    gate: bool = PropagateOptions.gate  # keep predicted pixels in the organ's intensity range (never vs another volume)
    largest: bool = PropagateOptions.largest  # keep each organ's largest connected component (3D), as evaluated
    appearance: float = PropagateOptions.appearance  # across volumes: fuse with pretrained appearance, this weight (0 = off)
    intensity: bool = PropagateOptions.intensity  # refine with the organ's intensity log-odds (lib.pipeline.refine)
    walker: str = PropagateOptions.walker  # what steps the walk inside one volume: network | registration
    train_dir: str | None = None       # trainer output; None = <app>/model/trained
    use_trained: bool = True           # serve <train_dir>/model when it exists and matches
    result_extension: str = ".nii.gz"  # default result file type (a request may override)
    labels: tuple = DEFAULT_LABELS     # (name, value) pairs shown by clients; any non-zero value is segmented
    model_workers: int = 1             # threads serving infers in arrival order; 0 = in the request's coroutine
    torch_threads: int = 0             # torch CPU threads of the process; 0 = torch's choice (OMP_NUM_THREADS, else per core)
    max_voxels: int = 512 * 512 * 1024  # largest image / label a request may bring (read from the header)

    @property
    def sd_source(self) -> str | None:
        return weights_source(self.sd_path, SD_ENV)

    @property
    def dino_source(self) -> str | None:
        return weights_source(self.dino_path, DINO_ENV)

    def train_folder(self, app_dir) -> Path:
        return Path(self.train_dir) if self.train_dir else Path(app_dir) / "model" / "trained"


KNOWN = {f.name for f in fields(AppConfig)}
# keys MONAI Label itself reads from conf, or that other tooling may pass; accepted and ignored here
PASSTHROUGH = {"server_mode", "models", "skip_trainers", "skip_strategies", "skip_scoring", "use_pretrained_model"}


def _folder(key: str, value: str) -> str:
    p = Path(value).expanduser()
    if not p.is_dir():
        raise OptionError(f"{key} {value!r}: folder not found")
    return str(p.resolve())


def _labels(key: str, value: str) -> tuple:
    """'liver=1,spleen=4' -> (("liver", 1), ("spleen", 4))."""
    pairs = []
    for item in value.split(","):
        name, _, num = item.partition("=")
        try:
            v = int(num)
        except ValueError:
            v = -1
        if not name.strip() or not 1 <= v <= 255:
            raise OptionError(f"{key} {value!r} is not valid: expected name=value pairs (value 1-255) "
                              "separated by commas, e.g. liver=1,spleen=4")
        pairs.append((name.strip(), v))
    return tuple(pairs)


def _text(key: str, value: str) -> str:
    return value


# --conf key -> (parser, extra arguments): the one table of what each setting accepts
CONF_FIELDS = {
    "preset": (as_choice, PRESETS), "sd_path": (_text,), "dino_path": (_text,), "checkpoint": (_folder,),
    "device": (as_choice, DEVICES), "threshold": (as_fraction,), "batch_size": (as_int, 1, 4096),
    "label_tag": (as_name,), "merge": (as_choice, MERGE_RULES), "chain": (as_bool,), "gate": (as_bool,),
    "largest": (as_bool,), "appearance": (as_float, 0.0, MAX_APPEARANCE), "intensity": (as_bool,),
    "walker": (as_choice, WALKERS),
    "train_dir": (lambda k, v: str(Path(v).expanduser().resolve()),),
    "use_trained": (as_bool,), "result_extension": (as_choice, RESULT_EXTENSIONS), "labels": (_labels,),
    "model_workers": (as_int, 0, 64), "torch_threads": (as_int, 0, 256), "max_voxels": (as_int, 1000, None),
}


def parse_conf(conf: dict | None) -> AppConfig:
    """MONAI Label conf (str -> str) -> AppConfig. Unknown keys and bad values raise ConfError."""
    conf = {str(k): ("" if v is None else str(v)) for k, v in (conf or {}).items()}
    unknown = set(conf) - KNOWN - PASSTHROUGH
    if unknown:
        raise ConfError(f"unknown --conf key(s) {', '.join(sorted(unknown))}: valid keys are {', '.join(sorted(KNOWN))}")
    out: dict = {}
    for key, (parse, *args) in CONF_FIELDS.items():
        value = conf.get(key, "").strip() if key != "label_tag" else conf.get(key)
        if value is None or (value == "" and key != "label_tag"):
            continue
        try:
            out[key] = parse(key, value, *args)
        except OptionError as err:
            raise ConfError(f"--conf {err}") from None
    cfg = AppConfig(**out)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfError("--conf device 'cuda': no CUDA device is available; choose one of auto | cpu")
    return cfg


def resolve_device(cfg: AppConfig) -> str:
    """auto -> cuda when available, else cpu."""
    if cfg.device != "auto":
        return cfg.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
