"""QAT training throughput on one GPU: mixq vs torch.ao QAT vs float training, CIFAR-10 ResNet-18.

    PYTHONPATH=src python benchmarks/qat_throughput.py --out OUT      # on the GPU machine

Synthetic data already on the GPU (random images, random labels), so the table measures the training step
alone. mixq in eager mode runs its fused Triton fake-quant kernels (mixq.quantization.fused); the "torch ops"
variant turns them off (the plain torch ops every fake quantization ran before), for the comparison in one run.
Fused variants also check one training step against the torch-ops path on a copy of the model (same batch):
the largest difference of the logits, of the loss and of the gradients, and whether the observers' states agree.
SGD with momentum, batch 256 (--batch). Every variant: --warmup steps (compilation included for
compiled variants, reported separately as "first steps s"), then --blocks blocks of --steps steps timed with
CUDA synchronisation; images/s is the median block. Compiled variants run their timed steps with
torch._dynamo's error_on_recompile, so a recompile fails the variant instead of hiding in the numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

import mixq
from mixq.quantization import fake_quant
from mixq.zoo.models import create_model

ALL8 = [  # the issue's configuration: conv input/weight/output, ReLU outputs, classifier input/weight
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
    # name: (model factory, bf16 autocast + channels_last, torch.compile mode or None, mixq's fused eager kernels)
    "float fp32": (float_model, False, None, None),
    "float bf16 + channels_last": (float_model, True, None, None),
    "float bf16 + channels_last, compiled": (float_model, True, "default", None),
    "float bf16 + channels_last, compiled + CUDA graphs": (float_model, True, "reduce-overhead", None),
    "torch.ao QAT (FX, x86 qconfig), fp32": (torch_ao_model, False, None, None),
    "torch.ao QAT (FX, x86 qconfig), bf16 + channels_last": (torch_ao_model, True, None, None),
    "mixq QAT all-8-bit, fp32, eager, torch ops": (mixq_model(ALL8), False, None, False),
    "mixq QAT all-8-bit, fp32, eager, fused kernels": (mixq_model(ALL8), False, None, True),
    "mixq QAT all-8-bit, bf16 + channels_last, eager, torch ops": (mixq_model(ALL8), True, None, False),
    "mixq QAT all-8-bit, bf16 + channels_last, eager, fused kernels": (mixq_model(ALL8), True, None, True),
    "mixq QAT tutorial style, fp32, eager, fused kernels": (mixq_model(TUTORIAL), False, None, True),
    "mixq QAT tutorial style, bf16 + channels_last, eager, fused kernels": (mixq_model(TUTORIAL), True, None, True),
    "mixq QAT all-8-bit, bf16 + channels_last, compiled": (mixq_model(ALL8), True, "default", None),
    "mixq QAT all-8-bit, bf16 + channels_last, compiled + CUDA graphs": (
        mixq_model(ALL8),
        True,
        "reduce-overhead",
        None,
    ),
    "mixq QAT tutorial style, bf16 + channels_last, compiled": (mixq_model(TUTORIAL), True, "default", None),
    "mixq QAT tutorial style, bf16 + channels_last, compiled + CUDA graphs": (
        mixq_model(TUTORIAL),
        True,
        "reduce-overhead",
        None,
    ),
}
DEFAULT_RUN = [  # the issue's table in one call: baselines, peer, eager (fused vs torch ops), compiled
    "float fp32",
    "float bf16 + channels_last",
    "torch.ao QAT (FX, x86 qconfig), fp32",
    "mixq QAT all-8-bit, fp32, eager, torch ops",
    "mixq QAT all-8-bit, fp32, eager, fused kernels",
    "mixq QAT all-8-bit, bf16 + channels_last, eager, fused kernels",
    "mixq QAT tutorial style, fp32, eager, fused kernels",
    "mixq QAT tutorial style, bf16 + channels_last, eager, fused kernels",
    "float bf16 + channels_last, compiled + CUDA graphs",
    "mixq QAT all-8-bit, bf16 + channels_last, compiled + CUDA graphs",
    "mixq QAT tutorial style, bf16 + channels_last, compiled + CUDA graphs",
]


def kernels(fused):
    """mixq's eager fake quantization: the fused kernels (the default on CUDA) or, for comparison, torch ops."""
    if fused is False:
        return mock.patch.object(fake_quant, "use_fused", lambda x: False)
    return contextlib.nullcontext()


def fused_vs_torch_ops(model, x, y, amp, device):
    """One training step (forward in train mode, backward) of the model with the fused kernels and of two copies
    on the torch ops, same batch: the largest differences fused vs torch ops (0.0 = bit for bit), the same between
    the two torch-ops copies (the run-to-run noise floor: cuDNN's backward may add in any order), and whether
    the state dicts (observer ranges, step counters, BN statistics) agree."""
    results = []
    for m, fused in ((copy.deepcopy(model), True), (copy.deepcopy(model), False), (copy.deepcopy(model), False)):
        with kernels(fused), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = m(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        results.append((logits.detach().float(), loss.detach().float(), m))
    return {"fused_vs_torch_ops": _differences(results[0], results[1]), "noise_floor": _differences(*results[1:])}


def _differences(one, other):
    (la, lossa, a), (lb, lossb, b) = one, other
    grads = [
        (pa.grad - pb.grad).abs().max().item()
        for pa, pb in zip(a.parameters(), b.parameters(), strict=True)
        if pa.grad is not None and pb.grad is not None
    ]
    states = [torch.equal(ta, tb) for ta, tb in zip(a.state_dict().values(), b.state_dict().values(), strict=True)]
    return {
        "max_abs_logit_diff": (la - lb).abs().max().item(),
        "loss_diff": (lossa - lossb).abs().item(),
        "max_abs_grad_diff": max(grads) if grads else None,
        "state_dict_entries_equal": f"{sum(states)}/{len(states)}",
    }


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, factory, amp, compiled, fused, args, device):
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    model = factory(x.cpu()).to(device)
    if amp:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    check = fused_vs_torch_ops(model, x, y, amp, device) if fused else None
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
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
    with kernels(fused):
        for _ in range(args.warmup):
            step()
    sync(device)
    first_steps_s = time.perf_counter() - start
    rates = []
    with torch._dynamo.config.patch(error_on_recompile=compiled is not None), kernels(fused):
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
        "fused_vs_torch_ops": check,
    }


def environment(device) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    gpu = torch.cuda.get_device_properties(device).name if device.type == "cuda" else platform.processor()
    driver = "-"
    with contextlib.suppress(Exception):
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    return (
        f"GPU: {gpu}; driver {driver}; CUDA {torch.version.cuda}; torch {torch.__version__}; triton {triton_version}; "
        f"python {platform.python_version()}; mixq {mixq.__version__}"
    )


def _short(d: dict) -> str:
    return (
        f"logits {d['max_abs_logit_diff']:.3g}, loss {d['loss_diff']:.3g}, grads {d['max_abs_grad_diff']:.3g}, "
        f"state {d['state_dict_entries_equal']} equal"
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--blocks", type=int, default=3)
    p.add_argument("--variants", nargs="*", default=DEFAULT_RUN, help=f"any of {list(VARIANTS)}")
    p.add_argument("--device", default="cuda", help="cpu: smoke test of the script only")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        factory, amp, compiled, fused = VARIANTS[name]
        try:
            rows.append(measure(name, factory, amp, compiled, fused, args, device))
        except Exception as e:  # a variant that cannot run is reported, not hidden
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                         "traceback": traceback.format_exc()})  # fmt: skip
            print(rows[-1]["traceback"], file=sys.stderr)
        print(json.dumps(rows[-1]), flush=True)
        (out / "qat-throughput.json").write_text(json.dumps(rows, indent=1))  # as they come
    head = [
        "# QAT throughput, CIFAR-10 ResNet-18, one GPU",
        "",
        environment(device),
        f"batch {args.batch}, synthetic data on the GPU, SGD momentum 0.9; {args.warmup} warm-up steps (compile "
        f"included), then {args.blocks} blocks of {args.steps} steps; images/s = median block",
        f"command: python benchmarks/qat_throughput.py {shlex.join(sys.argv[1:])}",
        "",
        "| training | images/s | vs torch.ao QAT fp32 | warm-up s | compiled graphs | fused vs torch ops, one step |",
        "|---|---|---|---|---|---|",
    ]
    peer = next(
        (r.get("images_per_second") for r in rows if r["variant"] == "torch.ao QAT (FX, x86 qconfig), fp32"), None
    )
    for r in rows:
        if "error" in r:
            head.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        ratio = f"{r['images_per_second'] / peer:.2f}x" if peer else "-"
        graphs = r["compiled_graphs"] if r["compiled_graphs"] is not None else "-"
        c = r.get("fused_vs_torch_ops")
        check = f"{_short(c['fused_vs_torch_ops'])} (torch ops twice: {_short(c['noise_floor'])})" if c else "-"
        head.append(
            f"| {r['variant']} | {r['images_per_second']:,.0f} | {ratio} | {r['first_steps_seconds']:.1f} | {graphs} "
            f"| {check} |"
        )
    text = "\n".join(head) + "\n"
    print(text)
    (out / "qat-throughput.md").write_text(text)
    (out / "qat-throughput.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
