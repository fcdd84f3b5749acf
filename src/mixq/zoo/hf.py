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
``op_types: ["Linear"]`` quantizes every projection and MLP layer.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FromEmbeddings", "hf_classifier", "HF_CLASSIFIERS"]

HF_CLASSIFIERS = ("hf_distilbert", "hf_bert_base")


class FromEmbeddings(nn.Module):
    """A Hugging Face sequence classifier called with token embeddings; returns its logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.model(inputs_embeds=embeddings).logits

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The engine's input for ``input_ids`` (batch, seq): the model's word embeddings, float32."""
        return self.model.get_input_embeddings()(input_ids).float()


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
