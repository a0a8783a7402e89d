"""The training loop: loss goes down, checkpoints are published atomically, resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lib.model import build_model, is_checkpoint, load_checkpoint, read_meta
from lib.training import TrainOptions, lr_factor, recipe_for, train
from lib.training.losses import EpisodeLoss
from lib.training.loop import param_groups
from tests.synthetic_volumes import write_dataset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), n=2)


def _opts(dataset, out, tmp_path, **kw):
    base = dict(data=[str(dataset)], out=str(out), preset="tiny", checkpoint_every=2, warmup=0,
                cache_dir=str(tmp_path / "cache"), progress_bar=False, device="cpu")
    base.update(kw)
    return TrainOptions(**base)


def test_a_few_iterations_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("tiny").train()
    model.config.mask_loss_weight = 0.0   # the paper's latent MSE alone
    s = model.config.image_size
    yy, xx = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    mask = (((yy - 30) ** 2 + (xx - 28) ** 2) < 150).float()[None, None].repeat(2, 1, 1, 1)
    moved = (((yy - 36) ** 2 + (xx - 34) ** 2) < 200).float()[None, None].repeat(2, 1, 1, 1)
    image = 0.3 + 0.5 * mask + 0.05 * torch.rand(2, 1, s, s)
    query = 0.3 + 0.5 * moved + 0.05 * torch.rand(2, 1, s, s)
    # the query's disc moved and grew: not solved by the support-mask prior that tiny starts from
    batch = {"support_image": image, "support_mask": mask, "query_image": query, "query_mask": moved}
    net = EpisodeLoss(model)
    opt = torch.optim.AdamW(param_groups(model, "sdfsmis", recipe_for("tiny")))
    losses = []
    for _ in range(8):
        loss = net(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses


def test_mask_loss_term_is_dice_ce_of_the_decoded_prediction():
    from lib.model.sdfsmis import mask_loss

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    s = model.config.image_size
    mask = torch.zeros(2, 1, s, s)
    mask[:, :, 20:40, 18:44] = 1
    image = 0.2 + 0.6 * mask
    with torch.no_grad():
        model.config.mask_loss_weight = 0.0
        mse = model.loss(image, mask, image, mask)
        model.config.mask_loss_weight = 2.0
        total = model.loss(image, mask, image, mask)
        pred = model.query_branch(image, model.support_branch(image, mask, groups=2))
        term = mask_loss(model.decode_logits(pred), mask)
    assert float(term) > 0.1
    torch.testing.assert_close(total, mse + 2.0 * term, rtol=1e-5, atol=1e-6)
    from monai.losses import DiceCELoss

    logits = 3 * torch.randn(3, 1, 16, 16)
    target = (torch.rand(3, 1, 16, 16) > 0.6).float()
    target[1] = 0                                          # an empty target slice too
    reference = DiceCELoss(sigmoid=True, smooth_nr=1.0, smooth_dr=1.0)(logits, target)
    torch.testing.assert_close(mask_loss(logits, target), reference, rtol=1e-5, atol=1e-6)


def test_train_publishes_a_checkpoint_logs_and_resumes(dataset, tmp_path):
    seen = []
    res = train(_opts(dataset, tmp_path / "run", tmp_path, iterations=3), progress=seen.append)
    assert res.iterations_done == 3 and not res.stopped
    assert [d["iteration"] for d in seen] == [1, 2, 3] and all(d["loss"] > 0 for d in seen)
    meta = read_meta(tmp_path / "run" / "model")
    assert meta["extra"]["iteration"] == 3 and meta["preset"] == "tiny"
    assert json.loads((tmp_path / "run" / "state" / "state.json").read_text())["iteration"] == 3
    # resume: continues at 4, not 1
    seen.clear()
    train(_opts(dataset, tmp_path / "run", tmp_path, iterations=5), progress=seen.append)
    assert [d["iteration"] for d in seen] == [4, 5]
    assert read_meta(tmp_path / "run" / "model")["extra"]["iteration"] == 5


def test_should_stop_saves_and_returns_early(dataset, tmp_path):
    res = train(_opts(dataset, tmp_path / "run", tmp_path, iterations=50, checkpoint_every=100),
                should_stop=lambda: True)
    assert res.stopped and res.iterations_done == 1
    assert read_meta(res.model_dir)["extra"]["iteration"] == 1


def test_vae_stage_trains_the_vae_and_sets_its_scaling_factor(dataset, tmp_path):
    before = build_model("tiny").vae.state_dict()
    res = train(_opts(dataset, tmp_path / "vae", tmp_path, iterations=2, stage="vae"))
    model = load_checkpoint(res.model_dir)
    assert read_meta(res.model_dir)["extra"]["stage"] == "vae"
    assert model.scaling_factor != 1.0 and model.config.vae["scaling_factor"] == model.scaling_factor
    assert any(not torch.equal(before[k], v) for k, v in model.vae.state_dict().items())
    with pytest.raises(ValueError, match="stage"):  # a vae-stage folder is not resumed as sdfsmis
        train(_opts(dataset, tmp_path / "vae", tmp_path, iterations=3))


def test_sigkill_mid_run_leaves_a_loadable_model_and_resume_continues(dataset, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "lib.train", str(dataset), "--out", str(out), "--preset", "tiny",
           "--iterations", "10000", "--checkpoint-every", "1", "--warmup", "0", "--device", "cpu",
           "--cache-dir", str(tmp_path / "cache"), "--threads", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if is_checkpoint(out / "model") and read_meta(out / "model")["extra"]["iteration"] >= 3:
                break
            assert proc.poll() is None, "training exited early"
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 240 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    load_checkpoint(out / "model")  # the published model is whole (or recovered from the previous one)
    done = read_meta(out / "model")["extra"]["iteration"]
    assert done >= 3
    seen = []
    train(_opts(dataset, out, tmp_path, iterations=done + 2, checkpoint_every=1), progress=seen.append)
    assert [d["iteration"] for d in seen] == [done + 1, done + 2]


def test_sdfsmis_stage_takes_only_the_vae_of_a_vae_stage_run(dataset, tmp_path):
    vae_run = train(_opts(dataset, tmp_path / "vae", tmp_path, iterations=1, stage="vae"))
    trained = load_checkpoint(vae_run.model_dir)
    res = train(_opts(dataset, tmp_path / "net", tmp_path, iterations=1, init=str(vae_run.model_dir),
                      mask_loss_weight=0.5))
    model = load_checkpoint(res.model_dir)
    assert model.scaling_factor == trained.scaling_factor
    for k, v in trained.vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[k], v), k
    assert model.config.mask_loss_weight == 0.5 and model.config.query_prior == "image+mask"  # the tiny preset
    with pytest.raises(ValueError, match="preset"):
        train(_opts(dataset, tmp_path / "bad", tmp_path, iterations=1, init=str(vae_run.model_dir), preset="mini"))


def test_learning_rate_schedule_warms_up_then_decays_by_cosine():
    assert [lr_factor(i, 100, 10) for i in (1, 5, 10, 50, 100)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    cos = [lr_factor(i, 110, 10, "cosine") for i in range(1, 111)]
    assert cos[4] == 0.5 and cos[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cos[9:], cos[10:]))                 # decays monotonically
    assert cos[59] == pytest.approx(0.55) and cos[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="schedule"):
        train(TrainOptions(data=["x"], schedule="linear"))


def test_stop_at_ends_early_on_the_full_schedule(dataset, tmp_path):
    res = train(_opts(dataset, tmp_path / "run", tmp_path, iterations=6, stop_at=2, schedule="cosine",
                      warmup=0, log_every=1, checkpoint_every=100))
    assert res.stopped and res.iterations_done == 2
    assert read_meta(res.model_dir)["extra"]["iteration"] == 2
    lines = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    base = recipe_for("tiny").lr_unet
    assert [x["iteration"] for x in lines] == [1, 2]
    assert lines[-1]["lr"][0] == pytest.approx(base * lr_factor(2, 6, 0, "cosine"))   # planned for 6, not 2


def test_align_registers_each_support_and_is_recorded_in_the_model(dataset, tmp_path, monkeypatch):
    """--align registration: every episode's support is registered onto its query before augmentation,
    and the published config says so (inference then aligns too); a resumed run keeps it."""
    from lib.training.options import parse_args
    from lib.transforms.align import SliceAligner

    aligned = []
    original = SliceAligner.align_episode

    def spy(self, episode):
        aligned.append(episode["support_image"].shape)
        return original(self, episode)

    monkeypatch.setattr(SliceAligner, "align_episode", spy)
    res = train(_opts(dataset, tmp_path / "run", tmp_path, iterations=2, align="registration"))
    size = build_model("tiny").config.image_size
    assert aligned == [(size, size)] * 4                         # 2 iterations x batch 2, at network size
    assert load_checkpoint(res.model_dir).config.align_support == "registration"
    aligned.clear()
    train(_opts(dataset, tmp_path / "run", tmp_path, iterations=3))   # resumed: the model's own setting
    assert len(aligned) == 2
    aligned.clear()
    train(_opts(dataset, tmp_path / "plain", tmp_path, iterations=1))
    assert aligned == [] and read_meta(tmp_path / "plain" / "model")["model"]["align_support"] == "none"
    with pytest.raises(ValueError, match="unknown support alignment"):
        train(_opts(dataset, tmp_path / "bad", tmp_path, iterations=1, align="flow"))
    assert parse_args(["d", "--out", "o", "--align", "registration"]).align == "registration"
