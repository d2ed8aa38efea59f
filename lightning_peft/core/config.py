"""Option dataclasses shared by every method, and the helpers that validate them.

A method's config is a keyword-only dataclass that subclasses :class:`AdapterConfig` (input-side
methods) or :class:`LayerConfig` (methods that wrap layers). Configs are validated in
``__post_init__`` and never mutated afterwards: resolving architecture defaults returns a copy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from lightning_peft.core.targeting import pattern_key

C = TypeVar("C", bound="AdapterConfig")


def invalid(config: object, field: str, value: object, expected: str) -> ValueError:
    """Build the error for a bad option: which field, the bad value, and what would be valid."""
    owner = type(config).__name__ if not isinstance(config, str) else config
    return ValueError(f"{owner}.{field} must be {expected}; got {value!r}.")


def check_positive_int(config: object, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise invalid(config, field, value, "a positive integer")


def check_positive(config: object, field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise invalid(config, field, value, "a positive number")


def check_probability(config: object, field: str, value: object) -> None:
    """A dropout-like probability: 0 <= p < 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise invalid(config, field, value, "a number in [0, 1)")


def check_choice(config: object, field: str, value: object, choices: Iterable[object]) -> None:
    choices = list(choices)
    if value not in choices:
        raise invalid(config, field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_module_keys(config: object, field: str, value: object, *, allow_str: bool, allow_empty: bool = False) -> None:
    """Target-like options: None, a list of module-name keys, or (when ``allow_str``) a regex/keyword."""
    if value is None:
        return
    if isinstance(value, str):
        if allow_str:
            return
        raise invalid(config, field, value, "None or a list of module names")
    if (
        not isinstance(value, Sequence)
        or (not value and not allow_empty)
        or not all(isinstance(v, str) and v for v in value)
    ):
        expected = "None, a regex string, 'all-linear', or a non-empty list of module names"
        if not allow_str:
            expected = "None or a list of module names"
        raise invalid(config, field, value, expected)


def check_patterns(
    config: object, field: str, value: object, check_value: Callable[[object, str, object], None]
) -> None:
    """A per-layer option (LoRA's ``rank_pattern``): a dict from module-name regexes to values.

    Each key must compile as a regular expression and each value pass ``check_value``; an error
    names the field, the key and the bad value (``LoRAConfig.rank_pattern['q_proj'] must be ...``).
    """
    if not isinstance(value, dict):
        raise invalid(config, field, value, "a dict from module-name regexes to values ({} for none)")
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise invalid(config, field, value, "a dict whose keys are non-empty strings (module-name regexes)")
        try:
            re.compile(key)
        except re.error as error:
            raise invalid(config, f"{field}[{key!r}]", key, f"keyed by a valid regular expression ({error})") from None
        check_value(config, f"{field}[{key!r}]", item)


def check_pattern_keys(config: object, fields: Sequence[str], targets: Mapping[str, Sequence[str]]) -> None:
    """Refuse a key of a per-layer option (LoRA's ``rank_pattern``) that selects none of the targets.

    A key selects a name by peft's rule (``get_pattern_key``): the regex matches the whole name or
    its end after a dot. A key that selects nothing would silently leave those layers at the default
    (peft only warns), so it is refused, naming the field, the key and the targets.

    Args:
        config: the config (its class names the field in the error).
        fields: the per-layer option fields to check (``("rank_pattern", "alpha_pattern")``).
        targets: the names the option is looked up with, by kind (``{"modules": [...], "parameters": [...]}``:
            module names and ``<module>.<parameter>`` keys inside the transformers model).
    """
    names = [name for group in targets.values() for name in group]
    for field_name in fields:
        unused = [key for key in getattr(config, field_name) if not any(pattern_key([key], name) for name in names)]
        if unused:
            shown = {kind: group for kind, group in targets.items() if group} or {"modules": []}
            listed = " or ".join(
                f"the {len(group)} targeted {kind} ({', '.join(group[:4])}{', ...' if len(group) > 4 else ''})"
                for kind, group in shown.items()
            )
            singular = " or ".join(kind.removesuffix("s") for kind in shown)
            raise ValueError(
                f"{type(config).__name__}.{field_name} key {unused[0]!r} matches none of {listed}; a key must match "
                f"a targeted {singular}'s name whole or after a dot. Fix or remove it."
            )


#: Field metadata of options that only choose initial values (see :func:`init_only`).
INIT_ONLY = "lightning_peft_init_only"


def init_only(default: Any = None) -> Any:
    """A config field that only chooses the adapter's initial values (an init text, a tokenizer).

    Such options are not part of what the adapter is: they are left out of :meth:`AdapterConfig.to_dict`,
    so checkpoints do not record them, loading does not compare them, and an adapter loads where
    they (a tokenizer, say) are not available. The trained tensors carry their effect.
    """
    return field(default=default, metadata={INIT_ONLY: True})


def _plain(value: Any) -> Any:
    """JSON-friendly copy: tuples become lists, nested dataclasses become dicts."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


@dataclass(kw_only=True)
class AdapterConfig:
    """Options every method has.

    Args:
        modules_to_save: modules trained in full and saved whole beside the adapter, such as a
            newly initialized classification head. Keys match like ``target_modules`` lists (exact
            name or dotted suffix). ``None`` picks the task head of a transformers
            ``*ForSequenceClassification`` / ``*ForTokenClassification`` model; ``[]`` trains none.
    """

    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        check_module_keys(self, "modules_to_save", self.modules_to_save, allow_str=False, allow_empty=True)
        if self.modules_to_save is not None and not isinstance(self.modules_to_save, list):
            # Accept tuples but store a list so that equality with a round-tripped config holds.
            object.__setattr__(self, "modules_to_save", list(self.modules_to_save))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serializable options (no method name: the registry maps the class to it).

        Options declared with :func:`init_only` are left out.
        """
        return {
            f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if not f.metadata.get(INIT_ONLY)
        }

    @classmethod
    def from_dict(cls: type[C], options: dict[str, Any]) -> C:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error, never dropped."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(
                f"{cls.__name__} has no option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(names))}."
            )
        return cls(**options)

    def replace(self: C, **changes: Any) -> C:
        """A validated copy with some options changed (the original is left as it is)."""
        return dataclasses.replace(self, **changes)

    def diff(self, other: AdapterConfig) -> dict[str, tuple[Any, Any]]:
        """Options whose values differ, as ``{field: (self_value, other_value)}``."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {
            k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)
        }

    def __str__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), sort_keys=True)})"


@dataclass(kw_only=True)
class LayerConfig(AdapterConfig):
    """Options of methods that wrap existing layers.

    Args:
        target_modules: which modules to wrap. A list matches a module whose full name equals an
            entry or ends with ``"." + entry`` (``["q_proj", "v_proj"]``); a string is a regular
            expression matched against the whole name; ``"all-linear"`` takes every linear layer
            but the output head. ``None`` uses the method's default for the model's architecture.
        exclude_modules: modules never to wrap, matched like ``target_modules``.
        layers_to_transform: wrap only the targets in these layers (an index or a list of them), as
            peft does: a module's layer index is the number after the first ``layers_pattern`` name
            in its full name (``model.layers.3.self_attn.q_proj`` -> 3 for ``"layers"``) or, with no
            pattern, the number in the first ``.<name>.<int>.`` of it. ``None`` wraps every layer.
            Needs ``target_modules`` as a list (a regex can name the layers itself), as in peft.
        layers_pattern: the name(s) of the module list that holds the layers (``"layers"``, ``"h"``,
            ``"block"``), each a regex; only with ``layers_to_transform``.
        modules_to_save: see :class:`AdapterConfig`.
    """

    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_module_keys(self, "target_modules", self.target_modules, allow_str=True)
        check_module_keys(self, "exclude_modules", self.exclude_modules, allow_str=True)
        for name in ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern"):
            value = getattr(self, name)
            if isinstance(value, tuple):
                object.__setattr__(self, name, list(value))
        self._check_layers()

    def _check_layers(self) -> None:
        layers, pattern = self.layers_to_transform, self.layers_pattern
        if (
            layers is not None
            and not _is_index(layers)
            and (not isinstance(layers, list) or not layers or not all(_is_index(i) for i in layers))
        ):
            raise invalid(
                self, "layers_to_transform", layers, "None, a layer index (int >= 0) or a non-empty list of them"
            )
        if pattern is not None:
            patterns = [pattern] if isinstance(pattern, str) else pattern
            if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) and p for p in patterns):
                raise invalid(
                    self, "layers_pattern", pattern, "None, a name such as 'layers', or a non-empty list of them"
                )
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as error:
                    raise invalid(
                        self, "layers_pattern", pattern, f"names or valid regular expressions ({p!r}: {error})"
                    ) from None
            if layers is None:
                raise invalid(
                    self, "layers_pattern", pattern, "None unless layers_to_transform is set (it says which layers)"
                )
        if layers is not None and isinstance(self.target_modules, str):
            raise invalid(
                self, "layers_to_transform", layers,
                f"None when target_modules is a regex or keyword ({self.target_modules!r}; as in peft): pass "
                "target_modules as a list of names, or name the layers in the regex",
            )  # fmt: skip

    def for_layer(self, name: str) -> LayerConfig:
        """The options for the module named ``name`` (its full name): ``self`` unless the method
        has per-layer options (LoRA's ``rank_pattern``), which return a new config, never an edit
        of this one. :func:`lightning_peft.core.wrapping.inject_layers` calls it before each wrap."""
        return self

    def check_selected(self, names: Sequence[str]) -> None:
        """Raise when per-layer options do not fit the modules selected (their names inside the
        transformers model, as :meth:`for_layer` gets them); nothing to check unless a method has them."""

    @property
    def bias_scope(self) -> Literal["none", "adapted", "all"]:
        """Which base-model biases the adapter trains beside its own tensors (LoRA's ``bias``):
        none, those of the layers it wraps, or every module's own ``bias`` parameter. The state
        code (:mod:`lightning_peft.core.state`) declares them from this."""
        return "none"


#: peft's ``bias`` values (LoraConfig's, AdaLoraConfig's) and the base biases each trains (``LayerConfig.bias_scope``).
BIAS_SCOPES: dict[str, Literal["none", "adapted", "all"]] = {"none": "none", "lora_only": "adapted", "all": "all"}


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


#: How a distributed strategy lays out the base model's weights, by name: FSDP1 (flat parameters),
#: FSDP2 (per-parameter DTensor shards), DeepSpeed ZeRO stages 1-3 (3: weights partitioned and
#: gathered per module; 1 and 2: gradients and optimizer state handled in DeepSpeed's buffers).
#: Replicated training (one device, DDP) needs no entry: every method supports it.
Sharding = Literal["fsdp", "fsdp2", "zero1", "zero2", "zero3"]
ALL_SHARDINGS: frozenset[Sharding] = frozenset({"fsdp", "fsdp2", "zero1", "zero2", "zero3"})
