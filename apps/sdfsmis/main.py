"""MONAI Label app: SD-FSMIS few-shot organ segmentation from one annotated slice.

Start from the repository root:  monailabel start_server --app apps/sdfsmis --studies <folder> [--conf key value]
Settings (--conf) and usage: docs/app.md.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]   # the repository root, which holds lib/
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
# MONAI Label finds the dcmqi converters (pip package, DICOM SEG) on PATH: the interpreter's bin folder
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")

import torch  # noqa: E402
from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402
from monailabel.interfaces.tasks.infer_v2 import InferType  # noqa: E402

from lib.activelearning import LeastCertain, SliceUncertainty, remember  # noqa: E402
from lib.configs.app_config import ConfError, parse_conf  # noqa: E402
from lib.infers.batch import SDFSMISBatchInfer  # noqa: E402
from lib.configs.model_store import ModelStore  # noqa: E402
from lib.infers.sdfsmis import SDFSMISInfer  # noqa: E402
from lib.infers.support import REQUEST_KEY, check_image, resolve_support  # noqa: E402
from lib.server import workers  # noqa: E402
from lib.server import install as install_guard  # noqa: E402
from lib.server.datastore import safe_datastore  # noqa: E402
from lib.server.validate import is_upload_path  # noqa: E402
from lib.trainers import graceful_stop  # noqa: E402
from lib.trainers.sdfsmis import SDFSMISTrain  # noqa: E402

logger = logging.getLogger(__name__)

INFER_NAMES = ("sdfsmis", "sdfsmis_scribbles", "sdfsmis_seg")


class SDFSMISApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self._scoring_lock = threading.Lock()
        try:
            self.cfg = parse_conf(conf)
            if self.cfg.torch_threads:   # process-wide; every worker thread's OpenMP pool follows it
                torch.set_num_threads(self.cfg.torch_threads)
            self.store = ModelStore(self.cfg, app_dir)
        except ConfError as err:
            logger.error(f"SD-FSMIS app cannot start: {err}")
            raise
        logger.info(f"SD-FSMIS model choice: {self.store.source.describe()} (device {self.store.device})")
        card = Path(self.store.source.folder) / "README.md" if self.store.source.folder else None
        if card is not None and card.is_file():
            logger.info(f"SD-FSMIS model card (training data, evaluation, limits): {card}")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="SD-FSMIS",
            description="Few-shot organ segmentation from one annotated slice (Stable Diffusion, SD-FSMIS)",
            version="1.0",
        )

    def init_infers(self):
        return {
            "sdfsmis": SDFSMISInfer(self.store, self.cfg, InferType.ANNOTATION),
            "sdfsmis_scribbles": SDFSMISInfer(
                self.store, self.cfg, InferType.SCRIBBLES,
                "SD-FSMIS from the Scribbles panel: each scribble label value is an organ",
            ),
            "sdfsmis_seg": SDFSMISInfer(
                self.store, self.cfg, InferType.SEGMENTATION,
                f"SD-FSMIS from the saved '{self.cfg.label_tag}' label of this image (or a support_image)",
            ),
        }

    def init_trainers(self):
        return {"sdfsmis": SDFSMISTrain(self.store, self.cfg, self.app_dir)}

    def init_strategies(self):
        """"Next Sample": the least certain image with its suggested slices; MONAI Label's random one stays."""
        return {"sdfsmis_uncertain": LeastCertain(self.cfg.label_tag), "random": Random()}

    def init_scoring_methods(self):
        return {"sdfsmis_uncertainty": SliceUncertainty(self.cfg.label_tag)}

    def init_datastore(self):
        return safe_datastore(self.studies, self.cfg.max_voxels) or super().init_datastore()

    def init_batch_infer(self):
        return SDFSMISBatchInfer()

    def on_init_complete(self):
        super().on_init_complete()
        if self.cfg.model_workers:   # infers and uploads in worker threads: the event loop keeps answering
            workers.install(self.cfg.model_workers)
        self.store.get()   # load now (server only; train / batch subprocesses load on first use)
        install_guard(self)   # server only: request checks in front of MONAI Label (lib/server)
        trainer = self._trainers.get("sdfsmis")
        if trainer is not None:
            graceful_stop.install(trainer.request_stop)
        logger.info(f"SD-FSMIS ready: infer tasks {', '.join(INFER_NAMES)}; {self.store.source.describe()}")

    def async_scoring(self, method, params=None):
        """MONAI Label's automatic scoring (start-up, after training and "Next Sample") in a thread of this
        process, one run at a time: the scoring reads image info and reads no network, and a subprocess
        would write the datastore file back from a copy older than the infer results recorded meanwhile."""
        methods = [method] if method else list(self._scoring_methods)
        if not self._server_mode:   # a train / batch subprocess: it ends before a thread would; the server scores
            return {}
        if not methods or not self._scoring_lock.acquire(blocking=False):
            return {}

        def run():
            try:
                for m in methods:
                    self.scoring({"method": m, **((params or {}).get(m) or {})})
            except Exception as err:  # noqa: BLE001 - a failed hint must not take the server down
                logger.warning(f"scoring failed: {type(err).__name__}: {err}")
            finally:
                self._scoring_lock.release()

        threading.Thread(target=run, name="sdfsmis-scoring", daemon=True).start()
        return {m: "started" for m in methods}

    def infer(self, request, datastore=None):
        """Resolve the support while the image id is still known, run MONAI Label's infer, and keep the
        result's uncertainty and suggested slices in the image's info (lib.activelearning)."""
        if request.get("model") not in INFER_NAMES:
            return super().infer(request, datastore)
        datastore = datastore or self.datastore()
        check_image(request, datastore)
        request = dict(request)
        image_id = request.get("image")
        request[REQUEST_KEY] = resolve_support(request, datastore, self.cfg.label_tag).to_request()
        result = super().infer(request, datastore)
        params = result.get("params") or {}
        # server only: a batch subprocess writing image info would race the server's own copy of the
        # datastore file, and the server could write back a copy without the batch's result labels
        if self._server_mode and isinstance(image_id, str) and not is_upload_path(image_id) and "uncertainty" in params:
            remember(datastore, image_id, params)
        return result
