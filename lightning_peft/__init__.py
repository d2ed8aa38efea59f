"""lightning_peft: parameter-efficient fine-tuning as PyTorch Lightning callbacks.

The pure-PyTorch API (``inject``, ``merge``, ``save_adapter``, ...) works on any ``nn.Module``;
``PEFTCallback`` brings it to a Lightning ``Trainer``. Imports are lazy, so ``import lightning_peft``
loads neither torch nor lightning until a name is used.

``lightning_peft.methods()`` lists the registered methods; ``lightning_peft.methods`` is also the
package of built-in methods (``lightning_peft.methods.lora``), made callable so that both hold
whichever is imported first (see ``lightning_peft/methods/__init__.py``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "PEFTCallback": "lightning_peft.lightning.callback",
    "ForgettingProbe": "lightning_peft.lightning.forgetting",
    "inject": "lightning_peft.api.inject",
    "merge": "lightning_peft.api.inject",
    "unmerge": "lightning_peft.api.inject",
    "merge_requantized": "lightning_peft.api.inject",
    "unload": "lightning_peft.api.inject",
    "summary": "lightning_peft.api.inject",
    "delete_adapter": "lightning_peft.api.inject",
    "adapters": "lightning_peft.api.adapters",
    "active_adapters": "lightning_peft.api.adapters",
    "set_adapter": "lightning_peft.api.adapters",
    "disable_adapter": "lightning_peft.api.adapters",
    "mixed_batch": "lightning_peft.api.adapters",
    "hotswap_adapter": "lightning_peft.api.adapters",
    "add_weighted_adapter": "lightning_peft.api.combine",
    "trainable_state_dict": "lightning_peft.core.state",
    "get_info": "lightning_peft.core.state",
    "on_step": "lightning_peft.api.training",
    "regularization": "lightning_peft.api.training",
    "calibrate": "lightning_peft.api.training",
    "save_adapter": "lightning_peft.api.io",
    "load_adapter": "lightning_peft.interop.loading",
    "save_peft_adapter": "lightning_peft.interop.peft_format",
    "load_peft_adapter": "lightning_peft.interop.peft_format",
    "quantize": "lightning_peft.core.quantize",
    "loftq": "lightning_peft.methods.lora_loftq",
    "dequantize": "lightning_peft.core.quantize",
    "prepare_for_kbit_training": "lightning_peft.core.quantize",
    "enable_gradient_checkpointing": "lightning_peft.core.checkpointing",
    # The subpackage itself, which is callable: Python binds it to this name once imported anyway.
    "methods": "lightning_peft.methods",
    "get_method": "lightning_peft.api",
}

__all__ = [
    "ForgettingProbe",
    "PEFTCallback",
    "active_adapters",
    "add_weighted_adapter",
    "adapters",
    "delete_adapter",
    "disable_adapter",
    "hotswap_adapter",
    "mixed_batch",
    "set_adapter",
    "calibrate",
    "dequantize",
    "enable_gradient_checkpointing",
    "get_info",
    "get_method",
    "inject",
    "load_adapter",
    "load_peft_adapter",
    "loftq",
    "merge",
    "merge_requantized",
    "methods",
    "on_step",
    "prepare_for_kbit_training",
    "quantize",
    "regularization",
    "save_adapter",
    "save_peft_adapter",
    "summary",
    "trainable_state_dict",
    "unload",
    "unmerge",
]

if TYPE_CHECKING:
    from lightning_peft.api import get_method
    from lightning_peft.api.adapters import (
        active_adapters,
        adapters,
        disable_adapter,
        hotswap_adapter,
        mixed_batch,
        set_adapter,
    )
    from lightning_peft.api.combine import add_weighted_adapter
    from lightning_peft.api.inject import (
        delete_adapter,
        inject,
        merge,
        merge_requantized,
        summary,
        unload,
        unmerge,
    )
    from lightning_peft.api.io import save_adapter
    from lightning_peft.api.training import calibrate, on_step, regularization
    from lightning_peft.core.checkpointing import enable_gradient_checkpointing
    from lightning_peft.core.quantize import dequantize, prepare_for_kbit_training, quantize
    from lightning_peft.core.state import get_info, trainable_state_dict
    from lightning_peft.interop.loading import load_adapter
    from lightning_peft.interop.peft_format import load_peft_adapter, save_peft_adapter
    from lightning_peft.lightning.callback import PEFTCallback
    from lightning_peft.lightning.forgetting import ForgettingProbe
    from lightning_peft.methods.lora_loftq import loftq
    from lightning_peft.registry import methods  # at run time the callable package, called the same way


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_peft' has no attribute {name!r}")
    imported = importlib.import_module(module)
    if imported.__name__ == f"{__name__}.{name}":  # a subpackage exported as itself
        return imported
    value = getattr(imported, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
