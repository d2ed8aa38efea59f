"""Adapter modules: the objects that own a method's parameters and say which ones they are.

Everything generic (freezing, the trainable state dict, loading, merging, summaries) walks the
model for :class:`AdapterModule` instances and reads their ``adapter_names`` declaration. Nothing
is picked by a substring of a parameter name.

Several named adapters may share one base layer: each adapter's wrapper wraps the next, the last
one the base layer (a chain, added innermost so earlier adapters keep their state-dict keys). A
wrapper that is switched off (:meth:`AdapterModule.set_enabled`) passes its input straight to
what it wraps, so the chain computes the base layer plus the enabled adapters' updates. In a mixed
batch (:mod:`lightning_peft.api.adapters`) each wrapper updates only the rows of its own samples.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class AdapterModule(nn.Module):
    """A module that holds adapter state.

    Subclasses list in ``adapter_names`` the attributes (parameters, buffers or submodules, dotted
    paths allowed) that make up the adapter: those are trained, checkpointed and loaded; all other
    state in the module is frozen base weight.
    """

    adapter_names: ClassVar[tuple[str, ...]] = ()
    #: Buffers that only training uses, such as statistics a method updates step by step (AdaLoRA's
    #: importance scores): checkpoints keep them so that resuming is exact, adapter files leave them
    #: out, and loading never requires them.
    training_state_names: ClassVar[tuple[str, ...]] = ()
    #: The registered method this module belongs to (set by each method's subclass).
    method: ClassVar[str] = ""
    #: Whether the forward reads tensors of submodules it does not call (a ParameterDict of
    #: deltas). Strategies that gather a module's parameters only in that module's own forward
    #: (DeepSpeed ZeRO-3) must then gather every parameter inside this module for its whole
    #: forward and backward.
    gather_as_unit: ClassVar[bool] = False
    #: Local tensor names that Hugging Face peft spells differently (``{"lora_A": "lora_A.weight"}``).
    peft_names: ClassVar[dict[str, str]] = {}
    #: Whether another adapter may share the base layer this one wraps (see the module docstring).
    #: False where the adapter reads the base weight itself (DoRA's norm, a delta shadowing it).
    stackable: ClassVar[bool] = True
    #: Whether a mixed batch can run through this module, each row with its own adapter
    #: (:meth:`AdapterLayer.mixed_forward`).
    supports_mixed_batch: ClassVar[bool] = False
    #: Whether the tensors under this module beside the adapter's are frozen base weights that
    #: identify the base model; False for a module that keeps a trained copy of a base module.
    fingerprinted: ClassVar[bool] = True

    def __init__(self) -> None:
        super().__init__()
        #: The adapter this module belongs to (set by ``inject``).
        self.adapter_name = "default"
        self._enabled = True
        #: In a mixed batch: the indices of the batch rows this adapter serves; ``None`` otherwise.
        self.rows: Tensor | None = None
        #: In a mixed batch: how many samples it names.
        self.batch_size: int | None = None

    def mixed_rows(self, x: Tensor) -> Tensor:
        """This adapter's rows of a mixed batch, on ``x``'s device, once ``x`` is checked to be that batch."""
        assert self.rows is not None and self.batch_size is not None
        if x.shape[0] != self.batch_size:
            raise ValueError(
                f"mixed_batch names {self.batch_size} samples, but the {type(self).__name__} of adapter "
                f"{self.adapter_name!r} got a batch of {x.shape[0]} (input shape {tuple(x.shape)}); pass one adapter "
                "name per sample, batch first (for generate(), repeat each name num_return_sequences * num_beams "
                "times)."
            )
        return self.rows if self.rows.device == x.device else self.rows.to(x.device)

    @property
    def enabled(self) -> bool:
        """Whether the adapter takes part in the forward (``set_adapter`` and ``disable_adapter`` switch it)."""
        return self._enabled

    def set_enabled(self, enabled: bool) -> None:
        """Switch the adapter on or off; switched off, the module computes what the base model does."""
        self._enabled = enabled

    def adapter_state(self) -> Iterator[tuple[str, Tensor]]:
        """(local name, tensor) for every declared parameter and buffer."""
        return self._declared(self.adapter_names)

    def training_state(self) -> Iterator[tuple[str, Tensor]]:
        """(local name, tensor) for every buffer in ``training_state_names``."""
        return self._declared(self.training_state_names)

    def _declared(self, names: tuple[str, ...]) -> Iterator[tuple[str, Tensor]]:
        for attr in names:
            target = self.get_submodule(attr.rsplit(".", 1)[0]) if "." in attr else self
            leaf = attr.rsplit(".", 1)[-1]
            value = getattr(target, leaf)
            if isinstance(value, nn.Module):
                for name, tensor in value.named_parameters():
                    yield f"{attr}.{name}", tensor
                for name, tensor in value.named_buffers():
                    yield f"{attr}.{name}", tensor
            elif isinstance(value, Tensor):
                yield attr, value
            elif value is not None:
                raise TypeError(f"{type(self).__name__} declares {attr!r}, which is a {type(value)}")

    def peft_key(self, local: str) -> str:
        """The name peft's adapter files give the tensor this module calls ``local``."""
        return self.peft_names.get(local, local)

    def peft_refusal(self) -> str | None:
        """Why Hugging Face peft's format cannot hold this module's adapter, or ``None`` when it can.

        Both peft paths (saving, the peft folder beside checkpoints, loading before any copy) ask
        every module first and raise with the module's path and this reason. By default every
        module can go through peft's format."""
        return None

    def to_peft_tensor(self, local: str, tensor: Tensor) -> Tensor:
        """The tensor as peft stores it (laid out differently, or scaled: see :meth:`from_peft_tensor`)."""
        return tensor

    def check_peft_version(self, version: str | None) -> None:
        """Raise ``ValueError`` if a peft file written by peft ``version`` (its ``peft_version``; ``None``
        when the file does not say) cannot be read right by this module: where the layout
        converts for what particular peft versions compute. By default every version is read."""

    def from_peft_tensor(self, local: str, stored: Tensor) -> Tensor | None:
        """``stored`` (peft's tensor, of ``to_peft_tensor``'s shape) as this module holds it, where
        ``to_peft_tensor`` changes values rather than only their order; ``None`` (the default): the
        inverse is found from ``to_peft_tensor`` itself, as a rearrangement of the elements."""
        return None

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(local name, parameter) for every declared parameter: what the optimizer trains."""
        for name, tensor in self.adapter_state():
            if isinstance(tensor, nn.Parameter):
                yield name, tensor

    @property
    def mergeable(self) -> bool:
        """Whether this module can fold its adapter into the base weights."""
        return False

    @property
    def merged(self) -> bool:
        return False

    def merge(self) -> None:
        raise TypeError(
            f"{type(self).__name__} ({self.method or 'this method'}) has nothing to merge into base weights; "
            "it changes the model's inputs or adds modules rather than updating a weight."
        )

    def unmerge(self) -> None:
        self.merge()

    def on_unload(self) -> None:
        """Undo side effects on the model (hooks) before the module is removed by ``unload``."""


class AdapterLayer(AdapterModule):
    """Wraps one base layer (kept as ``self.base_layer``) and adds an adapter around it.

    The wrapper forwards attribute access it does not know to the base layer, so code that reads
    ``module.weight`` or ``module.in_features`` keeps working. Subclasses implement ``forward``,
    ``reset_adapter_parameters`` and, when the adapter folds into the weight,
    ``_merge``/``_unmerge``.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._merged = False

    @property
    def base(self) -> nn.Module:
        """The base layer itself, below any other adapter's wrapper that shares it."""
        module = self.base_layer
        while isinstance(module, AdapterLayer):
            module = module.base_layer
        return module

    @property
    def bypassed(self) -> bool:
        """Whether the forward is just the wrapped module's: merged (the update is in the weight),
        switched off, or in a mixed batch with no row of its own."""
        return self._merged or not self._enabled or (self.rows is not None and self.rows.numel() == 0)

    def mixed_forward(self, x: Tensor, update: Callable[[Tensor], Tensor]) -> Tensor:
        """The wrapped module's output on ``x`` (batch first), plus ``update(x[rows])`` on this adapter's rows.

        One gather and one scatter per layer, whatever the batch: every sample's output is what
        that sample alone would give (row by row equal to running it with its adapter).
        """
        rows = self.mixed_rows(x)
        result = self.base_layer(x)
        part = update(x.index_select(0, rows)).to(result.dtype)
        # In place: the wrapped layers (linear, embedding, conv) keep no output for their backward,
        # and autograd refuses, rather than miscomputes, if one ever did.
        return result.index_add_(0, rows, part)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":  # not set yet (during __init__) or deleted: no recursion
                raise
            return getattr(self._modules["base_layer"], name)

    def base_owner(self, names: Iterable[str]) -> nn.Module:
        """The module that holds the base layer's parameters ``names``: the base layer itself, or
        the module inside a wrapper that a strategy put around it (an FSDP1 unit).

        Its own forward is the one point where a strategy that shards the base layer has those
        parameters whole; an adapter that reads them does so from a hook on this module.
        """
        names = list(names)
        for module in self.base_layer.modules():
            if all(n in module._parameters for n in names):
                return module
        raise RuntimeError(f"{type(self).__name__}: no module in its base layer holds {names}")

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @staticmethod
    def adapter_factory(base_weight: Tensor) -> dict[str, Any]:
        """Device and dtype for new adapter tensors: the base weight's (float32 for quantized bases)."""
        dtype = base_weight.dtype if base_weight.is_floating_point() else torch.float32
        return {"device": base_weight.device, "dtype": dtype}

    def reset_parameters(self) -> None:
        """Initialize the adapter (not the base layer, which keeps its pretrained weights).

        Named ``reset_parameters`` so that strategies that build on the meta device and then
        materialize each module (FSDP, ``Fabric.init_module(empty_init=True)``) initialize it.
        """
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        raise NotImplementedError

    @property
    def mergeable(self) -> bool:
        return type(self)._merge is not AdapterLayer._merge

    @property
    def merged(self) -> bool:
        return self._merged

    def merge(self) -> None:
        """Fold the adapter into the base weight so the forward costs what the base layer costs."""
        if not self.mergeable:
            super().merge()
        if not self._merged:
            with torch.no_grad():
                self._merge()
            self._merged = True

    def unmerge(self) -> None:
        """Undo :meth:`merge`, restoring the base weight (to float rounding)."""
        if not self.mergeable:
            super().merge()
        if self._merged:
            with torch.no_grad():
                self._unmerge()
            self._merged = False

    def _merge(self) -> None:
        raise NotImplementedError

    def _unmerge(self) -> None:
        raise NotImplementedError

    def unwrap(self) -> nn.Module:
        """The base layer, with the adapter merged in if it was merged."""
        return self.base_layer


class TrainableModule(AdapterLayer):
    """A module trained in full and saved whole (``modules_to_save``), e.g. a new task head.

    It trains a copy (``trained``) and keeps the module it wraps as it was, as peft's
    ``ModulesToSaveWrapper`` does: switched off, the model is the base model exactly, and each
    named adapter that saves the same module has a copy of its own.

    With ``tied`` (an output layer tied to the input embedding, ``ensure_weight_tying``; see
    :mod:`lightning_peft.core.tying`) the copy's weight *is* the tied module's trained weight, one
    tensor: ``logits = h E'^T`` with ``E'`` the embedding's trained table. That tensor is declared
    once, by ``tied``; peft's files repeat it under this layer's name (:meth:`peft_copies`).
    """

    adapter_names = ("trained",)
    method = "modules_to_save"
    supports_mixed_batch = True
    fingerprinted = False  # the wrapped module is a new head (random at init), not what identifies the base

    def __init__(self, base_layer: nn.Module, tied: TrainableModule | None = None) -> None:
        super().__init__(base_layer)
        #: The trained copy whose weight this one shares, kept out of the module tree.
        self._tied = [tied] if tied is not None else []
        if tied is None:
            self.trained = copy.deepcopy(base_layer)
            return
        shared, own = tied.trained.weight, base_layer.weight
        if not isinstance(shared, Tensor) or not isinstance(own, Tensor) or shared.shape != own.shape:
            raise ValueError(
                f"a {type(base_layer).__name__} of weight {getattr(own, 'shape', own)} cannot share the trained "
                f"weight {getattr(shared, 'shape', shared)} of {type(tied.base_layer).__name__}"
            )
        # Copied with the tied tensor in place of its own weight: the one trained table, not a copy of it.
        self.trained = copy.deepcopy(base_layer, memo={id(own): shared})
        self.adapter_names = ()  # type: ignore[assignment,misc]  # per instance: the tensor is the tied module's

    def peft_copies(self) -> dict[str, tuple[AdapterModule, str]]:
        """A tied copy's weight, which peft stores again under this layer's name (the same values)."""
        return {"trained.weight": (self._tied[0], "trained.weight")} if self._tied else {}

    def peft_key(self, local: str) -> str:
        return local.removeprefix("trained.")  # peft files keep a saved module's own names

    def __getattr__(self, name: str) -> Any:
        # Attributes come from the copy that answers: the trained one while the adapter is on (as peft's).
        try:
            return nn.Module.__getattr__(self, name)
        except AttributeError:
            if name in ("base_layer", "trained") or "trained" not in self._modules:
                raise
            answering = self._modules["trained"] if self._enabled else self._modules["base_layer"]
            return getattr(answering, name)

    @property
    def weight(self) -> Tensor:
        return (self.trained if self._enabled else self.base_layer).weight

    @property
    def bias(self) -> Tensor | None:
        return getattr(self.trained if self._enabled else self.base_layer, "bias", None)

    @property
    def bypassed(self) -> bool:
        return not self._enabled or (self.rows is not None and self.rows.numel() == 0)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.bypassed:
            return self.base_layer(*args, **kwargs)
        if self.rows is None:
            return self.trained(*args, **kwargs)
        x, *rest = args
        rows = self.mixed_rows(x)
        result = self.base_layer(*args, **kwargs)
        part = self.trained(x.index_select(0, rows), *rest, **kwargs)
        if not isinstance(result, Tensor) or not isinstance(part, Tensor) or part.shape[1:] != result.shape[1:]:
            what = tuple(part.shape) if isinstance(part, Tensor) else type(part).__name__
            raise ValueError(
                f"adapter {self.adapter_name!r}'s copy of {type(self.base).__name__} returns {what} for its rows, "
                f"where the module it shares returns {tuple(result.shape) if isinstance(result, Tensor) else result}; "
                "a mixed batch needs saved modules of one output shape (e.g. classifier heads of one num_labels). "
                "Serve these adapters in separate batches."
            )
        return result.index_copy(0, rows, part.to(result.dtype))

    def reset_adapter_parameters(self) -> None:
        if self._tied:
            return  # the tensor is the tied module's, which resets it
        reset = getattr(self.trained, "reset_parameters", None)
        if callable(reset):
            reset()

    @property
    def mergeable(self) -> bool:
        return True  # unloading with merge=True keeps the trained copy in the module's place

    def _merge(self) -> None:
        pass

    def _unmerge(self) -> None:
        pass

    def unwrap(self) -> nn.Module:
        """The trained copy once merged, else the module as it was."""
        return self.trained if self._merged else self.base_layer
