"""Interoperability with other tools' adapter formats (Hugging Face peft)."""

from lightning_peft.interop.peft_format import (
    check_peft_adapter,
    load_peft_adapter,
    save_peft_adapter,
    write_peft_folder,
)

__all__ = ["check_peft_adapter", "load_peft_adapter", "save_peft_adapter", "write_peft_folder"]
