"""Built-in methods. Importing this package registers each one (one file per method).

Registration order is the order methods are listed in (README, CLI, errors); LoRA, the default,
comes first.

``lightning_peft.methods`` is both this package and the public ``lightning_peft.methods()``
(the names of the registered methods): Python binds a subpackage to its parent's attribute of
the same name once it is imported, replacing whatever the parent had put there, so the package
itself is made callable, and ``lightning_peft.methods()`` and ``lightning_peft.methods.lora``
work whatever was imported first.
"""

from __future__ import annotations

import sys
import types

from lightning_peft import registry


class _MethodsPackage(types.ModuleType):
    def __call__(self) -> list[str]:
        """Names of every registered method, in registration order (``lightning_peft.registry.methods``)."""
        return registry.methods()


sys.modules[__name__].__class__ = _MethodsPackage

# isort: off
from lightning_peft.methods import lora  # noqa: E402, F401
from lightning_peft.methods import lora_embedding  # noqa: E402, F401  (LoRA on nn.Embedding: a layer type)
from lightning_peft.methods import lora_mha  # noqa: E402, F401  (LoRA on nn.MultiheadAttention: a layer type)
from lightning_peft.methods import lora_conv  # noqa: E402, F401  (LoRA on nn.Conv1d/2d/3d)
from lightning_peft.methods import dora  # noqa: E402, F401  (a LoRA variant: registers use_dora)
from lightning_peft.methods import lora_param  # noqa: E402, F401  (LoRA on bare parameters: target_parameters)
from lightning_peft.methods import lora_eva  # noqa: E402, F401  (LoRA's data-driven init "eva": a calibration)
from lightning_peft.methods import lora_corda  # noqa: E402, F401  (LoRA's data-driven init "corda": a calibration)
from lightning_peft.methods import ia3  # noqa: E402, F401
from lightning_peft.methods import bottleneck  # noqa: E402, F401
from lightning_peft.methods import adalora  # noqa: E402, F401
from lightning_peft.methods import bitfit  # noqa: E402, F401
from lightning_peft.methods import last_k  # noqa: E402, F401
from lightning_peft.methods import topk  # noqa: E402, F401
from lightning_peft.methods import prompt_tuning  # noqa: E402, F401
from lightning_peft.methods import p_tuning  # noqa: E402, F401
from lightning_peft.methods import prefix_tuning  # noqa: E402, F401
from lightning_peft.methods import trainable_tokens  # noqa: E402, F401  (also LoRA's trainable_token_indices)

# isort: on
