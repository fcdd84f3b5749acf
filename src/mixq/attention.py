"""Explicit multi-head attention: ``nn.MultiheadAttention`` with its projections as plain ``nn.Linear`` layers.

torch's ``nn.MultiheadAttention`` keeps the input projection as a bare ``in_proj_weight`` parameter, its ``out_proj``
is a ``NonDynamicallyQuantizableLinear`` (a Linear subclass whose type name is not ``Linear``), and in eval mode
without gradients it and ``nn.TransformerEncoderLayer`` take a fused fast path that reads ``out_proj.weight``
directly; torch's TorchScript ONNX exporter writes neither that path nor SDPA at opsets 13 and 19
(``aten::_native_multi_head_attention``, ``aten::scaled_dot_product_attention``: issue 22).
:class:`ExplicitMultiheadAttention` computes the same function with ``in_proj`` and ``out_proj`` as ``nn.Linear``
submodules (NNI names ``<attn>.in_proj`` and ``<attn>.out_proj``, so ``op_types: ["Linear"]`` and ``op_names:
["encoder.layers.*.self_attn.*"]`` reach them) and the attention itself as ``matmul -> softmax -> matmul`` (ONNX
MatMul/Softmax), each matmul a :class:`MatMul` module (``<attn>.qk_matmul``: the scaled Q by K^T, ``<attn>.pv_matmul``:
the probabilities by V), so ``op_types: ["MatMul"]`` (or ``op_names: ["*.qk_matmul"]``) quantizes their operands.
:func:`explicit_attention_` swaps every ``nn.MultiheadAttention`` of a model for one;
``mixq.prepare_`` and ``mixq.export`` do it, so the quantized model, its deploy model and its ONNX graph share the
same layer names.

State dicts: the explicit module stores ``in_proj.weight``/``in_proj.bias`` where torch stores
``in_proj_weight``/``in_proj_bias``; it loads either form.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._errors import ModelStructureError

__all__ = ["MatMul", "ExplicitMultiheadAttention", "explicit_attention_", "has_torch_attention"]


class MatMul(nn.Module):
    """``torch.matmul(a, b)`` as a module, so a config can name it (op type ``"MatMul"``) and its two activation
    operands can be quantized (quant type ``"input"``: each operand with its own range)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.matmul(a, b)


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention``'s function (same arguments, same outputs) with Linear projections."""

    # TransformerEncoderLayer's fused fast path checks these attributes (in this order: batch_first,
    # in_proj_bias, _qkv_same_embed_dim) before it reads in_proj_weight. The explicit module has no fused
    # in_proj_weight, so it declares itself ineligible; the layer then calls forward() below.
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0, batch_first=False):
        super().__init__()
        if embed_dim % num_heads:
            raise ModelStructureError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.qk_matmul = MatMul()  # (q / sqrt(d)) @ k^T: the attention scores
        self.pv_matmul = MatMul()  # softmax(scores) @ v

    @property
    def in_proj_bias(self):
        # Read only by that fast-path check; a quantizer wrapper around in_proj has no .bias of its own.
        return getattr(self.in_proj, "bias", None)

    @classmethod
    def from_torch(cls, mha: nn.MultiheadAttention, name: str = "") -> ExplicitMultiheadAttention:
        """The explicit module holding ``mha``'s weights (same device and dtype)."""
        where = f"attention {name!r}" if name else "nn.MultiheadAttention"
        if not mha._qkv_same_embed_dim:
            raise ModelStructureError(f"{where}: kdim/vdim differ from embed_dim; only equal dims are supported")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ModelStructureError(f"{where}: add_bias_kv / add_zero_attn are not supported")
        bias = mha.in_proj_bias is not None
        explicit = cls(mha.embed_dim, mha.num_heads, bias, mha.dropout, mha.batch_first)
        explicit.to(device=mha.in_proj_weight.device, dtype=mha.in_proj_weight.dtype)
        with torch.no_grad():
            explicit.in_proj.weight.copy_(mha.in_proj_weight)
            explicit.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                explicit.in_proj.bias.copy_(mha.in_proj_bias)
                explicit.out_proj.bias.copy_(mha.out_proj.bias)
        explicit.train(mha.training)
        return explicit

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for torch_key, key in (("in_proj_weight", "in_proj.weight"), ("in_proj_bias", "in_proj.bias")):
            if prefix + torch_key in state_dict:
                state_dict[prefix + key] = state_dict.pop(prefix + torch_key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # (N, L, E) from here on: the batch stays the leading dimension of every tensor, so an engine with a
        # dynamic batch (the cuda backend lowers per-sample shapes) sees it there in the exported graph
        batch, length, embed = query.shape
        source = key.shape[1]
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:  # cross attention: the one Linear (and its quantizers) applied to each input, its slice kept
            q = self.in_proj(query)[..., :embed]
            k = self.in_proj(key)[..., embed : 2 * embed]
            v = self.in_proj(value)[..., 2 * embed :]
        heads, dim = self.num_heads, self.head_dim
        q = q.reshape(batch, length, heads, dim).transpose(1, 2)  # (N, H, L, D)
        k = k.reshape(batch, source, heads, dim).transpose(1, 2)
        v = v.reshape(batch, source, heads, dim).transpose(1, 2)
        scores = self.qk_matmul(q * (1.0 / math.sqrt(dim)), k.transpose(2, 3))  # (N, H, L, S)
        mask = _additive_mask(attn_mask, key_padding_mask, is_causal, length, source, batch, heads, scores.dtype)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = self.pv_matmul(weights, v).transpose(1, 2).reshape(batch, length, embed)
        out = self.out_proj(out)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(1)
        return out, weights if batched else weights.squeeze(0)


def _additive_mask(attn_mask, key_padding_mask, is_causal, length, source, batch, heads, dtype):
    """One float mask added to the (N, H, L, S) scores: -inf where attention is forbidden."""
    mask = None
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        mask = _as_float(attn_mask, dtype)
        if mask.dim() == 3:
            mask = mask.reshape(batch, heads, length, source)
    if key_padding_mask is not None:
        pad = _as_float(key_padding_mask, dtype).reshape(batch, 1, 1, source)
        mask = pad if mask is None else mask + pad
    return mask


def _as_float(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def has_torch_attention(model: nn.Module) -> bool:
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def explicit_attention_(model: nn.Module) -> nn.Module:
    """Replace (in place) every ``nn.MultiheadAttention`` of ``model`` by an :class:`ExplicitMultiheadAttention`
    with the same weights. A ``nn.TransformerEncoder`` holding one stops using nested tensors (its fast path reads
    ``in_proj_weight``; the explicit module has none). Returns ``model``; a model without attention is unchanged."""
    if isinstance(model, nn.MultiheadAttention):
        raise ModelStructureError("pass the model that contains the nn.MultiheadAttention, not the attention itself")
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            model.set_submodule(name, ExplicitMultiheadAttention.from_torch(module, name))
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder):
            module.use_nested_tensor = False
    return model
