"""Tiny registered models covering the families people bring (timm-style: ``create_model(name)``), for
``tests/test_model_coverage.py``: a ViT, a BERT-style encoder, a ConvNeXt block, depthwise + squeeze-excite,
grouped conv, concat and upsample. Each is small enough to quantize, export and build on CPU in seconds;
``COVERAGE_MODELS`` maps each name to its input shape (batch first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["COVERAGE_FAMILIES", "COVERAGE_MODELS", "TinyViT", "TinyBert", "BertBaseEncoder", "benchmark_transformer"]


class TinyViT(nn.Module):
    """ViT: patch embedding (Conv2d), class token, position embedding, pre-norm nn.TransformerEncoder, head."""

    def __init__(self, image=32, patch=8, dim=64, depth=2, heads=4, mlp=128, classes=10):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        tokens = (image // patch) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True)
        layer.norm_first = True
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.encoder(x))[:, 0])


class TinyBert(nn.Module):
    """BERT-style: token features (a Linear stands in for the embedding lookup, so the input is float),
    position embedding, LayerNorm, post-norm nn.TransformerEncoder with GELU, pooled classifier."""

    def __init__(self, features=32, seq=16, dim=64, depth=2, heads=4, mlp=128, classes=4):
        super().__init__()
        self.embed = nn.Linear(features, dim)
        self.pos_embed = nn.Parameter(torch.randn(1, seq, dim) * 0.02)
        self.embed_norm = nn.LayerNorm(dim)
        layer = nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.pooler = nn.Linear(dim, dim)
        self.classifier = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.encoder(self.embed_norm(self.embed(x) + self.pos_embed))
        return self.classifier(torch.tanh(self.pooler(x[:, 0])))


class ConvNeXtBlock(nn.Module):
    """ConvNeXt: depthwise 7x7, channels-last LayerNorm, inverted-bottleneck Linear MLP with GELU, layer scale."""

    def __init__(self, dim=32, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 4, stride=4)
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem(x)
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(F.gelu(self.pwconv1(self.norm(y)))) * self.gamma
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean((2, 3)))


class DepthwiseSE(nn.Module):
    """MobileNet/EfficientNet style: pointwise expand, depthwise 3x3, squeeze-excite (pool, 1x1 convs, sigmoid)."""

    def __init__(self, channels=16, expand=4, classes=10):
        super().__init__()
        hidden = channels * expand
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.expand = nn.Conv2d(channels, hidden, 1)
        self.dw = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.se_reduce = nn.Conv2d(hidden, hidden // 4, 1)
        self.se_expand = nn.Conv2d(hidden // 4, hidden, 1)
        self.project = nn.Conv2d(hidden, channels, 1)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu6(self.dw(F.relu6(self.expand(x))))
        s = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = x + self.project(y * s)
        return self.head(x.mean((2, 3)))


class GroupedConv(nn.Module):
    """ResNeXt style: grouped 3x3 convs (groups=4) between 1x1 convs."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.grouped1 = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.grouped2 = nn.Conv2d(32, 64, 3, stride=2, padding=1, groups=4)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.grouped2(F.relu(self.grouped1(x))))
        return self.head(x.mean((2, 3)))


class ConcatNet(nn.Module):
    """Inception/DenseNet style: two branches concatenated on channels, then a conv."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.branch1 = nn.Conv2d(16, 16, 1)
        self.branch3 = nn.Conv2d(16, 16, 3, padding=1)
        self.fuse = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.head = nn.Linear(32, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.cat([F.relu(self.branch1(x)), F.relu(self.branch3(x))], dim=1)
        return self.head(F.relu(self.fuse(x)).mean((2, 3)))


class UpsampleNet(nn.Module):
    """U-Net/FPN style: downsample, nearest 2x upsample, skip concat; dense output."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, padding=1)
        self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.up = nn.Conv2d(32, 16, 3, padding=1)
        self.out = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        skip = F.relu(self.enc(x))
        y = F.interpolate(F.relu(self.down(skip)), scale_factor=2, mode="nearest")
        return self.out(torch.cat([F.relu(self.up(y)), skip], dim=1))


class BertBaseEncoder(nn.Module):
    """BERT-base's encoder stack on embeddings (no tokenizer, no embedding table): 12 post-norm layers,
    d_model 768, 12 heads, FFN 3072 with GELU; a 2-class head on the first token."""

    def __init__(self, layers: int = 12, d_model: int = 768, heads: int = 12, ffn: int = 3072):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn, dropout=0.0, activation="gelu", batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        # nn.TransformerEncoder deep-copies one layer, so every layer would start with the same weights; a trained
        # model's differ, and equal ones let an engine share them (with equal weights, the Q/DQ graph read back from
        # OpenVINO IR ran its FullyConnected layers in 10.2 ms, read from ONNX in 13.6 ms, NNCF's 10.3 ms:
        # benchmarks/results/openvino-profile-equal-weights-amx.md). Each layer its own:
        for each in self.encoder.layers:
            each.self_attn._reset_parameters()  # in_proj only
            each.self_attn.out_proj.reset_parameters()
            each.linear1.reset_parameters()
            each.linear2.reset_parameters()
        self.classifier = nn.Linear(d_model, 2)

    def forward(self, x):
        return self.classifier(self.encoder(x)[:, 0])


def benchmark_transformer(name: str, layers: int | None = None):
    """The transformer benchmarks' models with random weights (seed 0): ``"vit_b_16"`` (torchvision's where it
    imports, else the same architecture as :class:`TinyViT`), ``"bert_base_encoder"``, or a Hugging Face classifier
    run from embeddings, sequence 128 (``"hf_distilbert"``, ``"hf_bert_base"``: :mod:`.hf`, needs transformers);
    ``layers`` keeps only that many encoder layers (smoke runs). Returns (model in eval mode, one sample's shape,
    description)."""
    torch.manual_seed(0)
    if name == "bert_base_encoder":
        return BertBaseEncoder(layers or 12).eval(), (128, 768), "BERT-base-sized encoder"
    if name.startswith("hf_"):
        from .hf import hf_classifier

        model = hf_classifier(name, layers)
        kind = type(model.model).__name__
        what = f"Hugging Face {kind} (transformers, random init, eager attention), from embeddings"
        return model, (128, 768), what
    try:
        import torchvision

        model, what = torchvision.models.vit_b_16(weights=None), "torchvision.models.vit_b_16"
        # torchvision zero-initialises the head, which would make every output 0 and every SQNR meaningless.
        model.heads.head.reset_parameters()
        what += " (head re-initialised: torchvision's is zeros)"
        if layers:
            model.encoder.layers = model.encoder.layers[:layers]
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision wheel built for another torch
        model = TinyViT(image=224, patch=16, dim=768, depth=layers or 12, heads=12, mlp=3072, classes=1000)
        what = (
            f"ViT-B/16's architecture as mixq.zoo.coverage.TinyViT(image=224, patch=16, dim=768, depth=12, "
            f"heads=12, mlp=3072, classes=1000) (torchvision unusable here: {type(e).__name__})"
        )
    return model.eval(), (3, 224, 224), what


# name -> (model class, built with its defaults; input shape, batch first). mixq.zoo.models registers each name.
COVERAGE_FAMILIES = {
    "tiny_vit": (TinyViT, (2, 3, 32, 32)),
    "tiny_bert": (TinyBert, (2, 16, 32)),
    "convnext_block": (ConvNeXtBlock, (2, 3, 32, 32)),
    "depthwise_se": (DepthwiseSE, (2, 3, 32, 32)),
    "grouped_conv": (GroupedConv, (2, 3, 16, 16)),
    "concat_net": (ConcatNet, (2, 3, 16, 16)),
    "upsample_net": (UpsampleNet, (2, 3, 16, 16)),
}
COVERAGE_MODELS = {name: shape for name, (_, shape) in COVERAGE_FAMILIES.items()}
