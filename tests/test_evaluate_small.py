"""`python -m lib.evaluate` on a folder of 3 volumes: propagation needs no folds; protocol says why it cannot run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lib.evaluate import evaluate, main
from lib.evaluation.protocol import ProtocolError
from tests.synthetic_volumes import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("small") / "volumes", n=3, shape=(40, 40, 14))


def test_propagation_runs_on_three_volumes(small, tmp_path):
    out = tmp_path / "prop"
    results = evaluate(["--data", str(small), "--organs", "big=1,small=2", "--method", "copy", "--mode", "propagation",
                        "--out", str(out), "--no-progress", "--overlay-slices", "0"])
    # every volume once per organ, each its own support, scored on its organ extent
    assert sorted(r["query"] for r in results["per_volume"]) == [0, 0, 1, 1, 2, 2]
    assert all(r["support"][0]["volume"] == r["query"] for r in results["per_volume"])
    assert {(r["organ"], r["n_slices"]) for r in results["per_volume"]} == {("big", 9), ("small", 3)}
    # organs that do not move between slices: copy is exact
    assert results["summary"]["dice"]["mean"] == pytest.approx(1.0)
    assert results["plan"]["rpt_folds_case_ids"] is None
    saved = json.loads((out / "results.json").read_text())
    assert saved["mode"] == "propagation" and (out / "results.md").is_file()


def test_protocol_and_fold_selection_need_ten_volumes(small, tmp_path):
    args = ["--data", str(small), "--organs", "big=1", "--method", "copy", "--out", str(tmp_path / "x"), "--no-progress"]
    with pytest.raises(ProtocolError, match=r"--mode protocol needs the 5-fold protocol.*at least 10 volumes.*has 3"):
        evaluate(args)
    with pytest.raises(ProtocolError, match=r"--folds needs the 5-fold protocol"):
        evaluate(args + ["--mode", "propagation", "--folds", "0"])
    assert main(args) == 2 and not (tmp_path / "x" / "results.json").exists()


def test_module_entry_point_prints_the_reason(small, tmp_path):
    """`python -m lib.evaluate` is a thin entry: same message, exit status 2."""
    proc = subprocess.run([sys.executable, "-m", "lib.evaluate", "--data", str(small), "--organs", "big=1",
                           "--method", "copy", "--out", str(tmp_path / "y")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "at least 10 volumes" in proc.stderr and "--mode propagation" in proc.stderr


def test_prototype_floor_finds_the_organs_without_training(small, tmp_path):
    """The training-free floor (pretrained features, organ vs. background prototypes) through the CLI:
    the synthetic organs differ from their surroundings, so matching finds them."""
    results = evaluate(["--data", str(small), "--organs", "big=1", "--method", "prototype", "--mode", "propagation",
                        "--out", str(tmp_path / "proto"), "--no-progress", "--overlay-slices", "0"])
    assert results["method"] == "prototype"
    assert results["summary"]["dice"]["mean"] > 0.6


def test_ct3d_floor_finds_the_organs_without_training(small, tmp_path):
    """The same floor on the CT-trained 3D encoder (whole volumes through lib.evaluation.ct_encoder)."""
    results = evaluate(["--data", str(small), "--organs", "big=1", "--method", "prototype", "--encoder", "ct3d",
                        "--mode", "propagation", "--out", str(tmp_path / "ct3d"), "--no-progress",
                        "--overlay-slices", "0"])
    assert all(m["encoder"].startswith("I3ResNet-152") for m in results["models"].values())
    assert results["summary"]["dice"]["mean"] > 0.6


@pytest.mark.parametrize("extra, words", [(["--method", "copy", "--appearance", "0.25"], "registration or sdfsmis"),
                                          (["--method", "registration", "--appearance", "-1"], "positive weight"),
                                          (["--server", "http://127.0.0.1:9", "--appearance", "0.25"], "--conf appearance"),
                                          (["--method", "copy", "--features", str(ROOT / "README.md")], "prototype or registration"),
                                          (["--method", "registration", "--features", str(ROOT / "README.md")], "needs --appearance"),
                                          (["--method", "prototype", "--features", "missing.safetensors"], "no such file"),
                                          (["--method", "registration", "--no-locate"], "with --appearance"),
                                          (["--method", "registration", "--encoder", "ct3d"], "is for --method prototype"),
                                          (["--method", "prototype", "--encoder", "lite2+ct3d"], "is for --method prototype"),
                                          (["--method", "copy", "--encoder", "ct3d"], "is for --method prototype"),
                                          (["--no-intensity", "--preset", "tiny"], "no-intensity changes"),
                                          (["--method", "registration", "--no-intensity"], "no-intensity changes")])
def test_appearance_is_refused_where_it_does_not_apply(small, tmp_path, extra, words):
    with pytest.raises(ProtocolError, match=words):
        evaluate(["--data", str(small), "--organs", "big=1", "--mode", "propagation", "--out", str(tmp_path / "x"),
                  "--no-progress", *extra])
