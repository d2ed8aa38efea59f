"""Interoperability with other tools' adapter formats (Hugging Face peft)."""

from lightning_peft.interop.peft_format import load_peft_adapter, save_peft_adapter

__all__ = ["load_peft_adapter", "save_peft_adapter"]
