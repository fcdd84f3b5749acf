"""NNI-shaped quantizer objects (``QAT_Quantizer(model, config_list, optimizer, dummy_input)``) over the
native verbs in :mod:`mixq.quantization`; ``mixq.nni`` re-exports them."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .._errors import ConfigError
from .._io import atomic_write
from ..calibration import save_calibration_config
from ..distributed import barrier, is_main_process
from ..export import export_float_onnx
from ..quantization import LSQ, PTQ, QAT, DoReFa, Method, export_calibration, freeze_, prepare_, quantized_layers
from ..quantization.model import deploy_, load_calibration_
from .settings import nni_config_list

__all__ = ["Quantizer", "QAT_Quantizer", "ObserverQuantizer", "LsqQuantizer", "DoReFaQuantizer"]


class Quantizer:
    """Wraps the configured modules of ``model`` on construction; ``compress()`` returns the model."""

    def __init__(
        self,
        model: nn.Module,
        config_list: Sequence[Mapping],
        method: Method,
        optimizer: torch.optim.Optimizer | None = None,
        dummy_input: torch.Tensor | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.bound_model = model
        self.config_list = config_list
        self.optimizer = optimizer
        self.specs = prepare_(model, config_list, method, example_input=dummy_input)
        self._exported: dict | None = None  # the calibration of the last export_model (the model is unwrapped)

    def compress(self) -> nn.Module:
        return self.bound_model

    def load_calibration_config(self, calibration_config: Mapping) -> None:
        """NNI's ``load_calibration_config``: start the activation ranges from a calibration config (as
        ``export_model`` returns, from this or another quantizer, or NNI's), e.g. to begin QAT from PTQ ranges.
        A layer the config lacks keeps its own (with a warning, as in NNI); bits that differ are an error."""
        missing = load_calibration_(self.bound_model, calibration_config)
        if missing:
            warnings.warn(
                f"load_calibration_config: no entry for {', '.join(repr(n) for n in missing)}; kept as they are",
                stacklevel=2,
            )

    def export_model(
        self,
        model_path: str | os.PathLike,
        calibration_path: str | os.PathLike | None = None,
        onnx_path: str | os.PathLike | None = None,
        input_shape: Sequence[int] | None = None,
        device: torch.device | str | None = None,
    ) -> dict:
        """Save the float deploy state dict (BN folded) to ``model_path``, optionally the calibration config
        (``.json`` or ``.pth``) and a float ONNX model; return the calibration config.

        As in NNI, the model gets its plain modules back (carrying the deploy weights, so it computes in float
        what the engine computes); pass it with the returned config to ``ModelSpeedup``. Activations never
        observed (a module ``forward`` never calls, or no data yet) are left out with a warning. Each file is
        written atomically; calling this again writes the same files."""
        if onnx_path is not None and input_shape is None:
            raise ConfigError("export_model: onnx_path needs input_shape, e.g. (1, 1, 28, 28)")
        if quantized_layers(self.bound_model) or self._exported is None:
            self._exported = export_calibration(self.bound_model, allow_unobserved=True)
            deploy_(self.bound_model)
        calibration = copy.deepcopy(self._exported)
        if is_main_process():  # under torch.distributed every rank returns the config, rank 0 writes
            with atomic_write(model_path, "wb") as f:
                torch.save(self.bound_model.state_dict(), f)
            if calibration_path is not None:
                save_calibration_config(calibration, calibration_path)
            if onnx_path is not None:
                export_float_onnx(copy.deepcopy(self.bound_model), onnx_path, input_shape, device)
        barrier()
        return calibration


class QAT_Quantizer(Quantizer):  # noqa: N801 - NNI's name
    """NNI's ``QAT_Quantizer(model, config_list, optimizer, dummy_input)``.

    Weights use their current min/max (per channel by default), activations an EMA of batch min/max
    (decay 0.99). ``quant_start_step`` counts training-mode forward passes of each layer (NNI counted
    optimizer steps; one forward per step gives the same number). With ``dummy_input``, BatchNorms
    directly after configured convs are folded. A quant type whose ``quant_scheme``/``quant_dtype`` is given
    (in its entry or with :func:`mixq.nni.set_quant_scheme_dtype`) is quantized with NNI's rules (defaults
    per_tensor_affine / uint for the part not given, int range -127..127, uint symmetric zero point 127);
    types without are quantized with mixq's defaults (int8 per-channel symmetric weights, uint8 affine
    activations).
    """

    def __init__(self, model, config_list, optimizer=None, dummy_input=None, ema_decay: float = 0.99):
        super().__init__(model, nni_config_list(config_list), QAT(ema_decay), optimizer, dummy_input)
        self.config_list = config_list


class ObserverQuantizer(Quantizer):
    """Post-training quantization: run calibration batches through the model in eval mode, then
    ``compress()`` fixes the ranges and turns quantization on. Choose an observer per config entry with
    the ``observer`` key (``minmax``, ``ema``, ``percentile``, ``entropy``, ``mse``). As in NNI,
    ``compress()`` before any data is allowed: weights are quantized and activations stay float (NNI would
    quantize them with a default scale of 1), with a warning."""

    def __init__(self, model, config_list, optimizer=None, dummy_input=None):
        super().__init__(model, config_list, PTQ(), optimizer, dummy_input)

    def compress(self) -> nn.Module:
        return freeze_(self.bound_model, allow_unobserved=True)


class LsqQuantizer(Quantizer):
    """Learned step size quantization. The step sizes are parameters; they are added to ``optimizer``
    (as a param group without weight decay) so the user's own training loop learns them."""

    def __init__(self, model, config_list, optimizer=None, dummy_input=None):
        super().__init__(model, config_list, LSQ(), optimizer, dummy_input)
        scales = [
            q.scale
            for w in quantized_layers(model).values()
            for q in (w.input_quantizer, w.input1_quantizer, w.weight_quantizer, w.output_quantizer)
            if q is not None
        ]
        if optimizer is not None:
            optimizer.add_param_group({"params": scales, "weight_decay": 0.0})


class DoReFaQuantizer(Quantizer):
    """DoReFa-Net weight quantization (``quant_types`` must be ``['weight']``)."""

    def __init__(self, model, config_list, optimizer=None, dummy_input=None):
        super().__init__(model, config_list, DoReFa(), optimizer, dummy_input)
