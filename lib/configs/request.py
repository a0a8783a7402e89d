"""The infer request's own options, parsed with the same typed parsers as `--conf` (lib.configs.fields).

`infer_options(request, cfg)` is the one reader of them: the infer task calls it, and the request guard
(lib.server.validate) calls it before MONAI Label sees the request. Defaults come from the app's
`--conf` (AppConfig); a threshold left unset stays None until the infer task resolves it against the
served model (lib.pipeline.PropagateOptions.for_model).
"""
from __future__ import annotations

from lib.configs.app_config import MAX_APPEARANCE, MERGE_RULES, RESULT_EXTENSIONS, WALKERS, AppConfig
from lib.configs.fields import OptionError, as_bool, as_choice, as_float, as_fraction, as_int, as_label_values, read

BACKGROUND_SCRIBBLES = "background_scribbles"   # Slicer's scribbles label_info name: not an organ
REQUEST_KEY = "_sdfsmis_support"   # where the app's resolved support (lib.infers.support) travels in the request


def _label_info(value) -> list[int]:
    """Slicer's label_info: [{"name": str, "id": 0-255}, ...] -> the ids named background_scribbles."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise OptionError("label_info must be a list of {name, id} objects")
    out = []
    for info in value:
        if not isinstance(info, dict) or not isinstance(info.get("name", ""), str):
            raise OptionError("label_info entries must be objects with a string name and an id 0-255")
        if info.get("id") is not None:
            value_id = as_int("label_info id", info["id"], 0, 255)
            if info.get("name") == BACKGROUND_SCRIBBLES:
                out.append(value_id)
    return out


def infer_options(request: dict, cfg: AppConfig | None = None) -> dict:
    """request params -> {threshold (float | None), batch_size, merge, chain, gate, largest, appearance, intensity,
    walker, extension, ignore (label values that are not organs)}; OptionError names a bad key and what it accepts."""
    cfg = cfg or AppConfig()
    return {
        "threshold": read(request, "threshold", as_fraction, cfg.threshold),
        "batch_size": read(request, "batch_size", as_int, cfg.batch_size, 1, 4096),
        "merge": read(request, "merge", as_choice, cfg.merge, MERGE_RULES, listed=True),
        "chain": read(request, "chain", as_bool, cfg.chain),
        "gate": read(request, "gate", as_bool, cfg.gate),
        "largest": read(request, "largest", as_bool, cfg.largest),
        "appearance": read(request, "appearance", as_float, cfg.appearance, 0.0, MAX_APPEARANCE),
        "intensity": read(request, "intensity", as_bool, cfg.intensity),
        "walker": read(request, "walker", as_choice, cfg.walker, WALKERS, listed=True),
        "extension": read(request, "result_extension", as_choice, cfg.result_extension, RESULT_EXTENSIONS),
        "ignore": as_label_values("ignore_labels", request.get("ignore_labels")) + _label_info(request.get("label_info")),
    }
