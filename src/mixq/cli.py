"""The ``mixq`` command line: a thin layer over the library.

Every command checks all of its arguments first (files exist and parse, the model takes the data, the
backend is available) and only then starts work. Errors are one line and exit status 2; argparse's own
usage errors (a bad option value) keep argparse's usage line and also exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from ._errors import ConfigError, DataError, MixqError

__all__ = ["main", "build_parser", "DEFAULT_BACKEND"]

# The engine backend of `demo` and `build` when --backend is not given.
DEFAULT_BACKEND = "auto"  # as ModelSpeedup: build the engines this machine has, time them, keep the fastest

# Image shape (channels, height, width) of each data set `quantize` can train on.
IMAGE_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

# Plain progress lines (stderr not a terminal): every this many steps or seconds, and at each epoch end.
LOG_EVERY_STEPS = 100
LOG_EVERY_SECONDS = 10.0

EXAMPLES = {
    "demo": """examples:
  mixq demo                                      # the NNI tutorial end to end, 3 epochs (data: see --data-dir)
  mixq demo --quick                              # small subset, two short epochs (CI)
  mixq demo --backend onnxruntime                # one backend instead of auto (the fastest measured)""",
    "download": """examples:
  mixq download mnist cifar10                    # into ~/.cache/mixq/data: official files, resumable, verified
  mixq download mnist --data-dir ~/data          # into a folder of your choice (then MIXQ_DATA=~/data)
  mixq download mnist --mirror file:///mnt/mnist/ # from an offline copy of the official files
  mixq download mnist cifar10 --from /mnt/share/data  # copy (and verify) another data directory""",
    "quantize": """config lists ship in examples/configs/ (nni_tutorial.yaml, all_8bit.yaml, fast_mixed.yaml).

examples:
  mixq quantize --model lenet --config examples/configs/nni_tutorial.yaml --method qat --dataset mnist \\
                --epochs 3 --out runs/q
  mixq quantize --model my_net.py:Net --weights fp32.pth --config examples/configs/all_8bit.yaml \\
                --method ptq --dataset cifar10 --out runs/p
  torchrun --nproc_per_node 2 -m mixq quantize --distributed --model resnet18_cifar \\
                --config examples/configs/all_8bit.yaml --dataset cifar10 --epochs 1 --out runs/ddp""",
    "build": """examples:
  mixq build --model lenet --weights runs/q/model.pth --calibration runs/q/calibration.json \\
             --input-shape 128,1,28,28 --out runs/q/lenet.mixq""",
    "bench": """examples:
  mixq bench runs/q/lenet.mixq --batch 1 128 --runs 100""",
    "report": """examples:
  mixq report runs/q/lenet.mixq --profile-batch 128   # placement per layer, with per-layer time
  mixq report runs/demo                              # the tables a demo run wrote""",
    "search": """Writes to --out: config.yaml (the chosen config_list), search.md (summary, every configuration
evaluated, every layer option), pareto.png, report.txt (the winner's placement report), search.json,
engine.mixq. Measurements are cached (--cache, default OUT/cache): rerunning the same command resumes.

examples:
  mixq search --model lenet --weights fp32.pth --dataset mnist --out runs/search
  mixq search --model resnet18_cifar --weights r18.pth --dataset cifar10 --max-drop 0.5 --batch 64 \\
              --backend openvino onnxruntime --out runs/search-r18
  mixq search --model lenet --weights fp32.pth --dataset mnist --latency-ms 1.0 --finetune-epochs 1 \\
              --choices fp32 int8 int8w7 --out runs/search-1ms""",
    "inspect": """examples:
  mixq inspect runs/q/lenet.mixq
  mixq inspect runs/q/calibration.json""",
}

DATA_DEFAULT = "$MIXQ_DATA, else shared/data beside the checkout, else ~/.cache/mixq/data, downloaded if missing"
WEIGHTS_HINT = "pass the trained float state dict, or --random-weights for a smoke test"
INSPECT_TAKES = "inspect takes a calibration config (.json/.pth) or an engine file (.mixq)"


# --- argument types: argparse reports a bad value as a usage error before any work ----------------------


def _int_at_least(low: int):
    words = "a positive integer" if low == 1 else f"an integer >= {low}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    parse.__name__ = "positive int" if low == 1 else f"int >= {low}"  # argparse names the type in some errors
    return parse


_positive_int = _int_at_least(1)
_nonnegative_int = _int_at_least(0)


def _float_above(low: float, inclusive: bool = False):
    words = f"a number >= {low:g}" if inclusive else ("a positive number" if low == 0 else f"a number > {low:g}")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}") from None
        if not (value >= low if inclusive else value > low) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected {words}, got {text!r}")
        return value

    parse.__name__ = "number"
    return parse


_positive_float = _float_above(0.0)
_nonnegative_float = _float_above(0.0, inclusive=True)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes like 128,1,28,28, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected (batch, ...) with positive sizes, got {text!r}")
    return shape


# --- reading files by what they hold ---------------------------------------------------------------------


def _one_line(e: BaseException, limit: int = 160) -> str:
    """``Type: first line`` of an exception, ANSI codes removed, cut at a sentence end when long."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit and ". " in text[20:]:
        text = text[: text.index(". ", 20) + 1]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


class _UnreadableError(Exception):
    """A file that is neither a mixq engine, a PyTorch file, JSON nor YAML."""


ENGINE = object()  # what _read_any returns for a mixq engine file


def _is_engine(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as z:
            return "manifest.json" in z.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _read_any(path: Path):
    """The contents of ``path``, decided by content rather than suffix: a mixq engine (``ENGINE``), a
    ``torch.save`` file (read with ``weights_only=True``: no code runs), else JSON or YAML text."""
    with open(path, "rb") as f:
        head = f.read(1024)
    try:
        if head.startswith(b"PK\x03\x04"):  # zip: a mixq engine or torch.save's archive format
            if _is_engine(path):
                return ENGINE
            return _torch_load(path)
        if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
            return _torch_load(path)
        if b"\x00" in head:
            raise _UnreadableError("unknown binary format")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            return _yaml_load(text)
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if path.suffix == ".json":
                raise
            return _yaml_load(text)
    except _UnreadableError:
        raise
    except UnicodeDecodeError as e:
        raise _UnreadableError("unknown binary format") from e
    except Exception as e:
        raise _UnreadableError(_one_line(e)) from e


def _torch_load(path: Path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def _yaml_load(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:  # its first line is the context; the problem and place follow
        mark = e.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise _UnreadableError(f"YAML: {e.problem or e.context}{where}") from e


CALIBRATION_KEYS = ("weight_scale", "input_bits", "weight_bits", "output_bits", "tracked_min_input")


def _is_calibration(data) -> bool:
    from .calibration import FORMAT_KEY

    if not isinstance(data, Mapping):
        return False
    return FORMAT_KEY in data or any(
        isinstance(v, Mapping) and any(k in v for k in CALIBRATION_KEYS) for v in data.values()
    )


def _is_state_dict(data) -> bool:
    import torch

    return isinstance(data, Mapping) and bool(data) and all(isinstance(v, torch.Tensor) for v in data.values())


def _keys(d: Mapping, n: int = 4) -> str:
    keys = [repr(k) for k in list(d)[:n]]
    return ", ".join(keys) + (", ..." if len(d) > n else "")


def _describe(data) -> str:
    """What a parsed file holds, in words: 'a PyTorch state dict of 10 tensors (e.g. conv1.weight)'."""
    if data is ENGINE:
        return "a mixq engine file"
    if _is_calibration(data):
        return "a calibration config (from export_model)"
    if _is_state_dict(data):
        return f"a PyTorch state dict of {len(data)} tensors (e.g. {next(iter(data))})"
    if isinstance(data, list):
        if data and all(isinstance(e, Mapping) for e in data):
            return f"a config_list of {_plural(len(data), 'entry', 'entries')}"
        return f"a list of {_plural(len(data), 'item')}"
    if isinstance(data, Mapping):
        return f"a dict with keys {_keys(data)}" if data else "an empty dict"
    if data is None:
        return "an empty file"
    if isinstance(data, str):
        return "plain text"
    return f"a {type(data).__name__}"


def _existing_file(option: str, path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{option} {p}: is a folder, not a file")
    if not p.is_file():
        raise ConfigError(f"{option} {p}: file not found")
    return p


# --- models, weights, configs, data ----------------------------------------------------------------------


def load_model(spec: str):
    """A registered example model name, or ``path/to/file.py:Name`` (a class or factory taking no arguments)."""
    from .zoo.models import create_model, list_models

    if ":" not in spec:
        return create_model(spec)
    file, _, attr = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"--model {spec}: file {path} not found (registered models: {list_models()})")
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise ConfigError(f"--model {spec}: importing {path} failed: {_one_line(e)}") from e
    if not hasattr(module, attr):
        raise ConfigError(f"--model {spec}: {path} has no {attr!r}")
    try:
        return getattr(module, attr)()
    except Exception as e:
        raise ConfigError(f"--model {spec}: calling {attr}() failed: {_one_line(e)}") from e


def load_weights(model, path: str, model_spec: str) -> None:
    """Load the state dict at ``path`` into ``model``; a file that is not a state dict, or one of another
    model, is a one-line error naming the file, the model and the first keys that differ."""
    p = _existing_file("--weights", path)
    try:
        state = _read_any(p)
    except _UnreadableError as e:
        if "Weights only load failed" in str(e):
            raise ConfigError(
                f"--weights {p} holds pickled Python objects (e.g. a whole model saved with torch.save(model)), "
                "which mixq does not unpickle; save model.state_dict() instead"
            ) from None
        raise ConfigError(f"--weights {p}: cannot read as a PyTorch state dict ({e})") from None
    if not _is_state_dict(state):
        raise ConfigError(
            f"--weights {p} is {_describe(state)}, not a PyTorch state dict (save model.state_dict() with torch.save)"
        )
    problem = _state_dict_mismatch(model.state_dict(), state)
    if problem and all(k.startswith("module.") for k in state):
        problem += " (saved from a DistributedDataParallel/DataParallel wrapper: strip the 'module.' prefix)"
    if problem:
        raise ConfigError(f"--weights {p} does not fit --model {model_spec} ({type(model).__name__}): {problem}")
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise ConfigError(f"--weights {p}: loading into --model {model_spec} failed ({_one_line(e)})") from e


def _shape_text(t) -> str:
    return str(list(t.shape))


def _state_dict_mismatch(own: Mapping, theirs: Mapping, n: int = 2) -> str | None:
    """None if ``theirs`` loads into a model whose state dict is ``own``, else the first differences."""
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    reshaped = [k for k in own if k in theirs and tuple(own[k].shape) != tuple(theirs[k].shape)]

    def few(keys, text):
        shown = ", ".join(text(k) for k in keys[:n])
        return shown + (", ..." if len(keys) > n else "")

    parts = []
    if missing:
        parts.append(f"{_plural(len(missing), 'missing key')} ({few(missing, lambda k: f'{k} {_shape_text(own[k])}')})")
    if unexpected:
        shown = few(unexpected, lambda k: f"{k} {_shape_text(theirs[k])}")
        parts.append(f"{_plural(len(unexpected), 'unexpected key')} ({shown})")
    if reshaped:
        shown = few(
            reshaped, lambda k: f"{k}: {_shape_text(theirs[k])} in the file, {_shape_text(own[k])} in the model"
        )
        parts.append(f"{_plural(len(reshaped), 'shape mismatch', 'shape mismatches')} ({shown})")
    return "; ".join(parts) or None


def load_config(path: str) -> list:
    """The config_list at ``path`` (.json or .yaml): a list of dicts, else a one-line error saying what the
    file is instead."""
    p = _existing_file("--config", path)
    try:
        data = _read_any(p)
    except _UnreadableError as e:
        raise ConfigError(f"--config {p}: cannot parse ({e})") from None
    if _is_calibration(data):
        raise ConfigError(
            f"--config {p} is a calibration config (from export_model); --config takes a config_list (list of "
            "dicts); pass calibration files to `mixq build --calibration`"
        )
    if isinstance(data, list):
        return data
    if data is ENGINE or _is_state_dict(data):
        hint = "; pass state dicts as --weights" if data is not ENGINE else ""
        raise ConfigError(f"--config {p} is {_describe(data)}; --config takes a config_list (list of dicts){hint}")
    raise ConfigError(f"--config {p}: expected a config_list (a YAML/JSON list of dicts), found {_describe(data)}")


def _resolved_config(model, path: str) -> list:
    import mixq

    config = load_config(path)
    try:
        mixq.resolve_config(model, config)
    except ConfigError as e:
        raise ConfigError(f"--config {path}: {e}") from e
    return config


def load_calibration(path: str) -> dict:
    """The calibration config at ``path``, checked; another kind of file is named as what it is."""
    from .calibration import load_calibration_config

    p = _existing_file("--calibration", path)
    try:
        data = _read_any(p)
    except _UnreadableError:
        data = None  # load_calibration_config names the parse error
    if data is ENGINE or _is_state_dict(data) or isinstance(data, list):
        hint = "; a config_list goes to `mixq quantize --config`" if isinstance(data, list) else ""
        raise ConfigError(
            f"--calibration {p} is {_describe(data)}, not a calibration config (pass the calibration.json "
            f"written by `mixq quantize`){hint}"
        )
    return load_calibration_config(p)


def _check_model_input(model, shape: tuple[int, ...], model_spec: str, what: str) -> None:
    """Run one zero sample of ``shape`` through ``model``; if it fails, say which layer expects what."""
    problem = _first_failure(model, shape)
    if problem:
        raise ConfigError(f"--model {model_spec} does not fit {what}: {problem}")


def _first_failure(model, shape: tuple[int, ...]) -> str | None:
    import torch

    entered, done = [], set()
    hooks = []
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()):
            hooks.append(m.register_forward_pre_hook(lambda mod, inp, name=name: entered.append((name, mod, inp))))
            hooks.append(m.register_forward_hook(lambda mod, inp, out, name=name: done.add(name)))
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
        return None
    except Exception as e:
        failing = [(n, m, i) for n, m, i in entered if n not in done]
        return _explain_failure(failing[-1] if failing else None, model, shape, e)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _explain_failure(failing, model, shape, error: Exception) -> str:
    if failing is None:
        return f"{type(model).__name__} fails on a {list((1, *shape))} input ({_one_line(error)})"
    name, module, inputs = failing
    got = inputs[0].shape if inputs and hasattr(inputs[0], "shape") else None
    kind = type(module).__name__
    if hasattr(module, "in_channels") and got is not None and len(got) > 1:
        return f"layer {name} ({kind}) expects {_plural(module.in_channels, 'input channel')}, got {got[1]}"
    if hasattr(module, "in_features") and got is not None:
        return f"layer {name} ({kind}) expects {_plural(module.in_features, 'input feature')}, got {got[-1]}"
    return f"layer {name} ({kind}) fails on its input {list(got) if got is not None else '?'} ({_one_line(error)})"


def _data_root(data_dir: str | None, dataset: str) -> Path:
    """The data directory holding ``dataset``: ``--data-dir``, ``$MIXQ_DATA``, or the first default location
    (mixq.zoo.data.default_data_dirs). When none is given and none holds it, the official files are downloaded into
    the user cache folder now, before any work; a failed download is one line naming the exact commands."""
    from .zoo.data import data_dir as resolve
    from .zoo.data import user_cache_dir
    from .zoo.download import download

    try:
        return resolve(data_dir, dataset)
    except DataError:
        if data_dir is not None or os.environ.get("MIXQ_DATA"):
            raise
    cache = user_cache_dir()
    print(f"mixq: no {dataset} data found; downloading it into {cache} (checksum-verified)", file=sys.stderr)
    try:
        download(dataset, cache)
    except (DataError, OSError) as e:
        raise DataError(
            f"no {dataset} data found and downloading it into {cache} failed ({_short(e)}): run "
            f"`mixq download {dataset}` where the internet is reachable, `mixq download {dataset} --from DIR` to "
            f"copy a local copy, or set MIXQ_DATA to a folder holding {dataset}/"
        ) from None
    return cache


def _short(e: BaseException, limit: int = 90) -> str:
    text = _one_line(e, limit)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_out(path: str, folder: bool) -> None:
    """--out must be creatable and writable: checked before any work, so that nothing is trained for nothing."""
    from ._io import unwritable_reason

    reason = unwritable_reason(path, folder)
    if reason is not None:
        raise ConfigError(f"--out {path}: {reason}")


def _dataset(name: str, data_dir, train: bool, limit=None):
    from .zoo.data import load_cifar10, load_mnist

    if name == "mnist":
        return load_mnist(train, data_dir, limit)
    return load_cifar10(train, data_dir, limit)


def _check_backend(name: str) -> None:
    from .auto import candidate_backends
    from .backends import get_backend

    try:
        candidate_backends() if name == "auto" else get_backend(name)
    except MixqError as e:
        raise ConfigError(f"--backend {name}: {e}") from e


# --- progress on stderr ----------------------------------------------------------------------------------


class _LogProgress:
    """Plain progress lines for a stderr that is not a terminal (a log file, CI): every ``LOG_EVERY_STEPS``
    steps or ``LOG_EVERY_SECONDS`` seconds, whichever comes first, and a summary when the epoch closes."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc = total, desc
        self.steps = self.images = 0
        self.loss = self.loss_sum = None
        self.start = self.last = time.perf_counter()

    def update(self, n: int = 1, loss: float | None = None, images: int | None = None) -> None:
        self.steps += n
        self.images += images or 0
        if loss is not None:
            self.loss = loss
            self.loss_sum = (self.loss_sum or 0.0) + loss * n
        now = time.perf_counter()
        if self.steps % LOG_EVERY_STEPS == 0 or now - self.last >= LOG_EVERY_SECONDS:
            self.last = now
            loss_text = f", loss {self.loss:.4f}" if self.loss is not None else ""
            self._print(f"step {self.steps}/{self.total}{loss_text}", now)

    def close(self) -> None:
        now = time.perf_counter()
        loss_text = f", mean loss {self.loss_sum / self.steps:.4f}" if self.loss_sum is not None else ""
        self._print(f"done, {self.steps} steps in {now - self.start:.1f} s{loss_text}", now)

    def _print(self, text: str, now: float) -> None:
        seconds = max(now - self.start, 1e-9)
        rate = f"{self.images / seconds:.0f} images/s" if self.images else f"{self.steps / seconds:.1f} steps/s"
        print(f"{self.desc}: {text}, {rate}", file=sys.stderr, flush=True)


class _BarProgress:
    """A tqdm bar on a terminal, showing the last loss."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)

    def update(self, n: int = 1, loss: float | None = None, images: int | None = None) -> None:
        if loss is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def _progress_factory(enabled: bool):
    """``factory(total=, desc=)`` -> an object with ``update(n, loss=, images=)`` and ``close()``, or None."""
    if not enabled:
        return None
    return _BarProgress if sys.stderr.isatty() else _LogProgress


def _note(progress, text: str) -> None:
    """A one-off progress line (PTQ calibration, evaluation), shown wherever progress is."""
    if progress is not None:
        print(text, file=sys.stderr, flush=True)


# --- commands --------------------------------------------------------------------------------------------


def cmd_demo(args) -> int:
    _check_out(args.out, folder=True)
    _check_backend(args.backend)
    root = _data_root(args.data_dir, "mnist")

    from .zoo.demo import DemoOptions, run_demo

    opts = DemoOptions(
        data_dir=str(root), out=args.out, epochs=args.epochs, quick=args.quick, seed=args.seed, backend=args.backend
    )
    run_demo(opts, progress_factory=_progress_factory(not args.no_progress))
    return 0


def cmd_download(args) -> int:
    from ._io import unwritable_reason
    from .zoo.data import user_cache_dir
    from .zoo.download import copy_dataset, download

    root = Path(args.data_dir or os.environ.get("MIXQ_DATA") or user_cache_dir())
    folder = "--data-dir" if args.data_dir else "MIXQ_DATA" if os.environ.get("MIXQ_DATA") else "the cache folder"
    reason = unwritable_reason(root, True)
    if reason is not None:
        raise ConfigError(f"{folder} {root}: {reason}")
    if args.source is not None and not Path(args.source).is_dir():
        raise ConfigError(f"--from {args.source}: not a folder (a data directory holding mnist/ or cifar10/)")
    for name in args.datasets:
        if args.source is not None:
            path = copy_dataset(name, args.source, root)
            print(f"{name}: {path} (copied from {args.source}, checksums verified)")
        else:
            path = download(name, root, args.mirror)
            print(f"{name}: {path} (checksums verified)")
    return 0


@dataclass
class _QuantizeJob:
    model: object
    config: list
    calib: object = None  # --calib-data inputs (a tensor), or None: the data set's training images
    test: object = None  # --eval-data (a TensorDataset), or None: the data set's test images (if any)


def _prepare_quantize(args) -> _QuantizeJob:
    """Every check of `mixq quantize` before any data is loaded or any step is trained."""
    if args.method == "ptq" and not args.weights and not args.random_weights:
        raise ConfigError(
            "--method ptq needs --weights: calibrating a model's random initial weights gives a useless model; "
            f"{WEIGHTS_HINT} (QAT may start from scratch)"
        )
    if args.distributed and "RANK" not in os.environ:
        raise ConfigError(
            "--distributed needs torchrun: torchrun --nproc_per_node N -m mixq quantize --distributed ..."
        )
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: this machine has no usable CUDA GPU (torch.cuda.is_available() is False)")
    if args.distributed and args.device != "auto":
        raise ConfigError(
            "--distributed takes the device from torchrun (one GPU per process, else the CPU); drop --device"
        )
    _check_out(args.out, folder=True)
    if (args.compile or args.amp) and args.method != "qat":
        raise ConfigError(f"--{'compile' if args.compile else 'amp'} applies to QAT training; PTQ only calibrates")
    if args.dataset is None and args.calib_data is None:
        raise ConfigError("give --dataset (mnist, cifar10) or, for PTQ of your own model, --calib-data FILE")
    if args.calib_data is not None and args.method != "ptq":
        raise ConfigError(
            "--calib-data calibrates PTQ (--method ptq); QAT trains on labelled data: --dataset, or "
            "mixq.train.qat_train with your own tensors (docs/own-model.md)"
        )
    calib, test = _own_data(args)

    torch.manual_seed(args.seed)
    model = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights, args.model)
    if calib is not None:
        shape = tuple(calib.shape[1:])
        _check_model_input(model, shape, args.model, f"--calib-data {args.calib_data} (samples {list(shape)})")
    else:
        shape = IMAGE_SHAPES[args.dataset]
        _check_model_input(model, shape, args.model, f"--dataset {args.dataset} (images {'x'.join(map(str, shape))})")
    if test is not None and tuple(test.tensors[0].shape[1:]) != shape:
        raise ConfigError(
            f"--eval-data {args.eval_data}: samples {list(test.tensors[0].shape[1:])}, but the model is calibrated "
            f"on samples {list(shape)}"
        )
    config = _resolved_config(model, args.config)
    if not args.training_only:
        _check_buildable(model, config, args.config)
    if args.dataset is not None:
        args.data_dir = str(_data_root(args.data_dir, args.dataset))
    return _QuantizeJob(model, config, calib, test)


def _own_data(args):
    """(--calib-data inputs or None, --eval-data TensorDataset or None), read and checked before any work. A
    --calib-data folder is read as images through --calib-transform."""
    from .zoo.data import ImageTransform, load_image_folder

    if args.calib_transform is not None and (args.calib_data is None or not Path(args.calib_data).is_dir()):
        raise ConfigError("--calib-transform applies to an image folder given as --calib-data DIR")
    if args.calib_data is not None and Path(args.calib_data).is_dir():
        try:
            transform = ImageTransform.parse(args.calib_transform)
        except DataError as e:
            raise ConfigError(f"--calib-transform: {e}") from None
        try:
            calib = load_image_folder(args.calib_data, transform, args.calib_images)
        except DataError as e:
            raise ConfigError(f"--calib-data {e}") from None
    else:
        calib = _own_data_file("calib-data", args.calib_data)
    return calib, _own_data_file("eval-data", args.eval_data)


def _own_data_file(option: str, path: str | None):
    """--calib-data: the inputs tensor; --eval-data: a labelled TensorDataset; None without the option."""
    from .zoo.data import load_labelled_file, load_tensor_file

    if path is None:
        return None
    try:
        return (load_tensor_file if option == "calib-data" else load_labelled_file)(path)
    except DataError as e:
        raise ConfigError(f"--{option} {e}") from None


def _check_buildable(model, config: list, path: str) -> None:
    """Whether an engine can build what ``config`` asks for (e.g. 3-bit weights cannot): the same rule ``build``
    applies to the calibration config (mixq.export.layer_precisions), applied before training."""
    from .config import resolve_config
    from .export import layer_precisions

    entries = {}
    for name, spec in resolve_config(model, config).items():
        entry = {}
        for t in spec.quant_types:
            q = spec.spec(t)
            entry[f"{t}_bits"] = q.dtype.bits
            if q.is_float:
                entry[f"{t}_qspec"] = {"dtype": "fp8"}
        entries[name] = entry
    try:
        layer_precisions(entries)
    except MixqError as e:
        raise ConfigError(
            f"--config {path}: {e} (pass --training-only to train and export it anyway, for study; no engine builds it)"
        ) from None


def cmd_quantize(args) -> int:
    import torch
    from torch.utils.data import TensorDataset

    from .train import Placement, init_distributed, training_device
    from .zoo.metrics import accuracy

    job = _prepare_quantize(args)
    model = job.model
    train = test = None
    if args.dataset is not None:
        train = _dataset(args.dataset, args.data_dir, True, args.train_limit) if job.calib is None else None
        test = job.test or _dataset(args.dataset, args.data_dir, False, args.test_limit)
    else:
        test = job.test
    if test is not None and args.test_limit:
        test = TensorDataset(*(t[: args.test_limit] for t in test.tensors))
    placement = init_distributed() if args.distributed else Placement(device=training_device(args.device))
    model.to(placement.device)
    progress = _progress_factory(not args.no_progress and placement.rank == 0)
    torch.manual_seed(args.seed)
    if args.method == "qat":
        quantizer = _qat(model, job.config, train, args, placement, progress)
    else:
        images = job.calib if job.calib is not None else train.tensors[0]
        quantizer = _ptq(model, job.config, images, args, placement, progress)
    model.eval().cpu()
    out = Path(args.out)
    quantizer.export_model(out / "model.pth", out / "calibration.json")  # rank 0 writes
    if placement.rank == 0:
        source = f"--eval-data {args.eval_data}" if job.test is not None else args.dataset
        if test is None:
            print(
                f"{args.method} {args.model}: calibrated on --calib-data {args.calib_data}; no --eval-data, so "
                "accuracy was not measured"
            )
        else:
            own = f" of --eval-data {args.eval_data}" if job.test is not None else ""
            _note(progress, f"evaluating the fake-quant model on {len(test.tensors[0])} test images{own}")
            with torch.no_grad():
                acc = accuracy(model, test)
            processes = f" ({placement.world} processes)" if placement.world > 1 else ""
            print(
                f"{args.method} {args.model} on {source}: fake-quant accuracy {acc:.2f}% "
                f"on {len(test.tensors[0])} test images{processes}"
            )
        print(f"wrote {out / 'model.pth'} and {out / 'calibration.json'}")
    if args.distributed:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


def _qat(model, config, train, args, placement, progress):
    """QAT_Quantizer on ``model`` (NNI's config_list convention, as the CLI's configs are written), then the
    library's loop (mixq.train.qat_train)."""
    import torch
    import torch.nn.functional as F

    from .nni import QAT_Quantizer
    from .train import QATOptions, qat_train

    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    quantizer = QAT_Quantizer(model, config, optimizer, train.tensors[0][:2].to(placement.device))
    loss_fn = F.nll_loss if args.model == "lenet" else F.cross_entropy
    amp, compiled = getattr(args, "amp", False), getattr(args, "compile", False)  # `search` fine-tunes without them
    options = QATOptions(epochs=args.epochs, batch_size=args.batch_size, amp=amp, compile=compiled)
    qat_train(model, optimizer, *train.tensors, loss_fn, options, placement, progress)
    return quantizer


def _ptq(model, config, images, args, placement, progress):
    """ObserverQuantizer on ``model``, then the library's sharded calibration (mixq.train.ptq_calibrate)."""
    from .nni import ObserverQuantizer
    from .train import ptq_calibrate

    model.eval()
    quantizer = ObserverQuantizer(model, config, None, images[:2].to(placement.device))
    ptq_calibrate(model, images[: args.calib_images], args.batch_size, placement, lambda t: _note(progress, t))
    return quantizer


def _prepare_build(args):
    """Every check of `mixq build` before the engine is built: (model with weights, calibration config)."""
    if not args.weights and not args.random_weights:
        raise ConfigError(
            "--weights is required: without it the engine gets the model's random initial weights; pass the "
            "model.pth written by `mixq quantize`, or --random-weights for a smoke test"
        )
    model = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights, args.model)
    shape = args.input_shape
    _check_model_input(model, shape[1:], args.model, f"--input-shape {','.join(map(str, shape))}")
    calibration = load_calibration(args.calibration)
    _check_backend(args.backend)
    _check_out(args.out, folder=False)
    return model, calibration


def cmd_build(args) -> int:
    from .speedup import ModelSpeedup

    model, calibration = _prepare_build(args)
    model.eval()
    speedup = ModelSpeedup(
        model,
        args.input_shape,
        config=calibration,
        batchsize=args.input_shape[0],
        backend=args.backend,
        threads=args.threads,
    ).compress()
    path = speedup.export_quantized_model(args.out)
    print(speedup.report())
    print(f"wrote {path}")
    return 0


def cmd_bench(args) -> int:
    import platform

    import torch

    from .backends import load_engine
    from .zoo.metrics import median_latency

    test = _own_data_file("eval-data", args.eval_data)
    engine = load_engine(args.engine)
    if test is not None and tuple(test.tensors[0].shape[1:]) != engine.input_shape[1:]:
        raise ConfigError(
            f"--eval-data {args.eval_data}: samples {list(test.tensors[0].shape[1:])}, the engine takes "
            f"{list(engine.input_shape[1:])}"
        )
    print(f"{args.engine}: backend {engine.backend}; {platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"median of {args.runs} runs after {args.warmup} warm-up, random normal input")
    print("| batch | median ms | per sample us |\n|---|---|---|")
    for b in args.batch:
        x = torch.randn(b, *engine.input_shape[1:])
        t = median_latency({"engine": engine.run}, x, args.warmup, args.runs)["engine"]
        print(f"| {b} | {t * 1e3:.3f} | {t * 1e6 / b:.2f} |")
    if test is not None:
        from .zoo.metrics import accuracy

        acc = accuracy(engine.run, test, min(engine.max_batch or 1000, 1000))
        print(f"engine top-1 {acc:.2f}% on the {len(test.tensors[0])} images of --eval-data {args.eval_data}")
    return 0


def cmd_report(args) -> int:
    import torch

    from .backends import load_engine
    from .report import PlacementReport

    path = Path(args.path)
    if path.is_dir():
        results = path / "results.md"
        if not results.is_file():
            raise ConfigError(f"{path}: no results.md (run mixq demo --out {path} first)")
        print(results.read_text(encoding="utf-8"))
        return 0
    engine = load_engine(path)
    report = PlacementReport(engine.backend, engine.placement())
    if args.profile_batch:
        x = torch.randn(args.profile_batch, *engine.input_shape[1:])
        report.times = {t.layer: t.microseconds for t in engine.profile(x, args.runs)}
        report.batch = args.profile_batch
    print(report)
    return 0


def _prepare_search(args):
    """Every check of `mixq search` before any data is read or anything is measured: the float model with
    its weights, the backends and the choices."""
    from .search import check_choices

    if not args.weights and not args.random_weights:
        raise ConfigError(f"--weights is required: the search measures the accuracy of a trained model; {WEIGHTS_HINT}")
    model = load_model(args.model)
    if args.weights:
        load_weights(model, args.weights, args.model)
    shape = IMAGE_SHAPES[args.dataset]
    _check_model_input(model, shape, args.model, f"--dataset {args.dataset} (images {'x'.join(map(str, shape))})")
    backends = args.backend
    if "auto" in backends and len(backends) > 1:
        raise ConfigError(f"--backend: 'auto' or a list of backends, not both (got {' '.join(backends)})")
    for name in backends:
        _check_backend(name)
    try:
        check_choices(args.choices)
    except ConfigError as e:
        raise ConfigError(f"--choices: {e}") from None
    test_images = 10_000  # MNIST and CIFAR-10 test sets
    if args.eval_images + args.verify_images > test_images:
        raise ConfigError(
            f"--eval-images {args.eval_images} + --verify-images {args.verify_images} exceed the {test_images} test "
            f"images of {args.dataset} (the two sets are disjoint)"
        )
    _check_out(args.out, folder=True)
    args.data_dir = str(_data_root(args.data_dir, args.dataset))
    return model, ("auto" if backends == ["auto"] else backends)


def cmd_search(args) -> int:
    import argparse as _argparse

    import torch
    from torch.utils.data import TensorDataset

    from .search import Budget, search
    from .train import Placement
    from .zoo.metrics import accuracy

    model, backends = _prepare_search(args)
    model.eval()
    progress = _progress_factory(not args.no_progress)
    fine_tune_all = args.finetune_epochs and not args.train_limit
    train_limit = None if fine_tune_all else max(args.calib_images, args.train_limit or 0)
    train = _dataset(args.dataset, args.data_dir, True, train_limit)
    test = _dataset(args.dataset, args.data_dir, False, args.eval_images + args.verify_images)
    x, y = test.tensors
    held = TensorDataset(x[: args.eval_images], y[: args.eval_images])
    verify = TensorDataset(x[args.eval_images :], y[args.eval_images :])
    calib = train.tensors[0][: args.calib_images]

    def eval_fn(predict):  # top-1 % on the first --eval-images test images
        return accuracy(predict, held, 500)

    def verify_fn(predict):  # top-1 % on the next --verify-images test images
        return accuracy(predict, verify, 500)

    def finetune(net, config):
        options = _argparse.Namespace(**{**vars(args), "epochs": args.finetune_epochs})
        tune = train if not args.train_limit else TensorDataset(*(t[: args.train_limit] for t in train.tensors))
        torch.manual_seed(args.seed)
        _qat(net, config, tune, options, Placement(), progress)
        return net

    budget = Budget(latency_ms=args.latency_ms) if args.latency_ms is not None else Budget(max_drop=args.max_drop)
    result = search(
        model,
        [calib[i : i + args.batch] for i in range(0, len(calib), args.batch)],
        eval_fn,
        verify_fn=verify_fn,
        budget=budget,
        backends=backends,
        choices=args.choices,
        batch=args.batch,
        finalists=args.finalists,
        max_measured=args.max_measured,
        runs=args.runs,
        profile_runs=args.profile_runs,
        threads=args.threads,
        cache_dir=None if args.no_cache else (args.cache or Path(args.out) / "cache"),
        finetune=finetune if args.finetune_epochs else None,
        progress=progress is not None,
    )
    written = result.save(args.out)
    print(result.summary())
    print(f"config_list: {json.dumps(result.config_list)}")
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_inspect(args) -> int:
    from .backends.base import read_engine_file
    from .calibration import load_calibration_config

    path = Path(args.path)
    if _inspect_kind(path) == "engine":
        manifest, members = read_engine_file(path)
        return _inspect_engine(manifest, members, path)
    return _inspect_calibration(load_calibration_config(path), path)


def _inspect_kind(path: Path) -> str:
    """'engine' or 'calibration', decided by content; by suffix where content cannot tell (a missing or
    unreadable file: that loader then names the problem). Any other kind of file is an error saying what it is."""
    by_suffix = "calibration" if path.suffix in (".json", ".pth", ".pt") else "engine"
    if not path.is_file():
        return by_suffix
    try:
        data = _read_any(path)
    except _UnreadableError:
        return by_suffix
    if data is ENGINE:
        return "engine"
    if _is_state_dict(data) or not isinstance(data, Mapping):
        raise ConfigError(f"{path} is {_describe(data)}, not a calibration config; {INSPECT_TAKES}")
    return "calibration"


def _inspect_calibration(config: dict, path: Path) -> int:
    print(f"{path}: calibration config, {len(config)} layers")
    for name, e in config.items():
        parts = [f"{t}={e[f'{t}_bits']}b" for t in ("input", "weight", "output") if f"{t}_bits" in e]
        extra = f" folded_bn={e['folded_bn']}" if e.get("folded_bn") else ""
        print(f"  {name} ({e.get('op_type', '?')}): {', '.join(parts)}{extra}")
    return 0


def _inspect_engine(manifest: dict, members: dict, path: Path) -> int:
    print(f"{path}: mixq engine, format {manifest['format_version']}, backend {manifest['backend']}")
    print(f"  input shape {tuple(manifest['input_shape'])} (batch dynamic), max batch {manifest.get('max_batch')}")
    print(f"  members: {', '.join(f'{k} ({len(v)} bytes)' for k, v in members.items())}")
    for name, layer in manifest["layers"].items():
        print(f"  {name} ({layer['op_type']}): {layer['precision']}")
    return 0


# --- the parser ------------------------------------------------------------------------------------------


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' layout and appends each option's default to its help (where it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        skip = unset or action.required or not action.option_strings
        if skip or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def _backend_help() -> str:
    from .backends import list_backends

    return f"engine backend: auto (the best one available here) or one of {', '.join(list_backends())}"


def _weights_options(p, weights_help: str, random_help: str) -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--weights", metavar="FILE", help=weights_help)
    group.add_argument("--random-weights", action="store_true", help=random_help)


def _add_demo(add) -> None:
    demo = add("demo", "the NNI tutorial end to end on MNIST", cmd_demo)
    demo.add_argument("--data-dir", help=f"folder holding mnist/ (default: {DATA_DEFAULT})")
    demo.add_argument("--epochs", type=_positive_int, default=3, help="training epochs per strategy")
    demo.add_argument("--out", default="runs/demo", help="output folder")
    demo.add_argument("--quick", action="store_true", help="12000 train / 2000 test images, two epochs, fewer runs")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the initial weights and data order")
    demo.add_argument("--backend", default=DEFAULT_BACKEND, help=_backend_help())
    demo.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines on stderr")


def _add_download(add) -> None:
    dl = add("download", "download MNIST / CIFAR-10 (official files, checksum-verified)", cmd_download)
    dl.add_argument("datasets", nargs="+", choices=["mnist", "cifar10"], help="data sets to download")
    dl.add_argument("--data-dir", help="target folder (default: $MIXQ_DATA, else the user cache ~/.cache/mixq/data)")
    source = dl.add_mutually_exclusive_group()
    source.add_argument(
        "--mirror",
        action="append",
        metavar="URL",
        help="base URL to download from instead of the usual mirrors "
        "(repeatable; file:// works: a folder holding the official files)",
    )
    source.add_argument("--from", dest="source", metavar="DIR", help="copy from another data directory instead")


def _add_quantize(add) -> None:
    q = add("quantize", "QAT or PTQ a model with a config_list, export model + calibration", cmd_quantize)
    q.add_argument("--model", required=True, help="registered name (lenet, resnet18_cifar, ...) or file.py:Name")
    _weights_options(
        q,
        "float state dict to start from (--method ptq needs it, or --random-weights)",
        "no --weights on purpose: PTQ of the random initial weights (smoke tests only)",
    )
    q.add_argument("--config", required=True, metavar="FILE", help="config_list as .yaml or .json")
    q.add_argument("--method", choices=["qat", "ptq"], default="qat", help="quantization-aware training or PTQ")
    q.add_argument(
        "--dataset", choices=sorted(IMAGE_SHAPES), help="training and test data (or --calib-data with --method ptq)"
    )
    q.add_argument(
        "--calib-data",
        metavar="FILE",
        help="PTQ on your own inputs: a float tensor [N, ...] in .npy or .pt/.pth (normalized as in training), or "
        "a folder of images (see --calib-transform); the first --calib-images are used",
    )
    q.add_argument(
        "--calib-transform",
        metavar="SPEC",
        help="how a --calib-data image folder becomes inputs, e.g. 'size=32x32;mode=RGB;mean=0.49,0.48,0.45;"
        "std=0.25,0.24,0.26' (mode L: gray; pixels scaled to [0, 1] before mean/std; default: as they are, RGB)",
    )
    q.add_argument(
        "--eval-data",
        metavar="FILE",
        help="accuracy on your own labelled data: .npz (images, labels) or .pt/.pth {'images', 'labels'}",
    )
    q.add_argument("--data-dir", help=f"folder holding mnist/ and cifar10/ (default: {DATA_DEFAULT})")
    q.add_argument("--epochs", type=_positive_int, default=1, help="QAT epochs")
    q.add_argument("--lr", type=_positive_float, default=0.01, help="QAT SGD learning rate")
    q.add_argument("--momentum", type=_nonnegative_float, default=0.5, help="QAT SGD momentum")
    q.add_argument("--batch-size", type=_positive_int, default=128, help="QAT and PTQ batch size")
    q.add_argument("--calib-images", type=_positive_int, default=2048, help="PTQ calibration images")
    q.add_argument("--train-limit", type=_positive_int, help="use only the first N training images (default: all)")
    q.add_argument("--test-limit", type=_positive_int, help="use only the first N test images (default: all)")
    q.add_argument(
        "--seed", type=int, default=0, help="random seed (initial weights without --weights, DDP data order)"
    )
    q.add_argument("--out", required=True, metavar="DIR", help="output folder for model.pth and calibration.json")
    q.add_argument("--no-progress", action="store_true", help="no progress bars or progress lines on stderr")
    q.add_argument(
        "--training-only",
        action="store_true",
        help="accept a config no engine builds (e.g. 3-bit weights): train and export it for study",
    )
    q.add_argument("--distributed", action="store_true", help="under torchrun: DDP QAT / sharded PTQ, rank 0 writes")
    q.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="where to train (auto: a GPU if there is one)"
    )
    q.add_argument("--amp", action="store_true", help="QAT under bf16 autocast with channels_last (fake quant in fp32)")
    q.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the prepared model for QAT (CUDA graphs on a GPU; full batches only; the first steps "
        "compile, about a minute for ResNet-18)",
    )


def _add_build(add) -> None:
    b = add("build", "calibration config -> engine file", cmd_build)
    b.add_argument("--model", required=True, help="registered name or file.py:Name")
    _weights_options(
        b,
        "the state dict written by quantize/export_model (model.pth); needed unless --random-weights",
        "no --weights on purpose: build with the random initial weights (smoke tests only)",
    )
    b.add_argument("--calibration", required=True, metavar="FILE", help="calibration config (.json or .pth)")
    b.add_argument("--input-shape", type=_shape, required=True, help="e.g. 128,1,28,28 (batch stays dynamic)")
    b.add_argument("--backend", default=DEFAULT_BACKEND, help=_backend_help())
    b.add_argument("--threads", type=_positive_int, help="intra-op threads (default: all cores)")
    b.add_argument("--out", required=True, metavar="FILE", help="engine file to write (.mixq)")


def _add_bench(add) -> None:
    bench = add("bench", "latency of an engine file", cmd_bench)
    bench.add_argument("engine", help="engine file (.mixq)")
    bench.add_argument("--batch", type=_positive_int, nargs="+", default=[1, 128], help="batch sizes (default: 1 128)")
    bench.add_argument("--runs", type=_positive_int, default=100, help="timed runs per batch size")
    bench.add_argument("--warmup", type=_nonnegative_int, default=10, help="untimed warm-up runs per batch size")
    bench.add_argument(
        "--eval-data",
        metavar="FILE",
        help="also the engine's top-1 on your labelled data: .npz (images, labels) or .pt/.pth {'images', 'labels'}",
    )


def _add_report(add) -> None:
    r = add("report", "placement report of an engine, or the tables of a results folder", cmd_report)
    r.add_argument("path", help="engine file (.mixq) or a `mixq demo --out` folder")
    r.add_argument("--profile-batch", type=_positive_int, help="also time each layer at this batch (default: off)")
    r.add_argument("--runs", type=_positive_int, default=20, help="profiled runs with --profile-batch")


def _add_search(add) -> None:
    from .search import CHOICES, DEFAULT_CHOICES, NOT_EXPRESSIBLE

    s = add("search", "the fastest per-layer precision within an accuracy budget, measured on the engines", cmd_search)
    s.add_argument("--model", required=True, help="registered name (lenet, resnet18_cifar, ...) or file.py:Name")
    _weights_options(
        s,
        "the trained float state dict",
        "no --weights on purpose: search the random initial weights (smoke tests only)",
    )
    s.add_argument("--dataset", choices=sorted(IMAGE_SHAPES), required=True, help="calibration and test data")
    s.add_argument("--data-dir", help=f"folder holding mnist/ and cifar10/ (default: {DATA_DEFAULT})")
    budget = s.add_mutually_exclusive_group()
    budget.add_argument(
        "--max-drop", type=_nonnegative_float, default=0.5, help="largest allowed top-1 drop, in points"
    )
    budget.add_argument(
        "--latency-ms", type=_positive_float, help="instead: the most accurate configuration at most this slow"
    )
    s.add_argument(
        "--backend",
        nargs="+",
        default=["auto"],
        metavar="NAME",
        help=_backend_help() + "; several allowed (default: auto)",
    )
    s.add_argument(
        "--choices",
        nargs="+",
        default=list(DEFAULT_CHOICES),
        metavar="PRECISION",
        help=f"precisions to consider, of {', '.join([*CHOICES, *NOT_EXPRESSIBLE])}; the search checks which "
        f"each backend really runs (default: {' '.join(DEFAULT_CHOICES)})",
    )
    s.add_argument("--batch", type=_positive_int, default=128, help="batch size the latency is measured at")
    s.add_argument("--calib-images", type=_positive_int, default=512, help="training images for PTQ calibration")
    s.add_argument("--eval-images", type=_positive_int, default=2000, help="first test images: the search's metric")
    s.add_argument(
        "--verify-images", type=_positive_int, default=5000, help="next test images: held out, to verify finalists"
    )
    s.add_argument("--finalists", type=_positive_int, default=3, help="plans per backend built and verified")
    s.add_argument("--max-measured", type=_nonnegative_int, help="measure at most N layer options (default: all)")
    s.add_argument("--runs", type=_positive_int, default=20, help="timed runs per engine (interleaved)")
    s.add_argument("--profile-runs", type=_positive_int, default=10, help="profiled runs per engine")
    s.add_argument("--threads", type=_positive_int, help="intra-op threads (default: all cores)")
    s.add_argument("--finetune-epochs", type=_nonnegative_int, default=0, help="QAT epochs for the winner (0: none)")
    s.add_argument("--lr", type=_positive_float, default=0.01, help="QAT fine-tune SGD learning rate")
    s.add_argument("--momentum", type=_nonnegative_float, default=0.5, help="QAT fine-tune SGD momentum")
    s.add_argument("--batch-size", type=_positive_int, default=128, help="QAT fine-tune batch size")
    s.add_argument("--train-limit", type=_positive_int, help="fine-tune on the first N training images (default: all)")
    s.add_argument("--seed", type=int, default=0, help="random seed of the fine-tune's data order")
    s.add_argument("--cache", metavar="DIR", help="measurement cache (default: OUT/cache)")
    s.add_argument("--no-cache", action="store_true", help="keep measurements in memory only")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")


def _add_inspect(add) -> None:
    i = add("inspect", "what an engine file or calibration config contains", cmd_inspect)
    i.add_argument("path", help="engine file (.mixq) or calibration config (.json/.pth)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixq",
        description="Mixed-precision quantization that really runs faster.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mixq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name, help_text, func):
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES[name])
        p.formatter_class = _HelpFormatter
        p.set_defaults(func=func)
        return p

    for add_command in (
        _add_demo,
        _add_download,
        _add_quantize,
        _add_build,
        _add_bench,
        _add_report,
        _add_search,
        _add_inspect,
    ):
        add_command(add)
    return parser


def _forget_interrupt() -> None:
    """Make a caught Ctrl-C exit with our status 130 rather than by SIGINT.

    CPython remembers a KeyboardInterrupt that escaped any ``exec``/``eval`` of a source string (its
    ``run_eval_code_obj``), even one caught later: ``dataclasses`` and ``namedtuple`` build their methods that
    way, so a Ctrl-C landing in, e.g., a lazy ``import torch._dynamo`` at the start of training sets the flag.
    At exit, ``python -m mixq`` then kills itself with SIGINT (status -2) after we printed 'interrupted' and
    returned 130. Running one source string resets that flag.
    """
    exec("pass")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 2 for errors, 130 for Ctrl-C)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse printed usage + error (status 2), or --help / --version (0)
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, not at exit: a reader that went away is then caught below
        return status
    except MixqError as e:
        print(f"mixq {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixq {args.command}: interrupted", file=sys.stderr)
        _forget_interrupt()
        return 130
    except BrokenPipeError:
        # The reader went away (`mixq inspect x.mixq | head`): stop quietly, as a command killed by SIGPIPE does.
        # stdout is pointed at /dev/null so that Python's flush of it at exit does not raise a second time.
        _silence_stdout()
        return 128 + 13  # 141, what a shell reports for SIGPIPE


def _silence_stdout() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no real file (captured under a test): nothing to flush later
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
