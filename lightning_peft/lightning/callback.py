"""PEFTCallback: parameter-efficient fine-tuning for any LightningModule, as one Trainer callback.

    trainer = L.Trainer(callbacks=[PEFTCallback(method="lora", r=8)])

At setup it injects the method into the LightningModule (after ``configure_model`` when the
module builds its model there) and freezes everything else; the optimizers that
``configure_optimizers`` returns are restricted to the trainable parameters before any strategy
wraps them; checkpoints keep only the trainable state plus optimizer, scheduler, loop and RNG
state, and resuming from them is exact. Methods that declare training hooks (see
``lightning_peft.api.training``) get them run: calibration at train start, a regularization
penalty's gradient before each optimizer step, and per-step work after it. At the first optimizer
step of every fit (a resumed one too) it checks that every trainable tensor got a gradient
(``on_dead_params``): an adapter on a layer the forward never calls would otherwise never train.

With ``adapter_name`` it trains one named adapter beside others the module already holds (loaded in
``__init__`` or ``configure_model``, e.g. ``lp.load_adapter(self.model, path, adapter_name="task_a")``):
only that adapter trains, and checkpoints hold only its tensors::

    trainer = L.Trainer(callbacks=[PEFTCallback("lora", adapter_name="task_b", r=8)])
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_debug, rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from typing_extensions import override

import lightning_peft.api  # noqa: F401  (registers the built-in methods)
from lightning_peft import registry
from lightning_peft.api import adapters as api_adapters
from lightning_peft.api import inject as api_inject
from lightning_peft.api import training
from lightning_peft.core import shared_input, state
from lightning_peft.core.checkpointing import enable_gradient_checkpointing
from lightning_peft.core.config import AdapterConfig, check_choice
from lightning_peft.lightning import peft_dir, strategies

#: What PEFTCallback does when a trainable tensor got no gradient in the first optimizer step.
DeadParams = Literal["raise", "warn", "ignore"]
DEAD_PARAMS_CHOICES: tuple[DeadParams, ...] = ("raise", "warn", "ignore")


def _rng_state() -> dict[str, Any]:
    """Every RNG a training step may draw from (dropout, shuffling, augmentation)."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    rng["python_version"], rng["python_gauss"] = random.getstate()[0], random.getstate()[2]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return rng
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    rng["numpy"] = {"kind": kind, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    return rng


def _set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate((rng["python_version"], tuple(rng["python"]), rng["python_gauss"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if "numpy" in rng:
        import numpy as np

        n = rng["numpy"]
        np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _optimizers_in(result: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer in what ``configure_optimizers`` may return (one, lists, dicts, tuples of lists)."""
    if isinstance(result, torch.optim.Optimizer):
        return [result]
    if isinstance(result, dict):
        return [o for value in result.values() for o in _optimizers_in(value)]
    if isinstance(result, (list, tuple)):
        return [o for value in result for o in _optimizers_in(value)]
    return []


class PEFTCallback(Callback):
    """Freeze the LightningModule, inject a PEFT method, train and checkpoint only the adapter.

    Args:
        method: a registered method name (``"lora"``; see ``lightning_peft.methods()``) or a
            method config object such as ``LoRAConfig(r=16)``.
        verbose: print the trainable-parameter summary at setup.
        restore_rng: on resume, restore the RNG states saved with the checkpoint, so that dropout
            and shuffling continue as in an uninterrupted run.
        on_dead_params: what to do when a trainable tensor has no gradient (``.grad is None``) at
            the first optimizer step of a fit, after gradient accumulation: ``"raise"`` (default),
            ``"warn"`` and train on, or ``"ignore"``. Such a tensor never trains: its module is never
            called by the forward, or reaches the loss only through a detached path. A gradient of
            zeros is a gradient (LoRA's ``A`` gets one at init, since ``B = 0``) and passes. Not
            checked under FSDP1 and DeepSpeed, which keep gradients in flat buffers, not per tensor.
        gradient_checkpointing: recompute each layer's activations in backward instead of keeping them
            (transformers models; see :func:`lightning_peft.enable_gradient_checkpointing`, which also makes
            checkpointing train adapters under frozen input embeddings). About one more forward per step for
            activation memory that no longer grows with depth.
        checkpoint_blocks: with ``gradient_checkpointing``, the blocks to checkpoint in a module that is
            not a transformers model: names (a ``ModuleList``'s name checkpoints each of its children)
            or module classes, as ``lightning_peft.enable_gradient_checkpointing(blocks=...)`` takes them.
        adapter_name: the adapter to train (``"default"`` unless given). Other adapters the module
            holds stay frozen and out of the checkpoints; one it holds by this name, with the same
            method and options, is trained on (a second fit), otherwise it is added beside them.
        peft_dir: beside every checkpoint ``<stem>.ckpt`` (a DeepSpeed checkpoint folder too) also
            write ``<stem>.peft/``, the adapter in Hugging Face peft's format, which
            ``PeftModel.from_pretrained``, transformers' ``load_adapter`` and
            ``lightning_peft.load_peft_adapter`` read (global rank 0 writes it, atomically; it is
            removed with its checkpoint; see :mod:`lightning_peft.lightning.peft_dir`). An adapter
            that peft's format cannot hold (a method without one) is said once, as a warning, at
            train start, and then only the checkpoints are written.
        **options: the method's options when ``method`` is a name (``r=8, alpha=16, ...``).

    Raises:
        ValueError: for an unknown method, invalid options, ``on_dead_params`` or ``adapter_name`` (at
            construction), and at setup for targets that match nothing, an unsupported strategy, an
            adapter of this name with other options, or other adapters under a sharded strategy.
        RuntimeError: at the first optimizer step, for tensors without a gradient (``on_dead_params="raise"``).
    """

    def __init__(
        self,
        method: str | AdapterConfig = "lora",
        *,
        verbose: bool = True,
        restore_rng: bool = True,
        on_dead_params: DeadParams = "raise",
        gradient_checkpointing: bool = False,
        checkpoint_blocks: Sequence[str | type[torch.nn.Module]] | None = None,
        adapter_name: str = state.DEFAULT_ADAPTER,
        peft_dir: bool = True,
        **options: Any,
    ) -> None:
        self.method, self.config = registry.to_config(method, options)
        self.adapter_name = api_inject.check_adapter_name(adapter_name, "PEFTCallback.adapter_name")
        check_choice("PEFTCallback", "on_dead_params", on_dead_params, DEAD_PARAMS_CHOICES)
        self.verbose = verbose
        self.restore_rng = restore_rng
        self.on_dead_params: DeadParams = on_dead_params
        if not isinstance(gradient_checkpointing, bool):
            raise ValueError(
                f"PEFTCallback.gradient_checkpointing must be True or False; got {gradient_checkpointing!r}."
            )
        if checkpoint_blocks is not None and not gradient_checkpointing:
            raise ValueError(
                f"PEFTCallback.checkpoint_blocks={checkpoint_blocks!r} names blocks to checkpoint, but "
                "gradient_checkpointing is False; set gradient_checkpointing=True, or drop checkpoint_blocks."
            )
        self.gradient_checkpointing = gradient_checkpointing
        if not isinstance(peft_dir, bool):
            raise ValueError(f"PEFTCallback.peft_dir must be True or False; got {peft_dir!r}.")
        self.peft_dir = peft_dir
        self._peft_dir_refused: str | None = None  # why peft's format cannot hold this adapter, once known
        self.checkpoint_blocks = None if checkpoint_blocks is None else list(checkpoint_blocks)
        self._grads_checked: set[int] = set()  # ids of the optimizers whose first step was checked
        self._backward_ran = False  # a backward pass ran since the last optimizer step
        self._original_configure_model: Any = None
        self._stepped = 0  # trainer.global_step when the method's on_step last ran
        self._total_steps: int | None = None  # optimizer steps the fit will take, if known
        self._original_configure_optimizers: Any = None
        self._sharded = False  # the Trainer's strategy is one of the sharded PEFT strategies

    @property
    @override
    def state_key(self) -> str:
        if self.adapter_name == state.DEFAULT_ADAPTER:  # the key checkpoints of one adapter were written under
            return self._generate_state_key(method=self.method.name)
        return self._generate_state_key(method=self.method.name, adapter_name=self.adapter_name)

    # ------------------------------------------------------------------ injection

    def check_strategy(self, trainer: pl.Trainer) -> None:
        """Refuse strategies whose checkpointing or optimizer setup this callback does not handle, and
        sharded strategies the method does not support; and Lightning's bitsandbytes precision plugin."""
        strategies.check_supported(trainer.strategy, self.method)
        scope = getattr(self.config, "bias_scope", "none")
        if scope != "none" and isinstance(trainer.strategy, strategies.PEFTStrategy):
            # The biases sit in the frozen base's shards (FSDP units, ZeRO partitions), which the sharded
            # strategies gather, save and load as adapter modules' tensors only; never run that way yet.
            raise ValueError(
                f"{type(self.config).__name__}.bias={getattr(self.config, 'bias', scope)!r} trains base-model "
                f"biases, which {type(trainer.strategy).__name__} (sharding {trainer.strategy.sharding!r}) shards "
                "with the frozen weights; lightning_peft trains them on one device and with DDP only. Use "
                "strategy='ddp', or bias='none'."
            )
        for option in ("target_parameters", "trainable_token_indices"):  # LoRA's: never run sharded yet
            value = getattr(self.config, option, None)
            if value is not None and isinstance(trainer.strategy, strategies.PEFTStrategy):
                raise ValueError(
                    f"{type(self.config).__name__}.{option}={value!r} is trained on one device and with DDP only: "
                    f"its layers read base tensors outside their own module, which {type(trainer.strategy).__name__} "
                    f"(sharding {trainer.strategy.sharding!r}) has not been tested to gather. Use strategy='ddp', or "
                    f"leave {option} unset."
                )
        plugin = trainer.precision_plugin
        if type(plugin).__name__ == "BitsandbytesPrecision":  # by name: importing it needs bitsandbytes
            mode = getattr(plugin, "mode", None) or "the chosen mode"
            raise ValueError(
                f"PEFTCallback does not train under Lightning's BitsandbytesPrecision ({mode}): it quantizes every "
                "nn.Linear when the strategy sets up, after the adapter is added, so it would also quantize the heads "
                "the adapter trains (modules_to_save) and leave the 4-bit layers unprepared for k-bit training. "
                "Quantize the base instead: the task modules' quantization='nf4' | 'fp4' | 'int8' option, or "
                "lightning_peft.quantize(model, 'nf4') before training; and drop the precision plugin."
            )

    def inject(self, pl_module: pl.LightningModule) -> None:
        """Add adapter ``adapter_name`` to ``pl_module`` (beside the adapters it holds, in the module that
        holds them: see :func:`~lightning_peft.lightning.strategies.adapter_root`) unless this same
        adapter is already there, and make it the one that trains."""
        path, root = strategies.adapter_root(pl_module)
        others = [name for name in state.adapters(root) if name != self.adapter_name]
        owner = type(pl_module).__name__
        if self._sharded and (others or path):
            held = f"adapters {', '.join(map(repr, others))} beside {self.adapter_name!r}" if others else "adapters"
            raise ValueError(
                f"{owner}{f'.{path}' if path else ''} holds {held}, and the sharded PEFT strategies checkpoint the "
                "LightningModule's own single adapter only; train it on one device or with strategy='ddp'."
            )
        if path:
            outside = [key for key in pl_module.state_dict(keep_vars=True) if not key.startswith(f"{path}.")]
            if outside:  # frozen here, they would be missing from checkpoints the next fit resumes from
                raise ValueError(
                    f"{owner}.{path} holds adapters, but {owner} has state outside it ({', '.join(outside[:3])}); "
                    "load the adapters into the LightningModule itself (lightning_peft.load_adapter(self, path, "
                    "adapter_name=...))."
                )
        info = state.get_info(root, self.adapter_name)
        if info is not None:
            requested = api_inject.resolve(root, self.config)
            if info.method == self.method.name and requested in (info.config, info.injected):
                # A second stage (validate after fit), a second fit, or an adapter loaded to train on
                # (``injected``: these options, before a calibration such as EVA's reshaped the adapter).
                if state.active_adapters(root) != [self.adapter_name]:
                    api_adapters.set_adapter(root, self.adapter_name)
                return
            raise ValueError(
                f"{owner} already has a {info.method} adapter {info.name!r} ({info.config}); "
                f"this PEFTCallback would add {self.method.name} ({self.config}). Use one PEFTCallback per module, "
                "or another adapter_name."
            )
        if strategies.is_sharded(pl_module):
            raise ValueError(
                f"{type(pl_module).__name__}'s weights are already sharded (FSDP or ZeRO-3) when PEFTCallback injects "
                f"{self.method.name}: the adapter must be added before the model is wrapped. Build the model without "
                "wrapping it in configure_model and let the strategy shard it (strategy='peft_fsdp' or 'peft_fsdp2')."
            )
        api_inject.inject(root, self.config, adapter_name=self.adapter_name)
        if self._sharded:  # its layers may sit in different units, gathered one unit at a time
            shared_input.detach(root)
        if self.gradient_checkpointing:
            enable_gradient_checkpointing(pl_module, blocks=self.checkpoint_blocks)
        if self.verbose:
            rank_zero_info(api_inject.summary(root))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        others = [c for c in trainer.callbacks if isinstance(c, PEFTCallback) and c is not self]
        if others:
            raise ValueError(
                f"the Trainer has {len(others) + 1} PEFTCallbacks ({self.state_key}, "
                f"{', '.join(c.state_key for c in others)}); one trains one adapter per fit (each restricts the "
                "optimizer to its own adapter and checkpoints only it, so the others would not train). Train one "
                "adapter per fit and load the others beside it with lightning_peft.load_adapter(..., adapter_name=...)."
            )
        self.check_strategy(trainer)
        self._sharded = isinstance(trainer.strategy, strategies.PEFTStrategy)
        strategies.secure_checkpoints(trainer.strategy)  # before any checkpoint is read
        if self.peft_dir and stage == "fit":
            peft_dir.install(trainer.strategy, functools.partial(self._write_peft_dir, trainer))
        self._restrict_configure_optimizers(pl_module)
        if not is_overridden("configure_model", pl_module):
            self.inject(pl_module)
            return
        # The model is built in configure_model, which runs after setup and before the strategy
        # wraps the model or builds optimizers: inject right after it, inside the same contexts.
        original = pl_module.configure_model
        self._original_configure_model = original

        @functools.wraps(original)
        def configure_model() -> None:
            original()
            self.inject(pl_module)

        pl_module.configure_model = configure_model  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # peft_dir's wrappers stay: trainer.save_checkpoint after fit still runs this callback's
        # on_save_checkpoint, and its checkpoint gets its peft folder too (the next fit reinstalls them).
        if self._original_configure_model is not None:
            pl_module.__dict__.pop("configure_model", None)
            self._original_configure_model = None
        if self._original_configure_optimizers is not None:
            pl_module.__dict__.pop("configure_optimizers", None)
            self._original_configure_optimizers = None

    # ------------------------------------------------------------------ optimization

    @staticmethod
    def restrict_optimizer(optimizer: torch.optim.Optimizer) -> int:
        """Drop frozen parameters from every param group, keeping groups and their settings.

        Empty groups stay so that LR schedulers, which hold one value per group, still line up.
        Returns the number of parameters removed.
        """
        removed = 0
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if p.requires_grad]
            removed += len(group["params"]) - len(kept)
            group["params"] = kept
        for param in [p for p in optimizer.state if not p.requires_grad]:
            del optimizer.state[param]
        return removed

    def _restrict_configure_optimizers(self, pl_module: pl.LightningModule) -> None:
        """Restrict the optimizers where ``configure_optimizers`` returns them.

        That is before any strategy sees them: DeepSpeed builds its engine (and ZeRO its partitions)
        from the optimizer inside ``strategy.setup``, long before ``on_fit_start``.
        """
        if self._original_configure_optimizers is not None:
            return
        original = pl_module.configure_optimizers
        self._original_configure_optimizers = original

        @functools.wraps(original)
        def configure_optimizers() -> Any:
            result = original()
            for optimizer in _optimizers_in(result):
                self.restrict_optimizer(optimizer)
            return result

        pl_module.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state.assert_no_grad_leak(pl_module)
        summary = api_inject.summary_dict(strategies.adapter_root(pl_module)[1])
        for logger in trainer.loggers:
            logger.log_hyperparams({"peft": summary})

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Again, for modules that unfreeze something in their own on_fit_start (which runs after ours).
        state.assert_no_grad_leak(pl_module)
        self._stepped = trainer.global_step
        self._grads_checked.clear()  # each fit checks its first step, a resumed one too
        self._backward_ran = False
        total = trainer.estimated_stepping_batches
        self._total_steps = int(total) if math.isfinite(total) else None
        if self.peft_dir:
            self._check_peft_dir(pl_module)
        if self.method.needs_calibration(self.config):
            self.calibrate(trainer, pl_module)

    # ------------------------------------------------------------------ method training hooks
    # Methods declare optional hooks on their registry entry (lightning_peft.api.training runs
    # them); none is specific to a method here.

    @staticmethod
    def calibrate(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the method's calibration on the training dataloader, through ``training_step``.

        Under ``isolate_rng``, so drawing these batches leaves shuffling and dropout of the run
        itself as they would be without it, and with ``self.log`` muted, so that they do not count
        toward the run's metrics. A calibration may give the adapter new tensors (EVA's rank
        redistribution resizes or removes layers): the optimizers, built before train start, then
        hold the new ones in place of the old (see :meth:`swap_parameters`).
        """

        _, root = strategies.adapter_root(pl_module)
        before = dict(state.adapter_parameters(root))

        def loss_of(training_step: Callable[..., Any], batch: Any) -> torch.Tensor:
            with trainer.precision_plugin.train_step_context():
                output = training_step(trainer.strategy.batch_to_device(batch), 0)
            loss = output["loss"] if isinstance(output, dict) else output
            if not isinstance(loss, torch.Tensor):
                raise TypeError(
                    f"{type(pl_module).__name__}.training_step must return the loss (a tensor or a dict with "
                    f"'loss') for {state.require_info(root).method} to calibrate on it; got {type(output)}."
                )
            return loss

        def mute(*args: Any, **kwargs: Any) -> None:
            return None

        pl_module.__dict__.update(log=mute, log_dict=mute)
        try:
            # The strategy says how to call training_step outside the loop (through its wrapper or not).
            with isolate_rng(), strategies.calibration(trainer.strategy) as training_step:
                training.calibrate(root, trainer.train_dataloader, functools.partial(loss_of, training_step))
        finally:
            for name in ("log", "log_dict"):
                pl_module.__dict__.pop(name, None)
        after = dict(state.adapter_parameters(root))
        replaced = {id(p): after.get(name) for name, p in before.items() if after.get(name) is not p}
        if replaced:
            for optimizer in trainer.optimizers:
                PEFTCallback.swap_parameters(optimizer, replaced)

    @staticmethod
    def swap_parameters(optimizer: torch.optim.Optimizer, replaced: dict[int, torch.nn.Parameter | None]) -> int:
        """Put new parameter objects in place of old ones in every param group (``None``: drop the old one).

        The groups and their options (learning rate, weight decay, what LR schedulers read) stay as
        they are. Only a parameter without optimizer state can be swapped (its moments would have
        the old shape): at train start, before the first step, there is none. Returns the number swapped.

        Raises:
            RuntimeError: when the optimizer holds state for a parameter to swap (nothing is changed).
        """
        held = [p for p in optimizer.state if id(p) in replaced and optimizer.state[p]]
        if held:
            raise RuntimeError(
                f"PEFTCallback: the calibration gave {len(replaced)} adapter tensors new shapes, but "
                f"{type(optimizer).__name__} already holds state for {len(held)} of the old ones (it stepped "
                "before train start?), which cannot be carried over to the new shapes; build the optimizer "
                "without stepping it in configure_optimizers, or calibrate (lightning_peft.calibrate) before "
                "building it."
            )
        swapped = 0
        for group in optimizer.param_groups:
            params = []
            for p in group["params"]:
                if id(p) not in replaced:
                    params.append(p)
                    continue
                swapped += 1
                new = replaced[id(p)]
                if new is not None:
                    params.append(new)
            group["params"] = params
        for p in [p for p in optimizer.state if id(p) in replaced]:
            del optimizer.state[p]
        return swapped

    # ------------------------------------------------------------------ gradient flow

    @staticmethod
    def without_grad(module: torch.nn.Module, params: Iterable[torch.Tensor]) -> dict[str, list[str]]:
        """The trainable ``params`` whose ``.grad`` is None, grouped by the module they belong to.

        Returns ``{"<module path> (<class>)": [tensor names within it]}``; the module is the adapter
        module holding the tensor (``model.layers.1.mlp.up_proj (LoRALinear)``), else its parent.
        """
        names = {id(p): n for n, p in module.named_parameters(remove_duplicate=False)}
        owners: list[tuple[str, torch.nn.Module]] = sorted(state.adapter_modules(module), key=lambda i: -len(i[0]))
        found: dict[str, list[str]] = {}
        for param in params:
            if not param.requires_grad or param.grad is not None or id(param) not in names:
                continue
            name = names[id(param)]
            found_owner = next(((n, m) for n, m in owners if n and name.startswith(f"{n}.")), None)
            if found_owner is None:
                parent = name.rpartition(".")[0]
                found_owner = (parent, module.get_submodule(parent) if parent else module)
            path, holder = found_owner
            found.setdefault(f"{path or '<root>'} ({type(holder).__name__})", []).append(
                name[len(path) + 1 :] if path else name
            )
        return found

    def check_gradients(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        """Raise or warn (``on_dead_params``) for the optimizer's trainable tensors without a gradient."""
        strategy = trainer.strategy
        if isinstance(strategy, strategies.PEFTStrategy) and strategy.sharding != "fsdp2":
            rank_zero_debug(
                f"PEFTCallback: gradient-flow check skipped under {type(strategy).__name__} ({strategy.sharding}), "
                "which keeps gradients in flat or partitioned buffers rather than in each tensor's .grad."
            )
            return
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        dead = self.without_grad(pl_module, params)
        if not dead:
            return
        count = sum(len(v) for v in dead.values())
        shown = [f"  {where}: {', '.join(tensors)}" for where, tensors in list(dead.items())[:10]]
        if len(dead) > 10:
            shown.append(f"  ... and {len(dead) - 10} more modules")
        message = (
            f"PEFTCallback: {count} of the {len(params)} trainable tensors of {self.method.name} got no gradient "
            "in the first optimizer step, so they never train:\n" + "\n".join(shown) + "\n"
            "A tensor gets no gradient when the forward never calls its module (a targeted layer the model does "
            "not use, or one skipped on this batch, such as an MoE expert no token was routed to), when the "
            "module's output reaches the loss only through a detached path (.detach(), torch.no_grad(), .item()), "
            "or when reentrant activation checkpointing wraps it and no input of the checkpointed block requires "
            "grad (frozen embeddings: call enable_input_require_grads() on the model, or use use_reentrant=False). "
            "Narrow target_modules, or add these modules to exclude_modules, so that the adapter sits on layers the "
            "forward uses, or fix the detached path. If the module is skipped only on some batches, pass "
            "PEFTCallback(on_dead_params='warn') to train on."
        )
        if self.on_dead_params == "raise":
            raise RuntimeError(message)
        rank_zero_warn(message)

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._backward_ran = True

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Once per optimizer step, after its accumulation window's backward passes and before the
        # step and zero_grad. A step without a backward (training_step returned None) is not judged.
        if self.on_dead_params != "ignore" and self._backward_ran and id(optimizer) not in self._grads_checked:
            self._grads_checked.add(id(optimizer))
            self.check_gradients(trainer, pl_module, optimizer)
        self._backward_ran = False
        # Gradients are accumulated and unscaled here, and not yet clipped: adding the penalty's
        # gradient equals having added the penalty to the loss. The strategy puts them, whole, in
        # .grad (sharded strategies hold shards, DeepSpeed its own buffers) and keeps them for an
        # on_step that reads them.
        reads = self.method.on_step is not None and self.method.on_step_uses_adapter
        if self.method.regularization is None and not reads:
            return
        with strategies.adapter_gradients(trainer.strategy, keep=reads):
            if self.method.regularization is not None:
                training.add_regularization_grad(strategies.adapter_root(pl_module)[1])

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the optimizer step (if this batch ended an accumulation window) and before the next
        # batch's zero_grad; the model is not in a forward pass, so hooks may edit tensors in place.
        if self.method.on_step is None or trainer.global_step == self._stepped:
            return
        self._stepped = trainer.global_step
        uses = self.method.on_step_uses_adapter
        with strategies.stepped_adapter(trainer.strategy) if uses else contextlib.nullcontext():
            training.on_step(strategies.adapter_root(pl_module)[1], trainer.global_step, self._total_steps)

    # ------------------------------------------------------------------ checkpointing

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if not isinstance(trainer.strategy, strategies.PEFTStrategy):  # those collected the adapter themselves
            checkpoint["state_dict"] = self.adapter_state_dict(pl_module)

    def _check_peft_dir(self, pl_module: pl.LightningModule) -> None:
        """Find out, before the first checkpoint, whether peft's format holds this adapter; warn once if not."""
        from lightning_peft.interop import peft_format

        try:
            root = strategies.adapter_root(pl_module)[1]
            peft_format.check_peft_adapter(root, self.adapter_name, total_step=self._total_steps)
            if self._sharded and self.method.kind == "input":
                raise ValueError(f"a {self.method.name} adapter's peft file is not written under a sharded strategy")
        except ValueError as error:
            if self._peft_dir_refused is None:
                rank_zero_warn(
                    f"PEFTCallback(peft_dir=True) writes no peft adapter folder beside the checkpoints: {error} "
                    "Pass peft_dir=False to silence this."
                )
            self._peft_dir_refused = str(error)
        else:
            self._peft_dir_refused = None

    def _write_peft_dir(self, trainer: pl.Trainer, checkpoint: Path) -> None:
        """After a checkpoint is written: its peft folder beside it (every rank calls; rank 0 writes)."""
        if self._peft_dir_refused is None and trainer.lightning_module is not None:
            peft_dir.write(trainer, checkpoint, self.adapter_name, self._total_steps)

    def adapter_state_dict(self, pl_module: pl.LightningModule) -> OrderedDict[str, torch.Tensor]:
        """Adapter ``adapter_name``'s state only, keyed like ``pl_module.state_dict()``, with its record.

        Where the adapters sit in a submodule (``self.model``), the record is also written at the
        root with the base path seen from ``pl_module``, so ``lightning_peft.load_adapter`` reads the
        checkpoint as it reads any other.
        """
        path, root = strategies.adapter_root(pl_module)
        sd = state.trainable_state_dict(root, adapter_name=self.adapter_name)
        if not path:
            return sd
        moved: OrderedDict[str, torch.Tensor] = OrderedDict((f"{path}.{key}", value) for key, value in sd.items())
        metadata = {f"{path}.{key}" if key else path: entry for key, entry in sd._metadata.items()}  # type: ignore[attr-defined]
        record = dict(state.read_metadata(sd))
        record["base_path"] = f"{path}.{record['base_path']}" if record["base_path"] else path
        metadata[""] = {"version": pl_module._version, state.METADATA_KEY: record}
        moved._metadata = metadata  # type: ignore[attr-defined]
        return moved

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method.name,
            "adapter_name": self.adapter_name,
            "config": self.config.to_dict(),
            "rng": _rng_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Method, options and base model were already checked when the model's weights loaded
        # (the state dict carries its own record); here only the RNG position remains. It is set
        # now, before the fit loop creates its first data iterator (which draws a seed), as an
        # uninterrupted run would be at that point; the sanity check in between runs under
        # Lightning's isolate_rng.
        if self.restore_rng and "rng" in state_dict:
            _set_rng_state(state_dict["rng"])
