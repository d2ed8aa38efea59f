"""Built-in methods. Importing this package registers each one (one file per method)."""

from lightning_peft.methods import lora  # noqa: F401
