"""``python -m lightning_peft {fit,validate,test,predict} --config ...``: LightningCLI with PEFT.

The PEFT method is a Trainer callback in the config, given by name or as a config object::

    trainer:
      callbacks:
        - class_path: lightning_peft.PEFTCallback
          init_args:
            method:
              class_path: lightning_peft.methods.lora.LoRAConfig
              init_args: {r: 8, alpha: 16}

and on the command line as ``--trainer.callbacks.method.r 16`` (the last callback in the list).
Beyond Lightning's own CLI this adds: method configs accepted as ``class_path`` objects, the
registered methods and their options in ``--help``, a model summary with trainable vs frozen
parameters, and ``predict`` printing its predictions as JSON lines.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

import jsonargparse
import yaml
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from typing_extensions import override

from lightning_peft import registry
from lightning_peft.core.config import AdapterConfig
from lightning_peft.lightning.callback import PEFTCallback
from lightning_peft.lightning.summary import PEFTModelSummary

SUBCOMMANDS = ("fit", "validate", "test", "predict")
#: The command that prints one method's options in full (type, default and description).
METHOD_HELP = "python -m lightning_peft fit --trainer.callbacks+=PEFTCallback --trainer.callbacks.method.help {cls}"


def _format_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return json.dumps(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return json.dumps(field.default_factory())
    return "required"


def methods_help() -> str:
    """Every registered method with its options (name: type = default), for ``--help``."""
    lines = ["PEFT methods (set in trainer.callbacks as PEFTCallback's method: a name or a class_path config):"]
    for method in registry.all_methods():
        cls = method.config_cls
        lines.append(f"  {method.name}: {method.summary}")
        lines.append(f"    class_path: {cls.__module__}.{cls.__qualname__}")
        for field in dataclasses.fields(cls):
            lines.append(f"    {field.name}: {field.type} = {_format_default(field)}")
        lines.append(f"    all about each option: {METHOD_HELP.format(cls=cls.__name__)}")
    return "\n".join(lines)


class _HelpFormatter(jsonargparse.DefaultHelpFormatter):
    """Keeps the line breaks of the description and the methods list."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


class LogConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` as Lightning does and also logs the whole run config to every logger.

    So a W&B run (or ``hparams.yaml``) records exactly what was run, under the key ``cli``: model,
    data, trainer and the PEFT method with its options, as plain JSON.
    """

    @override
    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_validation=True))
        config.pop("config", None)  # the paths of the config files given
        for logger in trainer.loggers:
            logger.log_hyperparams({"cli": config})


class PEFTLightningCLI(LightningCLI):
    """LightningCLI that knows the PEFT method configs and prints what PEFT needs to see.

    Args and behaviour are LightningCLI's; subclass mode is on for models and datamodules, the
    saved ``config.yaml`` is overwritten on reruns, and every registered method's config class
    can be given wherever an :class:`~lightning_peft.core.config.AdapterConfig` is expected.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Method configs are dataclasses, which jsonargparse would otherwise only take as plain
        # nested options of the declared (base) class; this lets `class_path: ...LoRAConfig` through.
        jsonargparse.set_parsing_settings(subclasses_enabled=[AdapterConfig])
        # Imported classes are known subclasses, which short class_paths resolve to
        # (`LoRAConfig`, `PEFTCallback`, `SequenceClassification`) and --help lists.
        registry.all_methods()
        import lightning_peft.tasks as tasks

        for name in tasks.__all__:
            getattr(tasks, name)
        help_kwargs = {"epilog": methods_help(), "formatter_class": _HelpFormatter}
        parser_kwargs = {
            "description": "lightning_peft: parameter-efficient fine-tuning with PyTorch Lightning.",
            **help_kwargs,
            **{cmd: dict(help_kwargs) for cmd in SUBCOMMANDS},
            **kwargs.pop("parser_kwargs", {}),
        }
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", LogConfigCallback)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with a rich progress bar and :class:`PEFTModelSummary` unless configured otherwise."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        added: list[Any] = []
        for flag, kind, default in (
            ("enable_progress_bar", ProgressBar, RichProgressBar),
            ("enable_model_summary", ModelSummary, PEFTModelSummary),
        ):
            wanted = config.get(flag) is not False and not config.get("barebones")
            if wanted and not any(isinstance(c, kind) for c in callbacks):
                added.append(default())
        if added and "callbacks" not in kwargs:
            kwargs["callbacks"] = [*callbacks, *added]
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        self._fit_start = time.perf_counter()

    def after_fit(self) -> None:
        """One line with the final validation metrics and one with the checkpoint to use next."""
        if not self.trainer.is_global_zero:
            return
        elapsed = time.perf_counter() - self._fit_start
        metrics = {k: float(v) for k, v in sorted(self.trainer.callback_metrics.items()) if k.startswith("val_")}
        shown = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()) or "no validation run"
        print(f"fit finished in {elapsed:.0f} s: {shown}")
        checkpoint = self.trainer.checkpoint_callback
        path = getattr(checkpoint, "best_model_path", "") or getattr(checkpoint, "last_model_path", "")
        if path and os.path.isfile(path):
            peft = any(isinstance(c, PEFTCallback) for c in self.trainer.callbacks)
            print(f"checkpoint ({'adapter only, ' if peft else ''}{os.path.getsize(path) / 1e3:,.0f} kB): {path}")

    def predict(self, **kwargs: Any) -> Any:
        """Run ``Trainer.predict`` and print each prediction as one JSON line on stdout."""
        predictions = self.trainer.predict(**kwargs)
        for batch in predictions or []:
            for item in batch if isinstance(batch, list) else [batch]:
                print(json.dumps(item, default=str), file=sys.stdout)
        return predictions


def main(args: list[str] | None = None, *, run: bool = True) -> PEFTLightningCLI:
    """The console entry point (``lightning-peft`` / ``python -m lightning_peft``)."""
    return PEFTLightningCLI(args=args, run=run)


__all__ = ["PEFTLightningCLI", "main", "methods_help"]
