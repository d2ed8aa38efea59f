"""Built-in methods. Importing this package registers each one (one file per method)."""

from lightning_peft.methods import adalora, bitfit, last_k, lora, topk  # noqa: F401
