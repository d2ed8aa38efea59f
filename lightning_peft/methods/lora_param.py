"""LoRA on bare ``nn.Parameter`` tensors (``LoRAConfig.target_parameters``), as peft's ``ParamWrapper`` has it.

Mixture-of-experts layers in transformers keep their experts as one 3-D tensor per projection
(Mixtral's ``experts.gate_up_proj`` is ``(E, out, in)``, GPT-OSS's ``(E, in, out)``) and use it in
their own ``forward``: there is no ``nn.Linear`` to wrap. Here the module that holds the tensor is
wrapped, and for the duration of its forward each targeted tensor ``W`` reads as::

    W' = W + s * Delta,   s = alpha / r (alpha / sqrt(r) with rslora)

2-D ``W`` (out, in): ``Delta = B A`` with ``A: (r, in)``, ``B: (out, r)``, as LoRA on a linear layer.
3-D ``W`` (E, d1, d2): one rank-r update per expert, stored as peft stores it::

    A: (E r, in)  rows e*r .. e*r + r - 1 are expert e's A_e (blocked)
    B: (out, r E) column j*E + e is column j of expert e's B_e (interleaved)
    Delta_e = B_e A_e (out, in), laid out as W[e]: (out, in) = (d1, d2) for a module whose
    ``is_transposed`` is False (Mixtral: ``x @ W[e]^T``), else Delta_e^T with (in, out) = (d1, d2).

``rank_pattern`` / ``alpha_pattern`` keys match ``<module>.<parameter>`` (peft's key for a
parameter target), beside the targeted modules' names, with or without ``target_modules``: a
key must select a targeted module or parameter (:func:`check_pattern_keys`; peft applies such a
key to the parameter too, though it warns that it matched no module). ``layers_to_transform``
does not restrict parameter targets, as in peft.
Merging adds ``s Delta`` to ``W`` itself. Like peft, this refuses dropout (the input cannot be
factored out of ``W' x``), DoRA and initializations that read a weight matrix (PiSSA, OLoRA, ...).
A module's several targeted tensors share one wrapper; peft nests one wrapper per tensor, the
tensor registered first innermost, which gives its file keys (``experts.base_layer.lora_A.weight``
for the inner one), reproduced by :meth:`LoRAParameters.peft_key`.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from lightning_peft.core import config as options
from lightning_peft.core.layer import AdapterLayer
from lightning_peft.core.targeting import find_base_model, relative_name
from lightning_peft.core.wrapping import replace_modules, select_targets
from lightning_peft.methods import lora

#: Initializations a parameter target takes (those that draw A and B without reading a weight matrix).
INITS = ("kaiming", "gaussian", "random")


def check(config: lora.LoRAConfig) -> None:
    """Refuse the LoRA options peft's ParamWrapper refuses, naming the field (``target_parameters`` is set)."""
    owner = type(config).__name__
    refusals = {
        "dropout": (config.dropout != 0, "0 with target_parameters (dropout cannot be applied to a weight's input "
                                         "from outside the module that uses it; peft refuses it too)"),
        "use_dora": (config.use_dora, "False with target_parameters (DoRA is not defined on bare parameters)"),
        "init": (config.init not in INITS, f"one of {', '.join(map(repr, INITS))} with target_parameters"),
    }  # fmt: skip
    for field, (bad, expected) in refusals.items():
        if bad:
            raise ValueError(f"{owner}.{field} must be {expected}; got {getattr(config, field)!r}.")


class LoRAParameters(AdapterLayer):
    """LoRA on some parameters of one module: ``W' = W + s Delta`` while the module runs (see the module docstring)."""

    adapter_names = ("lora_A", "lora_B")
    method = "lora"
    #: The forward reads the base module's tensors before calling it (ZeRO-3 must gather them for it).
    gather_as_unit: ClassVar[bool] = True
    #: Another adapter's wrapper around this one would read the base tensors without the update.
    stackable: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module, names: list[str], config: lora.LoRAConfig, site: str = "") -> None:
        """``site``: the module's name inside the transformers model, which ``rank_pattern`` and
        ``alpha_pattern`` keys match as ``<site>.<parameter>`` (peft's key for a parameter target)."""
        super().__init__(base_layer)
        check(config)
        held = dict(self.base.named_parameters(recurse=False))
        self.names = [n for n in held if n in names]  # peft's nesting order: the module's own order
        self.init = config.init
        #: per name: the rank and scale its config gives (rank_pattern / alpha_pattern)
        self.ranks: dict[str, int] = {}
        self.scales: dict[str, float] = {}
        #: per name: (experts, in, out, whether Delta_e is stored transposed (in, out) in W)
        self.layout: dict[str, tuple[int, int, int, bool]] = {}
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        for name in self.names:
            weight = held[name]
            if weight.dim() == 2:
                experts, (out_f, in_f), transposed = 1, weight.shape, False
            elif weight.dim() == 3:
                transposed = bool(getattr(self.base, "is_transposed", False))
                experts, d1, d2 = weight.shape
                out_f, in_f = (d2, d1) if transposed else (d1, d2)
            else:
                raise TypeError(
                    f"parameter {name!r} has shape {tuple(weight.shape)}; target_parameters takes 2-D (out, in) "
                    "and 3-D (experts, ., .) parameters only"
                )
            factory = self.adapter_factory(weight)
            own = config.for_layer(f"{site}.{name}" if site else name)
            self.ranks[name], self.scales[name] = own.r, own.scaling
            self.layout[name] = (experts, in_f, out_f, transposed)
            self.lora_A[name] = nn.Parameter(torch.empty(own.r * experts, in_f, **factory))
            self.lora_B[name] = nn.Parameter(torch.empty(out_f, own.r * experts, **factory))
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        for name in self.names:
            a, b = self.lora_A[name], self.lora_B[name]
            if self.init == "gaussian":
                nn.init.normal_(a, std=1 / self.ranks[name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if self.init == "random":  # peft's init_lora_weights=False: B as nn.Linear initializes a weight
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
            else:
                nn.init.zeros_(b)

    def peft_key(self, local: str) -> str:
        kind, _, name = local.partition(".")
        depth = len(self.names) - 1 - self.names.index(name)  # peft: the first registered tensor innermost
        return "base_layer." * depth + f"{kind}.weight"

    def delta(self, name: str) -> Tensor:
        """``s Delta`` laid out as the parameter ``name``, in its dtype."""
        experts, _, _, transposed = self.layout[name]
        weight = self.base._parameters[name]
        a, b = self.lora_A[name], self.lora_B[name]
        if experts == 1 and weight.dim() == 2:
            return (b @ a * self.scales[name]).to(weight.dtype)  # (out, in)
        r = self.ranks[name]
        a_e = a.view(experts, r, -1)  # (E, r, in)
        b_e = b.view(b.shape[0], r, experts).permute(2, 0, 1)  # (E, out, r)
        delta = torch.bmm(b_e, a_e) * self.scales[name]  # (E, out, in)
        return (delta.transpose(1, 2) if transposed else delta).to(weight.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.bypassed:
            return self.base_layer(*args, **kwargs)
        adapted = {name: self.base._parameters[name] + self.delta(name) for name in self.names}
        return functional_call(self.base_layer, adapted, args, kwargs, strict=False)

    def _merge(self) -> None:
        for name in self.names:
            self.base._parameters[name].add_(self.delta(name))

    def _unmerge(self) -> None:
        for name in self.names:
            self.base._parameters[name].sub_(self.delta(name))

    def extra_repr(self) -> str:
        return f"parameters={self.names}, r={self.ranks}, scaling={self.scales}"


def select(model: nn.Module, keys: list[str]) -> dict[str, list[str]]:
    """Module site -> the names of its own parameters that ``keys`` target (peft's matching).

    A key matches a parameter whose full name (adapter wrappers taken out) equals it or ends with
    ``"." + key``; the site is the module's name with the wrappers taken out.

    Raises:
        ValueError: for a key that matches no parameter (listing some that exist), or a parameter
            of the top-level module (which no wrapper can replace).
    """
    found: dict[str, list[str]] = {}
    used: set[str] = set()
    for module_name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            continue  # its own tensors are adapter state; its base is visited as module.base_layer
        site = ".".join(part for part in module_name.split(".") if part != "base_layer")
        for name, _ in module.named_parameters(recurse=False):
            full = f"{site}.{name}" if site else name
            hits = [key for key in keys if full == key or full.endswith(f".{key}")]
            if not hits:
                continue
            if not module_name:
                raise ValueError(
                    f"LoRAConfig.target_parameters selects {full!r}, a parameter of the top-level "
                    f"{type(model).__name__}; only parameters of its submodules can be targeted"
                )
            used.update(hits)
            found.setdefault(site, []).append(name)
    missing = [key for key in keys if key not in used]
    if missing:
        some = [n for n, p in model.named_parameters() if p.dim() >= 2][:6]
        raise ValueError(
            f"LoRAConfig.target_parameters has {missing!r}, which match no parameter of {type(model).__name__} "
            f"(a key matches a parameter's full name or its dotted suffix); parameters it has: {some}"
        )
    return found


def check_pattern_keys(model: nn.Module, config: lora.LoRAConfig) -> None:
    """Refuse a ``rank_pattern``/``alpha_pattern`` key that selects neither a targeted module nor a
    targeted parameter (runs before anything is wrapped; see ``LoRAConfig.check_selected``).

    The names are those each target looks its rank and alpha up with, inside the transformers
    model: a module's name, and a parameter's ``<module>.<parameter>`` (peft's ``current_key``).
    """
    assert config.target_parameters is not None
    base_path, _ = find_base_model(model)
    modules = select_targets(model, config) if config.target_modules != [] else []
    sites = {relative_name(site, base_path): names for site, names in select(model, config.target_parameters).items()}
    targets = {
        "modules": [relative_name(name, base_path) for name in modules],
        "parameters": [f"{site}.{name}" if site else name for site, names in sites.items() for name in names],
    }
    options.check_pattern_keys(config, ("rank_pattern", "alpha_pattern"), targets)


def apply(model: nn.Module, config: lora.LoRAConfig) -> list[str]:
    """Wrap each module holding a ``target_parameters`` tensor in one :class:`LoRAParameters`."""
    assert config.target_parameters is not None
    check(config)
    found = select(model, config.target_parameters)
    for name in found:
        module = model.get_submodule(name)
        if isinstance(module, AdapterLayer):
            raise ValueError(
                f"LoRAConfig.target_parameters selects parameters of {name!r}, which is already wrapped by "
                f"{type(module).__name__} (of target_modules, or of adapter {module.adapter_name!r}); a module's "
                "parameters and the module itself cannot both be adapted. Leave it out of target_modules (peft "
                "refuses this too), or delete the other adapter first"
            )
    base_path, _ = find_base_model(model)

    def build(name: str, module: nn.Module) -> LoRAParameters:
        return LoRAParameters(module, found[name], config, relative_name(name, base_path))

    return replace_modules(model, list(found), build)


lora.OPTIONS["target_parameters"] = apply
lora.CHECKS["target_parameters"] = check_pattern_keys
