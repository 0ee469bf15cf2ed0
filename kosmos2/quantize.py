"""Inference dtypes: bfloat16 with prepacked weights, and int8 weight-only quantisation (gpt-fast style).

    model = load_pretrained(directory)            # float32 (or a saved int8 checkpoint: already int8)
    model = prepare_model(model, "int8")          # or "bfloat16"; "float32" leaves it as it is
    save_pretrained(model, out)                   # an int8 checkpoint that loads without quantising again

What each dtype runs (benchmarks/README.md has the measurements behind each choice):
- float32: `nn.Linear` through oneDNN (`kosmos2.generate.onednn_linear`).
- bfloat16: every parameter and the KV cache in bfloat16; every `nn.Linear` becomes a `PackedLinear`, whose
  weight is reordered once into oneDNN's blocked layout. On the AMD Zen 4 we measured, oneDNN's bf16 product
  on the plain row-major weight streamed about half the bytes per second of the float32 one, so plain bf16
  decoded no faster than float32; on the packed weight it streams at the float32 rate, half the bytes.
- int8: the decoder's linear layers and the output head become `Int8Linear`: int8 weights with one
  bfloat16 scale per output channel (symmetric, scale = max |w| / 127 over the row), run by
  `torch._weight_int8pack_mm` on bfloat16 activations. Everything else is bfloat16 as above: the vision
  encoder and the connector run once per image over hundreds of rows, where the int8 kernel (a loop over
  rows) is slower than bf16 products, and the token embedding is read one row per token. torchao 0.18's
  `Int8WeightOnlyConfig` ran a dequantising fallback on this CPU, 60x slower (shared/DEPS.md).
- int8-dynamic: the same int8 weights and scales (the same checkpoint layout: an int8 checkpoint loads as
  either) in `Int8DynamicLinear`, run by PyTorch's dynamically quantised linear (FBGEMM): each row of the
  float32 input is rounded to 8 bits on its own grid, so it is not weight-only, and int8 multiplies int8;
  a row's output does not depend on the other rows of the call. Everything else is
  float32. Its kernel is 3-7x faster per layer at batch 1 than `_weight_int8pack_mm` on our CPU, and it
  handles many rows well, for about twice the per-layer error (benchmarks/README.md).

The int8 rule per layer (`int8_supported`): the layer's input width must be a multiple of 16. On our CPU
`torch._weight_int8pack_mm` returned wrong values for other widths (72: inf; 33, 50: NaN) and crashed for 8,
without raising; such a layer keeps its bfloat16 weight (packed) and `prepare_model` lists it in
`model.int8_skipped`. The kernel also crashed on weights or activations that did not start on a 16-byte
boundary: `Int8Linear` copies such a tensor to a fresh (64-byte aligned) allocation first.

Checkpoint layout of an int8 model (`kosmos2.checkpoint.save_pretrained`): each quantised layer `L` stores
`L.weight_int8` (int8 [out, in]) and `L.weight_scale` (bfloat16 [out]) instead of `L.weight`, its bias as
`L.bias`; the output head, tied to the embedding in float models, stores its own int8 copy
(`text_model.lm_head.weight_int8` / `.weight_scale`) next to the bfloat16 embedding; every other tensor is
bfloat16. config.json gains `"quantization_config": {"quant_method": "kosmos2_int8_weight_only", "bits": 8,
"granularity": "per_channel", "symmetric": true, "scale_dtype": "bfloat16", "activation_dtype": "bfloat16",
"modules": [the quantised layers' names]}` (transformers' key; transformers itself cannot load this layout).
"""

from __future__ import annotations

import functools
import math
import platform
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

DTYPES = ("float32", "bfloat16", "int8", "int8-dynamic")
INT8_DTYPES = ("int8", "int8-dynamic")  # the two read the same int8 checkpoint layout
QUANT_METHOD = "kosmos2_int8_weight_only"
INT8_PREFIX = "text_model."  # the decoder blocks and the output head; the image side stays bfloat16
INT8_WIDTH_MULTIPLE = 16  # _weight_int8pack_mm is correct only for input widths that are multiples of 16


def dtype_name(dtype: str | torch.dtype | None) -> str | None:
    """'float32' | 'bfloat16' | 'int8' from a name, an alias or a torch dtype; None stays None."""
    if dtype is None:
        return None
    aliases = {
        "fp32": "float32",
        "bf16": "bfloat16",
        "float": "float32",
        "qint8": "int8",
        "int8_dynamic": "int8-dynamic",
        "w8a8": "int8-dynamic",
    }
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = aliases.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return name


# -- int8 weight-only --------------------------------------------------------------------------------------


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight [out, in] -> (int8 [out, in], bfloat16 scales [out]).

    scale = max |w| over the row / 127, rounded to bfloat16 first, and the weights are rounded against that
    stored scale, so `q * scale` is the dequantised weight (|error| <= scale / 2 per weight). An all-zero row
    gets a tiny scale and zeros.
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-8).to(torch.bfloat16)
    q = torch.round(w / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def int8_supported(layer: nn.Linear) -> bool:
    """The per-layer rule: PyTorch's int8 kernel is used where the input width is a multiple of 16."""
    return layer.in_features % INT8_WIDTH_MULTIPLE == 0


def _aligned(t: Tensor) -> bool:
    """Whether `t` starts on a 64-byte boundary (as fresh allocations do). The CPU int8 kernel crashed here
    on weights at offsets of 2 or 8 bytes and on activations at 2 or 6 (16, 32 and 64 worked)."""
    return t.device.type != "cpu" or t.data_ptr() % 64 == 0


class Int8Linear(nn.Module):
    """y = x @ (weight_int8 * weight_scale)^T + bias, through `torch._weight_int8pack_mm` (bf16 in and out).

    Buffers: weight_int8 [out, in] int8, weight_scale [out] bfloat16, bias [out] bfloat16 or None.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer(
            "weight_int8", torch.empty(out_features, in_features, dtype=torch.int8, device=device)
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.bfloat16, device=device))
        self.register_buffer(
            "bias", torch.empty(out_features, dtype=torch.bfloat16, device=device) if bias else None
        )

    @classmethod
    def from_linear(cls, layer: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(layer.weight)
        out = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        out.weight_int8, out.weight_scale = q, scale
        if layer.bias is not None:
            out.bias = layer.bias.detach().to(torch.bfloat16)
        return out

    def dequantized(self) -> Tensor:
        """The weight the layer multiplies by, [out, in] float32 (tests, references)."""
        return self.weight_int8.float() * self.weight_scale.float().unsqueeze(1)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if not _aligned(self.weight_int8):  # e.g. mapped from a safetensors file at an odd offset
            self.weight_int8 = self.weight_int8.clone()
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()
        y = torch._weight_int8pack_mm(x2 if _aligned(x2) else x2.clone(), self.weight_int8, self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int8DynamicLinear(Int8Linear):
    """The same int8 weights, scales and checkpoint layout as `Int8Linear`, multiplied by PyTorch's
    dynamically quantised linear (`quantized::linear_dynamic`, FBGEMM on x86), which accumulates int8 x int8
    in int32. Not weight-only: the activations are rounded to 8 bits too, for FBGEMM's vectorised kernel,
    3-7x faster per layer at batch 1 than `torch._weight_int8pack_mm` on our CPU (benchmarks/README.md).
    Float32 in and out; the bias is added in float32 after the product.

    One grid per row. FBGEMM rounds its whole input to one grid, from the input's min and max: a row's
    result would depend on the other rows of the call (a prompt's other tokens at prefill, other requests in
    a batch), so prefill and batched decoding would not give what decoding the row alone gives. Here each row
    is divided by its largest |value| and one extra row (1, -1, 0, ...) pins the call's range to [-1, 1], so
    every row is rounded on its own symmetric grid (step 2 max|x_row| / levels), whatever else is in the
    call; the output row is multiplied back. Integer products are exact, so a row's output is bit for bit
    the same alone or in any batch (tests/test_quantize.py). levels = 255 with VNNI (our Zen 4); on a CPU
    without VNNI FBGEMM's 8-bit products can saturate 16-bit sums, so there it is 127 (`reduce_range`,
    PyTorch's own default for FBGEMM).
    """

    def _packed(self):
        packed = self.__dict__.get("_pack")
        if packed is None:
            zero = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch 2.13 says quantized tensors will go; pinned here
                warnings.simplefilter("ignore", UserWarning)
                w = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.weight_scale.double(), zero, 0
                )
            range_row = torch.zeros(1, self.in_features)
            range_row[0, 0], range_row[0, min(1, self.in_features - 1)] = 1.0, -1.0
            packed = (torch.ops.quantized.linear_prepack(w, None), range_row)
            self.__dict__["_pack"] = packed
        return packed

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        packed, range_row = self._packed()
        x2 = x.reshape(-1, self.in_features).float()
        peak = torch.linalg.vector_norm(x2, math.inf, dim=1, keepdim=True).clamp_(min=1e-30)  # 0 stays 0
        y = torch.ops.quantized.linear_dynamic(torch.cat([x2 / peak, range_row]), packed, reduce_range())
        y = y[:-1].mul_(peak) if self.bias is None else torch.addcmul(self.bias, y[:-1], peak)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dynamic int8 activations (a grid per row)"


@functools.cache
def reduce_range() -> bool:
    """Whether int8-dynamic rounds activations to 7 bits instead of 8: unless the CPU has VNNI (AVX512-VNNI
    or AVX-VNNI, read from /proc/cpuinfo), whose int8 products accumulate in 32 bits without saturating."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return True
    return not ({"avx512_vnni", "avx_vnni"} & set(flags))


def dynamic_available() -> bool:
    """PyTorch's dynamically quantised linear on this machine (FBGEMM: x86-64)."""
    return "fbgemm" in torch.backends.quantized.supported_engines


# -- bfloat16 with prepacked weights ---------------------------------------------------------------------


def packing_available() -> bool:
    """oneDNN's bf16 linear with reordered weights: x86-64 with oneDNN and native bf16 support."""
    if platform.machine().lower() not in ("x86_64", "amd64") or not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class PackedLinear(nn.Module):
    """An inference-only bfloat16 linear layer whose weight is reordered once into oneDNN's blocked layout
    (`torch.ops.mkldnn._reorder_linear_weight`) and run by `torch.ops.mkldnn._linear_pointwise`.

    The packed weight is an opaque oneDNN tensor: it is kept outside the parameters (CPU only, no autograd);
    `state_dict()` gives the plain `weight` (and `bias`) back, so a model holding these saves as usual.
    """

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        weight = layer.weight.detach().to(torch.bfloat16).contiguous()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        bias = None if layer.bias is None else layer.bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", bias)

    @property
    def weight(self) -> Tensor:
        """The plain [out, in] bfloat16 weight (a copy out of the packed layout)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(
            x.to(torch.bfloat16), self.packed, self.bias, "none", [], ""
        )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 packed"


# -- whole models -----------------------------------------------------------------------------------------


def _linear_layers(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Linear]]:
    return [(n, m) for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(prefix)]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the model's `Int8Linear` layers (what a checkpoint's quantization_config lists)."""
    return [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]


def quantization_config(model: nn.Module) -> dict | None:
    """The config.json entry that describes an int8 model's checkpoint layout; None for a float model."""
    modules = quantized_modules(model)
    if not modules:
        return None
    return {
        "quant_method": QUANT_METHOD,
        "bits": 8,
        "granularity": "per_channel",
        "symmetric": True,
        "scale_dtype": "bfloat16",
        "activation_dtype": "bfloat16",  # what `int8` runs; `int8-dynamic` reads the same layout
        "modules": modules,
    }


def quantize_int8(
    model: nn.Module, prefix: str = INT8_PREFIX, layer_type: type[Int8Linear] = Int8Linear
) -> list[str]:
    """Replace every `nn.Linear` under `prefix` that `int8_supported` accepts by an `Int8Linear`, in place,
    quantising from the layer's current weights (float32 weights give the most accurate scales). Returns the
    names of the layers left unquantised by the rule. The tied output head gets its own int8 copy."""
    skipped = []
    for name, layer in _linear_layers(model, prefix):
        if int8_supported(layer):
            _replace(model, name, layer_type.from_linear(layer))
        else:
            skipped.append(name)
    return skipped


def int8_structure(model: nn.Module, modules: Iterable[str]) -> None:
    """Make the named layers empty `Int8Linear`s (on the meta device), the shape a saved int8 checkpoint
    loads into; raises ValueError naming a layer that is not a linear layer of this model."""
    for name in modules:
        try:
            layer = model.get_submodule(name)
        except AttributeError:
            layer = None
        if type(layer) is not nn.Linear:
            raise ValueError(f"quantization_config names {name!r}, which is not a linear layer of this model")
        _replace(
            model, name, Int8Linear(layer.in_features, layer.out_features, layer.bias is not None, "meta")
        )


def pack_linear_layers(model: nn.Module) -> int:
    """Replace every bfloat16 CPU `nn.Linear` by a `PackedLinear`, in place; returns how many (0 where
    oneDNN's bf16 path is not available: the layers then stay plain `nn.Linear`)."""
    if not packing_available():
        return 0
    layers = [
        (n, m)
        for n, m in _linear_layers(model)
        if m.weight.dtype == torch.bfloat16 and m.weight.device.type == "cpu"
    ]
    for name, layer in layers:
        _replace(model, name, PackedLinear(layer))
    return len(layers)


@torch.no_grad()
def prepare_model(model: nn.Module, dtype: str | torch.dtype) -> nn.Module:
    """Put a loaded model into an inference dtype, in place (see the module docstring); returns it.

    "float32": the float parameters in float32. "bfloat16": parameters in bfloat16, linear layers packed.
    "int8": the decoder's linear layers and the head quantised (layers already `Int8Linear`, from an int8
    checkpoint, are kept as they are), the rest bfloat16 and packed. Sets `model.inference_dtype` and
    `model.int8_skipped` (layers the int8 rule left in bfloat16). Inference only: packed layers have no
    gradients.
    """
    name = dtype_name(dtype)
    has_int8 = bool(quantized_modules(model))
    if has_int8 and name not in INT8_DTYPES:
        raise ValueError(
            f"this model holds int8 layers (an int8 checkpoint); use dtype 'int8' or 'int8-dynamic', "
            f"not {name!r}"
        )
    skipped: list[str] = []
    if name == "float32":
        model.float()
    elif name == "int8-dynamic":
        if not dynamic_available():
            raise ValueError("dtype 'int8-dynamic' needs PyTorch's FBGEMM engine (x86-64); use 'int8'")
        for n, m in model.named_modules():  # layers of an int8 checkpoint: the same buffers, this kernel
            if type(m) is Int8Linear:
                _replace(model, n, _as_dynamic(m))
        skipped = quantize_int8(model, layer_type=Int8DynamicLinear)
        model.float()  # the rest of the network (and the activations) in float32
        for m in model.modules():
            if isinstance(m, Int8Linear):  # bfloat16 scales, as saved (exact: they were bfloat16 values)
                m.weight_scale = m.weight_scale.to(torch.bfloat16)
                m.__dict__.pop("_pack", None)
        # own copies of every tensor: a checkpoint's float32 tensors are views of its memory-mapped file,
        # which would otherwise stay mapped and resident (all 6.7 GB at full size) behind the few still used
        model._apply(torch.clone)
    else:
        if name == "int8":
            skipped = quantize_int8(model)
        model.to(torch.bfloat16)  # float tensors only: int8 weights stay int8
        pack_linear_layers(model)
    model.inference_dtype = name
    model.int8_skipped = skipped
    return model


def bytes_read_per_token(model: nn.Module) -> int:
    """Bytes of weights one batch-1 decoding step reads, as this model stores them: every tensor of the
    decoder (`text_model`) once, packed weights included, except the token embedding when the output head
    holds its own copy (the lookup then reads one row of it). The KV cache is not counted."""
    seen: set[int] = set()
    total = 0
    text = model.get_submodule("text_model")
    for t in [*text.parameters(), *text.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in text.modules():
        if isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * 2
    head = text.get_submodule("lm_head")
    if not isinstance(head, nn.Linear):
        total -= text.model.embed_tokens.weight.numel() * text.model.embed_tokens.weight.element_size()
    return total


def _as_dynamic(layer: Int8Linear) -> Int8DynamicLinear:
    out = Int8DynamicLinear(layer.in_features, layer.out_features, layer.bias is not None, "meta")
    out.weight_int8, out.weight_scale, out.bias = layer.weight_int8, layer.weight_scale, layer.bias
    return out


def reference_linear(layer: nn.Module, x: Tensor) -> Tensor:
    """float64 reference product of any of the layer kinds here (tests)."""
    weight = layer.dequantized() if isinstance(layer, Int8Linear) else layer.weight
    y = x.double() @ weight.double().T
    return y if layer.bias is None else y + layer.bias.double()
