"""Hugging Face ``transformers`` text classifiers as mixq models (``pip install 'mixq[transformers]'``).

mixq's engines take one float tensor, and a tokenizer's ``input_ids`` are integers: :class:`FromEmbeddings` runs
the classifier from its token embeddings instead (``inputs_embeds``, which every ``*ForSequenceClassification``
accepts), so the engine's input is ``(batch, seq, hidden)`` floats from :meth:`FromEmbeddings.embed` (the
model's own embedding table, run in torch before the engine). Position embeddings, the embedding LayerNorm and
everything after stay inside the engine. There is no attention mask: every token attends to every other, padding
tokens included, so pad nothing: batch texts of one token length, or run one text per call.

    from transformers import AutoModelForSequenceClassification
    hf = AutoModelForSequenceClassification.from_pretrained(path, attn_implementation="eager")
    model = FromEmbeddings(hf).eval()
    x = model.embed(tokenizer(text, return_tensors="pt").input_ids)  # one text: (1, its length, hidden)

``attn_implementation="eager"`` writes attention as MatMul -> Softmax -> MatMul in the ONNX graph, which every
backend reads; its Linear layers (``...attention.self.query`` / ``q_lin`` ...) are plain ``nn.Linear``, so
``op_types: ["Linear"]`` quantizes every projection and MLP layer. :class:`FromEmbeddings` also gives each attention
module that dispatches through ``transformers``' attention interface two :class:`mixq.attention.MatMul` modules
(``<attention>.qk_matmul``, ``<attention>.pv_matmul``) and switches the model to ``"mixq_eager"``: eager attention
computed with those modules (registered with ``transformers.AttentionInterface``; the same operations in the same
order), so ``op_types: ["MatMul"]`` quantizes the attention matmuls too.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ..attention import MatMul

__all__ = ["FromEmbeddings", "hf_classifier", "HF_CLASSIFIERS"]

HF_CLASSIFIERS = ("hf_distilbert", "hf_bert_base")


class FromEmbeddings(nn.Module):
    """A Hugging Face sequence classifier called with token embeddings; returns its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        attention = [m for m in model.modules() if _dispatches_attention(m)]
        if attention and getattr(model.config, "_attn_implementation", None) == "eager":
            _register_attention()
            for module in attention:
                module.qk_matmul, module.pv_matmul = MatMul(), MatMul()
            model.set_attn_implementation(ATTENTION)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeddings).logits

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The engine's input for ``input_ids`` (batch, seq): the model's word embeddings, float32."""
        return self.model.get_input_embeddings()(input_ids).float()


ATTENTION = "mixq_eager"


def _dispatches_attention(module: nn.Module) -> bool:
    """Whether ``module``'s forward calls ``transformers``' attention interface (BERT's, DistilBERT's attention)."""
    code = getattr(inspect.unwrap(type(module).forward), "__code__", None)  # through decorators
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _eager_with_modules(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """``transformers``' eager attention (models/bert's ``eager_attention_forward``) with the two matmuls as the
    attention module's :class:`MatMul` modules."""
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    weights = module.qk_matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = nn.functional.softmax(weights, dim=-1)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = module.pv_matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, _eager_with_modules)


def hf_classifier(name: str, layers: int | None = None, labels: int = 2) -> FromEmbeddings:
    """A randomly initialised (seed 0, nothing downloaded) DistilBERT-base (``"hf_distilbert"``: 6 layers, d768)
    or BERT-base (``"hf_bert_base"``: 12 layers, d768) sequence classifier, eager attention, in eval mode;
    ``layers`` keeps only that many layers (tests, smoke runs)."""
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{name} needs Hugging Face transformers: pip install 'mixq[transformers]'") from e
    torch.manual_seed(0)
    if name == "hf_distilbert":
        config = transformers.DistilBertConfig(n_layers=layers or 6, num_labels=labels, attn_implementation="eager")
        model = transformers.DistilBertForSequenceClassification(config)
    elif name == "hf_bert_base":
        config = transformers.BertConfig(num_hidden_layers=layers or 12, num_labels=labels, attn_implementation="eager")
        model = transformers.BertForSequenceClassification(config)
    else:
        raise ValueError(f"unknown Hugging Face classifier {name!r}; known: {', '.join(HF_CLASSIFIERS)}")
    return FromEmbeddings(model).eval()
