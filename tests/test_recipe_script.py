"""scripts/train_recipe.sh: the embedded model's recipe as one command. Its lib.train stages must
parse with the current CLI and keep the settings the model card documents (no run: the stages take
hours)."""
from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

from lib.training.options import parse_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_recipe.sh"


def _stages() -> dict[str, list[str]]:
    """stage name -> the argv its `"$PY" -m lib.train` line gives lib.train, with the data folders as
    `a b`, OUT as `out` and THREADS as 2."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        m = re.match(r'^stage (\w+) "\$PY" -m lib\.train (.*)$', line.strip())
        if m:
            words = m.group(2).replace('"$@"', "a b").replace('"$OUT', '"out').replace('"$THREADS"', "2")
            out[m.group(1)] = shlex.split(words)
    return out


def test_script_is_valid_bash_and_asks_for_its_arguments():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    res = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True)
    assert res.returncode == 2 and "usage:" in res.stderr


def test_stages_parse_and_keep_the_documented_settings():
    stages = _stages()
    assert list(stages) == ["vae", "network", "aligned"]
    vae, net, aligned = (parse_args(stages[k]) for k in ("vae", "network", "aligned"))
    assert vae.data == ["a", "b"] and vae.stage == "vae" and vae.preset == "mini"
    assert (vae.iterations, vae.batch_size, vae.threads) == (1500, 2, 2)
    assert net.init == "out/vae/model" and net.align == "none"
    assert (net.iterations, net.stop_at, net.merge, net.vanish, net.gap, net.schedule) == (5000, 4000, 8, 0.2, 6, "cosine")
    assert aligned.init == "out/mini/model" and aligned.align == "registration"
    assert (aligned.iterations, aligned.merge, aligned.vanish, aligned.gap, aligned.aug_strength) == (2500, 8, 0.1, 2, 0.5)
    assert aligned.out == "out/mini-aligned"


def test_model_card_points_at_the_script():
    card = (ROOT / "apps" / "sdfsmis" / "model" / "README.md").read_text()
    assert "bash scripts/train_recipe.sh" in card
