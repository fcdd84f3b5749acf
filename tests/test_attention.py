"""mixq.attention: ExplicitMultiheadAttention computes nn.MultiheadAttention's function (outputs and attention
weights) for every argument form torch accepts here, loads torch's state dict, and a TransformerEncoder keeps
its output (fast path included) after the swap. Fresh random inputs and weights, float32: equality within
float32 rounding of the same math in another order (torch.testing's float32 defaults)."""

import copy

import pytest
import torch
from torch import nn

import mixq
from mixq.attention import ExplicitMultiheadAttention, explicit_attention_

E, H, L, S, N = 32, 4, 6, 9, 3


def _pair(batch_first=False, bias=True):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, bias=bias, batch_first=batch_first).eval()
    with torch.no_grad():  # torch initialises the biases to zero: make them count
        if bias:
            mha.in_proj_bias.normal_()
            mha.out_proj.bias.normal_()
    return mha, ExplicitMultiheadAttention.from_torch(mha)


def _inputs(batch_first, cross, batched=True):
    def t(length):
        shape = (N, length, E) if batch_first else (length, N, E)
        return torch.randn(*shape) if batched else torch.randn(length, E)

    q = t(L)
    if not cross:
        return q, q, q
    kv = t(S)
    return q, kv, t(S)


CASES = {
    "self": {},
    "no_weights": {"need_weights": False},
    "per_head_weights": {"average_attn_weights": False},
    "bool_mask": {"attn_mask": "bool"},
    "float_mask": {"attn_mask": "float"},
    "padding": {"key_padding_mask": True},
    "padding_and_mask": {"key_padding_mask": True, "attn_mask": "bool"},
}


def _kwargs(spec, length, source, batched=True):
    kw = {k: v for k, v in spec.items() if k in ("need_weights", "average_attn_weights")}
    if spec.get("attn_mask") == "bool":
        kw["attn_mask"] = torch.ones(length, source, dtype=torch.bool).triu(1)  # causal-style, no empty rows
    elif spec.get("attn_mask") == "float":
        kw["attn_mask"] = torch.randn(length, source)
    if spec.get("key_padding_mask"):
        pad = torch.zeros(N, source, dtype=torch.bool)
        pad[:, -2:] = True  # the last two keys are padding; every query keeps some keys
        kw["key_padding_mask"] = pad if batched else pad[0]
    return kw


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cross", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_explicit_attention_equals_torch(batch_first, cross, case):
    mha, explicit = _pair(batch_first)
    torch.manual_seed(1)
    q, k, v = _inputs(batch_first, cross)
    kw = _kwargs(CASES[case], L, S if cross else L)
    with torch.no_grad():
        ref_out, ref_w = mha(q, k, v, **kw)
        out, w = explicit(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out)
    if ref_w is None:
        assert w is None
    else:
        torch.testing.assert_close(w, ref_w)


def test_unbatched_input_and_no_bias():
    mha, explicit = _pair(bias=False)
    torch.manual_seed(2)
    q, k, v = _inputs(False, cross=True, batched=False)
    kw = _kwargs({"key_padding_mask": True}, L, S, batched=False)
    with torch.no_grad():
        ref_out, ref_w = mha(q, k, v, **kw)
        out, w = explicit(q, k, v, **kw)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(w, ref_w)


def test_loads_torch_state_dict():
    mha, _ = _pair()
    fresh = ExplicitMultiheadAttention(E, H)
    fresh.load_state_dict(mha.state_dict())
    torch.manual_seed(3)
    x = torch.randn(L, N, E)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, x, x)[0], mha(x, x, x)[0])


@pytest.mark.parametrize("norm_first", [False, True])
def test_transformer_encoder_output_kept_after_the_swap(norm_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, 64, dropout=0.0, activation="gelu", batch_first=True)
    layer.norm_first = norm_first
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    swapped = explicit_attention_(copy.deepcopy(encoder))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in swapped.modules())
    assert {n for n, m in swapped.named_modules() if isinstance(m, nn.Linear) and "self_attn" in n} == {
        f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("in_proj", "out_proj")
    }
    torch.manual_seed(4)
    x = torch.randn(N, L, E)
    pad = torch.zeros(N, L, dtype=torch.bool)
    pad[0, -1] = True
    with torch.no_grad():  # eval + no_grad: torch's encoder takes its fused fast path here
        torch.testing.assert_close(swapped(x, src_key_padding_mask=pad), encoder(x, src_key_padding_mask=pad))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.MultiheadAttention(E, H, kdim=16, vdim=16), "kdim/vdim"),
        (lambda: nn.MultiheadAttention(E, H, add_bias_kv=True), "add_bias_kv"),
    ],
)
def test_unsupported_forms_name_the_attention(make, message):
    model = nn.Sequential(make())
    with pytest.raises(mixq.MixqError, match=rf"attention '0'.*{message}"):
        explicit_attention_(model)
