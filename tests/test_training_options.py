"""lib.training without a run: the generated CLI, recipes, legacy model configs, train request options."""
from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from lib.configs.fields import OptionError
from lib.model import PRESETS, SDFSMISConfig, build_model, load_checkpoint, preset_config, save_checkpoint
from lib.model.config import LEGACY_TRAINING_KEYS
from lib.training import RECIPES, Recipe, TrainOptions, recipe_for, request_options
from lib.training.loop import run_recipe
from lib.training.options import REQUEST_DEFAULTS, build_parser, parse_args

ROOT = Path(__file__).resolve().parents[1]

# every flag `python -m lib.train` had before the parser was generated: none may disappear
FLAGS_BEFORE = """--out --preset --init --stage --iterations --batch-size --lr-unet --lr-new --lr-vae --weight-decay
--mask-loss-weight --grad-clip --warmup --stop-at --schedule --checkpoint-every --seed --device --resume --no-resume
--cache-dir --sd-path --dino-path --exclude-labels --setting2-rule --merge --vanish --gap --aug-strength --align
--log-every --threads""".split()


def _other_value(f, action, i: int):
    """A value for field f that differs from its default, and the argv words that give it."""
    if action.choices:
        value = next(c for c in action.choices if c != f.default)
        return value, [action.option_strings[0], value]
    if f.name == "data":
        return ["a", "b"], ["a", "b"]
    if f.name == "exclude_labels":
        return [1, 3], [action.option_strings[0], "1,3"]
    if isinstance(f.default, bool):
        flag = next(s for s in action.option_strings if s.startswith("--no-") == f.default)
        return not f.default, [flag]
    kind = action.type
    value = {int: 1000 + i, float: 0.125 + i, str: f"value-{i}"}[kind]
    return value, [action.option_strings[0], str(value)]


def test_generated_parser_round_trips_every_field():
    parser = build_parser()
    by_dest = {a.dest: a for a in parser._actions if a.dest != "help"}
    names = [f.name for f in fields(TrainOptions)]
    assert sorted(by_dest) == sorted(names), "every TrainOptions field has exactly one argument"
    argv, expected = [], {}
    for i, f in enumerate(fields(TrainOptions)):
        value, words = _other_value(f, by_dest[f.name], i)
        default = f.default if f.default is not MISSING else f.default_factory()
        assert value != default, f.name
        argv += words
        expected[f.name] = value
    opts = parse_args(argv)
    assert {f.name: getattr(opts, f.name) for f in fields(TrainOptions)} == expected
    # and nothing given: the dataclass defaults (out is required on the command line)
    plain = parse_args(["d", "--out", "o"])
    assert plain == TrainOptions(data=["d"], out="o")


def test_every_earlier_flag_is_kept_and_documented():
    parser = build_parser()
    strings = {s for a in parser._actions for s in a.option_strings}
    assert set(FLAGS_BEFORE) <= strings
    assert all(a.help for a in parser._actions), "every argument has help text"
    iterations = next(a for a in parser._actions if a.dest == "iterations")
    assert "sd15 15000, mini 2500, mini-lite2 1500, mini-lite2-ft 1500, tiny 20" in iterations.help   # recipe defaults shown per preset
    assert "10%" in " ".join(parser.format_help().split())      # '%' escaped for argparse
    with pytest.raises(SystemExit):
        parse_args(["d"])                                     # --out is required
    with pytest.raises(SystemExit):
        parse_args(["d", "--out", "o", "--exclude-labels", "1,x"])


def test_recipes_hold_the_training_settings_not_the_model_config():
    assert not set(LEGACY_TRAINING_KEYS) & {f.name for f in fields(SDFSMISConfig)}
    assert (RECIPES["sd15"].lr_unet, RECIPES["sd15"].lr_new, RECIPES["sd15"].iterations) == (1e-5, 5e-5, 15000)
    assert (recipe_for("mini").batch_size, recipe_for("tiny").iterations) == (4, 20)
    assert set(RECIPES) == set(PRESETS)                          # every preset has its recipe
    cfg = preset_config("tiny")
    run = run_recipe(cfg, TrainOptions(iterations=7, lr_new=0.5, schedule="cosine"))
    assert (run.iterations, run.lr_new, run.schedule, run.lr_unet) == (7, 0.5, "cosine", recipe_for("tiny").lr_unet)
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="linear")
    with pytest.raises(ValueError, match="iterations"):
        recipe_for("tiny").override(iterations=0)


def test_legacy_config_json_with_training_keys_loads(tmp_path):
    shipped = json.loads((ROOT / "apps" / "sdfsmis" / "model" / "config.json").read_text())["model"]
    assert set(LEGACY_TRAINING_KEYS) <= set(shipped)            # the embedded model predates the move
    cfg = SDFSMISConfig.from_dict(shipped)
    assert cfg.preset == "mini" and not hasattr(cfg, "lr_unet")
    folder = save_checkpoint(build_model("tiny"), tmp_path / "old")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"].update(lr_unet=1e-3, lr_new=1e-3, weight_decay=0.01, batch_size=2, iterations=20)
    (folder / "config.json").write_text(json.dumps(meta))
    assert load_checkpoint(folder).config.preset == "tiny"
    with pytest.raises(ValueError, match="unknown SD-FSMIS config keys"):
        SDFSMISConfig.from_dict(dict(shipped, not_a_key=1))


def test_train_request_options_are_typed_with_defaults():
    assert request_options({}) == REQUEST_DEFAULTS
    got = request_options({"iterations": "30", "lr_unet": "1e-4", "lr_new": "", "batch_size": 3.0,
                           "init": ["preset", "current"], "checkpoint_every": 5, "device": "CUDA:1", "other": "x"})
    assert got == {"iterations": 30, "lr_unet": 1e-4, "lr_new": None, "batch_size": 3, "init": "preset",
                   "checkpoint_every": 5, "device": "cuda:1"}


@pytest.mark.parametrize("request_, key", [
    ({"iterations": "abc"}, "iterations"), ({"iterations": 0}, "iterations"),
    ({"iterations": float("inf")}, "iterations"), ({"iterations": 10**8}, "iterations"),
    ({"iterations": ["x"]}, "iterations"), ({"batch_size": "many"}, "batch_size"),
    ({"batch_size": True}, "batch_size"), ({"batch_size": 0}, "batch_size"), ({"lr_unet": "x"}, "lr_unet"),
    ({"lr_new": -1}, "lr_new"), ({"lr_new": float("nan")}, "lr_new"), ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"init": "xyz"}, "init"), ({"init": [1]}, "init"), ({"device": "tpu"}, "device"),
    ({"device": ["cuda"]}, "device"), ({"device": "cuda:x"}, "device"), ({"device": "/dev/nvidia0"}, "device"),
])
def test_bad_train_request_options_name_their_key(request_, key):
    from lib.server.validate import ClientError, check_train_options

    with pytest.raises(OptionError, match=f"^{key} ") as err:
        request_options(request_)
    with pytest.raises(ClientError) as client:                  # the server's check is the same function
        check_train_options(request_)
    assert client.value.status_code == 400 and client.value.detail == str(err.value)
    assert "/dev" not in str(err.value)                         # paths are not echoed


def test_train_task_builds_its_run_from_the_parsed_request(tmp_path):
    from types import SimpleNamespace

    from lib.configs.app_config import parse_conf
    from lib.trainers.sdfsmis import SDFSMISTrain

    cfg = parse_conf({"train_dir": str(tmp_path / "train")})
    store = SimpleNamespace(source=SimpleNamespace(kind="embedded", preset="mini", folder="/models/mini"))
    task = SDFSMISTrain(store, cfg, tmp_path / "app")
    assert task.config() == {k: (["current", "preset"] if k == "init" else "" if v is None else v)
                             for k, v in REQUEST_DEFAULTS.items()}
    opts, done = task.options({"iterations": "12", "lr_new": "0.01", "device": "cpu"}, ["a.nii.gz"])
    assert done == 0 and opts.iterations == 12 and opts.lr_new == 0.01 and opts.lr_unet is None
    assert (opts.init, opts.preset, opts.device, opts.checkpoint_every) == ("/models/mini", "mini", "cpu", 50)
    opts, _ = task.options({"init": "preset"}, ["a.nii.gz"])
    assert opts.init is None and not opts.resume
    with pytest.raises(OptionError, match="^batch_size "):
        task.options({"batch_size": 0}, ["a.nii.gz"])
