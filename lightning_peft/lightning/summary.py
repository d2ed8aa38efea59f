"""A model summary that shows, per layer, how many parameters train and how many are frozen."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from lightning.pytorch.utilities.model_summary.model_summary import LEFTOVER_PARAMS_NAME
from typing_extensions import override


def _parameters(pl_module: pl.LightningModule, names: list[str], name: str) -> list[torch.nn.Parameter]:
    if name != LEFTOVER_PARAMS_NAME:
        return list(pl_module.get_submodule(name).parameters())
    inside = {id(p) for n in names if n != LEFTOVER_PARAMS_NAME for p in pl_module.get_submodule(n).parameters()}
    return [p for p in pl_module.parameters() if id(p) not in inside]


Columns = list[tuple[str, list[str]]]


def with_trainable_column(pl_module: pl.LightningModule, data: Columns) -> Columns:
    """Lightning's summary columns plus ``Trainable`` after ``Params``, without parameter-less rows
    (metrics, dropout, activations) and without the row numbers, which would then skip."""
    names = dict(data)["Name"]
    params = [_parameters(pl_module, names, name) for name in names]
    keep = [i for i, p in enumerate(params) if p]  # metrics, dropout, activations: nothing to show
    trainable = [get_human_readable_count(sum(p.numel() for p in params[i] if p.requires_grad)) for i in keep]
    out = [(column, [values[i] for i in keep]) for column, values in data if column != " "]  # no row numbers
    out.insert([column for column, _ in out].index("Params") + 1, ("Trainable", trainable))
    return out


class PEFTModelSummary(RichModelSummary):
    """Lightning's rich model summary plus a ``Trainable`` column beside ``Params``.

    With a PEFT method injected, most of each layer is frozen; the column shows where the few
    trainable parameters are, and the footer gives trainable and non-trainable totals.

    Args:
        max_depth: how deep nested layers are listed (0 turns the summary off).
    """

    def __init__(self, max_depth: int = 2, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth=max_depth, **summarize_kwargs)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._max_depth:
            return
        summary = self._summary(trainer, pl_module)
        if trainer.is_global_zero:
            self.summarize(
                with_trainable_column(pl_module, summary._get_summary_data()),
                summary.total_parameters,
                summary.trainable_parameters,
                summary.model_size,
                summary.total_training_modes,
                total_flops=getattr(summary, "total_flops", 0),
                **self._summarize_kwargs,
            )

    @staticmethod
    @override
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in summary_data:
            numeric = name in ("Params", "Trainable", "FLOPs", "Params per Device", "In sizes", "Out sizes")
            table.add_column(name, justify="right" if numeric else "left", no_wrap=name == "Name")
        for row in zip(*(values for _, values in summary_data), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        frozen = total_parameters - trainable_parameters
        share = 100.0 * trainable_parameters / max(total_parameters, 1)
        console.print(
            f"[bold]Trainable params[/]: {get_human_readable_count(trainable_parameters)} ({share:.2f} %)   "
            f"[bold]Frozen params[/]: {get_human_readable_count(frozen)}   "
            f"[bold]Total params[/]: {get_human_readable_count(total_parameters)}   "
            f"[bold]Size (MB)[/]: {model_size:,.1f}"
        )
