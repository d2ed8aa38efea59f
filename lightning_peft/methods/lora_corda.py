"""CorDA: LoRA's ``init="corda"``, the adapter taken from the weight's context-oriented decomposition.

Yang et al., 2024, "CorDA: Context-Oriented Decomposition Adaptation of Large Language Models", as
Hugging Face peft 0.21.2 computes it (``peft.tuners.lora.corda``). For a linear layer ``W`` (out x in)
and the inputs ``x_i`` (T x in) it receives on a few calibration samples::

    C      = 1/N sum_i (x_i / max(x_i))^T (x_i / max(x_i))       (input covariance; max over all entries)
    C'     = C + d mean(diag C) I                                  (d = 0.01, doubled until ||C' C'^-1 - I|| < 0.05)
    W C'   = U S V'^T,           V = C'^-T V'                      (so that W = U S V^T)
    ipm:   the r largest components (U_r, S_r, V_r);   kpm: the r smallest
    A_0    = sqrt(S_r / s) V_r^T,    B_0 = U_r sqrt(S_r / s),    W_res = W - s B_0 A_0

IPM (instruction-previewed) puts the directions the task's inputs excite most into the adapter;
KPM (knowledge-preserved) adapts the least used ones and leaves the rest in the frozen residual.
A sample is one sequence (peft hooks a batch of one): a batch of B sequences adds B samples.

How this fits injection-then-calibration (peft decomposes before injecting): injection wraps each
target with A = B = 0, so until calibration the model is exactly the base model and the layers see
the base model's inputs. :func:`calibrate` (LoRA's calibrate hook: ``lightning_peft.calibrate``,
or PEFTCallback at train start) runs ``corda_config.calibration_batches`` batches in eval mode
without gradients, collects every layer's ``C``, sets ``A = A_0``, ``B = B_0`` and rewrites the base
weight in place to ``W_res`` (as peft's ``corda_init`` does), so the model is still the base model.
Then, as for PiSSA: ``lightning_peft.merge`` gives ``W_res + s B A`` (peft's merged weight),
``lightning_peft.unload(model, merge=False)`` leaves ``W_res`` (as peft's ``unload``), and saving with
``convert_to_standard_lora=True`` writes peft's rank-2r plain LoRA of the original ``W``
(``[A; A_0]``, ``[B, -B_0]``).

``A_0``, ``B_0`` and a ``corda_ready`` flag are training state (``training_state_names``):
checkpoints keep them, so a resumed run takes its residual from them (the first forward or the
calibrate hook rebuilds ``W_res`` from the original ``W``, the same bits) and draws no batch. An
adapter file keeps only A and B; a layer with trained A, B but no ``A_0, B_0`` refuses to run.
Training a layer that was never calibrated is refused, as is CorDA on anything but ``nn.Linear`` /
transformers' ``Conv1D`` in float (peft's ``preprocess_corda`` hooks only those).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.targeting import is_linear
from lightning_peft.methods import lora_init
from lightning_peft.methods.lora import CALIBRATIONS, VARIANTS, LoRAConfig, LoRALinear

_log = logging.getLogger(__name__)
#: peft's damping: start at 1% of the mean variance, doubled until C' inverts to this accuracy.
_DAMP, _INV_ERROR = 0.01, 0.05
_MAX_DOUBLINGS = 64

_CALL = (
    "call lightning_peft.calibrate(model, batches, loss_fn) first (PEFTCallback does it at train start, on the "
    "training dataloader)"
)


class CordaLinear(LoRALinear):
    """LoRA on ``nn.Linear``/``Conv1D`` initialized by CorDA (see the module docstring): A = B = 0 until
    :func:`calibrate` sets them and the base weight's residual."""

    training_state_names: ClassVar[tuple[str, ...]] = ("lora_A0", "lora_B0", "corda_ready")
    #: The residual base weight is this adapter's: another adapter on it would see ``W_res`` (peft refuses too).
    stackable: ClassVar[bool] = False
    supports_mixed_batch: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, config: LoRAConfig) -> None:
        if not is_linear(base_layer):
            raise TypeError(
                f"it is a {type(base_layer).__name__}, and LoRAConfig.init='corda' decomposes nn.Linear and "
                "transformers' Conv1D weights only (as peft's preprocess_corda); exclude it from target_modules"
            )
        super().__init__(base_layer, config)  # refuses quantized and non-float bases (lora_init.rewrites_base)
        self.corda_method = lora_init.CordaConfig(**config.corda_config).corda_method  # type: ignore[arg-type]
        # Persistent buffers, so that checkpoints (training state) restore them into the module.
        self.register_buffer("lora_A0", torch.zeros_like(self.lora_A.detach()))
        self.register_buffer("lora_B0", torch.zeros_like(self.lora_B.detach()))
        self.register_buffer("corda_ready", torch.tensor(False, device=self.lora_A.device))
        #: Whether the base weight holds ``W_res`` in this process (a plain attribute: not state).
        self.residual_applied = False

    def reset_adapter_parameters(self) -> None:
        applied = getattr(self, "residual_applied", False)
        with torch.no_grad():
            if applied:  # a strategy materializing the module again: the base already holds W_res
                self.lora_A.copy_(self.lora_A0)
                self.lora_B.copy_(self.lora_B0)
                return
            # peft builds lora_A/lora_B as nn.Linear (drawing from the generator) before corda_init replaces them.
            lora_init.draw_like_peft(tuple(self.lora_A.shape), tuple(self.lora_B.shape))
            self.lora_A.zero_()
            self.lora_B.zero_()

    def _weight(self) -> Tensor:
        """The base weight as (out, in) float32."""
        stored: Tensor = self.base.weight  # type: ignore[assignment]
        return (stored.t() if self.fan_in_fan_out else stored).to(torch.float32)

    def decompose(self, covariance: Tensor) -> None:
        """Set ``A_0, B_0`` from the input covariance ``C`` (in x in) as peft's collect_eigens/corda_init, then
        ``A = A_0``, ``B = B_0`` and the base weight ``W_res``."""
        weight = self._weight()  # (out, in)
        r, n = self.r, covariance.shape[0]
        if r > min(weight.shape):
            raise ValueError(
                f"LoRAConfig.init='corda' takes r={r} components of a {tuple(weight.shape)} weight, which has only "
                f"{min(weight.shape)}; lower r (or its rank_pattern entry) for this layer"
            )
        cov = covariance.to(device=weight.device, dtype=torch.float32)
        eye = torch.eye(n, device=cov.device)
        damp = _DAMP
        for _ in range(_MAX_DOUBLINGS):
            fixed = cov + torch.diag(torch.ones(n, device=cov.device) * torch.mean(torch.diag(cov)) * damp)
            inverse = torch.linalg.inv(fixed)
            if torch.dist(fixed @ inverse, eye).item() < _INV_ERROR:
                break
            damp *= 2
        else:
            raise ValueError(
                "CorDA: the input covariance of this layer could not be inverted even with heavy damping; calibrate "
                "on more (and more varied) batches (LoRAConfig.corda_config.calibration_batches)"
            )
        u, s, vh = torch.linalg.svd(weight @ fixed, full_matrices=False)
        v = (vh @ inverse).t()  # (in, min)
        keep = slice(None, r) if self.corda_method == "ipm" else slice(-r, None)
        s, u, v = s[keep] / self.scaling, u[:, keep], v[:, keep]
        for name, tensor in (("S", s), ("U", u), ("V", v)):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"CorDA: the decomposition's {name} is not finite (an ill-conditioned covariance)")
        lora_A = v.t().mul(s.sqrt().view(-1, 1))  # (r, in)
        lora_B = u.mul(s.sqrt())  # (out, r)
        with torch.no_grad():
            self.lora_A0.copy_(lora_A)
            self.lora_B0.copy_(lora_B)
            self.lora_A.copy_(self.lora_A0)
            self.lora_B.copy_(self.lora_B0)
            self.corda_ready.fill_(True)
        self.apply_residual()

    def apply_residual(self) -> None:
        """Rewrite the base weight ``W`` to ``W - s B_0 A_0`` (from the stored ``A_0, B_0``: a resumed run computes
        the same bits as the run that calibrated)."""
        if self._merged:
            raise TypeError("LoRAConfig.init='corda': the adapter is merged; unmerge it before calibrating")
        stored: Tensor = self.base.weight  # type: ignore[assignment]
        with torch.no_grad():
            delta = self.scaling * self.lora_B0.to(torch.float32) @ self.lora_A0.to(torch.float32)  # (out, in)
            residual = (self._weight() - delta).to(stored.dtype)
            lora_init.remember(stored)
            stored.copy_(residual.t() if self.fan_in_fan_out else residual)
        self.residual_applied = True
        self.__dict__["_applied"] = (self.lora_A0.clone(), self.lora_B0.clone())

    def forward(self, x: Tensor) -> Tensor:
        if not self.residual_applied and not self.bypassed:
            self._before_calibration()
        return super().forward(x)

    def _before_calibration(self) -> None:
        """Restore ``W_res`` of a layer loaded from a checkpoint; refuse what would compute the wrong thing."""
        if bool(self.corda_ready):  # A_0, B_0 came with a checkpoint: rebuild the residual once
            self.apply_residual()
        elif torch.is_grad_enabled():
            raise RuntimeError(f"LoRA with init='corda' trained before its CorDA decomposition: {_CALL}.")
        elif bool(self.lora_B.any()):
            raise RuntimeError(
                "this init='corda' layer holds trained A, B but not its initial A_0, B_0, which its residual base "
                "weight W - s B_0 A_0 needs: adapter files keep only A and B. Load it from a training checkpoint "
                "(which keeps A_0, B_0), or save it with save_peft_adapter(..., convert_to_standard_lora=True): a "
                "plain LoRA of the original base, which loads anywhere"
            )


def _layers(model: nn.Module) -> list[tuple[str, CordaLinear]]:
    return [(name, m) for name, m in state.adapter_modules(model) if isinstance(m, CordaLinear)]


def _samples(x: Tensor) -> Tensor:
    """The layer input as samples (S, T, in): every leading index of a (..., T, in) input is one sequence."""
    if x.dim() >= 3:
        return x.reshape(-1, x.shape[-2], x.shape[-1])
    return x.reshape(1, -1, x.shape[-1])


def collect_covariances(
    model: nn.Module,
    layers: list[tuple[str, CordaLinear]],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor],
    options: lora_init.CordaConfig,
) -> dict[str, Tensor]:
    """Each layer's ``C = 1/N sum_i (x_i / max x_i)^T (x_i / max x_i)`` over the samples of the batches.

    In eval mode (peft hooks an ``eval()`` model) and without gradients; each module's training
    mode is put back after. Under ``torch.distributed`` the sums and counts are added over ranks.
    """
    sums: dict[str, Tensor] = {}
    counts = dict.fromkeys((name for name, _ in layers), 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach()
            if not options.use_float16_for_covariance:
                x = x.float()
            for sample in _samples(x):  # (T, in), one at a time as peft accumulates them
                sample = sample / torch.max(sample).abs()
                if not torch.isfinite(sample).all():
                    raise ValueError(
                        f"CorDA calibration: layer {name!r} got an input that is not finite, or whose largest entry "
                        "is 0 (peft divides each sample by it); check the calibration batches"
                    )
                covariance = sample.t() @ sample  # (in, in)
                if not torch.isfinite(covariance).all():
                    raise ValueError(
                        f"CorDA calibration: the covariance of layer {name!r} overflowed"
                        + (" in float16 (use_float16_for_covariance=True)" if x.dtype == torch.float16 else "")
                    )
                sums[name] = sums[name] + covariance if name in sums else covariance
                counts[name] += 1

        return hook

    handles = [layer.register_forward_pre_hook(hook_for(name)) for name, layer in layers]
    modes = {m: m.training for m in model.modules()}
    seen = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in itertools.islice(batches, options.calibration_batches):
                loss_fn(batch)
                seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if seen == 0:
        raise ValueError("LoRAConfig.init='corda' needs training batches to collect input covariances, but got none.")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for name, layer in layers:
            total = sums.get(name)
            if total is None:
                size = layer.lora_A.shape[1]
                total = torch.zeros(size, size, device=layer.lora_A.device)
            torch.distributed.all_reduce(total)
            count = torch.tensor(float(counts[name]), device=total.device)
            torch.distributed.all_reduce(count)
            sums[name], counts[name] = total, int(count.item())
    missing = [name for name, _ in layers if counts[name] == 0]
    if missing:
        raise ValueError(
            f"CorDA calibration: {len(missing)} targeted layer(s) received no input in {seen} batch(es) "
            f"({', '.join(missing[:3])}); they cannot be decomposed. Exclude them from target_modules."
        )
    return {name: sums[name] / counts[name] for name, _ in layers}


def calibrate(model: nn.Module, config: LoRAConfig, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor]) -> None:
    """CorDA's calibration (LoRA's calibrate hook for ``init="corda"``): covariances, decomposition, residual.

    Draws no batch when every layer was already decomposed (a model restored from a checkpoint:
    its residual is rebuilt from the stored ``A_0, B_0``).
    """
    layers = _layers(model)
    if not layers:
        return
    ready = [bool(layer.corda_ready) for _, layer in layers]
    if all(ready):
        for name, layer in layers:
            if not layer.residual_applied:
                layer.apply_residual()
            elif not all(map(torch.equal, layer.__dict__["_applied"], (layer.lora_A0, layer.lora_B0))):
                raise RuntimeError(
                    f"CorDA layer {name!r}: its base weight holds the residual of another decomposition than the "
                    "A_0, B_0 it now holds (a checkpoint of another run was loaded into this model); load it into a "
                    "fresh model"
                )
        return
    if any(ready):
        raise RuntimeError(
            "some init='corda' layers were decomposed and others not (a partial checkpoint?); load a complete one"
        )
    loaded = [name for name, layer in layers if bool(layer.lora_B.any()) or bool(layer.lora_A.any())]
    if loaded:
        raise RuntimeError(
            f"CorDA layer {loaded[0]!r} holds trained A, B but not its initial A_0, B_0 (adapter files keep only A "
            "and B), so calibrating would overwrite them; load it from a training checkpoint, or save it with "
            "save_peft_adapter(..., convert_to_standard_lora=True) and load that"
        )
    options = lora_init.CordaConfig(**config.corda_config)  # type: ignore[arg-type]  # a dict: check_corda
    for name, layer in layers:
        if layer._weight().shape != (layer.lora_B.shape[0], layer.lora_A.shape[1]):
            raise TypeError(
                f"CorDA layer {name!r}: its base weight is sharded or not (out, in) here; CorDA decomposes whole "
                "weights (train it without a sharded strategy)"
            )
        if layer.r > min(layer.lora_B.shape[0], layer.lora_A.shape[1]):  # before anything is rewritten
            layer.decompose(torch.empty(0, 0))  # raises, naming r and the weight's shape
    covariances = collect_covariances(model, layers, batches, loss_fn, options)
    for name, layer in layers:
        layer.decompose(covariances[name])
        if options.verbose:
            _log.info("CorDA (%s): decomposed %s with r=%d", options.corda_method, name, layer.r)


def wrap(module: nn.Module, config: LoRAConfig) -> LoRALinear:
    """The wrapper for ``init="corda"`` (LoRA's variant keyed by ``corda_config``, set exactly then)."""
    return CordaLinear(module, config)


VARIANTS["corda_config"] = wrap
CALIBRATIONS["corda"] = calibrate
