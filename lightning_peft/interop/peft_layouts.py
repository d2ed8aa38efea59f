"""Where peft's adapter files lay tensors out otherwise than the adapter layers declare them.

Two families need more than a per-tensor name and layout (``AdapterModule.peft_key`` /
``to_peft_tensor``, which :mod:`lightning_peft.interop.peft_format` applies to every other method):

* AdaLoRA: peft stores ``lora_E`` as ``(r, 1)`` (ours is ``(r,)``), keeps no ``rank_mask``, and,
  once budget allocation has pruned ranks, stores only the kept triplets with the mask per layer
  in ``adapter_config.json``'s ``rank_pattern`` (``{"<module>.lora_E": [bool] * init_r}``). Loading
  it, peft shrinks each layer to the kept ranks but keeps ``ranknum = init_r``, so the update
  stays ``alpha / init_r * P[:, k] diag(lambda[k]) Q[k]`` over the kept ranks ``k``; here the
  kept triplets go back to their positions, the pruned ones are zero and masked:
  the same update.
* Prompt learning (prompt tuning, P-tuning, prefix tuning): peft's file holds one tensor,
  ``prompt_embeddings``, the prompt as the model consumes it: the N virtual token embeddings
  ``(N, hidden)`` (for P-tuning the prompt encoder's output, ``MLP(E)`` or ``MLP(LSTM(E))``), or
  the prefix keys and values ``(N, L * 2 * kv_heads * head_dim)`` laid out as
  ``(N, L, 2, kv_heads, head_dim)`` (with ``prefix_projection``, what the MLP computes). That is
  what peft's inference mode (``PeftModel.from_pretrained``) runs, without any encoder.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.virtual import is_encoder_decoder

#: The one tensor of peft's prompt-learning adapter files.
PROMPT_KEY = "prompt_embeddings"
#: peft's ``task_type`` (which PeftModel subclass ``from_pretrained`` builds) for prompt learning, by the
#: transformers class name's ending. Other heads are refused: their parity with peft is not checked.
PROMPT_TASKS = {"ForCausalLM": "CAUSAL_LM"}


# --------------------------------------------------------------------------- AdaLoRA


def adalora_to_peft(tensors: dict[str, Tensor], prefix: str) -> dict[str, list[bool]] | None:
    """Rewrite AdaLoRA tensors (keyed as peft keys them) into peft's layout, in place; returns ``rank_pattern``.

    ``rank_pattern`` is ``None`` while no rank is pruned (every tensor then written whole); once one
    is, every layer's mask is recorded and only its kept triplets written, as peft saves after
    budget allocation.
    """
    masks = {key[: -len(".rank_mask")]: tensors.pop(key).bool() for key in list(tensors) if key.endswith(".rank_mask")}
    pruned = any(not bool(mask.all()) for mask in masks.values())
    pattern: dict[str, list[bool]] = {}
    for site, mask in masks.items():
        a, e, b = (tensors[f"{site}.lora_{m}"] for m in "AEB")
        if pruned:
            keep = mask.to(a.device)
            a, e, b = a[keep], e[keep], b[:, keep]
            pattern[f"{site[len(prefix) :]}.lora_E"] = [bool(v) for v in mask.tolist()]
        tensors[f"{site}.lora_A"], tensors[f"{site}.lora_B"] = a.contiguous(), b.contiguous()
        tensors[f"{site}.lora_E"] = e.reshape(-1, 1).contiguous()
    return pattern if pruned else None


def adalora_from_peft(
    ours: dict[str, Tensor], stored: dict[str, Tensor], rank_pattern: Any, prefix: str, where: str
) -> dict[str, Tensor]:
    """peft's AdaLoRA tensors (and ``rank_pattern``) in our layout, every shape checked first.

    Args:
        ours: the model's adapter tensors, keyed as peft keys them (``<site>.lora_A`` ... ``.rank_mask``).
        stored: the file's tensors.
        rank_pattern: the file's ``rank_pattern`` (``None``/``{}``: nothing pruned).
        prefix: peft's key prefix (``base_model.model.``), which ``rank_pattern`` keys lack.
        where: the file, for messages.

    Raises:
        ValueError: for a ``rank_pattern`` entry that names no AdaLoRA layer of the model or is not
            ``init_r`` booleans, or a tensor whose shape is not the kept ranks'.
    """
    if rank_pattern in (None, {}):
        rank_pattern = {}
    if not isinstance(rank_pattern, dict):
        raise ValueError(f"{where}: rank_pattern={rank_pattern!r} is not peft's mapping of module to kept ranks.")
    sites = [key[: -len(".rank_mask")] for key in ours if key.endswith(".rank_mask")]
    known = {f"{site[len(prefix) :]}.lora_E": site for site in sites}
    unknown = sorted(set(rank_pattern) - set(known))
    if unknown:
        raise ValueError(
            f"{where}: rank_pattern names {unknown[:3]}, which is not an AdaLoRA layer of this model "
            f"(its layers: {sorted(known)[:3]}{' ...' if len(known) > 3 else ''})."
        )
    out = dict(stored)
    for name, site in known.items():
        init_r = ours[f"{site}.rank_mask"].numel()
        mask = rank_pattern.get(name, [True] * init_r)
        if not isinstance(mask, list) or len(mask) != init_r or not all(isinstance(v, bool) for v in mask):
            raise ValueError(
                f"{where}: rank_pattern[{name!r}]={mask!r} is not a list of init_r={init_r} booleans (True: rank kept)."
            )
        kept = sum(mask)
        expected = {
            f"{site}.lora_A": (kept, ours[f"{site}.lora_A"].shape[1]),
            f"{site}.lora_E": (kept, 1),
            f"{site}.lora_B": (ours[f"{site}.lora_B"].shape[0], kept),
        }
        state.check_tensors(expected, stored, where)  # peft's shapes, key by key, before anything is copied
        keep = torch.tensor(mask, dtype=torch.bool)
        a, e, b = (stored[f"{site}.lora_{m}"] for m in "AEB")
        full_a = a.new_zeros(ours[f"{site}.lora_A"].shape)
        full_e = e.new_zeros(init_r)
        full_b = b.new_zeros(ours[f"{site}.lora_B"].shape)
        full_a[keep], full_e[keep], full_b[:, keep] = a, e[:, 0], b
        out[f"{site}.lora_A"], out[f"{site}.lora_E"], out[f"{site}.lora_B"] = full_a, full_e, full_b
        out[f"{site}.rank_mask"] = keep
    return out


# --------------------------------------------------------------------------- prompt learning


def prompt_module(model: nn.Module, adapter_name: str) -> nn.Module:
    """The one module of a prompt-learning adapter (its virtual tokens or prefix)."""
    modules = [module for _, module in state.adapter_modules(model, adapter_name)]
    if len(modules) != 1:
        raise ValueError(f"adapter {adapter_name!r} has {len(modules)} prompt modules; peft's format holds one.")
    return modules[0]


def prompt_tensor(module: nn.Module) -> Tensor:
    """What peft stores as ``prompt_embeddings``: the prompt the model consumes at inference (see the
    module doc). Computed in eval mode: a prompt encoder's dropout would put noise into the file, and
    draw from the random stream of a run that checkpoints in the middle of training (no exact resume).
    """
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            states = module.prefix_states() if hasattr(module, "prefix_states") else module.prompts()  # type: ignore[operator]
    finally:
        module.train(training)
    return states.detach().clone().contiguous()


def prompt_task_type(base: nn.Module, method: str) -> str:
    """peft's ``task_type`` for a prompt-learning adapter on ``base``.

    Raises:
        ValueError: for an encoder-decoder model or a head whose parity with peft is not checked.
    """
    name = type(base).__name__
    task = next((task for end, task in PROMPT_TASKS.items() if name.endswith(end)), None)
    if is_encoder_decoder(base) or task is None:
        raise ValueError(
            f"lightning_peft writes and reads {method} adapters in peft's format for "
            f"{', '.join('*' + end for end in PROMPT_TASKS)} models (peft's task_type "
            f"{', '.join(PROMPT_TASKS.values())}), whose outputs are checked equal to peft's; {name} is not one."
        )
    return task


def check_prompt_options(options: dict[str, Any], base: nn.Module, module: nn.Module, method: str, where: str) -> None:
    """Refuse peft prompt-learning fields that the model or lightning_peft's adapter does not fit.

    ``task_type`` must be the model's (see :func:`prompt_task_type`), ``num_transformer_submodules``
    1; for prefix tuning ``num_layers``, ``num_attention_heads`` and ``token_dim`` must be the
    model's attention cache layout (layers, key/value heads, their total size).
    """
    task = prompt_task_type(base, method)
    if options.get("task_type") not in (None, task):
        raise ValueError(
            f"{where} has task_type={options['task_type']!r}, but {type(base).__name__} takes task_type={task!r} "
            "(lightning_peft reads prompt-learning adapters for that head only)."
        )
    subs = options.get("num_transformer_submodules")
    if subs not in (None, 1):
        raise ValueError(
            f"{where} has num_transformer_submodules={subs!r}, which lightning_peft's {method} does not implement "
            "(supported: 1, one prompt before the model's input)."
        )
    layout = getattr(module, "layout", None)
    if layout is None:
        return
    layers, heads, head_dim = layout
    for field, value in (("num_layers", layers), ("num_attention_heads", heads), ("token_dim", heads * head_dim)):
        if options.get(field) not in (None, value):
            raise ValueError(
                f"{where} has {field}={options[field]!r}, but {type(base).__name__}'s attention cache takes "
                f"{field}={value} ({layers} layers, {heads} key/value heads of {head_dim})."
            )


def load_prompt(module: nn.Module, stored: Tensor) -> None:
    """Copy peft's ``prompt_embeddings`` (shape already checked) into the adapter's one trained tensor."""
    target = module.prefix if hasattr(module, "prefix_states") else module.embedding  # type: ignore[union-attr]
    assert isinstance(target, Tensor), "peft's prompt loads into a plain prompt or prefix (no encoder)"
    with torch.no_grad():
        target.copy_(stored.to(target))


def prompt_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of ``prompt_embeddings`` this module's adapter takes."""
    return tuple(prompt_tensor(module).shape)


__all__ = [
    "PROMPT_KEY",
    "adalora_from_peft",
    "adalora_to_peft",
    "check_prompt_options",
    "load_prompt",
    "prompt_module",
    "prompt_shape",
    "prompt_task_type",
    "prompt_tensor",
]
