"""QAT training throughput on one GPU: mixq vs torch.ao QAT vs float training, CIFAR-10 ResNet-18.

    PYTHONPATH=src python benchmarks/qat_throughput.py --out OUT      # on the GPU machine

Synthetic data already on the GPU (random images, random labels), so the table measures the training step
alone. SGD with momentum, batch 256 (--batch). Every variant: --warmup steps (compilation included for
compiled variants, reported separately as "first steps s"), then --blocks blocks of --steps steps timed with
CUDA synchronisation; images/s is the median block. Compiled variants run their timed steps with
torch._dynamo's error_on_recompile, so a recompile fails the variant instead of hiding in the numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

import mixq
from mixq.zoo.models import create_model

ALL8 = [  # the configuration: conv input/weight/output, ReLU outputs, classifier input/weight
    {"quant_types": ["input", "weight", "output"], "quant_bits": 8, "op_types": ["Conv2d"]},
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]
TUTORIAL = [  # NNI's tutorial style: conv/linear inputs and weights, ReLU outputs
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]


def float_model(_x):
    return create_model("resnet18_cifar")


def mixq_model(config):
    def make(x):
        model = create_model("resnet18_cifar")
        mixq.prepare_(model, config, mixq.QAT(), example_input=x[:1])
        return model

    return make


def torch_ao_model(x):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = create_model("resnet18_cifar").train()
    return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86"), example_inputs=(x[:1].cpu(),))


VARIANTS = {
    # name: (model factory, bf16 autocast + channels_last, torch.compile mode or None)
    "float fp32": (float_model, False, None),
    "float bf16 + channels_last": (float_model, True, None),
    "float bf16 + channels_last, compiled": (float_model, True, "default"),
    "float bf16 + channels_last, compiled + CUDA graphs": (float_model, True, "reduce-overhead"),
    "torch.ao QAT (FX, x86 qconfig), fp32": (torch_ao_model, False, None),
    "torch.ao QAT (FX, x86 qconfig), bf16 + channels_last": (torch_ao_model, True, None),
    "mixq QAT all-8-bit, fp32": (mixq_model(ALL8), False, None),
    "mixq QAT all-8-bit, bf16 + channels_last": (mixq_model(ALL8), True, None),
    "mixq QAT all-8-bit, bf16 + channels_last, compiled": (mixq_model(ALL8), True, "default"),
    "mixq QAT all-8-bit, bf16 + channels_last, compiled + CUDA graphs": (mixq_model(ALL8), True, "reduce-overhead"),
    "mixq QAT tutorial style, bf16 + channels_last, compiled": (mixq_model(TUTORIAL), True, "default"),
    "mixq QAT tutorial style, bf16 + channels_last, compiled + CUDA graphs": (
        mixq_model(TUTORIAL),
        True,
        "reduce-overhead",
    ),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, factory, amp, compiled, args, device):
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    model = factory(x.cpu()).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    model.train()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step_model = torch.compile(model, mode=compiled) if compiled else model

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync(device)
    start = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    first_steps_s = time.perf_counter() - start
    rates = []
    with torch._dynamo.config.patch(error_on_recompile=compiled is not None):
        for _ in range(args.blocks):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            sync(device)
            rates.append(args.steps * args.batch / (time.perf_counter() - t0))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"] if compiled else None
    skipped = dict(torch._dynamo.utils.counters["inductor"]).get("cudagraph_skips", 0) if compiled else None
    return {
        "variant": name,
        "images_per_second": statistics.median(rates),
        "block_rates": rates,
        "first_steps_seconds": first_steps_s,
        "compiled_graphs": graphs,
        "cudagraph_skips": skipped,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--device", default="cuda", help="cpu: smoke test of the script only")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        factory, amp, compiled = VARIANTS[name]
        try:
            rows.append(measure(name, factory, amp, compiled, args, device))
        except Exception as e:  # a variant that cannot run is reported, not hidden
            traceback.print_exc()
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
        print(json.dumps(rows[-1]), flush=True)
    gpu = torch.cuda.get_device_properties(device).name if device.type == "cuda" else platform.processor()
    head = [
        "# QAT throughput, CIFAR-10 ResNet-18, one GPU",
        "",
        f"GPU: {gpu}; CUDA {torch.version.cuda}; torch {torch.__version__}; "
        f"python {platform.python_version()}; mixq {mixq.__version__}",
        f"batch {args.batch}, synthetic data on the GPU, SGD momentum 0.9; {args.warmup} warm-up steps (compile "
        f"included), then {args.blocks} blocks of {args.steps} steps; images/s = median block",
        f"command: python benchmarks/qat_throughput.py {' '.join(sys.argv[1:])}",
        "",
        "| training | images/s | vs torch.ao QAT fp32 | warm-up s | compiled graphs |",
        "|---|---|---|---|---|",
    ]
    peer = next(
        (r.get("images_per_second") for r in rows if r["variant"] == "torch.ao QAT (FX, x86 qconfig), fp32"), None
    )
    for r in rows:
        if "error" in r:
            head.append(f"| {r['variant']} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['images_per_second'] / peer:.2f}x" if peer else "-"
        graphs = r["compiled_graphs"] if r["compiled_graphs"] is not None else "-"
        head.append(
            f"| {r['variant']} | {r['images_per_second']:,.0f} | {ratio} | {r['first_steps_seconds']:.1f} | {graphs} |"
        )
    text = "\n".join(head) + "\n"
    print(text)
    (out / "qat-throughput.md").write_text(text)
    (out / "qat-throughput.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
