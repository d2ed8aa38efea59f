"""Built-in methods. Importing this package registers each one (one file per method)."""

from lightning_peft.methods import (
    ia3,  # noqa: F401
    lora,  # noqa: F401
)
