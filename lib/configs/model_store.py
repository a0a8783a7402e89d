"""One SD-FSMIS network per app: chosen once from the settings, loaded once, shared by every infer
variant and the trainer, and reloaded when the trainer publishes a new checkpoint.

Model choice (first that applies):
1. `checkpoint` conf -> that folder.
2. no `preset` and no SD v1.5 weights configured -> the embedded checkpoint (<app>/model) when present,
   else a random `mini` model (with a loud warning).
3. `preset` given (or SD v1.5 weights configured: sd15) -> the embedded checkpoint when it has that
   preset, else that preset built fresh (sd15: pretrained SD/DINOv2 parts, new layers untrained).
Then, unless `use_trained false`, a checkpoint published by the trainer (<train_dir>/model) with the
same preset replaces 2./3. A checkpoint published while the server runs is always picked up.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lib.configs.app_config import AppConfig, ConfError, resolve_device
from lib.model import build_model, is_checkpoint, load_checkpoint, read_meta

logger = logging.getLogger(__name__)

PUBLISHED = "model"   # <train_dir>/model: the trainer's published checkpoint (lib.train layout)


@dataclass
class ModelSource:
    """Where the served weights come from. kind: checkpoint | embedded | trained | preset."""

    kind: str
    preset: str
    folder: str | None
    trained: bool

    def describe(self) -> str:
        state = "trained" if self.trained else "RANDOM/untrained"
        where = f"from {self.folder}" if self.folder else "built from the preset"
        return f"SD-FSMIS preset {self.preset!r} ({self.kind}, {state}) {where}"


def _meta_preset(folder) -> str:
    try:
        return read_meta(folder)["preset"]
    except (OSError, ValueError, KeyError) as err:
        raise ConfError(f"{folder} is not a usable SD-FSMIS checkpoint: {err}") from None


def choose_source(cfg: AppConfig, app_dir) -> ModelSource:
    """Apply the model-choice rules (module docstring) without loading any weights."""
    embedded = Path(app_dir) / "model"
    if cfg.checkpoint:
        if not is_checkpoint(cfg.checkpoint):
            raise ConfError(f"--conf checkpoint {cfg.checkpoint!r} is not an SD-FSMIS checkpoint "
                            "(needs config.json and model.safetensors)")
        source = ModelSource("checkpoint", _meta_preset(cfg.checkpoint), cfg.checkpoint, True)
        if cfg.preset and cfg.preset != source.preset:
            raise ConfError(f"--conf preset {cfg.preset!r} contradicts the checkpoint's preset {source.preset!r}")
        return source
    if cfg.preset is None and cfg.sd_source is None:
        if is_checkpoint(embedded):
            source = ModelSource("embedded", _meta_preset(embedded), str(embedded), True)
        else:
            source = ModelSource("preset", "mini", None, False)
    else:
        preset = cfg.preset or "sd15"
        if is_checkpoint(embedded) and _meta_preset(embedded) == preset:
            source = ModelSource("embedded", preset, str(embedded), True)
        else:
            source = ModelSource("preset", preset, None, False)
    published = cfg.train_folder(app_dir) / PUBLISHED
    if cfg.use_trained and is_checkpoint(published):
        if _meta_preset(published) == source.preset:
            source = ModelSource("trained", source.preset, str(published), True)
        else:
            logger.info(f"ignoring the trained checkpoint {published}: preset {_meta_preset(published)!r} "
                        f"is not the served preset {source.preset!r}")
    return source


def _stamp(folder: Path):
    """(mtime_ns, inode) of a checkpoint's config.json, None when absent: changes on every publication."""
    try:
        st = (folder / "config.json").stat()
        return st.st_mtime_ns, st.st_ino
    except OSError:
        return None


class ModelStore:
    """Thread-safe holder of the served network. get() loads lazily and reloads on a new publication."""

    def __init__(self, cfg: AppConfig, app_dir):
        self.cfg = cfg
        self.app_dir = Path(app_dir)
        self.device = resolve_device(cfg)
        self.source = choose_source(cfg, app_dir)
        self.published = cfg.train_folder(app_dir) / PUBLISHED
        # a publication already there is "seen" unless it is what we serve (then its stamp is taken on load)
        self._seen = _stamp(self.published) if self.source.kind != "trained" else None
        self._model = None
        self._loaded_at = None
        self._lock = threading.RLock()

    # ---- loading ---------------------------------------------------------------------------
    def _load(self, source: ModelSource):
        if source.folder:
            model = load_checkpoint(source.folder, device=self.device, sd_path=self.cfg.sd_source,
                                    dino_path=self.cfg.dino_source)
        else:
            torch.manual_seed(0)
            model = build_model(source.preset, sd_path=self.cfg.sd_source, dino_path=self.cfg.dino_source)
            model = model.to(self.device).eval()
        return model

    def _announce(self, source: ModelSource):
        line = f"serving {source.describe()} on {self.device}"
        if not source.trained:
            bar = "!" * 100
            logger.warning(bar)
            logger.warning(f"{line}: predictions are NOT meaningful until it is trained "
                           "(--conf checkpoint <folder>, an embedded checkpoint in the app's model/ folder, "
                           "or the app's train task)")
            logger.warning(bar)
        else:
            logger.info(line)

    def get(self):
        """The served model (loaded on first use, reloaded when the trainer has published since)."""
        with self._lock:
            stamp = _stamp(self.published)
            if stamp is not None and stamp != self._seen and is_checkpoint(self.published):
                try:
                    new = ModelSource("trained", _meta_preset(self.published), str(self.published), True)
                    model = self._load(new)
                except Exception as err:  # noqa: BLE001 - a bad publication must not break serving
                    logger.error(f"new checkpoint at {self.published} could not be loaded ({err}); "
                                 f"keeping {self.source.describe()}")
                    self._seen = stamp
                else:
                    self._model, self.source, self._seen = model, new, stamp
                    self._loaded_at = time.time()
                    logger.info(f"reloaded the checkpoint published by the trainer: {self.published}")
                    self._announce(new)
            if self._model is None:
                self._model = self._load(self.source)
                self._loaded_at = time.time()
                if self.source.kind == "trained":
                    self._seen = _stamp(self.published)
                self._announce(self.source)
            return self._model

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def lock(self):
        return self._lock

    def info(self) -> dict:
        """What is served (for results and /info)."""
        d = asdict(self.source)
        d["checkpoint"] = d.pop("folder")
        d["device"] = self.device
        d["loaded_at"] = self._loaded_at
        d["published_folder"] = str(self.published)
        if self.source.folder:
            try:
                d["checkpoint_extra"] = read_meta(self.source.folder).get("extra", {})
            except (OSError, ValueError):
                d["checkpoint_extra"] = {}
        return d
