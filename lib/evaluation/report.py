"""Writing results.json, results.md and overlay PNGs into the output folder."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from lib.evaluation import paper

_PAPER_NAME = {"spleen": "Spleen", "liver": "Liver", "lk": "LK", "rk": "RK"}


def _clean(obj):
    """JSON-safe copy: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def write_json(path: Path, results: dict) -> None:
    path.write_text(json.dumps(_clean(results), indent=2, allow_nan=False))


def _fmt(v, scale=1.0) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v * scale:.2f}"


def _columns(organs: list[str]) -> list[tuple[str, str | None]]:
    """(header, organ key) in the paper's order (Spleen, Liver, LK, RK) when the organs are those,
    else in the given order; then Mean."""
    by_paper = {_PAPER_NAME.get(o.lower()): o for o in organs}
    if set(by_paper) == {"Spleen", "Liver", "LK", "RK"}:
        cols = [(c, by_paper[c]) for c in ("Spleen", "Liver", "LK", "RK")]
    else:
        cols = [(o, o) for o in organs]
    return cols + [("Mean", "mean")]


def dice_table(results: dict, with_paper: bool = True) -> str:
    """Markdown: this run's Dice (%) per organ and mean, then the paper's rows for the same setting."""
    s = results["summary"]
    cols = _columns(results["organs"])
    lines = ["| Method | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines.append(f"| **{results['label']}** | " + " | ".join(_fmt(s["dice"].get(k), 100) for _, k in cols) + " |")
    if with_paper and results.get("mode") == "protocol":
        rows = paper.paper_rows(results.get("dataset") or "", results["setting"], results.get("source_dataset"))
        if rows and [c for c, _ in cols] == list(paper.COLUMNS):
            for name in paper.KEY_ROWS:
                if name in rows:
                    lines.append(f"| {name} | " + " | ".join(_fmt(rows[name][c]) for c, _ in cols) + " |")
    return "\n".join(lines)


def surface_table(results: dict) -> str:
    """Markdown: HD95 and ASSD (mm) per organ and mean."""
    s = results["summary"]
    cols = _columns(results["organs"])
    lines = ["| Metric | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for key, name in (("hd95", "HD95 (mm)"), ("assd", "ASSD (mm)")):
        lines.append(f"| {name} | " + " | ".join(_fmt(s[key].get(k)) for _, k in cols) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, results: dict, overlay_files: list[str]) -> None:
    ds = results.get("dataset") or "custom"
    out = [
        f"# {results['label']} on {ds} — {results['mode']} mode",
        "",
        f"Command: `{results['command']}`",
        "",
        f"Setting {results['setting']} · folds {', '.join(str(f) for f in results['plan']['folds'])} · "
        f"{results['summary']['n_volumes_total']} scored (volume, organ) pairs · "
        f"empty-prediction rule: {results['empty_rule']} · total {results['timings']['total_s']:.1f} s",
        "",
        "## Dice (%)",
        "",
        dice_table(results),
        "",
    ]
    if results.get("mode") == "protocol":
        caption = paper.paper_caption(ds, results["setting"], results.get("source_dataset"))
        out += [f"Paper rows: {caption} (numbers as printed in the paper).", ""]
    out += ["## Surface distances", "", surface_table(results), ""]
    if results.get("mode") == "protocol" and ds in paper.SURFACE and not (
        results.get("source_dataset") and results["source_dataset"] != ds
    ):
        sd = paper.SURFACE[ds]
        out += ["Paper, Setting 2, mean over organs (Tabs. 7/8): "
                + "; ".join(f"{m} HD95 {v['hd95']:.2f} / ASSD {v['assd']:.2f}" for m, v in sd.items()), ""]
    per_fold = results["summary"]["per_fold"]["dice"]
    if per_fold:
        cols = [c for c in _columns(results["organs"]) if c[1] != "mean"]
        out += ["## Dice (%) per fold", "", "| Fold | " + " | ".join(c for c, _ in cols) + " |",
                "|---" * (len(cols) + 1) + "|"]
        for fold, row in per_fold.items():
            out.append(f"| {fold} | " + " | ".join(_fmt(row.get(k), 100) for _, k in cols) + " |")
        out.append("")
    if results.get("skipped"):
        out += ["## Skipped", ""] + [f"- {s}" for s in results["skipped"]] + [""]
    if overlay_files:
        out += ["## Overlays", "", "Ground truth green, prediction red.", ""]
        out += [f"![{Path(f).stem}]({f})" for f in overlay_files] + [""]
    path.write_text("\n".join(out))


def write_overlays(folder: Path, overlays: dict, label: str) -> list[str]:
    """One PNG per organ: a few slices, ground-truth contour green, prediction contour red."""
    if not overlays:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for organ, data in overlays.items():
        slices = data["slices"]
        fig, axes = plt.subplots(1, len(slices), figsize=(3.2 * len(slices), 3.4), squeeze=False)
        for ax, sl in zip(axes[0], slices):
            ax.imshow(sl["image"].T, cmap="gray", vmin=0, vmax=1, origin="lower")
            for mask, color in ((sl["gt"], "lime"), (sl["pred"], "red")):
                if mask.any() and not mask.all():
                    ax.contour(mask.T.astype(float), levels=[0.5], colors=color, linewidths=1.0, origin="lower")
            inter = np.logical_and(sl["gt"], sl["pred"]).sum()
            tot = sl["gt"].sum() + sl["pred"].sum()
            ax.set_title(f"z={sl['z']}  Dice {2 * inter / tot if tot else 1:.2f}", fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{label}: {organ}, volume {data['query']} (fold {data['fold']}, "
                     f"3D Dice {data['dice']:.3f})", fontsize=10)
        fig.tight_layout()
        name = f"overlay_{organ}.png"
        fig.savefig(folder / name, dpi=80)
        plt.close(fig)
        files.append(f"overlays/{name}")
    return files
