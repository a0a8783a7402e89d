"""Few-shot evaluation on Abd-MRI / Abd-CT folders: `python -m lib.evaluate --data ../shared/data/abd-mri`.

The CLI behind `python -m lib.evaluate` (lib/evaluate.py only calls `main`): `build_parser()`,
`run(args)` (plan, segment, score, write the outputs) and `evaluate(argv)` / `main(argv)`.

Modes: `protocol` (RPT 5-fold cross-volume, the paper's numbers) and `propagation` (one annotated
slice per organ inside each volume). Methods: `sdfsmis` (a checkpoint or preset in-process, or a
running MONAI Label app with --server), `copy` and `registration` baselines. Writes results.json,
results.md and overlays/*.png into --out. See docs/evaluation.md.
"""
from __future__ import annotations

import argparse
import hashlib
import platform
import shlex
import sys
import time
from pathlib import Path

from lib.data.volumes import DatasetError
from lib.evaluation.dataset import EvalDataset
from lib.evaluation.methods import ENCODERS, METHODS, CopyMethod, RegistrationMethod, SDFSMISMethod
from lib.evaluation.metrics import EMPTY_RULES
from lib.evaluation.protocol import (
    DATASETS, MODES, ProtocolError, detect_dataset, parse_organs, propagation_plan, protocol_plan, rpt_folds,
)
from lib.evaluation.report import write_json, write_markdown, write_overlays
from lib.evaluation.runner import run_plan
from lib.pipeline.options import WALKERS, PropagateOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lib.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--data", required=True, help="folder of image_K.nii.gz / label_K.nii.gz (e.g. ../shared/data/abd-mri)")
    p.add_argument("--dataset", choices=DATASETS, help="label layout; default: detected from the folder name")
    p.add_argument("--organs", help="e.g. 'liver=1,spleen=4' or 'liver,spleen' (default: liver, spleen, LK, RK)")
    p.add_argument("--method", choices=METHODS, default="sdfsmis")
    p.add_argument("--chain", action="store_true",
                   help="segment slice by slice outward, each result the next support (lib.pipeline.walk) or moving "
                        "mask: propagation mode from the annotated slice; protocol mode (sdfsmis) from the query slice "
                        "at the support slice's relative position, segmented from the support (as the app does)")
    p.add_argument("--all-components", action="store_true",
                   help="sdfsmis: keep every predicted blob (default: each organ's largest 3D connected component, "
                        "the app's `largest`)")
    p.add_argument("--gate", action="store_true",
                   help="any method: keep only predicted pixels in the intensity range of the support's organ, and "
                        "drop slices where little is left (lib.transforms.postprocess.intensity_gate); with --chain "
                        "every step is gated before it becomes the next support")
    p.add_argument("--appearance", type=float, default=0.0, metavar="W",
                   help="registration, sdfsmis: across volumes, fuse each result with pretrained appearance, W the "
                        "weight of the place term (lib.pipeline.appearance; the app's `appearance`); 0 (default): off")
    p.add_argument("--no-locate", dest="locate", action="store_false",
                   help="with --appearance: fuse from the support where it is, without first moving it onto each "
                        "query slice by feature template matching (the app locates; for ablations)")
    p.add_argument("--no-intensity", dest="intensity", action="store_false",
                   help="without the intensity log-odds of the annotated organ and the query's own (lib.pipeline.refine): "
                        "in the --appearance fusion, and on the --chain of sdfsmis or registration inside one "
                        "volume (the app uses them; for ablations)")
    p.add_argument("--walker", choices=WALKERS, default=PropagateOptions.walker,
                   help="sdfsmis with --chain inside one volume: what makes each step of the walk, the network or the "
                        "neighbour's mask registered onto the slice (lib.pipeline.register_step; the app's "
                        "`walker`; across volumes the network always segments) [%(default)s]")
    p.add_argument("--features", metavar="FILE",
                   help="prototype, registration: a fine-tuned appearance backbone (`python -m lib.train_appearance`) "
                        "instead of ImageNet's")
    p.add_argument("--encoder", choices=ENCODERS, default="lite2",
                   help="prototype: the 2D ImageNet EfficientNet-Lite2 of the app's appearance prior, or a CT-trained "
                        "3D I3ResNet-152 over whole volumes (lib.evaluation.ct_encoder; 0-255 CT as Abd-CT's); "
                        "registration with --appearance: which of them gives the appearance logit, lite2+ct3d their "
                        "mean [%(default)s]")
    p.add_argument("--checkpoint", help="SD-FSMIS checkpoint folder; '{fold}' is replaced by the fold number")
    p.add_argument("--preset", help="build an untrained model of this preset instead of a checkpoint (smoke runs)")
    p.add_argument("--server", metavar="URL", help="run through a MONAI Label app's 'sdfsmis' infer task")
    p.add_argument("--mode", choices=MODES, default="protocol")
    p.add_argument("--folds", default=None,
                   help="comma-separated folds (default: all 5; propagation mode: every volume, any number)")
    p.add_argument("--setting", type=int, choices=(1, 2), default=1,
                   help="recorded only (the caller trained the fold's model under it); picks the paper's table")
    p.add_argument("--source-dataset", choices=DATASETS,
                   help="dataset the model was trained on, when it differs (cross-domain paper table)")
    p.add_argument("--out", required=True, help="output folder (results.json, results.md, overlays/)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--empty-distance", choices=EMPTY_RULES, default="diagonal",
                   help="HD95/ASSD of an empty prediction: the volume diagonal in mm, or excluded from means")
    p.add_argument("--overlay-slices", type=int, default=3, help="slices per organ in the overlay PNGs (0: none)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads for torch and SimpleITK (default 1: no oversubscription on shared CPUs)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _state_sha256(model) -> str:
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _method_factory(args, dataset_name: str):
    """-> (method_for_fold, per_fold: bool). Loads models lazily, one per fold when '{fold}' is used."""
    if not args.appearance >= 0:
        raise ProtocolError(f"--appearance must be 0 (off) or a positive weight, got {args.appearance}")
    if args.appearance and args.method not in ("registration", "sdfsmis"):
        raise ProtocolError("--appearance fuses the registration's or the network's results; use it with "
                            "--method registration or sdfsmis")
    if args.features and args.method not in ("prototype", "registration"):
        raise ProtocolError("--features is for --method prototype or registration (the app serves ImageNet's)")
    if args.features and args.method == "registration" and not args.appearance:
        raise ProtocolError("--features with --method registration needs --appearance W (the fusion it feeds)")
    if not args.locate and not args.appearance:
        raise ProtocolError("--no-locate changes the --appearance fusion; use it with --appearance W")
    if not args.intensity and not (args.appearance or (args.method in ("sdfsmis", "registration") and args.chain)):
        raise ProtocolError("--no-intensity changes the --appearance fusion or the --chain of sdfsmis or registration "
                            "inside one volume; use it with one of them")
    if args.walker != PropagateOptions.walker and (args.method != "sdfsmis" or args.server):
        raise ProtocolError("--walker chooses the steps of sdfsmis in-process (on a server: --conf walker)")
    if args.encoder != "lite2" and (args.features or args.server or not (
            args.method == "prototype" and args.encoder == "ct3d" or args.method == "registration" and args.appearance)):
        raise ProtocolError("--encoder ct3d is for --method prototype, ct3d or lite2+ct3d for --method registration "
                            "with --appearance; neither with --features")
    if args.features and not Path(args.features).is_file():
        raise ProtocolError(f"--features {args.features}: no such file")
    if args.server:
        if args.appearance:
            raise ProtocolError("--appearance is set on the server (--conf appearance W), not by the client")
        if args.method != "sdfsmis":
            raise ProtocolError("--server runs the app's sdfsmis task; use it with --method sdfsmis")
        from lib.evaluation.server import ServerMethod

        method = ServerMethod(args.server, dataset_name)
        return (lambda fold: method), False
    if args.method == "copy":
        method = CopyMethod(gate=args.gate)
        return (lambda fold: method), False
    if args.method == "prototype":
        from lib.evaluation.prototype import PrototypeMethod, VolumePrototypeMethod

        if args.encoder == "ct3d":
            method = VolumePrototypeMethod(gate=args.gate, device=args.device)
        else:
            method = PrototypeMethod(gate=args.gate, device=args.device, weights=args.features)
        return (lambda fold: method), False
    if args.method == "registration":
        method = RegistrationMethod(threads=args.threads, chain=args.chain, gate=args.gate,
                                    appearance=args.appearance, device=args.device, features=args.features,
                                    locate=args.locate, intensity=args.intensity, encoder=args.encoder)
        return (lambda fold: method), False
    if bool(args.checkpoint) == bool(args.preset):
        raise ProtocolError("--method sdfsmis needs exactly one of --checkpoint, --preset or --server")
    from lib.model import build_model, load_checkpoint, read_meta

    def method_of(model, info):
        options = PropagateOptions.for_model(model, batch_size=args.batch_size, chain=args.chain, gate=args.gate,
                                             largest=not args.all_components, appearance=args.appearance,
                                             locate=args.locate, intensity=args.intensity, walker=args.walker)
        return SDFSMISMethod(model, options, info)

    if args.preset:
        model = build_model(args.preset).to(args.device).eval()
        info = {"preset": args.preset, "config": model.config.to_dict(), "weights_sha256": _state_sha256(model)}
        method = method_of(model, info)
        return (lambda fold: method), False
    per_fold = "{fold}" in args.checkpoint
    cache: dict = {}

    def for_fold(fold):
        path = Path(args.checkpoint.format(fold=fold) if per_fold else args.checkpoint)
        if path not in cache:
            meta = read_meta(path)
            model = load_checkpoint(path, device=args.device)
            info = {"checkpoint": str(path), "config": meta,
                    "weights_sha256": _sha256(path / "model.safetensors")}
            cache.clear()
            cache[path] = method_of(model, info)
        return cache[path]

    return for_fold, per_fold


def evaluate(argv: list[str] | None = None) -> dict:
    """Run the CLI with `argv`; returns the results dict also written to --out/results.json."""
    import torch

    args = build_parser().parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, args.threads))
    try:
        return run(args, argv)
    finally:
        torch.set_num_threads(previous)


def parse_folds(spec: str | None) -> list[int]:
    """'0,4' -> [0, 4]; None -> all five."""
    if spec is None:
        return list(range(5))
    try:
        folds = sorted({int(f) for f in spec.split(",") if f.strip()})
    except ValueError:
        raise ProtocolError(f"--folds must be comma-separated integers 0..4, got {spec!r}") from None
    if not folds or any(not 0 <= f < 5 for f in folds):
        raise ProtocolError(f"--folds must name folds in 0..4, got {spec!r}")
    return folds


def make_plan(args, dataset, organs, folds: list[int], per_fold: bool):
    """-> (plan, RPT fold table or None). Propagation over every volume needs no folds (any count);
    protocol mode, --folds subsets and per-fold checkpoints need the 5-fold table (>= 10 volumes)."""
    n = len(dataset)
    if args.mode == "propagation" and not per_fold and args.folds is None:
        table = rpt_folds(n) if n >= 10 else None
        return propagation_plan(dataset.slices, organs, {"all": list(range(n))}, dataset.case_ids), table
    if n < 10:
        why = ("--mode protocol" if args.mode == "protocol"
               else "--folds" if args.folds is not None else "a per-fold checkpoint ('{fold}')")
        raise ProtocolError(
            f"{why} needs the 5-fold protocol, and the 5-fold protocol needs at least 10 volumes; {args.data} has "
            f"{n}. --mode propagation without --folds works on any number of volumes (each volume is its own support)")
    table = rpt_folds(n)
    if args.mode == "protocol":
        return protocol_plan(dataset.slices, organs, folds, dataset.case_ids), table
    if per_fold:
        return propagation_plan(dataset.slices, organs, {f: table[f] for f in folds}, dataset.case_ids), table
    volumes = sorted({v for f in folds for v in table[f]})
    return propagation_plan(dataset.slices, organs, {"all": volumes}, dataset.case_ids), table


def run(args, argv: list[str] | None = None) -> dict:
    """Plan, segment, score and write results.json / results.md / overlays for parsed `args`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    data = Path(args.data)
    dataset_name = args.dataset or detect_dataset(data.resolve().name)
    organs = parse_organs(args.organs, dataset_name)
    folds = parse_folds(args.folds)

    t_load = time.perf_counter()
    dataset = EvalDataset(data, organs)
    method_for_fold, per_fold = _method_factory(args, dataset_name or data.name)
    plan, table = make_plan(args, dataset, organs, folds, per_fold)
    prepare_s = time.perf_counter() - t_load

    outcome = run_plan(dataset, plan, method_for_fold, empty=args.empty_distance,
                       overlay_slices=args.overlay_slices, progress=not args.no_progress)
    outcome["timings"]["prepare_s"] = round(prepare_s, 3)
    label = "SD-FSMIS (server)" if args.server else {"sdfsmis": "SD-FSMIS (this run)", "copy": "copy baseline",
                                                     "registration": "registration baseline",
                                                     "prototype": "pretrained prototypes (floor)"}[args.method]
    summary = outcome["summary"]
    summary["n_volumes_total"] = len(outcome["records"])
    summary["n_empty_predictions"] = sum(r["empty"] for r in outcome["records"])
    import monai
    import SimpleITK
    import torch

    results = {
        "command": "python -m lib.evaluate " + shlex.join(argv),
        "argv": argv,
        "label": label,
        "data": str(args.data),
        "dataset": dataset_name,
        "source_dataset": args.source_dataset,
        "organs": list(organs),
        "organ_ids": organs,
        "method": args.method,
        "server": args.server,
        "mode": args.mode,
        "setting": args.setting,
        "empty_rule": args.empty_distance,
        "volumes": dataset.case_ids,
        "plan": {"folds": [str(f) for f in plan.folds], "layout": {str(k): v for k, v in plan.folds.items()},
                 "rpt_folds_case_ids": [[dataset.case_ids[i] for i in f] for f in table] if table else None},
        "skipped": plan.skipped,
        "models": outcome["methods"],
        "summary": summary,
        "per_volume": outcome["records"],
        "timings": outcome["timings"],
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "monai": monai.__version__, "simpleitk": SimpleITK.Version.VersionString(),
                        "device": args.device, "threads": args.threads},
        "units": {"dice": "fraction 0-1 (results.md shows %)", "hd95": "mm", "assd": "mm"},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results["out"] = str(out)
    overlay_files = write_overlays(out / "overlays", outcome["overlays"], label)
    write_json(out / "results.json", results)
    write_markdown(out / "results.md", results, overlay_files)
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        results = evaluate(argv)
    except (DatasetError, ProtocolError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = results["summary"]
    organs = results["organs"]
    print(" | ".join(f"{o} {100 * s['dice'][o]:.2f}" for o in organs) + f" | mean {100 * s['dice']['mean']:.2f}")
    print(f"HD95 mean {s['hd95']['mean']:.2f} mm, ASSD mean {s['assd']['mean']:.2f} mm; results in {results['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
