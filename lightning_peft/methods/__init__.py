"""Built-in methods. Importing this package registers each one (one file per method)."""

from lightning_peft.methods import lora, p_tuning, prefix_tuning, prompt_tuning  # noqa: F401
