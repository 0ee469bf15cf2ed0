"""The synthetic recipe's shared-prefix decoder pass: each scene's image prefix (`<s><image>` slots
`</image>`) runs once, and all the samples that continue it attend to its keys and values.

Functions over the decoder's public submodules (kosmos2.model.TextTransformer: embed, layers, layer_norm;
each DecoderBlock's self_attn, norms and ffn), so the model keeps one forward path. Every sample token
computes what it computes in a row of its own (`forward_shared`), for a fraction of the decoder tokens:
tests/test_train_synthetic.py checks the hidden states and the loss's gradients against one row a sample.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from kosmos2.model import DecoderAttention, DecoderBlock, TextTransformer


@dataclass
class SharedLayout:
    """How `forward_shared` lays its tokens out as one flat [N, C] tensor: pieces of `shapes[j]` = (rows,
    length) tokens, row-major, one after another. Piece 0 is the prefixes [S,P]; piece j >= 1 a chunk of
    sample rows, row r continuing prefix `index[j-1][r]` under mask `masks[j-1]` [L,P+L]."""

    shapes: list[tuple[int, int]]
    index: list[Tensor]
    masks: list[Tensor]

    @property
    def prefix_tokens(self) -> int:
        """The number of prefix tokens, which come first."""
        return self.shapes[0][0] * self.shapes[0][1]

    def split(self, x: Tensor, prefix: bool = True) -> list[Tensor]:
        """[N, ...] -> one [rows, length, ...] tensor per piece; `prefix` False: x holds the sample pieces
        only (the prefix's tokens left out) and so does the list."""
        shapes = self.shapes if prefix else self.shapes[1:]
        pieces = x.split([r * n for r, n in shapes])
        return [t.view(r, n, *x.shape[1:]) for t, (r, n) in zip(pieces, shapes, strict=True)]


def _heads(attn: DecoderAttention, x: Tensor) -> Tensor:
    # [B,T,C] -> [B,H,T,hd]
    B, T, C = x.shape
    return x.view(B, T, attn.heads, C // attn.heads).transpose(1, 2)


def _attend(attn: DecoderAttention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    # q [B,H,T,hd], k and v [B,H,S,hd]; mask [B,1,T,S] bool or None (causal) -> [B,T,C], heads merged
    y = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=attn.dropout if attn.training else 0.0
    )
    B, H, T, hd = y.shape
    return y.transpose(1, 2).reshape(B, T, H * hd)


def _with_prefix(attn: DecoderAttention, pick: Tensor, prefix: Tensor, own: Tensor) -> Tensor:
    # pick [R,S] one-hot, prefix [S,P,C], own [R,L,C] -> [R,H,P+L,hd]: each row's prefix, then its own
    S, P, C = prefix.shape
    picked = (pick @ prefix.view(S, P * C)).view(-1, P, C)
    return torch.cat([_heads(attn, picked), _heads(attn, own)], dim=2)


def attention_shared(
    attn: DecoderAttention, x: Tensor, layout: SharedLayout, prefix_out: bool = True
) -> Tensor:
    """x [N,C] laid out by `layout`: the prefix rows attend causally to themselves; each sample row to the
    keys and values of its prefix row, then causally to its own. `prefix_out` False: the prefix tokens give
    keys and values only, and the output holds the sample tokens alone (the last block of a pass that needs
    no prefix states)."""
    k, v = (layout.split(p(x)) for p in (attn.k_proj, attn.v_proj))  # [rows, length, C] pieces
    if prefix_out:
        q = [_heads(attn, t) for t in layout.split(attn.q_proj(x))]
    else:
        q = [None, *(_heads(attn, t) for t in layout.split(attn.q_proj(x[layout.prefix_tokens :]), False))]
    # plain-matmul attention on CPU: the kernel the shipped default model was trained with (the fused one
    # rounds differently, and a run is chaotic enough that other floats make another model);
    # benchmarks/train_step.py times both
    with sdpa_kernel(SDPBackend.MATH) if x.device.type == "cpu" else contextlib.nullcontext():
        out = [_attend(attn, q[0], _heads(attn, k[0]), _heads(attn, v[0]), None)] if prefix_out else []
        for j, (index, mask) in enumerate(zip(layout.index, layout.masks, strict=True), start=1):
            # each row's prefix keys and values picked by a product with a one-hot [R, S] matrix (exact: one
            # term): its backward is a product too, where index_select's is a slow scatter-add
            pick = F.one_hot(index, k[0].shape[0]).to(k[0].dtype)
            keys, values = (_with_prefix(attn, pick, t[0], t[j]) for t in (k, v))
            out.append(_attend(attn, q[j], keys, values, mask))
    y = torch.cat([t.flatten(0, 1) for t in out])  # [N, C]
    return attn.out_proj(attn.inner_attn_ln(y))


def block_shared(block: DecoderBlock, x: Tensor, layout: SharedLayout, prefix_out: bool = True) -> Tensor:
    """DecoderBlock.forward over the flat shared layout (`attention_shared`); `prefix_out` False: the output
    holds the sample tokens only."""
    h = attention_shared(block.self_attn, block.self_attn_layer_norm(x), layout, prefix_out)
    if not prefix_out:
        x = x[layout.prefix_tokens :]
    x = x + F.dropout(h, block.dropout, block.training)
    return x + block.ffn(block.final_layer_norm(x))


def forward_shared(
    decoder: TextTransformer,
    prefix_ids: Tensor,
    image_embeds: Tensor,
    image_mask: Tensor,
    samples: list[tuple[Tensor, Tensor, Tensor]],
    prefix_out: bool = True,
) -> tuple[Tensor | None, list[Tensor]]:
    """Training with a shared prefix: several samples continue each image prefix, and the prefix is run
    once. Each sample row computes exactly what it would as the continuation of its prefix in a row of its
    own (the prefix's keys and values are the same), for a fraction of the tokens and attention.

    prefix_ids [S,P] (no padding: all prefixes one length), image_mask [S,P] marking the image slots,
    image_embeds [S,N,C]; samples: chunks of (ids [R,L] right-padded, positions [R,L], index [R] = the
    prefix row each continues). Returns hidden states after the final LayerNorm: prefix [S,P,C] and one
    [R,L,C] per chunk. `prefix_out` False: the prefix's hidden states are not wanted (None is returned for
    them), so the last block computes the prefix's keys and values only, not its queries, attention output
    and MLP (the samples' states are the same).
    """
    S, P = prefix_ids.shape
    device = prefix_ids.device
    positions = torch.arange(2, P + 2, device=device).expand(S, P)  # make_positions, no pads
    pieces = [decoder.embed(prefix_ids, positions, image_embeds, image_mask)]
    layout = SharedLayout([(S, P)], [], [])
    for ids, pos, index in samples:
        R, L = ids.shape
        # a sample token sees the whole prefix, then its own row causally (right padding needs no mask)
        mask = torch.ones(L, P + L, dtype=torch.bool, device=device)
        mask[:, P:] = torch.ones(L, L, dtype=torch.bool, device=device).tril()
        pieces.append(decoder.embed(ids, pos, None, None))
        layout.shapes.append((R, L))
        layout.index.append(index)
        layout.masks.append(mask[None, None])
    x = torch.cat([t.flatten(0, 1) for t in pieces])  # [N, C]
    n = len(decoder.layers)
    for k, layer in enumerate(decoder.layers, 1):
        whole = prefix_out or k < n
        if decoder.gradient_checkpointing and decoder.training:
            x = checkpoint(block_shared, layer, x, layout, whole, use_reentrant=False)
        else:
            x = block_shared(layer, x, layout, whole)
    if not prefix_out:
        return None, layout.split(decoder.layer_norm(x), False)
    out = layout.split(decoder.layer_norm(x))
    return out[0], out[1:]
