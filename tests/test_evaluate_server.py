"""Server mode of the evaluation against a real MONAI Label server (tests/conftest.py, `--conf preset tiny`):
batch infer gives the very masks of one infer request per group, and leaves no private label behind."""
from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest

from lib.evaluate import evaluate
from lib.evaluation.dataset import EvalDataset
from lib.evaluation.protocol import propagation_plan, protocol_plan
from lib.evaluation.server import ServerMethod
from tests.synthetic_volumes import write_dataset

ORGANS = {"big": 1}


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("eval-server") / "volumes", n=10, shape=(48, 48, 14))


def _masks(method, dataset, plan) -> dict:
    """What the runner does: prepare the fold's jobs, then one run_group per group."""
    out = {}
    for fold in plan.folds:
        jobs = [j for j in plan.jobs if j.fold == fold]
        method.prepare(dataset, jobs)
        for job in jobs:
            for group in job.groups:
                out[(job.query, job.organ, group)] = method.run_group(dataset, job, group)
    return out


def _private_label_files(studies) -> list:
    return sorted(str(p.relative_to(studies)) for p in (studies / "labels").glob("eval-*/*") if p.is_file())


def test_batch_infer_gives_the_masks_of_per_request_infers(sdfsmis_server, volumes, tmp_path):
    url, studies = sdfsmis_server["url"], sdfsmis_server["studies"]
    dataset = EvalDataset(volumes, ORGANS)
    plans = {"protocol": protocol_plan(dataset.slices, ORGANS, [0], dataset.case_ids),
             "propagation": propagation_plan(dataset.slices, ORGANS, {"all": [0, 1, 2]}, dataset.case_ids)}
    # the app's gate empties a random model's masks inside a volume: off here, so the masks compared are not empty
    params = {"gate": False}
    for mode, plan in plans.items():
        batch = ServerMethod(url, "synthetic", params=params)
        direct = ServerMethod(url, "synthetic", batch=False, params=params)
        batched, requested = _masks(batch, dataset, plan), _masks(direct, dataset, plan)
        assert batched.keys() == requested.keys() and len(batched) == sum(len(j.groups) for j in plan.jobs)
        assert sum(m.any() for m in batched.values()) >= len(batched) // 2, f"{mode}: mostly empty masks"
        for key, mask in batched.items():
            assert mask.shape == requested[key].shape, (mode, key)
            assert np.array_equal(mask, requested[key]), f"{mode}: batch and per-request masks differ for {key}"
        # protocol fold 0: 2 queries x 3 support slices -> 3 batches; propagation: 1 organ -> 1 batch
        assert batch.describe()["batch_requests"] == {"protocol": 3, "propagation": 1}[mode]
        assert batch.describe()["infer_requests"] == 0
        assert direct.describe()["infer_requests"] == len(batched)
    assert _private_label_files(studies) == [], "private support / result labels were left in the datastore"


def test_cli_server_mode_runs_through_batch_infer(sdfsmis_server, volumes, tmp_path):
    url = sdfsmis_server["url"]
    out = tmp_path / "cli"
    results = evaluate(["--data", str(volumes), "--organs", "big=1", "--server", url, "--mode", "propagation",
                        "--out", str(out), "--no-progress", "--overlay-slices", "1"])
    described = next(iter(results["models"].values()))
    assert described["mode"] == "batch" and described["batch_requests"] == 1 and described["infer_requests"] == 0
    assert len(results["per_volume"]) == 10 and all(0.0 <= r["dice"] <= 1.0 for r in results["per_volume"])
    assert json.loads((out / "results.json").read_text())["server"] == url
    assert (out / "overlays" / "overlay_big.png").is_file()
    with urllib.request.urlopen(f"{url}/batch/infer", timeout=30) as r:
        assert json.loads(r.read())["status"] == "DONE"
    assert _private_label_files(sdfsmis_server["studies"]) == []
