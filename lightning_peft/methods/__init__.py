"""Built-in methods. Importing this package registers each one (one file per method)."""

# isort: off
# Registration order is the order methods are listed in; LoRA, the default, comes first.
from lightning_peft.methods import lora  # noqa: F401
from lightning_peft.methods import ia3  # noqa: F401
from lightning_peft.methods import bottleneck  # noqa: F401

# isort: on
