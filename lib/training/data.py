"""Episodes for a run: the images' supervoxel episodes, augmented and (optionally) aligned, as batches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lib.data.cross_volume import CrossVolumeSampler
from lib.data.episodes import EpisodeSampler
from lib.data.training_set import collect_images, load_training_volumes
from lib.model.config import SDFSMISConfig
from lib.training.options import TrainOptions
from lib.transforms.align import SliceAligner, support_aligner
from lib.transforms.augment import EpisodeAugment, resize_episode


def make_batch(sampler: EpisodeSampler, augment: EpisodeAugment | None, size: int, batch: int,
               device: torch.device, aligner: SliceAligner | None = None) -> dict[str, torch.Tensor]:
    """B episodes -> dict of (B, 1, S, S) float tensors on `device`. With `aligner` the support is
    registered onto the query first, as at inference, and augmented after (registration of a
    gamma-changed or warped pair misaligns more than it aligns)."""
    eps = []
    for _ in range(batch):
        ep = resize_episode(sampler.sample(), size)
        ep = aligner.align_episode(ep) if aligner is not None else ep
        eps.append(augment(ep) if augment is not None else ep)
    return {k: torch.from_numpy(np.stack([e[k] for e in eps])[:, None]).to(device)
            for k in ("support_image", "support_mask", "query_image", "query_mask")}


@dataclass
class Episodes:
    """The run's episode source; `batch()` draws one training batch."""

    images: list
    sampler: EpisodeSampler | CrossVolumeSampler
    augment: EpisodeAugment
    aligner: SliceAligner | None
    size: int
    batch_size: int
    device: torch.device

    def batch(self) -> dict[str, torch.Tensor]:
        return make_batch(self.sampler, self.augment, self.size, self.batch_size, self.device, self.aligner)

    def plain_batch(self, n: int) -> dict[str, torch.Tensor]:
        """n episodes without augmentation or alignment (the VAE's latent statistics)."""
        return make_batch(self.sampler, None, self.size, n, self.device)


def load_episodes(opts: TrainOptions, cfg: SDFSMISConfig, batch_size: int, device: torch.device,
                  start: int = 0, rank: int = 0) -> Episodes:
    """Read (or compute) the pseudo-labels of opts.data and set up sampling; seeds differ per rank
    and per resumed start so a resumed or parallel run does not replay the same episodes."""
    seed = opts.seed + start + 1000 * rank
    images = collect_images(opts.data)
    volumes, labels = load_training_volumes(images, opts.cache_dir, with_labels=opts.exclude_labels is not None,
                                            progress=opts.progress_bar and rank == 0)
    sampler = EpisodeSampler(volumes, seed=seed, labels=labels or None, exclude_labels=opts.exclude_labels,
                             setting2_rule=opts.setting2_rule, merge=opts.merge, vanish=opts.vanish, gap=opts.gap)
    if opts.cross > 0:
        sampler = CrossVolumeSampler(sampler, groups=[str(Path(p).parent) for p in images], share=opts.cross,
                                     seed=seed + 11)
    augment = EpisodeAugment(cfg.image_size, seed=seed + 7, strength=opts.aug_strength)
    aligner = support_aligner(cfg.align_support) if opts.stage == "sdfsmis" else None
    return Episodes(images, sampler, augment, aligner, cfg.image_size, batch_size, device)
