"""Active annotation through a real server (tiny preset, CPU; tests/conftest.py): the suggestion in the
infer result, the scoring method's image info, and "Next Sample" (POST /activelearning/<strategy>)."""
from __future__ import annotations

import json
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from monailabel.client import MONAILabelClient

from lib.activelearning import RESULT_KEY, SCORE_KEY
from lib.sample import SPACING, phantom

STRATEGY, SCORING = "sdfsmis_uncertain", "sdfsmis_uncertainty"


def _post(url: str, body=None):
    req = urllib.request.Request(url, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _info(client, image_id):
    return client.datastore()["objects"][image_id]["image"]["info"]


@pytest.fixture(scope="module")
def client(sdfsmis_server):
    from tests.conftest import SHAPE

    work = sdfsmis_server["work"]
    (work / "client").mkdir(exist_ok=True)
    c = MONAILabelClient(sdfsmis_server["url"], tmpdir=str(work / "client"))
    for k, seed in (("extra_a", 7), ("extra_b", 8)):   # two more unlabelled images
        image, _ = phantom(SHAPE, seed=seed)
        path = work / f"{k}.nii.gz"
        nib.save(nib.Nifti1Image(image, np.diag([*SPACING, 1.0])), str(path))
        c.upload_image(str(path), image_id=k)
    return c


def test_info_lists_the_strategy_and_the_scoring_method(sdfsmis_server):
    info = MONAILabelClient(sdfsmis_server["url"]).info()
    assert {STRATEGY, "random"} <= set(info["strategies"])
    assert SCORING in info["scoring"]


def test_infer_result_has_per_slice_confidence_and_the_slice_to_annotate_next(client):
    from tests.conftest import SHAPE

    _, params = client.infer("sdfsmis_seg", "phantom_1", {})   # the saved one-slice label
    organs = [str(v) for v in params["organs"]]
    annotated = params["copied_slices"]
    assert set(params["confidence"]) == set(organs) == set(params["next_slice"])
    for organ in organs:
        conf = params["confidence"][organ]
        assert len(conf) == SHAPE[-1]
        assert all(c is None or 0.0 <= c <= 1.0 for c in conf)
        assert all(conf[z] == 1.0 for z in annotated if conf[z] is not None)
        nxt = params["next_slice"][organ]
        assert nxt is None or (0 <= nxt < SHAPE[-1] and nxt not in annotated and conf[nxt] is not None)
        ranked = params["next_slices"][organ]
        assert ranked[:1] == ([nxt] if nxt is not None else []) and len(ranked) <= 3
    assert 0.0 <= params["uncertainty"] <= 1.0
    assert _info(client, "phantom_1")[RESULT_KEY]["uncertainty"] == params["uncertainty"]


def test_scoring_stores_uncertainty_and_novelty_in_image_info(client, sdfsmis_server):
    status, _ = _post(f"{sdfsmis_server['url']}/scoring/{SCORING}?run_sync=true")
    assert status == 200
    score = _info(client, "phantom_1")[SCORE_KEY]
    assert score["labelled"] is True and score["uncertainty"] == _info(client, "phantom_1")[RESULT_KEY]["uncertainty"]
    for image in ("phantom_2", "extra_a", "extra_b"):
        other = _info(client, image)[SCORE_KEY]
        assert other["labelled"] is False and other["uncertainty"] is None and 0.0 <= other["novelty"] <= 1.0


def test_next_sample_picks_the_never_segmented_then_the_least_certain(client, sdfsmis_server):
    url = sdfsmis_server["url"]
    for image in ("phantom_2", "extra_a"):   # segmented from phantom_1's label: their uncertainty is known
        client.infer("sdfsmis", image, {"support_image": "phantom_1"})
    status, pick = _post(f"{url}/activelearning/{STRATEGY}")
    assert status == 200 and pick["id"] == "extra_b"   # the only unlabelled image never segmented
    client.infer("sdfsmis", "extra_b", {"support_image": "phantom_1"})
    known = {i: _info(client, i)[RESULT_KEY]["uncertainty"] for i in ("phantom_2", "extra_a", "extra_b")}
    status, pick = _post(f"{url}/activelearning/{STRATEGY}")
    assert status == 200 and pick["id"] == max(known, key=known.get)
    assert pick["uncertainty"] == known[pick["id"]] and isinstance(pick["next_slice"], dict)
    status, pick = _post(f"{url}/activelearning/random")
    assert status == 200 and pick["id"] in known


def test_unknown_strategy_or_scoring_method_404_and_a_path_as_label_tag_400(sdfsmis_server):
    assert _post(f"{sdfsmis_server['url']}/activelearning/nope")[0] == 404
    assert _post(f"{sdfsmis_server['url']}/scoring/nope")[0] == 404
    assert _post(f"{sdfsmis_server['url']}/activelearning/{STRATEGY}", {"label_tag": "../x"})[0] == 400
