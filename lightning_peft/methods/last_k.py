"""Last-k: train the last k transformer blocks in full and freeze the rest (partial fine-tuning;
see e.g. Lee et al., 2019, "What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning").

Every parameter ``p`` of the last ``k`` blocks trains, as a dense delta beside the frozen weight::

    p_eff = p + delta_p,    delta_p = 0 at init,  for every p in blocks[L - k:], nothing else

The delta trains exactly as ``p`` would (same gradient); keeping it apart leaves the base model
untouched until ``merge`` adds it in, at the cost of one extra copy of those blocks while training.
The blocks are the model's list of repeated layers (``model.layers``, ``transformer.h``,
``encoder.layer``); in encoder-decoder models, the decoder's.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lightning_peft.core.config import AdapterConfig, check_positive_int, invalid
from lightning_peft.core.delta import DeltaLayer
from lightning_peft.core.targeting import name_matches
from lightning_peft.core.wrapping import replace_modules
from lightning_peft.registry import Method, register


@dataclass(kw_only=True)
class LastKConfig(AdapterConfig):
    """Last-k options.

    Args:
        k: how many blocks, counted from the output end, train in full.
        blocks: the module that holds the blocks in order (a ``ModuleList``), by full name or
            dotted suffix (``"decoder.block"``). ``None``: the last list of repeated blocks in the
            model (the decoder's in an encoder-decoder model).
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    k: int = 1
    blocks: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "k", self.k)
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
            raise invalid(self, "blocks", self.blocks, "None or a module name such as 'model.layers'")


class BlockDelta(DeltaLayer):
    """Trains a dense delta on every parameter of one module inside the last k blocks."""

    method = "last_k"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer, dense=[n for n, _ in base_layer.named_parameters(recurse=False)])


def _is_block_list(module: nn.Module) -> bool:
    """A ModuleList of composite modules that all have one class (transformer layers)."""
    children = list(module.children())
    return (
        isinstance(module, nn.ModuleList)
        and bool(children)
        and len({type(c) for c in children}) == 1
        and any(True for _ in children[0].children())
        and any(True for _ in children[0].parameters())
    )


def block_lists(model: nn.Module) -> list[str]:
    """Names of the lists of repeated blocks in ``model``, outermost only, in module order."""
    found: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in found) or ".base_layer" in f".{name}":
            continue
        if _is_block_list(module):
            found.append(name)
    return found


def find_blocks(model: nn.Module, config: LastKConfig) -> tuple[str, list[tuple[str, nn.Module]]]:
    """(name of the block list, [(block name, block), ...]) that ``config`` refers to."""
    candidates = block_lists(model)
    if config.blocks is None:
        if not candidates:
            raise ValueError(
                f"last_k found no list of repeated blocks in {type(model).__name__}; "
                "pass LastKConfig.blocks, the name of the ModuleList that holds them."
            )
        name = candidates[-1]
    else:
        matches = [n for n, _ in model.named_modules() if n and name_matches(n, [config.blocks])]
        if len(matches) != 1:
            found = "matched no module" if not matches else f"matched {len(matches)} modules ({', '.join(matches)})"
            raise ValueError(
                f"LastKConfig.blocks={config.blocks!r} {found} of {type(model).__name__}; it must name one module. "
                f"Lists of blocks it has: {', '.join(candidates) or 'none found'}."
            )
        name = matches[0]
    blocks = [(f"{name}.{child}", block) for child, block in model.get_submodule(name).named_children()]
    if not blocks:
        raise ValueError(f"LastKConfig.blocks={config.blocks!r} names {name}, which holds no blocks.")
    return name, blocks


def apply(model: nn.Module, config: LastKConfig) -> list[str]:
    """Wrap every module with parameters of its own inside the last ``k`` blocks."""
    name, blocks = find_blocks(model, config)
    if config.k > len(blocks):
        raise invalid(config, "k", config.k, f"at most the number of blocks in {name} ({len(blocks)})")
    targets: list[str] = []
    for block_name, block in blocks[len(blocks) - config.k :]:
        for sub, module in block.named_modules(prefix=block_name):
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            if any(True for _ in module.children()):
                raise TypeError(
                    f"last_k trains a block by wrapping the modules that hold its parameters; {sub} "
                    f"({type(module).__name__}) holds parameters beside submodules, which it cannot wrap"
                )
            targets.append(sub)
    return replace_modules(model, targets, lambda _, module: BlockDelta(module))


register(
    Method(
        name="last_k",
        config_cls=LastKConfig,
        kind="layer",
        apply=apply,
        sharding=BlockDelta.shardings,
        summary="the last k transformer blocks train in full (as deltas beside the frozen weights); mergeable",
        paper="Lee et al. 2019, What Would Elsa Do? Freezing Layers During Transformer Fine-Tuning",
    )
)
