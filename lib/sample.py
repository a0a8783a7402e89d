"""A synthetic abdominal-phantom study folder for trying the app without real data.

    python -m lib.sample --studies sample [--start] [--port 8000] [-- extra start_server args, e.g. --conf preset tiny]

Writes <studies>/phantom_K.nii.gz (ellipsoid body with liver-, spleen- and kidney-like blobs of
distinct intensities, noise, 1.5 x 1.5 x 5 mm spacing) and a one-slice `final` label for the first
one in MONAI Label's datastore layout (<studies>/labels/final/phantom_1.nii.gz): 1 liver, 2 right
kidney, 3 left kidney, 4 spleen (the Abd-MRI ids). With --start it then runs
`monailabel start_server --app apps/sdfsmis --studies <studies> --host 127.0.0.1 --port N [extra args]`.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SPACING = (1.5, 1.5, 5.0)
ORGANS = {  # value: (centre (x, y, z) as fractions, radii as fractions, intensity)
    1: ((0.36, 0.42, 0.50), (0.20, 0.17, 0.34), 0.62),   # liver (patient's right = image left)
    2: ((0.38, 0.66, 0.58), (0.06, 0.08, 0.20), 0.80),   # right kidney
    3: ((0.64, 0.66, 0.55), (0.06, 0.08, 0.20), 0.80),   # left kidney
    4: ((0.68, 0.40, 0.45), (0.09, 0.10, 0.22), 0.45),   # spleen
}
LIVER, RIGHT_KIDNEY, LEFT_KIDNEY, SPLEEN = 1, 2, 3, 4


def phantom(shape=(128, 128, 24), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (image float32 (H, W, Z), ground-truth label uint8 (H, W, Z)); organs shift/scale a little per seed."""
    rng = np.random.default_rng(seed)
    h, w, d = shape
    x, y, z = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), np.linspace(0, 1, d), indexing="ij")
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    body = ((x - 0.5) / 0.44) ** 2 + ((y - 0.52) / 0.36) ** 2 <= 1.0
    image[body] = 0.3
    fat = body & ~(((x - 0.5) / 0.40) ** 2 + ((y - 0.52) / 0.32) ** 2 <= 1.0)
    image[fat] = 0.15
    spine = ((x - 0.5) / 0.06) ** 2 + ((y - 0.80) / 0.06) ** 2 <= 1.0
    image[spine] = 0.95
    for value, (centre, radii, intensity) in ORGANS.items():
        c = np.asarray(centre) + rng.uniform(-0.03, 0.03, 3)
        r = np.asarray(radii) * rng.uniform(0.9, 1.1, 3)
        blob = ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1.0
        blob &= body
        image[blob] = intensity
        label[blob] = value
    image += rng.normal(0, 0.03, shape).astype(np.float32)
    image = np.clip(image, 0, 1) * 1000.0   # an MRI-like arbitrary scale
    return image.astype(np.float32), label


def _save(arr: np.ndarray, path: Path) -> None:
    affine = np.diag([*SPACING, 1.0])
    img = nib.Nifti1Image(arr, affine)
    img.header.set_zooms(SPACING)
    nib.save(img, str(path))


def one_slice(label: np.ndarray, z: int | None = None) -> np.ndarray:
    """The ground truth kept on one slice only (default: the slice with the most labelled voxels)."""
    if z is None:
        z = int(np.argmax((label > 0).reshape(-1, label.shape[-1]).sum(0)))
    out = np.zeros_like(label)
    out[..., z] = label[..., z]
    return out


def write_sample(studies, n: int = 3, shape=(128, 128, 24), overwrite: bool = False) -> dict:
    """Write the study folder; returns {"images": [paths], "label": path of the one-slice final label}."""
    studies = Path(studies)
    studies.mkdir(parents=True, exist_ok=True)
    final = studies / "labels" / "final"
    final.mkdir(parents=True, exist_ok=True)
    images = []
    for k in range(1, n + 1):
        path = studies / f"phantom_{k}.nii.gz"
        image, label = phantom(shape, seed=k)
        if overwrite or not path.exists():
            _save(image, path)
        images.append(path)
        if k == 1:
            label_path = final / "phantom_1.nii.gz"
            if overwrite or not label_path.exists():
                _save(one_slice(label), label_path)
    return {"images": images, "label": final / "phantom_1.nii.gz"}


def start_command(studies, port: int, extra=()) -> list[str]:
    # `python -m monailabel.main` = the `monailabel` command, but with this interpreter (the `monailabel`
    # script runs whatever `python` is first on PATH, which is not the venv's unless it is activated)
    return [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(ROOT / "apps" / "sdfsmis"), "--studies", str(studies),
                   "--host", "127.0.0.1", "--port", str(port), *extra]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lib.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", default="sample", help="study folder to write (default: sample)")
    ap.add_argument("--volumes", type=int, default=3, help="number of phantom volumes (default 3)")
    ap.add_argument("--overwrite", action="store_true", help="rewrite files that exist")
    ap.add_argument("--start", action="store_true", help="then start the MONAI Label server on it")
    ap.add_argument("--port", type=int, default=8000)
    args, extra = ap.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if extra and not args.start:
        ap.error(f"unrecognized arguments: {' '.join(extra)} (extra arguments go to the server with --start)")
    out = write_sample(args.studies, n=args.volumes, overwrite=args.overwrite)
    print(f"wrote {len(out['images'])} phantom volumes to {args.studies} and a one-slice 'final' label: {out['label']}")
    if not args.start:
        return 0
    cmd = start_command(Path(args.studies).resolve(), args.port, extra)
    print("starting:", " ".join(cmd))
    print(f"open http://127.0.0.1:{args.port}/ (API) or connect 3D Slicer's MONAI Label module to it")
    return subprocess.call(cmd, cwd=str(ROOT))


if __name__ == "__main__":
    raise SystemExit(main())
