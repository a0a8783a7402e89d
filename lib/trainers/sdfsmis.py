"""The MONAI Label train task `sdfsmis`: self-supervised training on ALL datastore images.

Episodes come from cached supervoxel pseudo-labels (lib.data), so no annotation is needed. The loop is
`lib.training.train`; it publishes `<train_dir>/model` atomically every `checkpoint_every` iterations and
at the end, and the infer task reloads it before its next request. MONAI Label runs this task in a
subprocess: progress reaches `/info` (train_stats) through `<train_dir>/train_stats.json`.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import signal
import time

from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.app_config import AppConfig
from lib.configs.model_store import PUBLISHED, ModelStore
from lib.model import is_checkpoint, read_meta
from lib.server import trainer_lock
from lib.training import INIT_CHOICES, TrainOptions, request_options
from lib.training.options import REQUEST_DEFAULTS

logger = logging.getLogger(__name__)

NIFTI = (".nii", ".nii.gz")
STOP_FILE = "STOP"
STATS_FILE = "train_stats.json"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, TypeError, ValueError):
        return False
    return True


class SDFSMISTrain(TrainTask):
    """Fine-tunes the served network (init=current) or trains the preset from scratch (init=preset)."""

    def __init__(self, store: ModelStore, cfg: AppConfig, app_dir):
        super().__init__("SD-FSMIS self-supervised training on every datastore image (supervoxel pseudo-labels)")
        self.store = store
        self.cfg = cfg
        self.out = cfg.train_folder(app_dir)
        self.stats_path = self.out / STATS_FILE
        self.stop_path = self.out / STOP_FILE
        self._stop_signal = False

    def config(self):
        """The options a client may send (lib.training.options.REQUEST_DEFAULTS; '' = the recipe's)."""
        return {k: list(INIT_CHOICES) if k == "init" else "" if v is None else v for k, v in REQUEST_DEFAULTS.items()}

    # ---- progress, shared with the server process through a JSON file ---------------------------
    def stats(self):
        try:
            stats = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        if stats.get("status") == "RUNNING" and not _pid_alive(stats.get("pid")):
            stats["status"] = "STOPPED"
        return stats

    def _write_stats(self, stats: dict) -> None:
        tmp = self.stats_path.with_name(f".{STATS_FILE}.{os.getpid()}")
        tmp.write_text(json.dumps(stats, indent=2))
        os.replace(tmp, self.stats_path)

    def request_stop(self) -> None:
        """Ask a running training (any process) to save a checkpoint and return."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.stop_path.touch()

    def should_stop(self) -> bool:
        return self._stop_signal or self.stop_path.exists()

    # ---- the run ---------------------------------------------------------------------------------
    def _images(self, datastore) -> list[str]:
        paths, skipped = [], []
        for image_id in sorted(datastore.list_images()):
            uri = datastore.get_image_uri(image_id)
            (paths if uri and uri.endswith(NIFTI) else skipped).append(uri or image_id)
        if skipped:
            logger.warning(f"training skips {len(skipped)} non-NIfTI image(s): {skipped[:5]}")
        if not paths:
            raise ValueError("the datastore has no NIfTI images to train on")
        return paths

    def options(self, request: dict, images: list[str]) -> tuple[TrainOptions, int]:
        """The request (lib.training.request_options) -> (TrainOptions, iterations already done)."""
        req = request_options(request)
        device = req["device"]
        if device.startswith("cuda"):
            import torch

            device = device if torch.cuda.is_available() else "cpu"
        published = self.out / PUBLISHED
        source = self.store.source
        resume, init_folder, done = False, None, 0
        if req["init"] == "current":
            if source.kind == "trained" and is_checkpoint(published):
                resume = True
                done = int(read_meta(published).get("extra", {}).get("iteration", 0))
            else:
                init_folder = source.folder
        return TrainOptions(
            data=images, out=str(self.out), preset=source.preset, init=init_folder, iterations=done + req["iterations"],
            batch_size=req["batch_size"], lr_unet=req["lr_unet"], lr_new=req["lr_new"],
            checkpoint_every=req["checkpoint_every"], device=device, resume=resume, sd_path=self.cfg.sd_source,
            dino_path=self.cfg.dino_source, progress_bar=False, log_every=1,
        ), done

    def __call__(self, request, datastore):
        from lib.training import train   # the loop's imports are heavy: only in the train process

        start = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        self.stop_path.unlink(missing_ok=True)
        for sig in (signal.SIGTERM, signal.SIGINT):   # graceful: save a checkpoint, then return
            try:
                signal.signal(sig, lambda *_: setattr(self, "_stop_signal", True))
            except ValueError:   # not the main thread (run_sync in the server): the STOP file still works
                pass
        images = self._images(datastore)
        opts, done = self.options(request, images)
        trainer_lock.acquire(self.out)   # one trainer at a time, across server restarts
        stats = {
            "status": "RUNNING", "pid": os.getpid(), "start_ts": int(start), "epoch": done, "start_epoch": done,
            "total_epochs": opts.iterations, "best_metric": 0.0, "loss": None, "images": len(images),
            "init": opts.init or ("resume" if opts.resume else f"preset {opts.preset}"),
            "model_dir": str(self.out / PUBLISHED), "current_time": "0:00:00",
        }
        self._write_stats(stats)
        logger.info(f"SD-FSMIS training: {len(images)} image(s), iterations {done} -> {opts.iterations}, "
                    f"init {stats['init']}, output {self.out}")
        best = [float("inf")]

        def progress(d):
            loss = d.get("loss_ema", d.get("loss"))
            if loss is not None and loss == loss:
                best[0] = min(best[0], float(loss))
            stats.update(epoch=int(d["iteration"]), total_epochs=int(d["iterations"]), loss=loss,
                         it_per_s=d.get("it_per_s"), best_metric=1.0 / (1.0 + best[0]) if best[0] < float("inf") else 0.0,
                         current_time=str(datetime.timedelta(seconds=int(time.time() - start))))
            self._write_stats(stats)
            logger.info(f"iteration {d['iteration']}/{d['iterations']} loss {float(d['loss']):.4f}")

        try:
            result = train(opts, progress=progress, should_stop=self.should_stop)
        except BaseException as err:
            stats.update(status="ERROR", error=str(err), total_time=str(datetime.timedelta(seconds=int(time.time() - start))))
            stats.pop("current_time", None)
            self._write_stats(stats)
            raise
        finally:
            self.stop_path.unlink(missing_ok=True)
            trainer_lock.release(self.out)
        stats.update(
            status="STOPPED" if result.stopped else "DONE", epoch=int(result.iterations_done),
            total_time=str(datetime.timedelta(seconds=int(time.time() - start))),
            published=is_checkpoint(result.model_dir), final_loss=result.final_loss,
        )
        stats.pop("current_time", None)
        self._write_stats(stats)
        logger.info(f"SD-FSMIS training {stats['status'].lower()} at iteration {result.iterations_done}; "
                    f"published {result.model_dir}")
        return stats
