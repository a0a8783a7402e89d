"""SupportCache: one support's encoding, computed once and reused for every query slice it serves."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SupportCache:
    """The query-independent part of SD-FSMIS for G supports of k shots each.

    prototype: QE support prototype p_s, (G, C_latent)
    embedding: VTCT text-like embedding, (G, n_tokens, D)
    tokens:    SII keys/values per transformer block index, each (G, k*L, C)
    shots:     k, the number of annotated slices per support
    prior:     support latents fed to the query branch, mean over the k shots: z_s^M (G, C, h, w) or
               [z_s^M, z_s^I] (G, 2C, h, w) per `config.query_prior`; None for "none" (the paper)
    prototypes: the pretrained prior's organ + background prototypes (G, 1 + P, C_f); None without
               `config.prior_backbone`
    """

    prototype: torch.Tensor
    embedding: torch.Tensor
    tokens: dict[int, torch.Tensor]
    shots: int
    prior: torch.Tensor | None = None
    prototypes: torch.Tensor | None = None

    @property
    def groups(self) -> int:
        return self.prototype.shape[0]

    def to(self, device=None, dtype=None) -> "SupportCache":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return SupportCache(
            move(self.prototype), move(self.embedding), {i: move(t) for i, t in self.tokens.items()}, self.shots,
            None if self.prior is None else move(self.prior),
            None if self.prototypes is None else move(self.prototypes),
        )

    def nbytes(self) -> int:
        ts = [self.prototype, self.embedding, *self.tokens.values()]
        ts += [t for t in (self.prior, self.prototypes) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)
