"""The registry: the single list of PEFT methods.

Each file in ``lightning_peft/methods`` ends with one :func:`register` call. The CLI's choices,
the shipped configs, the docs table and the test grids are all generated from this list, so a
method exists exactly when it is registered here.

The registry sits below the methods and never imports them: importing ``lightning_peft.methods``
registers the built-ins, and every floor above (``lightning_peft.api``, the Lightning layer, the
CLI) does so before it reads the list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lightning_peft.core.config import ALL_SHARDINGS, Sharding

if TYPE_CHECKING:
    from torch import Tensor, nn

    from lightning_peft.core.config import AdapterConfig

MethodKind = Literal["layer", "input"]


#: Adds the method to ``model`` in place, with an already resolved config; returns the names of
#: the modules it wrapped or added.
ApplyFn = Callable[["nn.Module", Any], list[str]]
#: Returns a copy of the config with architecture-dependent defaults filled in (never mutates).
ResolveFn = Callable[["nn.Module", Any], Any]

# Optional training hooks, for methods that do more than let the optimizer update their tensors.
# Each gets the model the method was injected into and its resolved config; a training loop runs
# them through lightning_peft.api.training (PEFTCallback does it for Lightning).

#: After each optimizer step, before the gradients are cleared: ``(model, config, step, total_steps)``,
#: ``step`` counting optimizer steps from 1, ``total_steps`` the planned number (``None`` if unknown).
StepFn = Callable[["nn.Module", Any, int, "int | None"], None]
#: A penalty joining the training loss (``loss + penalty``), or ``None`` when there is none.
RegularizationFn = Callable[["nn.Module", Any], "Tensor | None"]
#: Once before training: ``(model, config, batches, loss_fn)`` with ``loss_fn(batch) -> loss``.
#: Called again on resume, so it must leave a model whose choices were restored alone.
CalibrateFn = Callable[["nn.Module", Any, Iterable[Any], Callable[[Any], "Tensor"]], None]


def _no_defaults(model: nn.Module, config: Any) -> Any:
    return config


@dataclass(frozen=True)
class PeftFormat:
    """How a method's options map to Hugging Face peft's ``adapter_config.json`` (see ``lightning_peft.interop``).

    Tensor names are declared by the adapter layers themselves (``AdapterModule.peft_names``).

    Args:
        peft_type: peft's name for the method (``"LORA"``).
        to_peft: our resolved config -> peft's config fields (without ``peft_type``).
        from_peft: peft's config fields -> our config; raises ``ValueError`` naming any field whose
            value lightning_peft does not implement, rather than dropping it.
    """

    peft_type: str
    to_peft: Callable[[Any], dict[str, Any]]
    from_peft: Callable[[dict[str, Any]], Any]


def check_peft_defaults(method: str, options: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Refuse peft options that lightning_peft's ``method`` does not implement (non-default values).

    Raises:
        ValueError: naming the field, the value in the peft config, and the value supported.
    """
    for option, default in defaults.items():
        value = options.get(option)
        if value in (None, {}, []) or value == default:
            continue
        raise ValueError(
            f"peft {options.get('peft_type', '')} adapter_config.json has {option}={value!r}, which lightning_peft's "
            f"{method} does not implement (supported: {option}={default!r})."
        )


@dataclass(frozen=True)
class Method:
    """One registered PEFT method.

    Args:
        name: what users type (``method="lora"``).
        config_cls: its options dataclass.
        kind: ``"layer"`` methods wrap existing layers (LoRA, (IA)^3, adapters); ``"input"``
            methods act on the model's inputs or attention cache (prompt and prefix tuning).
        apply: adds the method to a model in place (see :data:`ApplyFn`).
        resolve: fills in per-architecture defaults (see :data:`ResolveFn`).
        on_step: per-step work after the optimizer step (see :data:`StepFn`), e.g. AdaLoRA's budget.
        on_step_uses_adapter: whether ``on_step`` reads the adapter's gradients or writes its
            tensors (AdaLoRA); a sharding strategy then makes them whole for it, each step.
        regularization: a penalty added to the loss (see :data:`RegularizationFn`).
        calibrate: a pass over a few training batches before training (see :data:`CalibrateFn`),
            e.g. to pick the entries a sparse method trains.
        calibrates: which configs ``calibrate`` is for (``config -> bool``); ``None``: every one.
            A method whose calibration is an option (LoRA's data-driven inits) so leaves the
            training batches untouched for its other configs: no batch is drawn for them.
        peft: the mapping to Hugging Face peft's adapter format, where lightning_peft implements it.
        peft_type: peft's name (``PeftType``) for the same method, where peft has it, set also while
            ``peft`` is not implemented (errors name it); taken from ``peft`` when that is set.
        sharding: the sharded layouts (:data:`Sharding`) the method trains correctly under, each
            tested on two ranks; PEFTCallback refuses a strategy whose layout is not listed.
        summary: one line for ``--help`` and the README's table.
        paper: the reference (authors, year, title).
    """

    name: str
    config_cls: type[AdapterConfig]
    kind: MethodKind
    apply: ApplyFn
    summary: str
    paper: str = ""
    resolve: ResolveFn = field(default=_no_defaults)
    on_step: StepFn | None = None
    on_step_uses_adapter: bool = False
    regularization: RegularizationFn | None = None
    calibrate: CalibrateFn | None = None
    calibrates: Callable[[Any], bool] | None = None
    peft: PeftFormat | None = None
    peft_type: str | None = None
    sharding: frozenset[Sharding] = ALL_SHARDINGS

    def __post_init__(self) -> None:
        if self.peft is None:
            return
        if self.peft_type is None:
            object.__setattr__(self, "peft_type", self.peft.peft_type)  # frozen: set once, here
        elif self.peft_type != self.peft.peft_type:
            raise ValueError(
                f"Method {self.name!r} has peft_type={self.peft_type!r} but its PeftFormat has "
                f"peft_type={self.peft.peft_type!r}; leave Method.peft_type unset (None) or make the two agree."
            )

    def needs_calibration(self, config: Any) -> bool:
        """Whether ``calibrate`` runs for ``config`` (see :attr:`calibrates`)."""
        return self.calibrate is not None and (self.calibrates is None or self.calibrates(config))

    def make_config(self, **options: Any) -> AdapterConfig:
        """The method's config from keyword options, with a clear error for unknown ones."""
        return self.config_cls.from_dict(options)


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (each method file calls this once, at import)."""
    known = _METHODS.get(method.name)
    if known is not None and known.config_cls is not method.config_cls:
        raise ValueError(f"a method named {method.name!r} is already registered ({known.config_cls.__name__})")
    for other in _METHODS.values():
        if other.config_cls is method.config_cls and other.name != method.name:
            raise ValueError(f"{method.config_cls.__name__} is already the config of method {other.name!r}")
    _METHODS[method.name] = method
    return method


def _registered() -> dict[str, Method]:
    """The registered methods; an empty registry is a missing import, never an empty list."""
    if not _METHODS:
        raise RuntimeError(
            "no PEFT method is registered yet: import lightning_peft.methods (or lightning_peft.api, which "
            "does) before reading the registry."
        )
    return _METHODS


def methods() -> list[str]:
    """Names of every registered method, in registration order."""
    return list(_registered())


def all_methods() -> list[Method]:
    """Every registered :class:`Method`."""
    return list(_registered().values())


def get(name: str) -> Method:
    """The method registered as ``name``.

    Raises:
        ValueError: for an unknown name, listing the registered ones.
    """
    if not isinstance(name, str) or name not in _registered():
        raise ValueError(f"method must be one of {', '.join(map(repr, _METHODS))}; got {name!r}.")
    return _METHODS[name]


def for_config(config: AdapterConfig) -> Method:
    """The method whose config class ``config`` is."""
    for method in _registered().values():
        if type(config) is method.config_cls:
            return method
    raise TypeError(
        f"{type(config).__name__} is not the config of a registered method; "
        f"registered: {', '.join(f'{m.name} ({m.config_cls.__name__})' for m in _METHODS.values())}."
    )


def to_config(method: str | AdapterConfig, options: dict[str, Any]) -> tuple[Method, AdapterConfig]:
    """Normalize ``inject``-style arguments (a name plus options, or a config) to (method, config)."""
    if isinstance(method, str):
        entry = get(method)
        return entry, entry.make_config(**options)
    entry = for_config(method)
    if options:
        raise TypeError(
            f"pass options either in the {type(method).__name__} or as keywords, not both "
            f"(got keywords {sorted(options)})."
        )
    return entry, method
