"""SII: Support Information Injection, an extra cross-attention in every BasicTransformerBlock.

The support branch runs the UNet first and each block stores its normed hidden states (its
self-attention input). The query branch runs second; in every block, after self-attention, query
tokens attend to that block's stored support tokens (keys and values), then the ordinary text
cross-attention (VTCT embedding) and the FFN follow.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from diffusers.models.attention import BasicTransformerBlock
from torch import nn


@dataclass
class SIIContext:
    """Per-call state passed through `cross_attention_kwargs={"sii": ctx}`.

    mode "store": each block writes `tokens[index]` = normed hidden states (S*k, L, C).
    mode "inject": each block reads `tokens[index]` (S, k*L, C) as keys/values; S is 1 (one support
    serving every query, expanded to the batch) or the query batch size.
    """

    mode: str
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)

    def support_tokens(self, index: int, batch: int) -> torch.Tensor:
        t = self.tokens[index]
        if t.shape[0] == batch:
            return t
        if t.shape[0] == 1:
            return t.expand(batch, -1, -1)
        raise ValueError(f"SII: {t.shape[0]} supports cannot serve a query batch of {batch}")


class SIIBasicTransformerBlock(BasicTransformerBlock):
    """BasicTransformerBlock (layer_norm type, as in SD v1.5) with an SII cross-attention.

    Shapes: hidden_states (B, L, C); encoder_hidden_states (B, T, D); support tokens (B, k*L, C).
    """

    sii_index: int

    @classmethod
    def from_block(cls, block: BasicTransformerBlock, index: int) -> "SIIBasicTransformerBlock":
        """Wrap an existing block (weights shared, not copied); SII initialised from its self-attention."""
        if block.norm_type != "layer_norm" or block.only_cross_attention or block.pos_embed is not None:
            raise ValueError("SII supports the SD v1.5 block layout (layer_norm, self- then cross-attention)")
        new = cls.__new__(cls)
        new.__dict__.update(block.__dict__)
        new._modules = dict(block._modules)
        new._parameters = dict(block._parameters)
        new._buffers = dict(block._buffers)
        new.sii_index = index
        new.norm_sii = copy.deepcopy(block.norm1)
        new.attn_sii = copy.deepcopy(block.attn1)
        return new

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict | None = None,
    ) -> torch.Tensor:
        ctx: SIIContext | None = (cross_attention_kwargs or {}).get("sii")
        norm = self.norm1(hidden_states)
        if ctx is not None and ctx.mode == "store":
            ctx.tokens[self.sii_index] = norm
        hidden_states = self.attn1(norm, attention_mask=attention_mask) + hidden_states
        if ctx is not None and ctx.mode == "inject":
            support = ctx.support_tokens(self.sii_index, hidden_states.shape[0])
            hidden_states = self.attn_sii(self.norm_sii(hidden_states), encoder_hidden_states=support) + hidden_states
        if self.attn2 is not None:
            hidden_states = (
                self.attn2(
                    self.norm2(hidden_states),
                    encoder_hidden_states=encoder_hidden_states,
                    attention_mask=encoder_attention_mask,
                )
                + hidden_states
            )
        return self.ff(self.norm3(hidden_states)) + hidden_states


def add_sii(unet: nn.Module) -> list[SIIBasicTransformerBlock]:
    """Replace every BasicTransformerBlock of `unet` in place; returns the SII blocks in call order."""
    blocks = []
    for parent in list(unet.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, BasicTransformerBlock) and not isinstance(child, SIIBasicTransformerBlock):
                new = SIIBasicTransformerBlock.from_block(child, len(blocks))
                setattr(parent, name, new)
                blocks.append(new)
    if not blocks:
        raise ValueError("the UNet has no BasicTransformerBlock to inject support information into")
    return blocks


def sii_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The parameters SII adds (norm_sii + attn_sii of every block)."""
    params = []
    for m in unet.modules():
        if isinstance(m, SIIBasicTransformerBlock):
            params += list(m.norm_sii.parameters()) + list(m.attn_sii.parameters())
    return params
