"""Numbers reported in the SD-FSMIS paper (Dice %, HD95/ASSD mm), for the report beside ours.

Columns are the paper's: Spleen, Liver, LK, RK, Mean. Tab. 1 (in-domain, Settings 1 and 2),
Tab. 2 (cross-domain, Setting 1), Tab. 6 (cross-domain, Setting 2, supplementary), Tabs. 7/8
(Setting 2, 256 px, with mean HD95/ASSD; Tab. 7 is Abd-MRI and Tab. 8 Abd-CT, as the text's
"+37.06 on Abd-MRI / +46.05 on Abd-CT" over UniverSeg identifies them). Other methods' numbers are
as the paper quotes them.
"""
from __future__ import annotations

COLUMNS = ("Spleen", "Liver", "LK", "RK", "Mean")
OURS = "SD-FSMIS (paper)"
# Rows shown in results.md, in this order, when the paper has them.
KEY_ROWS = (OURS, "DiffewS", "DIFD", "RPT", "ADNet", "SSL-ALPNet")

# name: Abd-MRI (5 values) | Abd-CT (5 values); None where the paper has a dash.
_TAB1 = {
    1: """
PANet       40.58 50.40 30.99 32.19 38.53 | 36.04 49.55 20.67 21.19 32.86
SENet       47.30 29.02 45.78 47.96 42.51 | 43.66 35.42 24.42 12.51 29.00
SSL-ALPNet  72.18 76.10 81.92 85.18 78.84 | 70.96 78.29 72.36 71.81 73.35
ADNet       72.29 82.11 73.86 85.80 78.51 | 63.48 77.24 72.13 79.06 72.97
AAS-DCL     76.24 72.33 80.37 86.11 78.76 | 72.30 75.41 74.69 74.18 73.66
Q-Net       75.99 81.74 78.36 87.98 81.02 | - - - - -
RPT         76.37 82.86 80.72 89.82 82.44 | 79.13 82.57 77.05 72.58 77.83
CAT-Net     68.83 78.98 74.01 78.90 75.18 | 67.65 75.31 63.36 60.05 66.59
PAMI        76.37 82.59 81.83 88.73 82.83 | 72.38 81.32 76.52 80.57 77.69
PGRNet      81.72 83.27 81.44 87.44 83.47 | 72.09 82.48 74.23 79.88 77.17
DIFD        75.72 80.99 88.59 91.19 84.12 | 79.41 79.66 83.03 78.67 80.19
DiffewS     76.37 78.49 75.01 87.43 79.32 | 78.65 80.51 74.85 80.46 78.80
SD-FSMIS    80.43 78.71 84.17 89.34 83.16 | 85.01 81.37 83.21 85.04 83.66
""",
    2: """
PANet       40.58 50.40 30.99 32.19 38.53 | 36.04 49.55 20.67 21.19 32.86
SENet       47.30 29.02 45.78 47.96 42.51 | 43.66 35.42 24.42 12.51 29.00
SSL-ALPNet  67.02 73.05 73.63 78.39 73.02 | 60.25 73.65 63.34 54.82 63.02
ADNet       59.44 77.03 59.64 56.68 63.20 | 50.97 70.63 48.41 40.52 52.63
AAS-DCL     74.86 69.94 76.90 83.75 76.36 | 66.36 71.61 64.71 69.95 68.16
Q-Net       65.37 78.25 64.81 65.94 68.59 | - - - - -
RPT         75.46 76.37 78.33 86.01 79.04 | 70.80 75.24 72.99 67.73 71.69
CAT-Net     67.31 75.02 75.31 83.23 75.22 | 66.02 80.51 68.82 64.56 70.88
PAMI        75.80 81.09 74.51 86.73 79.53 | 71.95 74.13 72.36 67.54 71.49
DGPANet     69.21 75.93 73.76 75.96 73.72 | 65.91 65.56 74.10 68.06 68.41
DIFD        70.96 80.38 85.38 90.54 81.82 | 78.67 80.77 84.47 75.48 79.85
DiffewS     73.11 77.16 77.41 83.47 77.79 | 76.84 79.57 69.70 73.62 74.93
SD-FSMIS    77.25 78.58 85.03 88.27 82.28 | 83.08 82.59 82.22 85.10 83.25
""",
}

# Cross-domain: trained on Abd-CT, tested on Abd-MRI | trained on Abd-MRI, tested on Abd-CT.
_CROSS = {
    1: """
PANet       41.83 40.21 35.36 40.32 39.43 | 36.58 54.63 21.95 29.19 35.58
SSL-ALPNet  54.01 50.62 47.30 53.07 51.25 | 39.23 60.80 33.01 38.24 42.82
RPT         54.94 52.58 42.58 58.44 52.13 | 52.04 59.47 40.29 49.60 50.35
DR-Adapter  53.91 62.79 71.67 74.12 65.62 | 55.77 70.83 55.93 44.20 56.68
IFA         59.14 67.04 73.90 75.37 68.86 | 56.44 71.50 54.60 50.85 58.35
FAMNet      58.21 73.01 57.28 74.68 65.79 | 65.78 73.57 57.79 61.89 64.75
DIFD        61.05 68.29 75.51 79.69 71.14 | 62.45 73.86 56.86 46.88 60.01
DiffewS     71.85 74.84 77.83 83.86 77.09 | 71.06 80.39 70.12 66.28 71.96
SD-FSMIS    74.70 75.26 84.77 90.96 81.42 | 77.78 81.02 73.03 71.72 75.90
""",
    2: """
PANet       33.57 31.93 27.10 32.08 31.17 | 28.12 41.78 16.72 20.78 26.85
SSL-ALPNet  51.12 47.75 44.34 50.23 48.36 | 34.89 54.37 30.06 33.91 38.31
RPT         52.70 50.29 40.36 56.21 49.89 | 48.25 53.76 38.64 45.78 46.61
DR-Adapter  53.66 60.06 67.01 70.28 62.75 | 54.43 62.52 54.15 40.81 52.98
IFA         56.14 63.36 71.58 73.75 66.21 | 55.31 68.11 51.23 46.04 55.17
DIFD        57.41 66.31 75.17 77.64 69.13 | 57.02 74.08 58.18 42.45 57.93
SD-FSMIS    76.08 72.27 84.86 88.95 80.54 | 77.82 82.97 71.22 68.07 74.82
""",
}

# Setting 2, 256 px: mean HD95 / ASSD (mm) and seconds per image (Tabs. 7, 8).
SURFACE = {
    "abd-mri": {
        "UniverSeg": {"hd95": 42.84, "assd": 20.05, "s_per_image": 0.0080},
        "MultiverSeg": {"hd95": 54.59, "assd": 20.76, "s_per_image": 0.0728},
        "DiffewS": {"hd95": 17.37, "assd": 8.74, "s_per_image": 0.0768},
        OURS: {"hd95": 13.15, "assd": 7.38, "s_per_image": 0.0914},
    },
    "abd-ct": {
        "UniverSeg": {"hd95": 53.86, "assd": 24.29, "s_per_image": 0.0077},
        "MultiverSeg": {"hd95": 57.63, "assd": 24.36, "s_per_image": 0.0551},
        "DiffewS": {"hd95": 18.86, "assd": 9.49, "s_per_image": 0.0732},
        OURS: {"hd95": 13.20, "assd": 7.62, "s_per_image": 0.0856},
    },
}


def _parse(block: str) -> dict[str, dict[str, dict[str, float | None]]]:
    rows: dict = {"abd-mri": {}, "abd-ct": {}}
    for line in block.strip().splitlines():
        name, rest = line.split(None, 1)
        name = OURS if name == "SD-FSMIS" else name
        for dataset, part in zip(("abd-mri", "abd-ct"), rest.split("|")):
            values = [None if v == "-" else float(v) for v in part.split()]
            if any(v is not None for v in values):
                rows[dataset][name] = dict(zip(COLUMNS, values))
    return rows


IN_DOMAIN = {setting: _parse(block) for setting, block in _TAB1.items()}
CROSS_DOMAIN = {setting: _parse(block) for setting, block in _CROSS.items()}


def paper_rows(dataset: str, setting: int, source: str | None = None) -> dict[str, dict]:
    """{method: {Spleen, Liver, LK, RK, Mean}} for evaluation on `dataset` (abd-mri | abd-ct).

    source: the dataset the model was trained on; a different one selects the cross-domain table.
    """
    if dataset not in ("abd-mri", "abd-ct") or setting not in (1, 2):
        return {}
    cross = source is not None and source != dataset
    return (CROSS_DOMAIN if cross else IN_DOMAIN)[setting][dataset]


def paper_caption(dataset: str, setting: int, source: str | None = None) -> str:
    if source is not None and source != dataset:
        table = "Tab. 2" if setting == 1 else "Tab. 6 (supplementary)"
        return f"{table}, cross-domain {source} -> {dataset}, Setting {setting}"
    return f"Tab. 1, {dataset}, Setting {setting}"
