"""Hugging Face ``transformers`` classifiers (issue 22): a DistilBERT and a BERT (2 layers, random init, eager
attention) run from token embeddings (``mixq.zoo.hf.FromEmbeddings``), every Linear int8, on ONNX Runtime and
OpenVINO: engine vs the fake-quant model >= 30 dB SQNR on embeddings of fresh random token ids, every asked layer
int8 in the placement. Skipped where transformers is not installed (it is in the ``dev`` extra)."""

import copy

import pytest
import torch

import mixq
from engine_cases import sqnr_db

transformers = pytest.importorskip("transformers")

LINEAR_INT8 = [{"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]}]
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
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_hf_classifier_int8_engine_matches_the_fake_quant_model(name, backend):
    model, vocab = tiny(name)
    ids = torch.randint(0, vocab, (8, SEQ), generator=torch.Generator().manual_seed(0))
    calib = model.embed(ids)
    q = copy.deepcopy(model)
    mixq.prepare_(q, LINEAR_INT8, mixq.PTQ(), example_input=calib[:1])
    mixq.calibrate_(q, lambda m: [m(calib[i : i + 2]) for i in range(0, 8, 2)])
    asked = set(mixq.quantized_layers(q))
    assert len(asked) == 2 * 6 + 2  # q, k, v, out, 2 MLP per layer; pre-classifier (DistilBERT) or pooler, head
    engine = mixq.compile(q, calib[:2], backend=backend)
    fresh = model.embed(torch.randint(0, vocab, (4, SEQ), generator=torch.Generator().manual_seed(1)))
    with torch.no_grad():
        ref = q(fresh)
    out = engine(fresh)
    assert out.shape == ref.shape == (4, 3)
    assert sqnr_db(ref, out) >= 30.0, sqnr_db(ref, out)
    rows = {r.layer: r for r in engine.report().rows}
    head = {layer for layer in asked if layer.endswith(".classifier")}  # OpenVINO may fold it into the layer before
    assert {layer: rows[layer].runs_as for layer in asked - head} == dict.fromkeys(asked - head, "int8")
    assert all(rows[layer].runs_as in ("int8", "fused") for layer in head)


def test_hf_classifier_names_what_it_needs():
    from mixq.zoo.hf import hf_classifier

    with pytest.raises(ValueError, match="unknown Hugging Face classifier 'gpt2'; known: hf_distilbert, hf_bert_base"):
        hf_classifier("gpt2")
