"""The app's settings, parsed once from MONAI Label's `--conf key value` pairs (strings).

This module is the only reader of `conf`; everything else gets an `AppConfig`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

PRESETS = ("mini", "sd15", "tiny")
DEVICES = ("auto", "cpu", "cuda")
MERGE_RULES = ("probability", "order")
# the Abd-MRI (CHAOS) ids; only names for viewers: every non-zero annotation value is segmented
DEFAULT_LABELS = (("liver", 1), ("right_kidney", 2), ("left_kidney", 3), ("spleen", 4))
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


class ConfError(ValueError):
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
    batch_size: int = 8                # query slices per forward pass
    label_tag: str = "final"           # datastore tag of saved annotations used as support
    merge: str = "probability"         # how overlapping organs are resolved
    chain: bool = True                 # walk slice by slice from the annotation (across volumes: from a seed slice)
    gate: bool = True                  # keep predicted pixels in the organ's intensity range (never vs another volume)
    train_dir: str | None = None       # trainer output; None = <app>/model/trained
    use_trained: bool = True           # serve <train_dir>/model when it exists and matches
    result_extension: str = ".nii.gz"  # default result file type (a request may override)
    labels: tuple = DEFAULT_LABELS     # (name, value) pairs shown by clients; any non-zero value is segmented
    model_workers: int = 1             # threads serving infers in arrival order; 0 = in the request's coroutine
    max_voxels: int = 512 * 512 * 1024  # largest image / label a request may bring (read from the header)

    @property
    def sd_source(self) -> str | None:
        return self.sd_path or os.environ.get("SDFSMIS_SD_PATH") or None

    @property
    def dino_source(self) -> str | None:
        return self.dino_path or os.environ.get("SDFSMIS_DINO_PATH") or None

    def train_folder(self, app_dir) -> Path:
        return Path(self.train_dir) if self.train_dir else Path(app_dir) / "model" / "trained"


KNOWN = {f.name for f in fields(AppConfig)}
# keys MONAI Label itself reads from conf, or that other tooling may pass; accepted and ignored here
PASSTHROUGH = {"server_mode", "models", "skip_trainers", "skip_strategies", "skip_scoring", "use_pretrained_model"}


def _choice(key: str, value: str, choices) -> str:
    v = value.strip().lower()
    if v not in choices:
        raise ConfError(f"--conf {key} {value!r} is not valid: choose one of {' | '.join(choices)}")
    return v


def parse_bool(value) -> bool | None:
    """true/false, 1/0, yes/no, on/off (any case) or a bool -> bool; anything else -> None."""
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    return True if v in TRUE else False if v in FALSE else None


def _bool(key: str, value: str) -> bool:
    parsed = parse_bool(value)
    if parsed is None:
        raise ConfError(f"--conf {key} {value!r} is not valid: choose one of true | false")
    return parsed


def _int(key: str, value: str, low: int = 1) -> int:
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfError(f"--conf {key} {value!r} is not valid: expected an integer >= {low}") from None
    if n < low:
        raise ConfError(f"--conf {key} {value!r} is not valid: expected an integer >= {low}")
    return n


def _fraction(key: str, value: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfError(f"--conf {key} {value!r} is not valid: expected a number between 0 and 1") from None
    if not 0.0 < x < 1.0:
        raise ConfError(f"--conf {key} {value!r} is not valid: expected a number between 0 and 1 (exclusive)")
    return x


def _folder(key: str, value: str) -> str:
    p = Path(value).expanduser()
    if not p.is_dir():
        raise ConfError(f"--conf {key} {value!r}: folder not found")
    return str(p.resolve())


def _labels(value: str) -> tuple:
    """'liver=1,spleen=4' -> (("liver", 1), ("spleen", 4))."""
    pairs = []
    for item in value.split(","):
        name, _, num = item.partition("=")
        try:
            v = int(num)
        except ValueError:
            v = -1
        if not name.strip() or not 1 <= v <= 255:
            raise ConfError(f"--conf labels {value!r} is not valid: expected name=value pairs (value 1-255) "
                            "separated by commas, e.g. liver=1,spleen=4")
        pairs.append((name.strip(), v))
    return tuple(pairs)


def parse_conf(conf: dict | None) -> AppConfig:
    """MONAI Label conf (str -> str) -> AppConfig. Unknown keys and bad values raise ConfError."""
    conf = {str(k): ("" if v is None else str(v)) for k, v in (conf or {}).items()}
    unknown = set(conf) - KNOWN - PASSTHROUGH
    if unknown:
        raise ConfError(f"unknown --conf key(s) {', '.join(sorted(unknown))}: valid keys are {', '.join(sorted(KNOWN))}")
    out: dict = {}
    if conf.get("preset"):
        out["preset"] = _choice("preset", conf["preset"], PRESETS)
    for key in ("sd_path", "dino_path"):
        if conf.get(key):
            out[key] = conf[key]
    if conf.get("checkpoint"):
        out["checkpoint"] = _folder("checkpoint", conf["checkpoint"])
    if conf.get("device"):
        out["device"] = _choice("device", conf["device"], DEVICES)
    if conf.get("threshold"):
        out["threshold"] = _fraction("threshold", conf["threshold"])
    if conf.get("batch_size"):
        out["batch_size"] = _int("batch_size", conf["batch_size"])
    if "label_tag" in conf:
        tag = conf["label_tag"].strip()
        if not tag or any(c in tag for c in "/\\"):
            raise ConfError(f"--conf label_tag {conf['label_tag']!r} is not valid: a non-empty name without slashes")
        out["label_tag"] = tag
    if conf.get("merge"):
        out["merge"] = _choice("merge", conf["merge"], MERGE_RULES)
    if conf.get("chain"):
        out["chain"] = _bool("chain", conf["chain"])
    if conf.get("gate"):
        out["gate"] = _bool("gate", conf["gate"])
    if conf.get("train_dir"):
        out["train_dir"] = str(Path(conf["train_dir"]).expanduser().resolve())
    if conf.get("use_trained"):
        out["use_trained"] = _bool("use_trained", conf["use_trained"])
    if conf.get("result_extension"):
        out["result_extension"] = _choice("result_extension", conf["result_extension"], (".nii.gz", ".nii", ".nrrd"))
    if conf.get("model_workers"):
        out["model_workers"] = _int("model_workers", conf["model_workers"], low=0)
    if conf.get("labels"):
        out["labels"] = _labels(conf["labels"])
    if conf.get("max_voxels"):
        out["max_voxels"] = _int("max_voxels", conf["max_voxels"], 1000)
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
