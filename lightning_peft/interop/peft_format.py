"""Hugging Face peft's adapter format: ``adapter_config.json`` + ``adapter_model.safetensors``.

An adapter trained with lightning_peft can be served by anything that reads peft adapters
(``PeftModel.from_pretrained``, vLLM, TGI), and a peft adapter can be loaded here, for every
method whose registry entry declares a :class:`~lightning_peft.registry.PeftFormat`. Tensor names
come from the adapter layers (``AdapterModule.peft_key``); options from the method's mapping,
which refuses peft options lightning_peft does not implement instead of dropping them.

Named adapters follow peft's layout: ``save_peft_adapter(model, folder)`` writes ``"default"`` in
``folder`` and each other adapter in ``folder/<name>``, every folder a plain peft adapter whose
tensor names carry no adapter name; they are keyed by where each module sits in the base model
(``state.site_name``), so an adapter that shares a layer with another writes what it would alone.
``load_peft_adapter(model, folder, adapter_name)`` reads one folder, as peft's ``load_adapter`` does.

Loading validates before it changes anything: a field that is not one of peft's (a typo such as
``lora_rnak``) is refused by name with the closest field suggested, every field the method does
not implement with the file's value is refused by name (the method's ``from_peft`` holds the
allowlist), and every tensor is checked for presence, exact shape (in peft's layout, key by key,
never reshaped to fit) and finiteness; on any failure the adapter it added is removed again, the
base weights an initialization rewrote (PiSSA, OLoRA) are put back bit for bit, and the tensors of
an adapter it loaded into are as they were.

AdaLoRA and the prompt-learning methods lay their tensors out as peft does through
:mod:`lightning_peft.interop.peft_layouts`: AdaLoRA's ``lora_E`` as ``(r, 1)``, its pruned ranks as
peft's ``rank_pattern`` (only the kept triplets stored); prompt tuning, P-tuning and prefix tuning
as the one ``prompt_embeddings`` tensor peft stores, the prompt the model consumes (for P-tuning
the encoder's output, which loads back as a ``prompt_tuning`` adapter; for prefix tuning with
``prefix_projection`` the MLP's output, which loads as ``projection=False``), on ``*ForCausalLM``
models (peft's ``task_type="CAUSAL_LM"``). :func:`write_peft_folder` writes one folder atomically
(PEFTCallback's ``peft_dir`` beside each checkpoint).

PiSSA/OLoRA adapters (``init="pissa"``, ``"pissa_niter_N"``, ``"olora"``) travel both ways as peft
has them: saved as they are (a loader, peft or this one, computes the residual base weight again
from the original one) or, with ``convert_to_standard_lora=True``, as the plain rank-2r LoRA
adapter that peft's ``path_initial_model_for_weight_conversion`` writes, which applies to the
original base weights (see :mod:`lightning_peft.methods.lora_init`).
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from lightning_peft import registry
from lightning_peft.api.inject import inject, remove_added, resolve
from lightning_peft.core import biases, files, state
from lightning_peft.core.layer import AdapterModule
from lightning_peft.core.targeting import find_base_model
from lightning_peft.interop import peft_layouts as layouts
from lightning_peft.methods import lora_init

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: What peft writes instead of safetensors with ``save_pretrained(safe_serialization=False)``.
BIN_NAME = "adapter_model.bin"
#: peft keys every tensor by its path under ``PeftModel.base_model.model``.
PREFIX = "base_model.model."
M = TypeVar("M", bound=nn.Module)

#: The version of peft whose config fields :data:`PEFT_FIELDS` lists.
PEFT_FIELDS_VERSION = "0.21.2"
#: Every field of peft's config class per ``peft_type`` (``dataclasses.fields`` of ``LoraConfig``,
#: ``IA3Config``, ``AdaLoraConfig``, ``PromptTuningConfig``, ``PromptEncoderConfig``,
#: ``PrefixTuningConfig`` and ``TrainableTokensConfig`` in peft 0.21.2; a test checks the installed
#: peft has no field missing here). A field
#: not listed is refused: lightning_peft does not guess what an unknown option meant.
# fmt: off
PEFT_FIELDS: dict[str, frozenset[str]] = {
    "LORA": frozenset({
        "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path",
        "bias", "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out",
        "inference_mode", "init_lora_weights", "kasa_config", "layer_replication", "layers_pattern",
        "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "lora_ga_config",
        "megatron_config", "megatron_core", "modules_to_save", "monteclora_config", "peft_type", "peft_version",
        "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules",
        "target_parameters", "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
        "use_rslora", "velora_config",
    }),
    "IA3": frozenset({
        "auto_mapping", "base_model_name_or_path", "exclude_modules", "fan_in_fan_out", "feedforward_modules",
        "inference_mode", "init_ia3_weights", "modules_to_save", "peft_type", "peft_version", "revision",
        "target_modules", "task_type",
    }),
}
PEFT_FIELDS["ADALORA"] = PEFT_FIELDS["LORA"] | {
    "beta1", "beta2", "deltaT", "init_r", "orth_reg_weight", "target_r", "tfinal", "tinit", "total_step",
}
_PROMPT_FIELDS = frozenset({
    "auto_mapping", "base_model_name_or_path", "inference_mode", "modules_to_save", "num_attention_heads",
    "num_layers", "num_transformer_submodules", "num_virtual_tokens", "peft_type", "peft_version", "revision",
    "task_type", "token_dim",
})
PEFT_FIELDS["PROMPT_TUNING"] = _PROMPT_FIELDS | {
    "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_kwargs", "tokenizer_name_or_path",
}
PEFT_FIELDS["P_TUNING"] = _PROMPT_FIELDS | {
    "encoder_dropout", "encoder_hidden_size", "encoder_num_layers", "encoder_reparameterization_type",
}
PEFT_FIELDS["PREFIX_TUNING"] = _PROMPT_FIELDS | {"encoder_hidden_size", "init_weights", "prefix_projection"}
PEFT_FIELDS["TRAINABLE_TOKENS"] = frozenset({
    "auto_mapping", "base_model_name_or_path", "inference_mode", "init_weights", "peft_type", "peft_version",
    "revision", "target_modules", "task_type", "token_indices",
})
# fmt: on
#: peft's class name per ``peft_type``, for messages.
PEFT_CLASSES = {
    "LORA": "LoraConfig",
    "IA3": "IA3Config",
    "ADALORA": "AdaLoraConfig",
    "PROMPT_TUNING": "PromptTuningConfig",
    "P_TUNING": "PromptEncoderConfig",
    "PREFIX_TUNING": "PrefixTuningConfig",
    "TRAINABLE_TOKENS": "TrainableTokensConfig",
}  # fmt: skip


def _format(method: str) -> registry.PeftFormat:
    entry = registry.get(method)
    if entry.peft is None:
        with_peft = [m.name for m in registry.all_methods() if m.peft is not None]
        if entry.peft_type is None:
            what = f"method {method!r} has no Hugging Face peft equivalent"
        else:
            what = (
                f"lightning_peft does not write method {method!r} in Hugging Face peft's format yet "
                f"(peft has it as peft_type={entry.peft_type!r})"
            )
        raise ValueError(
            f"{what}; save it with lightning_peft.save_adapter instead. Methods with a peft format: "
            f"{', '.join(with_peft)}."
        )
    return entry.peft


def _peft_modules(model: nn.Module, adapter_name: str) -> list[tuple[str, AdapterModule]]:
    """Adapter ``adapter_name``'s modules, after asking each whether peft's format can hold it.

    Raises:
        ValueError: naming the first module (by its path) that peft's format cannot hold, and why
            (:meth:`AdapterModule.peft_refusal`).
    """
    modules = list(state.adapter_modules(model, adapter_name))
    for prefix, module in modules:
        refusal = module.peft_refusal()
        if refusal is not None:
            raise ValueError(f"adapter {adapter_name!r}, layer {prefix!r}: {refusal}")
    return modules


def _peft_tensors(
    model: nn.Module,
    adapter_name: str,
    values: Mapping[str, Tensor] | None = None,
    clean: Callable[[str], str] | None = None,
) -> dict[str, tuple[str, Tensor, nn.Module, str]]:
    """Our full tensor name -> (peft key, the tensor as peft lays it out, its module, its local name).

    The key comes from the module's site in the base model (other adapters' wrappers taken out),
    as peft names it: no adapter name in it. ``values`` replaces the modules' own tensors (a
    sharded strategy's gathered adapter), keyed by ``clean(full name)``; ``clean`` also takes the
    strategy's wrapper modules (FSDP1's ``_fsdp_wrapped_module``) out of peft's keys.
    """
    clean = clean or (lambda name: name)
    info = state.adapter_of(model, adapter_name)
    base = f"{info.base_path}." if info.base_path else ""
    names: dict[str, tuple[str, Tensor, nn.Module, str]] = {}
    for prefix, module in _peft_modules(model, adapter_name):
        site = state.site_name(model, prefix)
        for local, tensor in module.adapter_state():
            full = f"{prefix}.{local}" if prefix else local
            if not full.startswith(base):
                raise ValueError(
                    f"adapter tensor {full!r} of adapter {adapter_name!r} lies outside the transformers model "
                    f"({info.base_path!r}); peft's format only holds tensors of the base model."
                )
            inner = site[len(base) :] if site.startswith(base) else site
            key = clean(PREFIX + (f"{inner}.{module.peft_key(local)}" if inner else module.peft_key(local)))
            if values is not None:
                if clean(full) not in values:
                    raise ValueError(f"the gathered adapter state lacks {clean(full)!r} of adapter {adapter_name!r}")
                tensor = values[clean(full)]
            names[full] = (key, module.to_peft_tensor(local, tensor), module, local)
    for full, bias in state.trained_biases(model, adapter_name):
        if not full.startswith(base):
            raise ValueError(
                f"bias {full!r} that adapter {adapter_name!r} trains lies outside the transformers model "
                f"({info.base_path!r}); peft's format only holds tensors of the base model."
            )
        key = clean(PREFIX + state.bias_site(model, full, adapter_name)[len(base) :])
        if values is not None:
            if clean(full) not in values:
                raise ValueError(f"the gathered adapter state lacks {clean(full)!r} of adapter {adapter_name!r}")
            bias = values[clean(full)]
        owner = model.get_submodule(full.rpartition(".")[0]) if "." in full else model
        names[full] = (key, bias, owner, "bias")
    return names


def _peft_names(
    model: nn.Module,
    adapter_name: str,
    values: Mapping[str, Tensor] | None = None,
    clean: Callable[[str], str] | None = None,
) -> dict[str, tuple[str, Tensor]]:
    """Our full tensor name -> (peft key, the tensor as peft lays it out), for adapter ``adapter_name``."""
    return {full: (key, t) for full, (key, t, _, _) in _peft_tensors(model, adapter_name, values, clean).items()}


def _from_peft_layout(module: nn.Module, local: str, ours: Tensor, stored: Tensor) -> Tensor:
    """``stored`` (already checked to have exactly peft's shape) in our layout.

    The inverse of the module's own ``to_peft_tensor``, found by passing it the element indices:
    each value goes back to the position it was taken from, and nothing is reshaped to fit.
    """
    if not isinstance(module, AdapterModule):  # a trained base bias: peft stores it as it is
        return stored
    inverse = getattr(module, "from_peft_tensor", None)  # a method whose peft layout changes values
    converted = inverse(local, stored) if inverse is not None else None
    if converted is not None:
        return converted
    index = torch.arange(ours.numel()).view(ours.shape)
    laid = module.to_peft_tensor(local, index)
    if laid.shape == ours.shape and torch.equal(laid, index):
        return stored  # the same layout (LoRA's A and B): the stored tensor as it is
    if laid.numel() != ours.numel() or not torch.equal(laid.flatten().sort().values, index.flatten()):
        raise TypeError(f"{type(module).__name__}.to_peft_tensor({local!r}) does not lay out each value once")
    out = torch.empty(ours.numel(), dtype=stored.dtype)
    out[laid.flatten()] = stored.flatten()
    return out.view(ours.shape)


def _converted(model: nn.Module, info: state.PEFTInfo, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """Rewrite a PiSSA/OLoRA adapter's tensors as peft's converted rank-2r LoRA (in place); its config changes.

    ``A' = [A; A_0]`` and ``B' = [B, -B_0]`` per layer, so ``s' B' A' = s (B A - B_0 A_0)`` with
    ``s' = s`` (``alpha' = 2 alpha``, or ``sqrt(2) alpha`` with rslora; ``rank_pattern`` and
    ``alpha_pattern`` entries alike): the update that turns the
    original base weight ``W = W_res + s B_0 A_0`` into the trained ``W_res + s B A``. A layer
    without ``A_0, B_0`` (an embedding, whose init leaves ``B_0 A_0 = 0``) gets zeros there.
    """
    config = info.config
    if info.method != "lora":
        raise ValueError(
            f"convert_to_standard_lora=True converts LoRA adapters initialized with PiSSA or OLoRA; adapter "
            f"{info.name!r} is a {info.method} adapter. Save it without the option."
        )
    if not lora_init.rewrites_base(config.init):  # type: ignore[attr-defined]
        return {"init_lora_weights": True}  # already a plain LoRA of the unchanged base: peft's True loads it
    if config.use_dora:  # type: ignore[attr-defined]
        raise ValueError(
            f"convert_to_standard_lora=True cannot convert adapter {info.name!r}: it is DoRA (use_dora=True), whose "
            "magnitude is not an additive update; save it as it is (peft then initializes the residual again)."
        )
    for _, (key, _, module, local) in _peft_tensors(model, info.name).items():
        initial = getattr(module, f"{local}0", None)
        if initial is None:
            initial = torch.zeros_like(tensors[key])
        if local == "lora_A":
            tensors[key] = torch.cat([tensors[key], initial.to(tensors[key])], dim=0).contiguous()
        elif local == "lora_B":
            tensors[key] = torch.cat([tensors[key], -initial.to(tensors[key])], dim=1).contiguous()
    factor = 2**0.5 if config.rslora else 2  # type: ignore[attr-defined]
    return {
        "init_lora_weights": True,
        "r": 2 * config.r,  # type: ignore[attr-defined]
        "lora_alpha": config.alpha * factor,  # type: ignore[attr-defined]
        # Per-layer ranks and alphas double the same way, so each layer keeps its scale.
        "rank_pattern": {k: 2 * v for k, v in config.rank_pattern.items()},  # type: ignore[attr-defined]
        "alpha_pattern": {k: v * factor for k, v in config.alpha_pattern.items()},  # type: ignore[attr-defined]
    }


def _peft_config(
    model: nn.Module, adapter_name: str, base_model_name_or_path: str | None, path: Path, total_step: int | None = None
) -> dict[str, Any]:
    """peft's config fields for adapter ``adapter_name`` (without ``rank_pattern``); reads no tensor."""
    info = state.adapter_of(model, adapter_name)
    try:
        fmt = _format(info.method)
    except ValueError as error:
        if len(state.adapters(model)) == 1:
            raise
        raise ValueError(f"adapter {adapter_name!r}: {error}") from error
    options = info.config
    if info.method == "adalora" and options.total_step is None and total_step is not None:  # type: ignore[attr-defined]
        options = options.replace(total_step=total_step)
    config = {
        "peft_type": fmt.peft_type,
        "task_type": None,
        "inference_mode": True,
        "base_model_name_or_path": base_model_name_or_path,
        **fmt.to_peft(options),
    }
    if registry.get(info.method).kind == "input":
        _, base = find_base_model(model)
        config["task_type"] = layouts.prompt_task_type(base, info.method)
    files.json_bytes(config, path)  # a non-finite option is refused here, naming the file
    return config


def _peft_folder(
    model: nn.Module,
    adapter_name: str,
    base_model_name_or_path: str | None,
    out: Path,
    convert: bool = False,
    total_step: int | None = None,
    values: Mapping[str, Tensor] | None = None,
    clean: Callable[[str], str] | None = None,
) -> tuple[Path, bytes, dict[str, Tensor]]:
    """(folder, config file bytes, tensors) of adapter ``adapter_name``: everything checked, nothing written."""
    info = state.adapter_of(model, adapter_name)
    config = _peft_config(model, adapter_name, base_model_name_or_path, out / CONFIG_NAME, total_step)
    if registry.get(info.method).kind == "input":
        if values is not None:
            raise ValueError(
                f"a {info.method} adapter's peft file holds the prompt it computes, which a sharded strategy's "
                "gathered tensors do not give; save it with lightning_peft.save_adapter, or train without sharding."
            )
        tensors = {layouts.PROMPT_KEY: layouts.prompt_tensor(layouts.prompt_module(model, adapter_name))}
    else:
        tensors = dict(_peft_names(model, adapter_name, values, clean).values())
        tensors.update({copy: tensors[source] for copy, source in _peft_copies(model, adapter_name).items()})
    if info.method == "adalora":
        config["rank_pattern"] = layouts.adalora_to_peft(tensors, PREFIX)
    if convert:
        config.update(_converted(model, info, tensors))
    elif str(getattr(info.config, "init", "")).startswith("pissa_niter_"):
        warnings.warn(_RANDOMIZED.format(init=info.config.init, what="peft, loading it, computes"), stacklevel=3)
    return out, files.json_bytes(config, out / CONFIG_NAME), tensors


def save_peft_adapter(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str | None = None,
    *,
    base_model_name_or_path: str | None = None,
    convert_to_standard_lora: bool = False,
    total_step: int | None = None,
) -> Path:
    """Write adapters of ``model`` in Hugging Face peft's format; returns the folder.

    Every adapter is checked (a method with a peft format, options peft can hold) before any file
    is written.

    Args:
        model: a model with lightning_peft adapters (also a LightningModule holding them).
        directory: the folder to write (created if needed).
        adapter_name: the adapter to write in ``directory``. Without a name, every adapter, in
            peft's layout: ``"default"`` in ``directory`` and each other one in ``directory/<name>``
            (a model with one adapter writes it in ``directory``); ``PeftModel.from_pretrained``
            reads the first, ``PeftModel.load_adapter(directory/<name>, adapter_name=<name>)`` the others.
        base_model_name_or_path: recorded for peft's ``PeftModel.from_pretrained``; defaults to
            the transformers model's ``config._name_or_path``.
        convert_to_standard_lora: write LoRA adapters initialized with PiSSA or OLoRA (which
            rewrote the base weights) as the plain rank-2r LoRA adapter of the original base
            weights, as peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)``
            does (``A' = [A; A_0]``, ``B' = [B, -B_0]``, ``alpha' = 2 alpha``). Adapters of other
            inits are written with ``init_lora_weights=True``; other methods are refused.
        total_step: AdaLoRA adapters whose ``total_step`` is ``None`` (the schedule took it from
            the training loop): the number of steps to record, which peft's ``AdaLoraConfig``
            requires (PEFTCallback passes the Trainer's).

    Raises:
        ValueError: for a name the model does not hold (listing those it does), an adapter of a
            method without a peft format, or an option peft's config cannot hold.
    """
    state.require_info(model)
    if not isinstance(convert_to_standard_lora, bool):
        raise ValueError(f"convert_to_standard_lora must be True or False; got {convert_to_standard_lora!r}.")
    out = Path(directory)
    if base_model_name_or_path is None:
        _, base = find_base_model(model)
        base_model_name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    if adapter_name is not None:
        name = state.adapter_of(model, adapter_name).name
        folders = [_peft_folder(model, name, base_model_name_or_path, out, convert_to_standard_lora, total_step)]
    else:
        names = list(state.adapters(model))
        folders = [
            _peft_folder(
                model,
                name,
                base_model_name_or_path,
                out if name == state.DEFAULT_ADAPTER or len(names) == 1 else out / name,
                convert_to_standard_lora,
                total_step,
            )
            for name in names
        ]
    for folder, text, tensors in folders:
        files.save_tensors(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
        files.atomic_write(folder / CONFIG_NAME, text)
    return out


def check_peft_adapter(model: nn.Module, adapter_name: str | None = None, *, total_step: int | None = None) -> None:
    """Raise what :func:`save_peft_adapter` would raise for adapter ``adapter_name``'s options; write nothing.

    It reads the adapter's config and asks its modules (:meth:`AdapterModule.peft_refusal`), but
    reads no tensor (under a sharded strategy they are shards).

    Raises:
        ValueError: for a method without a peft format or options peft's config cannot hold.
    """
    name = state.adapter_of(model, adapter_name).name if adapter_name else state.require_info(model).name
    _peft_config(model, name, None, Path(CONFIG_NAME), total_step)
    _peft_modules(model, name)


def write_peft_folder(
    model: nn.Module,
    directory: str | os.PathLike[str],
    adapter_name: str,
    *,
    total_step: int | None = None,
    values: Mapping[str, Tensor] | None = None,
    clean: Callable[[str], str] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` as one peft adapter folder, never seen half-written.

    An adapter whose init rewrote the base weight in a way peft cannot repeat on load (CorDA, a
    randomized PiSSA) is written converted to plain LoRA (see :func:`save_peft_adapter`'s
    ``convert_to_standard_lora``), so that ``PeftModel.from_pretrained`` on the original base gives
    its outputs.

    The files go to a hidden folder beside ``directory`` (same filesystem), which then replaces it
    by two renames (the old folder out, the new one in): a reader finds a complete folder, old or
    new, or, between the renames, none; a write that fails leaves ``directory`` as it was.

    Args:
        model: the model holding the adapter.
        directory: the folder to (re)place.
        adapter_name: the adapter to write.
        total_step: see :func:`save_peft_adapter`.
        values: the adapter's tensors by our full name, where the modules' own are shards (a sharded
            strategy's gathered adapter state); ``None`` reads the modules'.
        clean: a tensor name as the unwrapped model spells it (``values``' keys, and peft's), where
            a strategy wrapped modules (FSDP1).
    """
    out = Path(directory)
    _, base = find_base_model(model)
    name_or_path = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    # An init whose residual base peft cannot compute again on load is written converted (plain LoRA).
    init = str(getattr(state.adapter_of(model, adapter_name).config, "init", "kaiming"))
    convert = not lora_init.peft_recomputes(init)
    _, text, tensors = _peft_folder(
        model, adapter_name, name_or_path, out, convert, total_step=total_step, values=values, clean=clean
    )
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    staging, retired = out.parent / f".{out.name}.{tag}.lp-tmp", out.parent / f".{out.name}.{tag}.lp-old"
    try:
        files.save_tensors(tensors, staging / WEIGHTS_NAME, metadata={"format": "pt"})
        files.atomic_write(staging / CONFIG_NAME, text)
        if out.exists():
            os.replace(out, retired)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)
    return out


def _same_base_weights(model: nn.Module, stored: dict[str, Tensor]) -> set[str]:
    """Frozen base weights peft saved beside the adapter (it does for targeted embeddings) that equal ours.

    peft names such a weight ``<site>.base_layer.<name>``; ours may sit under several adapters'
    wrappers (``<site>.base_layer.base_layer.<name>``). Any that differ (a resized vocabulary,
    another base) stay unexpected, so loading fails loudly.
    """
    info = state.require_info(model)
    base = f"{info.base_path}." if info.base_path else ""
    adapter_ids = {id(t) for _, t in state.adapter_state(model)}
    same = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name.startswith(base) and ".base_layer." in name and id(tensor) not in adapter_ids:
            key = PREFIX + re.sub(r"(\.base_layer)+\.", ".base_layer.", name[len(base) :])
            if key in stored and stored[key].shape == tensor.shape and torch.equal(stored[key].to(tensor), tensor):
                same.add(key)
    return same


def _peft_copies(model: nn.Module, adapter_name: str) -> dict[str, str]:
    """peft key of a tensor peft writes twice -> the key of the one it repeats.

    A module declares such copies with ``peft_copies()`` (its local name -> the adapter module and
    local name repeated): a standalone trainable-tokens adapter's tied output layer, whose rows peft
    stores again under the layer's own name. Saving writes them; loading accepts them where equal.
    """
    info = state.adapter_of(model, adapter_name)
    base = f"{info.base_path}." if info.base_path else ""
    modules = list(state.adapter_modules(model, adapter_name))
    prefixes = {id(module): prefix for prefix, module in modules}

    def key(prefix: str, module: AdapterModule, local: str) -> str:
        site = state.site_name(model, prefix)
        inner = site[len(base) :] if site.startswith(base) else site
        return PREFIX + (f"{inner}.{module.peft_key(local)}" if inner else module.peft_key(local))

    return {
        key(prefix, module, local): key(prefixes[id(source)], source, source_local)
        for prefix, module in modules
        for local, (source, source_local) in getattr(module, "peft_copies", dict)().items()
    }


def _saved_bias_copies(model: nn.Module, adapter_name: str, stored: dict[str, Tensor]) -> set[str]:
    """Keys of copies peft writes beside a ``bias="all"`` adapter's saved modules, each checked.

    peft 0.21.2 then also stores each saved module's bias as ``<site>.modules_to_save.bias`` (the
    trained copy's again, besides ``<site>.bias``) and ``<site>.original_module.bias`` (the frozen
    original's, which it does not train). A key counts as such a copy only where its values equal
    the file's trained bias, or this model's original bias; any other stays unexpected.
    """
    info = state.adapter_of(model, adapter_name)
    if getattr(info.config, "bias_scope", "none") != "all":
        return set()
    base = f"{info.base_path}." if info.base_path else ""
    same = set()
    for prefix, module in state.adapter_modules(model, adapter_name):
        if module.method != "modules_to_save":
            continue
        site = PREFIX + state.site_name(model, prefix)[len(base) :]
        trained, copy, original = f"{site}.bias", f"{site}.modules_to_save.bias", f"{site}.original_module.bias"
        if copy in stored and trained in stored and torch.equal(stored[copy], stored[trained]):
            same.add(copy)
        mine = biases.own_bias(module.base_layer)
        fits = original in stored and mine is not None and stored[original].shape == mine.shape
        if fits and torch.equal(stored[original].to(mine), mine.detach()):  # type: ignore[union-attr]
            same.add(original)
    return same


def check_peft_fields(options: dict[str, Any], where: str) -> None:
    """Refuse a field that is not one of peft's for the config's ``peft_type`` (see :data:`PEFT_FIELDS`).

    Raises:
        ValueError: naming the field and the closest peft field, if one is close.
    """
    peft_type = str(options.get("peft_type"))
    known = PEFT_FIELDS.get(peft_type)
    if known is None:
        raise ValueError(
            f"{where}: lightning_peft has no list of peft's {peft_type} config fields to check it against; "
            f"known: {', '.join(sorted(PEFT_FIELDS))}."
        )
    unknown = sorted(set(options) - known)
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, sorted(known), n=1)
        raise ValueError(
            f"{where} has field {name!r}, which is not a field of peft's {PEFT_CLASSES.get(peft_type, peft_type)} "
            f"(as of peft {PEFT_FIELDS_VERSION}){f'; did you mean {close[0]!r}?' if close else '.'} lightning_peft "
            "refuses an option it cannot interpret rather than dropping it: fix or remove the field."
        )


def _read_peft_tensors(path: Path) -> dict[str, Tensor]:
    if path.name == WEIGHTS_NAME:
        return files.load_tensors(path)
    stored = files.load_torch(path)
    if not isinstance(stored, dict) or not all(isinstance(v, Tensor) for v in stored.values()):
        raise files.FileContentError(f"{path} is not a peft adapter: expected a mapping of tensor names to tensors.")
    return stored


def load_peft_adapter(model: M, directory: str | os.PathLike[str], adapter_name: str | None = None) -> M:
    """Load a Hugging Face peft adapter folder into ``model`` (injecting the method first); returns ``model``.

    Reads ``adapter_model.safetensors``, or peft's ``adapter_model.bin`` without unpickling it (plain
    tensors only). One folder, as peft's ``load_adapter`` reads one: for a folder that
    ``save_pretrained`` wrote with several adapters, load ``directory`` and then each
    ``directory/<name>`` with ``adapter_name=<name>``. All or nothing: when it raises, ``model`` is
    as it was (an adapter it added is removed, one it loaded into keeps its tensors).

    Args:
        model: the model to load into.
        directory: a peft adapter folder (``adapter_config.json`` + weights).
        adapter_name: the adapter to load into: one the model holds is overwritten (its method and
            options must be the file's); another name is added beside the adapters it has (and
            becomes the active one). Without a name: into the active adapter, or, for a model
            without adapters, as ``"default"``.

    Raises:
        FileNotFoundError: when the folder or its files are missing.
        files.FileContentError: when a file is truncated, corrupt, or holds a pickled object.
        ValueError: for a field peft does not have, a peft method or option lightning_peft does not
            implement, an adapter of that name with another method or options, a malformed name,
            or tensors that do not match the model's adapter (missing, unexpected, of another
            shape, not finite).
    """
    folder = Path(directory)
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        inside = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_NAME}")) if folder.is_dir() else []
        hint = (
            f"; it holds adapters in subfolders {', '.join(map(repr, inside))} (peft's layout for adapters other "
            "than 'default'): load each with load_peft_adapter(model, folder / name, adapter_name=name)"
            if inside
            else ""
        )
        raise FileNotFoundError(f"peft adapter folder {folder} lacks {CONFIG_NAME}{hint}")
    weights_file = next((folder / n for n in (WEIGHTS_NAME, BIN_NAME) if (folder / n).is_file()), None)
    if weights_file is None:
        raise FileNotFoundError(f"peft adapter folder {folder} lacks {WEIGHTS_NAME} (or peft's older {BIN_NAME})")
    options = files.read_json(config_file)
    if not isinstance(options, dict):
        raise files.FileContentError(f"{config_file} holds a JSON {type(options).__name__}, not peft's config object.")
    peft_type = options.get("peft_type")
    matches = [m for m in registry.all_methods() if m.peft is not None and m.peft.peft_type == peft_type]
    if not matches:
        known = sorted({m.peft.peft_type for m in registry.all_methods() if m.peft is not None})
        raise ValueError(f"peft_type={peft_type!r} has no lightning_peft equivalent; supported: {', '.join(known)}.")
    method = matches[0]
    check_peft_fields(options, str(config_file))
    try:
        config = method.peft.from_peft(options)  # type: ignore[union-attr]
    except KeyError as error:
        raise ValueError(
            f"{config_file} lacks the field {error.args[0]!r}, which lightning_peft's {method.name} needs; the file "
            "is truncated or was edited by hand."
        ) from error
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config_file}: {error}") from error
    stored = _read_peft_tensors(weights_file)
    current = state.get_info(model)
    target = adapter_name if adapter_name is not None else (current.name if current else state.DEFAULT_ADAPTER)
    # An init that rewrites base weights (PiSSA, OLoRA) records them first: a failed load puts them back.
    with lora_init.keeping_originals() as rewritten:
        try:
            _load_into(model, folder, weights_file, method, config, stored, target, options)
        except BaseException:
            lora_init.restore(rewritten)
            raise
    if rewritten and str(getattr(config, "init", "")).startswith("pissa_niter_"):
        warnings.warn(_RANDOMIZED.format(init=config.init, what="loading it computed"), stacklevel=2)
    return model


#: A randomized-SVD PiSSA adapter saved unconverted is only reproducible with the same random stream.
_RANDOMIZED = (
    "init={init!r} is PiSSA from a randomized SVD (torch.svd_lowrank), and {what} the residual base weights from "
    "torch's random generator, as peft does: they match the adapter's only if the generator is in the same state "
    "(seeded the same, the same layers before). Save such adapters with convert_to_standard_lora=True for a file "
    "that loads exactly."
)


def _load_into(
    model: nn.Module,
    folder: Path,
    weights_file: Path,
    method: registry.Method,
    config: Any,
    stored: dict[str, Tensor],
    target: str,
    options: dict[str, Any],
) -> None:
    """Inject (or find) adapter ``target`` and copy ``stored`` into it, all or nothing."""
    entry = registry.to_config(config, {})[0]  # P-tuning files load as prompt tuning (see p_tuning.from_peft)
    with state.all_or_nothing(model, remove=remove_added):
        info = state.get_info(model, target) if isinstance(target, str) else None
        if info is None:
            inject(model, config, adapter_name=target)
            info = state.adapter_of(model, target)
        elif info.method != entry.name or (
            # an EVA adapter not calibrated yet takes the file's ranks (state.ADOPTERS); others must be the same
            info.config.diff(resolve(model, config)) and not state.adopt(model, info, resolve(model, config))
        ):
            raise ValueError(
                f"{type(model).__name__}'s adapter {info.name!r} is a {info.method} adapter ({info.config}) that "
                f"differs from the peft adapter in {folder} ({config}); pass another adapter_name to add it beside, "
                "or load it into a fresh base model."
            )
        if entry.kind == "input":
            _load_prompt(model, info.name, folder, weights_file, stored, options, method.name)
            return
        tensors = _peft_tensors(model, info.name)
        if info.method == "adalora":
            ours = {key: peft for key, peft in _peft_names(model, info.name).values()}
            stored = layouts.adalora_from_peft(ours, stored, options.get("rank_pattern"), PREFIX, str(weights_file))
        names = {full: (key, peft) for full, (key, peft, _, _) in tensors.items()}
        missing = [key for key, _ in names.values() if key not in stored]
        biases_missing = [
            key for key, _, module, _ in tensors.values() if key in missing and not isinstance(module, AdapterModule)
        ]
        if missing and len(biases_missing) == len(missing):
            raise ValueError(
                f"the peft adapter in {folder} has bias={options.get('bias')!r} but lacks the biases that trains: "
                f"{biases_missing[:3]}{' ...' if len(biases_missing) > 3 else ''}. peft 0.19 writes none for "
                "bias='lora_only' (it looks them up without the wrapper's base_layer in their names); save it again "
                "with peft 0.21, or with bias='none' if they did not train."
            )
        known = {key for key, _ in names.values()} | _same_base_weights(model, stored)
        copies = {
            c
            for c, src in _peft_copies(model, info.name).items()
            if c in stored
            and src in stored
            and stored[c].shape == stored[src].shape
            and torch.equal(stored[c], stored[src])
        }
        extra = sorted(set(stored) - known - _saved_bias_copies(model, info.name, stored) - copies)
        if missing or extra:
            raise ValueError(
                f"the peft adapter in {folder} does not match this model's {method.name} adapter: "
                f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}"
                f"{' ...' if len(extra) > 3 else ''} (adapter {info.name!r}). Was it trained on another architecture?"
            )
        # Every tensor's exact shape (in peft's layout, key by key) and values, before one is copied.
        state.check_tensors({key: peft.shape for key, peft in names.values()}, stored, str(weights_file))
        for module in {id(m): m for _, _, m, _ in tensors.values() if isinstance(m, AdapterModule)}.values():
            try:
                module.check_peft_version(options.get("peft_version"))
            except ValueError as error:
                raise ValueError(f"{folder / CONFIG_NAME}: {error}") from None
        ours = dict(state.adapter_state(model, info.name))
        weights: OrderedDict[str, Tensor] = OrderedDict(
            # A tied bias (BERT's decoder.bias is cls.predictions.bias) is under each of its names, as in peft's file.
            (full, _from_peft_layout(module, local, ours.get(full, laid), stored[key]))
            for full, (key, laid, module, local) in tensors.items()
        )
        # This adapter's record: the load hooks then require its tensors only, not the other adapters'.
        weights._metadata = {"": {state.METADATA_KEY: info.metadata()}}  # type: ignore[attr-defined]
        with state.loading_from(str(weights_file)):
            model.load_state_dict(weights, strict=True)


def _load_prompt(
    model: nn.Module,
    adapter_name: str,
    folder: Path,
    weights_file: Path,
    stored: dict[str, Tensor],
    options: dict[str, Any],
    method: str,
) -> None:
    """Copy peft's ``prompt_embeddings`` into the prompt-learning adapter just injected (checks first)."""
    _, base = find_base_model(model)
    module = layouts.prompt_module(model, adapter_name)
    layouts.check_prompt_options(options, base, module, method, str(folder / CONFIG_NAME))
    extra = sorted(set(stored) - {layouts.PROMPT_KEY})
    if extra:
        raise ValueError(
            f"the peft adapter in {folder} does not match this model's {method} adapter: unexpected {extra[:3]}"
            f"{' ...' if len(extra) > 3 else ''} (a prompt-learning file holds {layouts.PROMPT_KEY!r} only)."
        )
    state.check_tensors({layouts.PROMPT_KEY: layouts.prompt_shape(module)}, stored, str(weights_file))
    layouts.load_prompt(module, stored[layouts.PROMPT_KEY])
