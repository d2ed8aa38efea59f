"""BitFit: train only the bias terms (Ben Zaken et al., 2022, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models").

Every bias ``b`` of the model (linear layers, layer norms, ...) is trained; all other weights stay
frozen. The trained bias is kept as a delta beside the frozen one::

    h = f(x; W, b + delta_b),    delta_b = 0 at init

which trains exactly as ``b`` itself would (same gradient), leaves the base model untouched until
``merge`` adds ``delta_b`` to ``b``, and makes checkpoints hold just the bias deltas. Architectures
without bias terms (LLaMA, T5) have nothing for BitFit to train.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_peft.core.config import LayerConfig
from lightning_peft.core.delta import DeltaLayer
from lightning_peft.core.layer import AdapterModule
from lightning_peft.core.targeting import find_base_model, in_layers, iter_named_modules, name_matches, relative_name
from lightning_peft.core.wrapping import replace_modules, select_targets
from lightning_peft.registry import Method, register


@dataclass(kw_only=True)
class BitFitConfig(LayerConfig):
    """BitFit options.

    Args:
        target_modules: modules whose bias trains, matched as in
            :class:`~lightning_peft.core.config.LayerConfig`. ``None``: every module with a bias of
            its own (every bias term of the model, each tensor once).
        exclude_modules: see :class:`~lightning_peft.core.config.LayerConfig`.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """


class BiasDelta(DeltaLayer):
    """Trains a delta on the wrapped module's ``bias``: ``h = f(x; W, b + delta_b)``."""

    method = "bitfit"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, dense=["bias"])


def _has_bias(module: nn.Module) -> bool:
    return isinstance(dict(module.named_parameters(recurse=False)).get("bias"), nn.Parameter)


def _every_bias(model: nn.Module) -> list[str]:
    """Names of the leaf modules owning a bias, each bias tensor once, never inside an adapter module.

    Leaf modules only, so that no wrapper ends up inside another; a bias that only a composite
    module holds (not tied to a leaf's, as BERT's output bias is) is refused rather than skipped.
    """
    names: list[str] = []
    covered: set[int] = set()
    inside: list[str] = []
    for name, module in iter_named_modules(model):
        if any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, AdapterModule):
            inside.append(f"{name}.")  # e.g. a task head in modules_to_save, which trains in full
            continue
        bias = dict(module.named_parameters(recurse=False)).get("bias")
        if isinstance(bias, nn.Parameter) and not any(True for _ in module.children()) and id(bias) not in covered:
            covered.add(id(bias))
            names.append(name)
    uncovered = [
        n
        for n, p in model.named_parameters()
        if n.rsplit(".", 1)[-1] == "bias" and id(p) not in covered and not any(n.startswith(i) for i in inside)
    ]
    if uncovered:
        raise TypeError(
            f"bitfit wraps the modules that hold bias terms, but {', '.join(uncovered[:5])} belong to modules "
            "with submodules, which it cannot wrap; pass target_modules to choose the biases to train."
        )
    return names


def apply(model: nn.Module, config: BitFitConfig) -> list[str]:
    """Wrap every selected module that has a bias."""
    owner = type(config).__name__
    if config.target_modules is None:
        names = _every_bias(model)
        if config.exclude_modules is not None:
            names = [n for n in names if not name_matches(n, config.exclude_modules)]
        base_path, _ = find_base_model(model)
        names = [
            n
            for n in names
            if in_layers(relative_name(n, base_path), config.layers_to_transform, config.layers_pattern)
        ]
        if not names:
            raise ValueError(
                f"bitfit found no bias term to train in {type(model).__name__}: this architecture has no biases "
                "(LLaMA and T5 have none). Use another method, e.g. lora, or last_k to train whole blocks."
            )
    else:
        names = select_targets(model, config)
        without = [n for n in names if not _has_bias(model.get_submodule(n))]
        if without:
            raise TypeError(
                f"{owner}.target_modules selected modules without a bias of their own: {', '.join(without[:5])}; "
                "bitfit trains biases, so target modules that have one (or leave target_modules=None for all)."
            )
        nested = [n for n in names if any(other.startswith(f"{n}.") for other in names)]
        if nested:
            raise TypeError(
                f"{owner}.target_modules selected {', '.join(nested[:5])} together with modules inside them; "
                "select either the outer module or the inner ones."
            )
    return replace_modules(model, names, lambda _, module: BiasDelta(module))


register(
    Method(
        name="bitfit",
        config_cls=BitFitConfig,
        kind="layer",
        apply=apply,
        sharding=BiasDelta.shardings,
        summary="only the bias terms train (kept as deltas b + delta_b beside the frozen biases); mergeable",
        paper="Ben Zaken et al. 2022, BitFit: Simple Parameter-efficient Fine-tuning for Transformer-based "
        "Masked Language-models",
    )
)
