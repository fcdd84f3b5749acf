"""torch.distributed on the CPU: 2 processes with the gloo backend (what CI can run)."""

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

import mixq
from mixq.nni import QAT_Quantizer
from mixq.zoo.models import TorchModel, create_model

WORLD = 2
CONFIG = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"], "observer": "minmax"},
    {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu1", "relu2"], "observer": "percentile"},
    {"quant_types": ["output"], "quant_bits": 8, "op_names": ["relu3", "relu4"], "observer": "entropy"},
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(n_batches=4, batch=16):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(batch, 1, 28, 28, generator=g) * (1 + i) for i in range(n_batches)]


def _init(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)


def _calibrate_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        torch.manual_seed(0)
        model = TorchModel().eval()
        mixq.prepare_(model, CONFIG, mixq.PTQ())
        shard = _data()[rank::WORLD]  # each rank sees its own half
        mixq.calibrate_(model, lambda m: [m(x) for x in shard])
        with open(os.path.join(out_dir, f"calib_{rank}.json"), "w") as f:
            json.dump(mixq.export_calibration(model), f)
    finally:
        dist.destroy_process_group()


def _qat_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        torch.manual_seed(0)
        model = create_model("tiny_resnet")  # BatchNorm folded into the convs: running stats must agree too
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
        config = [
            {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
            {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
        ]
        quantizer = QAT_Quantizer(model, config, optimizer, torch.randn(2, 3, 32, 32))
        ddp = DDP(model)
        g = torch.Generator().manual_seed(rank)  # different data on every rank
        for _ in range(3):
            x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            optimizer.step()
        model.eval()
        config = quantizer.export_model(os.path.join(out_dir, "model.pth"), os.path.join(out_dir, "calib.json"))
        with open(os.path.join(out_dir, f"qat_{rank}.json"), "w") as f:
            json.dump(config, f)
    finally:
        dist.destroy_process_group()


QAT_CONFIG = [
    {"quant_types": ["input", "weight"], "quant_bits": 8, "op_types": ["Conv2d", "Linear"]},
    {"quant_types": ["output"], "quant_bits": 8, "op_types": ["ReLU"]},
]
SYNC_STEPS = 4


def _sync_batches(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * rank + step)  # different data on every rank and step
    return torch.randn(8, 1, 28, 28, generator=g) * (1 + step + rank)


def _ema_observers(model):
    from mixq.observers import EMAMinMaxObserver

    return {n: m for n, m in model.named_modules() if isinstance(m, EMAMinMaxObserver)}


def _observer_states(model) -> dict:
    return {n: (o.min_val.item(), o.max_val.item(), bool(o.observed)) for n, o in _ema_observers(model).items()}


def _mixed_decays(model) -> None:
    for name, o in _ema_observers(model).items():  # two EMA decays: RangeSync applies them as separate runs
        if name.startswith("relu"):
            o.decay = 0.9


def _deferred_sync_worker(rank, port, out_dir):
    _init(rank, port)
    try:
        torch.manual_seed(0)
        model = TorchModel()
        mixq.prepare_(model, QAT_CONFIG, mixq.QAT())  # under torch.distributed: deferred, one collective per step
        _mixed_decays(model)
        ddp = DDP(model)
        calls = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        try:
            per_step, outputs = [], []
            for step in range(SYNC_STEPS):
                before = len(calls)
                out = ddp(_sync_batches(rank, step))
                out.sum().backward()  # no optimizer step: weights stay as in the reference
                outputs.append(out.detach())
                per_step.append(len(calls) - before)
            mixq.sync_ranges(model)
        finally:
            dist.all_reduce = all_reduce
        result = {"calls_per_step": per_step, "packed_sizes": calls, "states": _observer_states(model)}
        torch.save({"result": result, "outputs": outputs}, os.path.join(out_dir, f"sync_{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_deferred_range_sync_is_one_collective_and_matches_the_global_batch_reference(tmp_path):
    _spawn(_deferred_sync_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"sync_{r}.pt") for r in range(WORLD)]
    a, b = (r["result"] for r in ranks)
    observers = len(a["states"])
    assert observers == 9  # 5 conv/linear inputs + 4 ReLU outputs
    assert a["calls_per_step"] == [1] * SYNC_STEPS  # one collective per step, for every observer at once
    assert a["packed_sizes"] == [2 * observers] * SYNC_STEPS
    assert a["states"] == b["states"]  # bit-identical on both ranks

    # Reference in one process: each step, both ranks' batches through the same state (ranges recorded only),
    # then one EMA step per observer with the min/max over the two batches.
    torch.manual_seed(0)
    model = TorchModel()
    mixq.prepare_(model, QAT_CONFIG, mixq.QAT())  # not distributed here: observers would update at once
    _mixed_decays(model)
    observers_ref = _ema_observers(model)
    for o in observers_ref.values():
        o.deferred_sync = True
    for step in range(SYNC_STEPS):
        recorded = []
        for rank in range(WORLD):
            out = model(_sync_batches(rank, step))
            assert torch.equal(out, ranks[rank]["outputs"][step])  # the same forward as that rank's
            recorded.append({n: o.pending_range for n, o in observers_ref.items()})
            for o in observers_ref.values():
                o.pending_range = None
        for n, o in observers_ref.items():
            lo = torch.minimum(*(r[n][0] for r in recorded))
            hi = torch.maximum(*(r[n][1] for r in recorded))
            o.apply_global_range(lo, hi)
    assert _observer_states(model) == a["states"]


def _spawn(fn, tmp_path):
    mp.start_processes(fn, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="spawn")


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_distributed_calibration_equals_single_process(tmp_path):
    _spawn(_calibrate_worker, tmp_path)
    ranks = [json.loads((tmp_path / f"calib_{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]
    torch.manual_seed(0)
    single = TorchModel().eval()
    mixq.prepare_(single, CONFIG, mixq.PTQ())
    data = _data()
    mixq.calibrate_(single, lambda m: [m(x) for x in data])
    expected = json.loads(json.dumps(mixq.export_calibration(single)))
    assert ranks[0] == expected  # min/max and fixed-range histograms merge exactly


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_ddp_qat_exports_identical_configs_and_rank0_writes(tmp_path):
    _spawn(_qat_worker, tmp_path)
    a, b = (json.loads((tmp_path / f"qat_{r}.json").read_text()) for r in range(WORLD))
    assert a == b
    assert a["relu"]["tracked_max_output"] > 0 and a["layer1.0.conv1"]["folded_bn"] == "layer1.0.bn1"
    assert mixq.load_calibration_config(tmp_path / "calib.json") == a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.json", "model.pth", "qat_0.json", "qat_1.json"]


@pytest.mark.parametrize("method", ["ptq", "qat"])
def test_cli_quantize_under_torchrun(method, data_dir, tmp_path):
    import subprocess
    import sys

    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CONFIG if method == "ptq" else CONFIG[:1]))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "mixq",
        "quantize",
        "--distributed",
        "--model",
        "lenet",
        "--config",
        str(cfg),
        "--method",
        method,
        "--dataset",
        "mnist",
        "--data-dir",
        str(data_dir),
        "--train-limit",
        "2048",
        "--test-limit",
        "500",
        "--calib-images",
        "1024",
        "--batch-size",
        "128",
        "--no-progress",
        "--out",
        str(out),
        *(["--random-weights"] if method == "ptq" else []),  # PTQ without --weights is refused otherwise
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("fake-quant accuracy") == 1 and "(2 processes)" in r.stdout  # rank 0 reports
    assert mixq.load_calibration_config(out / "calibration.json")["fc1"]["weight_bits"] == 8


@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_deferred_sync_survives_deepcopy_and_pickling_with_a_collective_in_flight(tmp_path):
    import copy
    import io

    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        model = TorchModel()
        mixq.prepare_(model, QAT_CONFIG, mixq.QAT())  # a world of one is not distributed: defer by hand
        sync = mixq.defer_range_sync(model)
        model(_sync_batches(0, 0))  # records, and launches the all-reduce after the forward
        assert sync._work is not None
        clone = copy.deepcopy(model)  # waits for the all-reduce; both apply its result before their next forward
        assert sync._work is None
        observers, cloned = _ema_observers(model), _ema_observers(clone)
        assert not any(bool(o.observed) for o in (*observers.values(), *cloned.values()))
        mixq.sync_ranges(clone)
        mixq.sync_ranges(model)
        assert _observer_states(clone) == _observer_states(model) and all(bool(o.observed) for o in observers.values())
        copied_sync = clone._mixq_range_sync
        assert copied_sync is not sync and {id(o) for o in copied_sync.observers} == {id(o) for o in cloned.values()}
        model(_sync_batches(0, 1))
        buffer = io.BytesIO()
        torch.save(model, buffer)  # pickles the model with a collective in flight
        clone(_sync_batches(0, 1))
        mixq.sync_ranges(clone)
        mixq.sync_ranges(model)
        assert _observer_states(clone) == _observer_states(model)  # the copy syncs its own observers
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert loaded._mixq_range_sync._work is None
        mixq.sync_ranges(loaded)  # applies what was in flight when it was saved
        assert _observer_states(loaded) == _observer_states(model)
    finally:
        dist.destroy_process_group()
