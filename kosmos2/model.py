"""The Kosmos-2 network (Peng et al. 2023, "Kosmos-2: Grounding Multimodal Large Language Models to the
World", arXiv:2306.14824), top to bottom: vision encoder -> connector -> decoder -> `Kosmos2`.

    pixels [B,3,224,224] -> CLIP ViT-L/14 (257 tokens) -> post-LN on every token, L2-normalise
        -> connector: dense 1024->2048, 64 latent queries attend over [image tokens, latents] -> [B,64,2048]
    ids [B,T] -> token embeddings, image slots overwritten by the 64 image embeddings, * sqrt(2048),
        + sinusoidal positions -> 24 sub-LN (MAGNETO) decoder blocks -> final LN -> logits (tied embedding)

Module and parameter names are those of the Hugging Face checkpoint
(`text_model.model.layers.0.self_attn.q_proj`, `vision_model.model.pre_layrnorm`, ...) so `state_dict()`
loads and saves that layout with no name map.

Two ways to run the decoder:
- `forward(...)`: the whole sequence at once (training, scoring); returns `(logits, loss)`.
- `setup_cache(...)` then `forward_cached(...)`: a static KV cache (gpt-fast style) for generation; see
  `Kosmos2.forward_cached` for the contract.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from kosmos2.config import Kosmos2Config, TextConfig, VisionConfig

# -- helpers -----------------------------------------------------------------------------------------------


def quick_gelu(x: Tensor) -> Tensor:
    """CLIP's GELU approximation x * sigmoid(1.702 x); the released vision weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


def make_positions(input_ids: Tensor, pad_id: int = 1) -> Tensor:
    """Decoder positions [B,T] from ids [B,T]: 2 + (number of non-pad tokens before it); pad tokens get 1.

    This is fairseq's rule: BOS is 2, `<image>` 3, the 64 slots 4..67; left padding does not shift a row.
    For cached decoding the next token's position is the last position of the row + 1.
    """
    real = input_ids != pad_id
    return torch.where(real, torch.cumsum(real, dim=1) + 1, 1)


def sinusoidal_positions(positions: Tensor, dim: int) -> Tensor:
    """Fixed position embeddings [*, dim] (float32) for integer positions [*], computed on the fly.

    With half = dim/2 and f_i = exp(-i ln(10000) / (half - 1)): row p = [sin(p f), cos(p f)]; row 1 (the pad
    position) is zero. Same float32 operations as the table fairseq builds, so the values are identical.
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=positions.device).float() * -(math.log(10000) / (half - 1)))
    angles = positions.float().unsqueeze(-1) * freqs  # [*, half]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)  # [*, dim]
    return emb * (positions != 1).unsqueeze(-1)


def causal_padding_mask(query_index: Tensor, key_valid: Tensor) -> Tensor:
    """Boolean mask [B,1,T,S] (True = may attend) for queries at key slots `query_index` [T] over keys [B,S].

    A query sees keys at slots <= its own (causal) that are valid (not padding). It always sees itself, so a
    padding query, whose earlier keys are all padding, still has one key: a row with no key would make NaNs
    in the softmax that then spread through the cache. Padding rows' outputs are never used.
    """
    s = torch.arange(key_valid.shape[1], device=key_valid.device)
    causal = s.unsqueeze(0) <= query_index.unsqueeze(1)  # [T, S]
    itself = s.unsqueeze(0) == query_index.unsqueeze(1)  # [T, S]
    return ((causal.unsqueeze(0) & key_valid.unsqueeze(1)) | itself.unsqueeze(0)).unsqueeze(1)


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections, no mask (vision blocks and the connector)."""

    def __init__(self, width: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, kv: Tensor | None = None) -> Tensor:
        # x: queries [B,T,C]; kv: keys/values [B,S,C] (x itself for self-attention)
        kv = x if kv is None else kv
        B, T, C = x.shape
        S, H = kv.shape[1], self.heads
        q = self.q_proj(x).view(B, T, H, C // H).transpose(1, 2)  # [B,H,T,hd]
        k = self.k_proj(kv).view(B, S, H, C // H).transpose(1, 2)  # [B,H,S,hd]
        v = self.v_proj(kv).view(B, S, H, C // H).transpose(1, 2)
        # plain-matmul attention on CPU when gradients are wanted: PyTorch's fused CPU kernel takes ~3x as
        # long forward + backward at these sizes (32 images x 65 tokens x 48 dims: 19 ms against 6 ms a call;
        # docs/DEFAULT_MODEL.md); inference keeps the fused kernel
        kernel = x.device.type == "cpu" and torch.is_grad_enabled()
        with sdpa_kernel(SDPBackend.MATH) if kernel else contextlib.nullcontext():
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


# -- vision encoder: CLIP ViT -----------------------------------------------------------------------------


class VisionEmbeddings(nn.Module):
    """Patchify (conv, no bias), prepend the class token, add learned positions: [B,3,H,W] -> [B,1+N,C]."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.image_size = cfg.image_size
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(cfg.num_positions, cfg.width)

    def forward(self, pixel_values: Tensor) -> Tensor:
        B, _, Hp, Wp = pixel_values.shape
        if Hp != self.image_size or Wp != self.image_size:
            raise ValueError(
                f"pixel_values are {Hp}x{Wp} but the vision encoder takes "
                f"{self.image_size}x{self.image_size}; resize the images first (kosmos2.image.preprocess)"
            )
        x = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [B,C,g,g]
        x = x.flatten(2).transpose(1, 2)  # [B,N,C], patches in row-major order
        cls = self.class_embedding.expand(B, 1, -1)  # [B,1,C]
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # [B,1+N,C]


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(LN1(x)), then x + mlp(LN2(x))."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.self_attn = Attention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP ViT returning every token after the post-LayerNorm: [B,3,H,W] -> [B,1+N,C].

    CLIP applies `post_layernorm` to the class token only; Kosmos-2 feeds all 257 tokens to the connector and
    normalises them all with it.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)  # sic, the checkpoint's name
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        return self.post_layernorm(self.encoder(x))


class VisionModel(nn.Module):
    """Holds the ViT under the name `model`, as the checkpoint does (`vision_model.model.*`)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.model = VisionTransformer(cfg)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values)


# -- connector --------------------------------------------------------------------------------------------


class ImageToTextProjection(nn.Module):
    """Resampler: 64 learned queries attend over [projected image tokens, the queries themselves].

    [B,257,Cv] -> dense -> [B,257,D]; keys/values = concat with the latents -> [B,321,D]; output [B,64,D].
    One attention, no mask, no residual, no MLP, no LayerNorm.
    """

    def __init__(self, cfg: Kosmos2Config):
        super().__init__()
        D = cfg.text.width
        self.dense = nn.Linear(cfg.vision.width, D)
        self.latent_query = nn.Parameter(torch.empty(cfg.latent_query_num, D))
        self.x_attn = Attention(D, cfg.text.heads, dropout=cfg.text.attention_dropout)

    def forward(self, features: Tensor) -> Tensor:
        x = self.dense(features)  # [B,257,D]
        q = self.latent_query.expand(x.shape[0], -1, -1)  # [B,64,D]
        return self.x_attn(q, torch.cat([x, q], dim=1))  # [B,64,D]


# -- decoder: MAGNETO (sub-LN) transformer with a static KV cache -----------------------------------------


_MATH_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_attention_math", None)


def _one_query_bf16_cpu(q: Tensor, mask: Tensor | None) -> bool:
    """A decoding step (one query a row) over a bfloat16 cache on the CPU, with a boolean mask."""
    return (
        q.shape[2] == 1
        and q.dtype == torch.bfloat16
        and q.device.type == "cpu"
        and mask is not None
        and mask.dtype == torch.bool
    )


class KVCache(nn.Module):
    """Preallocated keys and values of one decoder layer: [B, H, max_len, head_dim] each."""

    def __init__(self, batch_size: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (batch_size, heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # input_pos [T]: the cache slots the new keys/values [B,H,T,hd] go to; returns the whole cache
        self.k.index_copy_(2, input_pos, k.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v.to(self.v.dtype))
        return self.k, self.v


class DecoderAttention(nn.Module):
    """Causal self-attention with MAGNETO's extra LayerNorm on the merged heads before `out_proj`."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        C = cfg.width
        self.heads, self.dropout = cfg.heads, cfg.attention_dropout
        self.q_proj = nn.Linear(C, C)
        self.k_proj = nn.Linear(C, C)
        self.v_proj = nn.Linear(C, C)
        self.out_proj = nn.Linear(C, C)
        # sub-LN: keeps the scale of the attention output in check in deep stacks (MAGNETO, Wang et al. 2022)
        self.inner_attn_ln = nn.LayerNorm(C, eps=cfg.layer_norm_eps)
        self.kv_cache: KVCache | None = None

    def _heads(self, x: Tensor) -> Tensor:
        # [B,T,C] -> [B,H,T,hd]
        B, T, C = x.shape
        return x.view(B, T, self.heads, C // self.heads).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        # q [B,H,T,hd], k and v [B,H,S,hd]; mask [B,1,T,S] bool or None (causal) -> [B,T,C], heads merged
        if _MATH_ATTENTION is not None and _one_query_bf16_cpu(q, mask) and not self.training:
            # a decoding step over a bfloat16 cache on the CPU: PyTorch's flash kernel took 215 us a layer at
            # batch 1 and 1,790 at batch 8 (111 keys, 2 threads), its math kernel 127 and 872, at the same
            # error against float64 (benchmarks/README.md, "Decoding step"). Called directly: the switch
            # `sdpa_kernel` is process-wide. It takes an additive mask.
            bias = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, -math.inf)
            y = _MATH_ATTENTION(q, k, v, bias)[0]
        else:
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=self.dropout if self.training else 0.0,
            )
        B, H, T, hd = y.shape
        return y.transpose(1, 2).reshape(B, T, H * hd)

    def forward(self, x: Tensor, mask: Tensor | None, input_pos: Tensor | None = None) -> Tensor:
        # x [B,T,C]; mask [B,1,T,S] bool or None (plain causal); input_pos [T] cache slots, None = no cache
        q, k, v = (self._heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if input_pos is not None:
            assert self.kv_cache is not None, "call setup_cache() before forward_cached()"
            k, v = self.kv_cache.update(input_pos, k, v)  # [B,H,max_len,hd]
        return self.out_proj(self.inner_attn_ln(self._attend(q, k, v, mask)))


class FeedForward(nn.Module):
    """fc1 -> exact GELU -> LayerNorm over the 8192 hidden units (sub-LN) -> fc2."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_dim)
        self.ffn_layernorm = nn.LayerNorm(cfg.mlp_dim, eps=cfg.layer_norm_eps)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.width)
        self.activation_dropout, self.dropout = cfg.activation_dropout, cfg.dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(F.gelu(self.fc1(x)), self.activation_dropout, self.training)
        return F.dropout(self.fc2(self.ffn_layernorm(h)), self.dropout, self.training)


class DecoderBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + ffn(LN(x)); `final_layer_norm` is the block's MLP LayerNorm."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.self_attn = DecoderAttention(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.dropout = cfg.dropout

    def forward(self, x: Tensor, mask: Tensor | None, input_pos: Tensor | None = None) -> Tensor:
        x = x + F.dropout(
            self.self_attn(self.self_attn_layer_norm(x), mask, input_pos), self.dropout, self.training
        )
        return x + self.ffn(self.final_layer_norm(x))


class TextTransformer(nn.Module):
    """Embeddings (with image rows), decoder blocks and the final LayerNorm: ids [B,T] -> hidden [B,T,C]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.width, self.dropout = cfg.width, cfg.dropout
        # padding_idx only keeps the pad row's gradient at zero; the released pad row is not zero, keep it so
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.width, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.layers))
        self.layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def embed(
        self, input_ids: Tensor, positions: Tensor, image_embeds: Tensor | None, image_mask: Tensor | None
    ) -> Tensor:
        x = self.embed_tokens(input_ids)  # [B,T,C]
        if image_embeds is not None:
            # the k-th marked slot of a row takes the k-th image embedding of that row (row-major fill);
            # image_embeds [B_img,N,C] holds the images of the rows that have slots, in order
            if image_mask is None:
                raise ValueError("image_embeds given without image_mask: mark the image slot positions")
            slots, needed = int(image_mask.sum()), image_embeds.shape[0] * image_embeds.shape[1]
            if slots != needed:
                raise ValueError(
                    f"image_mask marks {slots} slots but image_embeds {tuple(image_embeds.shape)} fill "
                    f"{needed}: each image needs exactly {image_embeds.shape[1]} marked slots in its row"
                )
            x = x.masked_scatter(image_mask.bool().unsqueeze(-1), image_embeds.to(x.dtype))
        # scale after the overwrite: image rows are scaled by sqrt(C) too, as in the released model
        x = x * math.sqrt(self.width) + sinusoidal_positions(positions, self.width).to(x.dtype)
        return F.dropout(x, self.dropout, self.training)

    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        mask: Tensor | None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
    ) -> Tensor:
        x = self.embed(input_ids, positions, image_embeds, image_mask)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, mask, input_pos, use_reentrant=False)
            else:
                x = layer(x, mask, input_pos)
        return self.layer_norm(x)


class TextDecoder(nn.Module):
    """The decoder (`model`) and its output head `lm_head`, whose weight IS the token embedding (tied)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.model = TextTransformer(cfg)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.model.embed_tokens.weight


# -- the whole model --------------------------------------------------------------------------------------


class Kosmos2(nn.Module):
    """Kosmos-2: image -> 64 embeddings spliced into the prompt -> causal LM over text and box tokens."""

    def __init__(self, config: Kosmos2Config):
        super().__init__()
        self.config = config
        self.text_model = TextDecoder(config.text)
        self.vision_model = VisionModel(config.vision)
        self.image_to_text_projection = ImageToTextProjection(config)
        self.register_buffer("cache_key_mask", None, persistent=False)  # [B,max_len] bool once set up
        self.apply(self._init_weights)

    # -- weights -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Fresh-model initialisation (for training from scratch; loading overwrites all of it)."""
        std = 0.02
        if module is self.text_model.lm_head:
            return  # its weight is the embedding, initialised (with a zero pad row) by embed_tokens
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, VisionEmbeddings):
            nn.init.normal_(module.class_embedding, std=module.class_embedding.shape[0] ** -0.5)
        elif isinstance(module, ImageToTextProjection):
            nn.init.normal_(module.latent_query, std=1.0)

    def tie_weights(self) -> None:
        """Make `lm_head.weight` the embedding matrix again (needed after `load_state_dict(assign=True)`);
        an int8 head (`kosmos2.quantize.Int8Linear`) keeps its own quantised copy."""
        if isinstance(self.text_model.lm_head, nn.Linear):
            self.text_model.lm_head.weight = self.text_model.model.embed_tokens.weight

    # -- image -> 64 embeddings ----------------------------------------------------------------------------

    def encode_image(self, pixel_values: Tensor) -> Tensor:
        """[B,3,H,W] normalised pixels -> [B, latent_query_num, text width] image embeddings."""
        h = self.vision_model(pixel_values)  # [B,257,Cv], post-LN on every token
        # L2-normalise each token: the connector was trained on unit-norm CLIP features
        return self.image_to_text_projection(F.normalize(h, dim=-1))

    def _image_embeds(self, pixel_values: Tensor | None, image_embeds: Tensor | None) -> Tensor | None:
        if pixel_values is not None and image_embeds is not None:
            raise ValueError("pass pixel_values or image_embeds, not both")
        return self.encode_image(pixel_values) if pixel_values is not None else image_embeds

    # -- full-sequence forward -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        pixel_values: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        attention_mask: Tensor | None = None,
        targets: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits for every position, and the loss when `targets` are given.

        input_ids [B,T]; pixel_values [B_img,3,H,W] or image_embeds [B_img,N,C] with image_mask [B,T] marking
        N slots per image row; attention_mask [B,T] (1 = token, 0 = padding; None = nothing to mask, which
        also suits right padding since causality hides it, and lets SDPA use its fused causal kernel);
        positions [B,T] default `make_positions(input_ids)`; targets [B,T]: targets[:, t] is the token to
        predict at position t (already shifted), -100 = ignored. Returns (logits [B,T,V], mean cross-entropy
        over the non-ignored targets, or None).
        """
        image_embeds = self._image_embeds(pixel_values, image_embeds)
        if positions is None:
            positions = make_positions(input_ids, self.config.text.pad_token_id)
        mask = None
        if attention_mask is not None:
            T = input_ids.shape[1]
            mask = causal_padding_mask(torch.arange(T, device=input_ids.device), attention_mask.bool())
        h = self.text_model.model(input_ids, positions, mask, image_embeds, image_mask)
        logits = self.text_model.lm_head(h)  # [B,T,V]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return logits, loss

    # -- static KV cache -----------------------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_len: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        """Preallocate the KV cache: per layer k and v [batch_size, heads, max_len, head_dim], plus the key
        padding mask `cache_key_mask` [batch_size, max_len] (True = slot holds a real token).

        max_len bounds prompt + generated tokens. dtype/device default to the model's. Calling it again
        replaces the cache (all rows empty).
        """
        if batch_size <= 0 or max_len <= 0:
            raise ValueError(
                f"setup_cache: batch_size and max_len must be positive, got {batch_size}, {max_len}"
            )
        weight = self.text_model.model.embed_tokens.weight
        dtype = dtype or weight.dtype
        device = device or weight.device
        t = self.config.text
        for layer in self.text_model.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, t.heads, max_len, t.head_dim, dtype, device)
        self.cache_key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)

    def clear_cache(self) -> None:
        """Free the KV cache."""
        for layer in self.text_model.model.layers:
            layer.self_attn.kv_cache = None
        self.cache_key_mask = None

    @torch.no_grad()
    def reorder_cache(self, index: Tensor) -> None:
        """Replace cache row b by old row index[b] (index [B'] LongTensor; B' may differ from B).

        Beam search: expand with `index = torch.arange(B).repeat_interleave(beams)`, then after each step
        reorder with the parent row of every surviving beam.
        """
        if self.cache_key_mask is None:
            raise RuntimeError("reorder_cache: no cache; call setup_cache() first")
        index = index.to(self.cache_key_mask.device)
        for layer in self.text_model.model.layers:
            cache = layer.self_attn.kv_cache
            cache.k = cache.k.index_select(0, index)
            cache.v = cache.v.index_select(0, index)
        self.cache_key_mask = self.cache_key_mask.index_select(0, index)

    def forward_cached(
        self,
        input_ids: Tensor,
        input_pos: Tensor,
        positions: Tensor,
        attention_mask: Tensor | None = None,
        image_embeds: Tensor | None = None,
        image_mask: Tensor | None = None,
        last_only: bool = False,
    ) -> Tensor:
        """Run new tokens through the decoder with the KV cache; logits [B,T,V] ([B,1,V] if last_only).

        input_ids [B,T]: the new tokens. input_pos [T] LongTensor: the cache slots they occupy; prefill writes
            slots 0..T-1 (`torch.arange(T)`), each decode step one slot (`torch.tensor([t])`). Slots are the
            same for every row: a left-padded batch keeps its padding in the cache, masked out.
        positions [B,T]: the position of each new token (the sinusoid index, SPEC §6). Prefill:
            `make_positions(input_ids)`; decode: `positions[:, -1:] + 1` of the previous call. This keeps
            left-padded rows right, which deriving positions from the slot would not.
        attention_mask [B,T]: 1 for real tokens, 0 for padding (default: all real). It is written into
            `cache_key_mask` at `input_pos`; padded keys are never attended to; attention is causal by slot.
        image_embeds [B_img,N,C] / image_mask [B,T]: at prefill, as in `forward`.
        last_only: compute logits for the last token only (left padding puts every row's last token there).

        The decode step (T=1, no image) has static shapes and no data-dependent control flow (torch.compile).
        """
        if self.cache_key_mask is None:
            raise RuntimeError("forward_cached: no cache; call setup_cache() first")
        max_len = self.cache_key_mask.shape[1]
        if (
            input_ids.shape[1] > 1 and int(input_pos.max()) >= max_len
        ):  # checked at prefill only (no sync per step)
            raise ValueError(
                f"forward_cached: cache slots up to {int(input_pos.max())} but max_len is {max_len}"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        self.cache_key_mask.index_copy_(1, input_pos, attention_mask.bool())
        mask = causal_padding_mask(input_pos, self.cache_key_mask)  # [B,1,T,max_len]
        h = self.text_model.model(input_ids, positions, mask, image_embeds, image_mask, input_pos=input_pos)
        if last_only:
            h = h[:, -1:]
        return self.text_model.lm_head(h)
