"""Self-supervised fine-tuning of the appearance prior (SSL-ALPNet's recipe on EfficientNet-Lite2).

The frozen ImageNet features recognise organ tissue only roughly (the prototype floor,
docs/evaluation.md). SSL-ALPNet fine-tunes its ImageNet backbone on supervoxel episodes with the
same prototype matching it segments with; here the same is done to the appearance prior the pipeline
fuses across volumes (lib.pipeline.appearance):

    support slice + supervoxel region -> organ / local background prototypes (lib.model.prototypes)
    query slice -> foreground logit -> BCE + Dice against the query's region (and the reverse:
    query prototypes segment the support, PANet's alignment term)

Episodes: lib.data.episodes (supervoxels of the images, no label is read), augmented on one side
(lib.transforms.augment). BatchNorm statistics stay the ImageNet ones (batches of a few slices).
The result is the backbone's state dict (`appearance.safetensors`, the stride-16 trunk only, ~4.6 MB),
which the evaluation takes with `--features`. Measured (docs/evaluation.md, *Fine-tuning the
appearance prior*): it raises the floor but lowers the fused result, so the app serves ImageNet's.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lib.model.prototypes import foreground_logit, prototypes
from lib.model.sdfsmis import mask_loss

APPEARANCE = "appearance.safetensors"


def episode_loss(features, support_image, support_mask, query_image, query_mask) -> torch.Tensor:
    """(B, 1, S, S) tensors -> scalar: BCE + soft Dice (lib.model.sdfsmis.mask_loss, the network's mask
    term) of the query's logit from the support's prototypes, plus the same with support and query swapped."""
    b = support_image.shape[0]
    f = features(torch.cat([support_image, query_image]))                      # (2B, C, h, w)
    fs, fq = f[:b], f[b:]
    total = 0.0
    for feat_a, mask_a, feat_b, mask_b in ((fs, support_mask, fq, query_mask), (fq, query_mask, fs, support_mask)):
        logit = torch.cat([foreground_logit(feat_b[i:i + 1], prototypes(feat_a[i:i + 1], mask_a[i:i + 1]))
                           for i in range(b)])                                  # (B, 1, h, w)
        total = total + mask_loss(F.interpolate(logit, size=mask_b.shape[-2:], mode="bilinear"), mask_b)
    return total / 2


def freeze_batchnorm(module: torch.nn.Module) -> None:
    """Keep every BatchNorm's running statistics (eval mode) while the rest trains."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def save_weights(features, path: Path) -> None:
    """The backbone's state dict -> safetensors, written to a temporary name and renamed."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in features.state_dict().items()}, str(tmp))
    tmp.replace(path)


def train(data: list, out: str, iterations: int = 1200, batch: int = 4, lr: float = 1e-4, size: int = 256,
          merge: int = 8, gap: int = 4, vanish: float = 0.1, cross: float = 0.0, strength: float = 1.0,
          seed: int = 42, checkpoint_every: int = 250, threads: int = 1, progress: bool = True,
          cache_dir=None) -> Path:
    """Fine-tune EfficientNet-Lite2's stride-16 trunk on the images' supervoxel episodes -> the weights file."""
    from tqdm import tqdm

    from lib.data.cross_volume import CrossVolumeSampler
    from lib.data.episodes import EpisodeSampler
    from lib.data.training_set import collect_images, load_training_volumes
    from lib.model.backbone import PretrainedFeatures
    from lib.training.data import make_batch
    from lib.transforms.augment import EpisodeAugment

    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = collect_images(data)
    volumes, _ = load_training_volumes(images, cache_dir, progress=progress)
    sampler = EpisodeSampler(volumes, seed=seed, merge=merge, vanish=vanish, gap=gap)
    if cross > 0:
        sampler = CrossVolumeSampler(sampler, groups=[str(Path(p).parent) for p in images], share=cross, seed=seed + 11)
    augment = EpisodeAugment(size, seed=seed + 7, strength=strength)
    features = PretrainedFeatures().train()
    freeze_batchnorm(features)
    optimizer = torch.optim.AdamW(features.parameters(), lr=lr, weight_decay=1e-4)
    warmup = min(50, iterations // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, iterations, warmup))
    bar = tqdm(range(iterations), desc="train appearance", unit="it", disable=not progress)
    start, running = time.time(), None
    with (out_dir / "train_log.jsonl").open("a") as log:
        for it in bar:
            running = _step(features, optimizer, schedule, make_batch(sampler, augment, size, batch, torch.device("cpu")),
                            running)
            bar.set_postfix(loss=f"{running:.3f}")
            if (it + 1) % 10 == 0:
                log.write(f'{{"iteration": {it + 1}, "loss": {running:.4f}, "seconds": {time.time() - start:.1f}}}\n')
                log.flush()
            if (it + 1) % checkpoint_every == 0 or it + 1 == iterations:
                save_weights(features, out_dir / f"appearance-{it + 1}.safetensors")
    final = out_dir / APPEARANCE
    save_weights(features, final)
    return final


def lr_factor(i: int, iterations: int, warmup: int) -> float:
    """Learning-rate multiplier after i steps: a linear warm-up times a cosine from 1 to 0 at `iterations`
    (the schedule of the runs in docs/evaluation.md; lib.training.recipe's cosine ends at 0.1 instead)."""
    return min(1.0, (i + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(i, iterations) / iterations))


def _step(features, optimizer, schedule, b: dict, running: float | None) -> float:
    """One optimiser step on batch `b` (lib.training.loop.step: backward, clipping at 1, AdamW), then the
    schedule -> the running (exponentially averaged) loss."""
    from lib.training.loop import step

    loss = step(lambda e: episode_loss(features, e["support_image"], e["support_mask"], e["query_image"],
                                       e["query_mask"]), optimizer, b, grad_clip=1.0)
    schedule.step()
    return loss if running is None else 0.95 * running + 0.05 * loss


def main(argv=None) -> int:
    """`python -m lib.train_appearance DATA [DATA ...] --out DIR`."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lib.train_appearance", description=__doc__.split("\n")[0])
    p.add_argument("data", nargs="+", help="dataset folders (image_K.nii.gz) and/or NIfTI images; labels unused")
    p.add_argument("--out", required=True, help=f"output folder: {APPEARANCE}, appearance-N.safetensors, train_log.jsonl")
    p.add_argument("--iterations", type=int, default=1200)
    p.add_argument("--batch-size", type=int, default=4, help="episodes per iteration")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (warm-up, then cosine)")
    p.add_argument("--merge", type=int, default=8, help="grow half the regions by up to this many supervoxels")
    p.add_argument("--gap", type=int, default=4, help="largest support-query slice distance")
    p.add_argument("--vanish", type=float, default=0.1, help="share of episodes where the region ends")
    p.add_argument("--cross", type=float, default=0.0, help="share of episodes across volumes (lib.data.cross_volume)")
    p.add_argument("--aug-strength", type=float, default=1.0)
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--cache-dir", help="pseudo-label cache (default: lib.data.supervoxel_cache's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's choice)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    if a.iterations < 1 or a.batch_size < 1 or not a.lr > 0:
        p.error("--iterations, --batch-size and --lr must be positive")
    path = train(a.data, a.out, a.iterations, a.batch_size, a.lr, merge=a.merge, gap=a.gap, vanish=a.vanish,
                 cross=a.cross, strength=a.aug_strength, seed=a.seed, checkpoint_every=a.checkpoint_every,
                 threads=a.threads, progress=not a.no_progress, cache_dir=a.cache_dir)
    print(f"wrote {path}; score it with `python -m lib.evaluate ... --method registration --appearance 0.25 "
          f"--features {path}`")
    return 0
