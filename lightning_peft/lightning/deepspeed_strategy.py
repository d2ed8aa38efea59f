"""``PEFTDeepSpeedStrategy``: DeepSpeed ZeRO-1/2/3 with trainable-only checkpoints, complete
adapter files, and the adapter made whole for the methods' training hooks.

DeepSpeed's own checkpoint engine unpickles its files (its torch.load turns weights-only loading off); this
strategy gives the engine lightning_peft's loader instead (plain tensors plus the few DeepSpeed
data classes its files hold) and atomic saving, and checks the adapter files of a checkpoint
folder before the engine loads anything from it."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor, nn
from typing_extensions import override

from lightning_peft.api import io
from lightning_peft.core import files, state
from lightning_peft.lightning.base import PEFTStrategy, secure

if TYPE_CHECKING:
    from lightning_peft.core.config import Sharding


class PEFTDeepSpeedStrategy(PEFTStrategy, DeepSpeedStrategy):
    """DeepSpeed ZeRO with trainable-only checkpoints and complete adapter files.

    Takes every argument of Lightning's ``DeepSpeedStrategy``; ``exclude_frozen_parameters``
    defaults to ``True``. Each checkpoint folder also holds ``adapter_config.json`` and
    ``adapter_model.safetensors`` (gathered under ZeRO-3, adapter tensors only), so
    ``lightning_peft.load_adapter(model, folder)`` reads it directly.

    Under ZeRO-3 the model is not built inside ``deepspeed.zero.Init``: the adapter's shapes come
    from the base layers, so they must be whole when it is injected; the engine partitions
    everything when it starts.
    """

    strategy_name = "peft_deepspeed"

    @property
    def sharding(self) -> Sharding:
        stage = int((self.config or {}).get("zero_optimization", {}).get("stage", 0))
        if stage not in (1, 2, 3):
            raise ValueError(f"PEFTDeepSpeedStrategy: ZeRO stage {stage} is not supported; valid: 1, 2 or 3.")
        return f"zero{stage}"  # type: ignore[return-value]

    def __init__(self, *args: Any, exclude_frozen_parameters: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, exclude_frozen_parameters=exclude_frozen_parameters, **kwargs)
        self._step_grads: dict[nn.Parameter, Tensor] = {}  # see adapter_gradients(keep=True)
        secure(self)  # for load_full_weights, which reads one file through the checkpoint IO

    @contextlib.contextmanager
    @override
    def model_sharded_context(self) -> Generator[None, None, None]:
        yield

    @override
    def init_deepspeed(self) -> None:
        super().init_deepspeed()
        if self.zero_stage_3:
            self.gather_units()
        self.secure_engine()

    def secure_engine(self) -> None:
        """Have the DeepSpeed engine read checkpoints with lightning_peft's loader and write them
        atomically (:class:`PlainTensorEngine`); engines other than DeepSpeed's default are left alone."""
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

        engine = self.deepspeed_engine
        if type(engine.checkpoint_engine) is TorchCheckpointEngine:
            engine.checkpoint_engine = PlainTensorEngine(engine.checkpoint_engine)

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Check the folder's adapter files (record, every tensor finite) before the engine loads a thing."""
        assert self.lightning_module is not None
        folder = Path(str(self.broadcast(checkpoint_path)))
        if (folder / io.CONFIG_NAME).is_file():
            record, tensors = io.read_adapter(folder)
            state.check_record(state.require_info(self.lightning_module), record, str(folder))
            state.check_finite(tensors, str(folder))
        return super().load_checkpoint(checkpoint_path, weights_only)

    def gather_units(self) -> None:
        """Have ZeRO-3 gather, for each adapter module that declares ``gather_as_unit``, every
        parameter inside it for its forward and backward.

        ZeRO-3 gathers a module's own parameters in that module's forward (and again in its
        backward); a tensor of a submodule that is never called (a ParameterDict) would otherwise
        be an empty shard. (An adapter that reads its base layer's weights does so from a hook on
        the base layer, where they are gathered: see ``AdapterLayer.base_owner``.)
        Registering them as the module's external parameters keeps ZeRO-3's gradient hooks per
        parameter, as for every other module.
        """
        import deepspeed

        assert self.lightning_module is not None
        for _, module in state.adapter_modules(self.lightning_module):
            if module.gather_as_unit:
                own = {id(p) for p in module.parameters(recurse=False)}
                for param in module.parameters():
                    if id(param) not in own:
                        deepspeed.zero.register_external_parameter(module, param)

    @contextlib.contextmanager
    @override
    def calibration(self) -> Generator[Callable[..., Any], None, None]:
        assert self.model is not None and self.lightning_module is not None
        try:
            yield self.lightning_module.training_step
        finally:
            if self.zero_stage_3:
                # Modules whose inputs need no gradient keep their weights gathered after a backward
                # pass that the engine did not run: partition them again.
                self.model.empty_partition_cache()

    def _gathered(self) -> contextlib.AbstractContextManager[Any]:
        assert self.lightning_module is not None
        if not self.zero_stage_3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.adapter_params(), modifier_rank=None)

    def _trainable(self) -> list[nn.Parameter]:
        return [p for p in self.adapter_params() if p.requires_grad]

    @contextlib.contextmanager
    @override
    def adapter_gradients(self, keep: bool = False) -> Generator[None, None, None]:
        """Between backward and the engine's step: each adapter parameter whole (gathered under
        ZeRO-3) with its full, reduced gradient in ``.grad``; on exit ``.grad`` goes back into the
        engine's gradient partitions (which is all the engine steps with) and is cleared again.

        Args:
            keep: also keep a copy of the final gradients for :meth:`stepped_adapter`, since the
                engine's step frees its own.
        """
        from deepspeed.utils import safe_get_full_grad

        if self.config.get("gradient_accumulation_steps", 1) > 1:
            raise ValueError(
                "PEFTDeepSpeedStrategy cannot run a method's training hooks (a penalty, per-step work) with "
                f"accumulate_grad_batches={self.config['gradient_accumulation_steps']}: Lightning hands accumulation "
                "to the DeepSpeed engine and runs the optimizer-step hooks on every micro-batch, before the "
                "gradients are complete. Use accumulate_grad_batches=1 (and a larger batch size)."
            )
        params = self._trainable()
        with self._gathered():
            # (param, full gradient in the engine's dtype or None where the engine keeps it in .grad
            # itself, what .grad starts as). Collectives under some stages: every rank fetches every
            # parameter's gradient, in the same order.
            exposed: list[tuple[nn.Parameter, Tensor | None, Tensor | None]] = []
            for param in params:
                if param.grad is not None:  # already in .grad: edits reach the engine in place
                    exposed.append((param, None, None))
                    continue
                full = safe_get_full_grad(param)
                if full is not None:
                    param.grad = full if full.dtype == param.dtype else full.to(param.dtype)
                    exposed.append((param, full, param.grad.clone() if param.grad is not full else full))
            try:
                yield
            finally:
                for param, full, start in exposed:
                    grad = param.grad
                    if keep and grad is not None:
                        self._step_grads[param] = grad.detach().clone()
                    if full is None or grad is None:
                        continue
                    param.grad = None  # safe_set_full_grad writes into .grad when there is one
                    # Only the change made here is rounded to the parameter's dtype, not the gradient.
                    _write_full(param, grad if start is full else full + (grad - start).to(full.dtype), grad=True)

    @contextlib.contextmanager
    @override
    def stepped_adapter(self) -> Generator[None, None, None]:
        """After the engine's step: each adapter parameter whole, with the gradients
        :meth:`adapter_gradients` kept in ``.grad``; entries changed inside are written into the
        engine's master weights too (else its next step would restore them from there)."""
        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        params = self._trainable()
        grads, self._step_grads = self._step_grads, {}
        gathered = deepspeed.zero.GatheredParameters(params, modifier_rank=0) if self.zero_stage_3 else None
        with gathered or contextlib.nullcontext(), torch.no_grad():
            before = [param.detach().clone() for param in params]
            for param in params:
                param.grad = grads.get(param)
            try:
                yield
            finally:
                for param, old in zip(params, before, strict=True):
                    param.grad = None
                    master = safe_get_full_fp32_param(param)  # a collective: every rank, every parameter
                    if master is not None:
                        changed = param.detach() != old
                        _write_full(param, torch.where(changed, param.detach().to(master.dtype), master), grad=False)

    @override
    def adapter_state_dict(self) -> OrderedDict[str, Tensor]:
        assert self.lightning_module is not None
        with self._gathered():
            sd = state.trainable_state_dict(self.lightning_module)
            for key in sd:
                sd[key] = sd[key].detach().to("cpu", copy=True)
        return sd

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return {}  # the engine writes the module's (trainable) state itself; see save_checkpoint

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        assert self.lightning_module is not None
        adapter = self.adapter_state_dict()  # every rank: the gather is a collective
        folder = self.broadcast(filepath)
        super().save_checkpoint(checkpoint, folder, storage_options)
        if self.is_global_zero:
            io.write_adapter(state.require_info(self.lightning_module), adapter, folder)
        self.barrier()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for stage in (2, 3):
            strategy_registry.register(
                f"peft_deepspeed_stage_{stage}",
                cls,
                description=f"DeepSpeed ZeRO stage {stage} with trainable-only checkpoints",
                stage=stage,
            )


def deepspeed_data_classes() -> list[type]:
    """The data classes DeepSpeed's checkpoint files hold besides tensors (loss scaler, ZeRO stage,
    fragment addresses): plain records, safe to allow for a ``weights_only`` load."""
    import importlib

    found = []
    for module, name in (
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        with contextlib.suppress(ImportError, AttributeError):  # versions that lack one never write it
            found.append(getattr(importlib.import_module(module), name))
    return found


class PlainTensorEngine:
    """DeepSpeed's ``TorchCheckpointEngine`` with ``load`` through :func:`lightning_peft.core.files.load_torch`
    (``weights_only=True``, :func:`deepspeed_data_classes` allowed) and ``save`` through
    :func:`lightning_peft.core.files.save_torch` (atomic); everything else is the wrapped engine's."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def __getattr__(self, name: str) -> Any:
        if name == "engine":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.engine, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        return files.load_torch(path, map_location=map_location, allow=deepspeed_data_classes())

    def save(self, state_dict: Any, path: str) -> None:
        files.save_torch(state_dict, path)


def _write_full(param: nn.Parameter, value: Tensor, grad: bool) -> None:
    """Write a whole gradient (``grad``) or master weight into DeepSpeed's partitions of ``param``.

    DeepSpeed's ``safe_set_full_*`` slice a ZeRO-3 rank's part out of the value unpadded, which
    fails where the size does not divide by the ranks: there each rank writes its own padded part.
    """
    from deepspeed.utils import (
        safe_set_full_fp32_param,
        safe_set_full_grad,
        safe_set_local_fp32_param,
        safe_set_local_grad,
    )

    if not hasattr(param, "ds_id"):
        (safe_set_full_grad if grad else safe_set_full_fp32_param)(param, value)
        return
    import deepspeed.comm as dist

    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    flat = value.flatten()
    local = torch.nn.functional.pad(flat, (0, max(0, start + size - flat.numel())))[start : start + size]
    (safe_set_local_grad if grad else safe_set_local_fp32_param)(param, local)
