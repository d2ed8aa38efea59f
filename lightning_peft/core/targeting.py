"""Which modules a method acts on: name matching, ``"all-linear"``, and per-architecture defaults.

Matching follows Hugging Face peft so that a config written for peft selects the same modules:
a list entry matches a full module name exactly or as a dotted suffix; a string is a regular
expression that must match the whole name. Unlike peft, every entry of a list must match some
module (:func:`check_listed`): a typo is an error that suggests the closest names, never a module
silently left out.

Only the model's own modules are candidates: metrics (torchmetrics) and loss modules that a
LightningModule holds beside its model are neither selected nor suggested.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

from torch import nn

from lightning_peft.core.layer import AdapterLayer

ALL_LINEAR = "all-linear"

# Task heads that are newly initialized when a pretrained backbone gets a classification head;
# trained in full unless the user says otherwise (peft does the same for its SEQ_CLS task type).
#: The freshly initialized heads of transformers classification models (wav2vec2-style audio
#: classifiers put a new ``projector`` in front of theirs).
_HEAD_NAMES = ("classifier", "score", "projector")
_HEAD_SUFFIXES = (
    "ForSequenceClassification",
    "ForTokenClassification",
    "ForImageClassification",
    "ForAudioClassification",
)


def name_matches(name: str, key: str | Sequence[str]) -> bool:
    """Whether a module's full name is selected by a target key (regex string or list of names)."""
    if isinstance(key, str):
        return re.fullmatch(key, name) is not None
    return any(name == k or name.endswith("." + k) for k in key)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
    """The first key of a per-layer pattern dict (LoRA's ``rank_pattern``) that selects module ``name``.

    peft's rule (``get_pattern_key``): a key is a regular expression that must match the whole
    name or its end after a dot (``"q_proj"`` selects ``model.layers.0.self_attn.q_proj``, not
    ``model.qq_proj``; ``"layers\\.0\\..*"`` the modules of layer 0). ``None`` when none does.
    """
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", name):
            return key
    return None


def layer_index(name: str, layers_pattern: str | Sequence[str] | None = None) -> int | None:
    """The layer index of the module named ``name``, as peft reads it for ``layers_to_transform``.

    With ``layers_pattern`` (a name or regex, or several tried in order): the number right after
    the first ``<pattern>.`` segment (``"layers"`` in ``model.layers.3.mlp.up_proj`` gives 3). Without:
    the number in the first ``.<name>.<int>.`` (the lazy first one, so ``layers.1.experts.0.w1``
    is layer 1, not expert 0). ``None`` when the name holds no such index.
    """
    if layers_pattern is None or not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def in_layers(name: str, layers: int | Sequence[int] | None, layers_pattern: str | Sequence[str] | None = None) -> bool:
    """Whether ``name`` lies in one of ``layers`` (peft's ``layers_to_transform``); every name does for ``None``."""
    if layers is None:
        return True
    index = layer_index(name, layers_pattern)
    if index is None:
        return False
    return index == layers if isinstance(layers, int) else index in layers


def relative_name(name: str, base_path: str) -> str:
    """A module's name inside the transformers model at ``base_path`` (see :func:`find_base_model`),
    as peft names it: per-layer options (patterns, layer indices) read these names."""
    return name[len(base_path) + 1 :] if base_path and name.startswith(base_path + ".") else name


def _named(name: str, base_path: str, target: str | Sequence[str]) -> bool:
    """Whether a target list names the module in full, which peft takes whatever ``layers_to_transform`` says."""
    return not isinstance(target, str) and relative_name(name, base_path) in target


def find_base_model(root: nn.Module) -> tuple[str, nn.Module]:
    """The transformers model inside ``root`` (``root`` itself if it is one), with its module path.

    A LightningModule usually holds the pretrained model as an attribute; the architecture, the
    default targets and the base-model fingerprint all refer to that inner model. Falls back to
    ``("", root)`` for plain ``nn.Module`` trees.
    """
    for name, module in root.named_modules():
        if isinstance(getattr(getattr(module, "config", None), "model_type", None), str) and hasattr(
            module, "get_input_embeddings"
        ):
            return name, module
    return "", root


def model_type(root: nn.Module) -> str | None:
    """transformers' ``config.model_type`` of the base model (``"llama"``, ``"bert"``, ...), if any."""
    _, base = find_base_model(root)
    value = getattr(getattr(base, "config", None), "model_type", None)
    return value if isinstance(value, str) else None


def _prefixed(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def output_layer_names(root: nn.Module) -> set[str]:
    """Full names of the output projection(s) (``lm_head``), which ``"all-linear"`` leaves alone."""
    prefix, base = find_base_model(root)
    get_output = getattr(base, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    if output is None:
        return set()
    return {_prefixed(prefix, n) for n, m in base.named_modules(remove_duplicate=False) if m is output}


def is_linear(module: nn.Module) -> bool:
    """nn.Linear or transformers' GPT-2 style ``Conv1D`` (a linear layer with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def default_modules_to_save(root: nn.Module) -> list[str]:
    """The freshly initialized task head of a transformers classification model, else nothing."""
    _, base = find_base_model(root)
    if not type(base).__name__.endswith(_HEAD_SUFFIXES):
        return []
    return [name for name in _HEAD_NAMES if isinstance(getattr(base, name, None), nn.Module)]


def is_model_module(module: nn.Module) -> bool:
    """False for modules a LightningModule keeps beside its model: metrics and losses.

    Told apart by where their classes are defined, so that the core imports neither lightning nor
    torchmetrics: a ``torchmetrics`` class (``Metric``, ``MetricCollection``) or a loss from
    ``torch.nn.modules.loss`` (``nn.CrossEntropyLoss``).
    """
    for cls in type(module).__mro__:
        where = getattr(cls, "__module__", "") or ""
        if where == "torchmetrics" or where.startswith("torchmetrics.") or where == "torch.nn.modules.loss":
            return False
    return True


def model_named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (name, module) pair of the model's own modules, shared modules under each of their names.

    The subtrees of metrics and losses (see :func:`is_model_module`) are left out, ``root`` is not.
    """
    outside: list[str] = []
    for name, module in root.named_modules(remove_duplicate=False):
        if any(name.startswith(prefix) for prefix in outside):
            continue
        if name and not is_model_module(module):
            outside.append(f"{name}.")
            continue
        yield name, module


def leaf_names(root: nn.Module, limit: int = 12) -> list[str]:
    """A few distinct names of ``root``'s leaf modules that hold parameters, for error messages
    that suggest targets (never a metric, a loss or a parameter-free activation)."""
    seen: dict[str, None] = {}
    for name, module in model_named_modules(root):
        if name and not any(True for _ in module.children()) and any(True for _ in module.parameters()):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
        if len(seen) >= limit:
            break
    return list(seen)


def iter_named_modules(root: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (name, module) pair, shared modules listed under each of their names."""
    return root.named_modules(remove_duplicate=False)


def close_names(key: str, names: Sequence[str], limit: int = 3) -> list[str]:
    """Module names, or their dotted endings, closest to a list entry ``key`` that matched nothing.

    ``key`` is compared with the last as many dotted components of each name as it has itself
    (``"v_prj"`` with ``"v_proj"``, ``"mlp.up_prj"`` with ``"mlp.up_proj"``) and, failing that,
    with the full names (``difflib`` similarity, best first).
    """
    width = key.count(".") + 1
    endings = list(dict.fromkeys(".".join(n.split(".")[-width:]) for n in names if n.count(".") + 1 >= width))
    found = difflib.get_close_matches(key, endings, n=limit, cutoff=0.6)
    if not found:
        found = difflib.get_close_matches(key, list(dict.fromkeys(names)), n=limit, cutoff=0.6)
    return found


def _or_list(names: Sequence[str]) -> str:
    quoted = [repr(n) for n in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"


def check_listed(
    root: nn.Module,
    keys: str | Sequence[str] | None,
    *,
    field: str = "target_modules",
    owner: str = "config",
    exempt: Collection[str] = (),
) -> None:
    """Require every entry of a list of module names to match a module of ``root``.

    A regular expression or ``"all-linear"`` (a string) is not checked here: :func:`select` raises
    when it matches nothing at all. Nothing is changed, so this runs before any module is wrapped.

    Args:
        root: the module tree the names refer to (metrics and losses in it are not candidates).
        keys: the option's value; ``None`` and strings pass.
        field: the option, named in the error.
        owner: the config class name, named in the error.
        exempt: entries allowed to match nothing (a method's default spelling of a module name).

    Raises:
        ValueError: naming each entry that matches nothing and the module names closest to it.
    """
    if keys is None or isinstance(keys, str):
        return
    modules = [(n, m) for n, m in model_named_modules(root) if n and ".base_layer" not in f".{n}"]
    names = [n for n, _ in modules]
    missing = [k for k in keys if k not in exempt and not any(n == k or n.endswith("." + k) for n in names)]
    if not missing:
        return
    # Suggest what a method could act on: modules that hold parameters (not an activation or dropout).
    weighted = [n for n, m in modules if any(True for _ in m.parameters())]
    where = f"no module of {type(root).__name__}"
    parts = []
    for key in missing:
        close = close_names(key, weighted)
        parts.append(f"{key!r} matches {where} ({f'closest: {_or_list(close)}' if close else 'no name is close'})")
        where = "none"
    one = len(missing) == 1
    raise ValueError(
        f"{owner}.{field}={list(keys)!r}: {'; '.join(parts)}. A list entry must equal a module's full name or "
        f"its last dotted components ('q_proj', 'self_attn.q_proj'); fix or remove {'it' if one else 'them'}. "
        f"Module names it has include: {', '.join(leaf_names(root))}."
    )


def select(
    root: nn.Module,
    target: str | Sequence[str],
    exclude: str | Sequence[str] | None,
    *,
    field: str = "target_modules",
    owner: str = "config",
    skip: Sequence[str] = (),
    layers: int | Sequence[int] | None = None,
    layers_pattern: str | Sequence[str] | None = None,
) -> list[str]:
    """Full names of the modules selected by ``target`` minus ``exclude``, in ``layers`` only.

    Args:
        root: the module tree to search.
        target: a list of names/suffixes, a regular expression, or ``"all-linear"``.
        exclude: modules to leave out, matched like ``target``.
        field: the option being resolved, named in errors.
        owner: the config class name, named in errors.
        skip: names whose subtrees are never selected (e.g. ``modules_to_save``).
        layers: only modules whose layer index (:func:`layer_index`) is one of these
            (``layers_to_transform``); ``None`` for every module.
        layers_pattern: the name(s) of the layer list, for :func:`layer_index`.

    Metrics and losses (see :func:`model_named_modules`) are never selected. Each entry of a list
    is not checked here (a method's default list may name modules a model variant lacks); see
    :func:`check_listed`, which ``inject`` runs on the options the user passed.

    Raises:
        ValueError: when nothing matches; the message lists module names the model has.
    """
    outputs = output_layer_names(root) if target == ALL_LINEAR else set()
    base_path = find_base_model(root)[0] if layers is not None else ""
    selected: list[str] = []
    saved: list[str] = []  # modules kept whole as a trained copy (modules_to_save): their inside is never a target
    for name, module in model_named_modules(root):
        if not name or any(name == s or name.startswith(s + ".") for s in [*skip, *saved]):
            continue
        if ".base_layer" in f".{name}":  # the inside of a wrapper is never a target of its own
            continue
        kept = isinstance(module, AdapterLayer) and module.method == "modules_to_save"
        if kept:
            saved.append(name)
        if target == ALL_LINEAR:  # a layer another adapter already wraps is still the linear layer it wraps
            inner = module.base if isinstance(module, AdapterLayer) else module
            hit = not kept and is_linear(inner) and name not in outputs
        else:
            hit = name_matches(name, target)
        if (
            hit
            and not (exclude is not None and name_matches(name, exclude))
            and (in_layers(relative_name(name, base_path), layers, layers_pattern) or _named(name, base_path, target))
        ):
            selected.append(name)
    if not selected:
        excluded = f" (after exclude_modules={exclude!r})" if exclude else ""
        if layers is not None:
            excluded += f" in layers_to_transform={layers!r}" + (
                f" (layers_pattern={layers_pattern!r})" if layers_pattern else " (the index after the first .<name>.)"
            )
        raise ValueError(
            f"{owner}.{field}={target!r} matched no module of {type(root).__name__}{excluded}. "
            f"Module names it has include: {', '.join(leaf_names(root))}."
        )
    return selected


def architecture_default(
    root: nn.Module, defaults: Mapping[str, str | Sequence[str]], *, method: str, field: str = "target_modules"
) -> str | list[str]:
    """The default targets of ``method`` for the model's architecture.

    A default is a list of names (matched as dotted suffixes) or, where a suffix cannot tell two
    modules apart (BERT's attention and feed-forward output projections are both ``*.output.dense``),
    a regular expression, returned as it is.

    Raises:
        ValueError: when the model has no known architecture default; says how to pass targets.
    """
    kind = model_type(root)
    if kind is not None and kind in defaults:
        value = defaults[kind]
        return value if isinstance(value, str) else list(value)
    known = ", ".join(sorted(defaults))
    what = f"architecture {kind!r}" if kind else f"a {type(root).__name__} (not a transformers model)"
    raise ValueError(
        f"{method} has no default {field} for {what}; pass {field} explicitly, e.g. "
        f"{field}={leaf_names(root, 4)!r} or {field}='all-linear'. Architectures with defaults: {known}."
    )
