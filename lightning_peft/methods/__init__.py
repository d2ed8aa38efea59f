"""Built-in methods. Importing this package registers each one (one file per method).

LoRA is imported first so that it, the default method, leads every listing (README, CLI, errors).
"""

from lightning_peft.methods import lora  # noqa: F401

# isort: split
from lightning_peft.methods import adalora, bitfit, last_k, topk  # noqa: F401
