"""Hugging Face ``transformers`` classifiers (issue 22): a DistilBERT and a BERT (2 layers, random init, eager
attention) run from token embeddings (``mixq.zoo.hf.FromEmbeddings``), every Linear int8, on ONNX Runtime and
OpenVINO, also with the attention matmuls int8 (``FromEmbeddings`` gives each attention module its MatMul
modules): engine vs the fake-quant model >= 30 dB SQNR on embeddings of fresh random token ids, every asked layer
int8 in the placement; the wrapped model computes what eager attention computes. Skipped where transformers is
not installed (it is in the ``dev`` extra)."""

import copy

import pytest
import torch

import mixq
from engine_cases import sqnr_db

transformers = pytest.importorskip("transformers")

LINEAR_INT8 = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]
WITH_MATMULS = [*LINEAR_INT8, {"quant_types": ["input"], "quant_bits": 8, "op_types": ["MatMul"]}]
SEQ = 16


def tiny(name: str):
    from mixq.zoo.hf import FromEmbeddings

    torch.manual_seed(0)
    if name == "distilbert":
        config = transformers.DistilBertConfig(
            n_layers=2, dim=64, hidden_dim=128, n_heads=4, max_position_embeddings=64, num_labels=3,
            attn_implementation="eager",
        )  # fmt: skip
        model = transformers.DistilBertForSequenceClassification(config)
    else:
        config = transformers.BertConfig(
            num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            max_position_embeddings=64, num_labels=3, attn_implementation="eager",
        )  # fmt: skip
        model = transformers.BertForSequenceClassification(config)
    return FromEmbeddings(model).eval(), config.vocab_size


@pytest.mark.parametrize("name", ["distilbert", "bert"])
def test_wrapped_model_computes_eager_attention(name):
    model, _ = tiny(name)
    assert model.model.config._attn_implementation == "mixq_eager"
    assert sum(n.endswith(("qk_matmul", "pv_matmul")) for n, _ in model.named_modules()) == 4
    torch.manual_seed(0)
    x = torch.randn(2, SEQ, 64)
    model.model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model(x)
    model.model.set_attn_implementation("mixq_eager")
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["distilbert", "bert"])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
@pytest.mark.parametrize("config", ["linear", "with_matmuls"])
def test_hf_classifier_int8_engine_matches_the_fake_quant_model(name, backend, config):
    model, vocab = tiny(name)
    ids = torch.randint(0, vocab, (8, SEQ), generator=torch.Generator().manual_seed(0))
    calib = model.embed(ids)
    q = copy.deepcopy(model)
    mixq.prepare_(q, LINEAR_INT8 if config == "linear" else WITH_MATMULS, mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(q, lambda m: [m(calib[i : i + 2]) for i in range(0, 8, 2)])
    asked = set(mixq.quantized_layers(q))
    # q, k, v, out, 2 MLP per layer; pre-classifier (DistilBERT) or pooler, head; 2 attention matmuls per layer
    assert len(asked) == 2 * 6 + 2 + (0 if config == "linear" else 2 * 2)
    engine = mixq.compile(q, calib[:2], backend=backend)
    fresh = model.embed(torch.randint(0, vocab, (4, SEQ), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        ref = q(fresh)
    out = engine(fresh)
    assert out.shape == ref.shape == (4, 3)
    assert sqnr_db(ref, out) >= 30.0, sqnr_db(ref, out)
    rows = {r.layer: r for r in engine.report().rows}
    # OpenVINO may fold the head into the layer before, and runs both attention matmuls as one i8 Subgraph
    head = {layer for layer in asked if layer.endswith((".classifier", "qk_matmul"))}
    assert {layer: rows[layer].runs_as for layer in asked - head} == dict.fromkeys(asked - head, "int8")
    assert all(rows[layer].runs_as in ("int8", "fused") for layer in head)


def test_hf_classifier_names_what_it_needs():
    from mixq.zoo.hf import hf_classifier

    with pytest.raises(ValueError, match="unknown Hugging Face classifier 'gpt2'; known: hf_distilbert, hf_bert_base"):
        hf_classifier("gpt2")
