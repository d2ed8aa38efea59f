"""ForgettingProbe: watch a causal LM's adapter drift from its base on held-out general text.

    trainer = L.Trainer(callbacks=[PEFTCallback("lora"), ForgettingProbe(texts=general_text)])

Fine-tuning on a narrow task can make a model worse at everything else (catastrophic forgetting).
The probe measures it while training runs: every ``every_n_epochs`` it runs the held-out batches
twice, with the adapter and inside :func:`lightning_peft.disable_adapter` (the bare base model),
and logs

* ``forgetting/ppl_adapter`` and ``forgetting/ppl_base``: perplexity of the held-out text,
  ``exp(mean NLL)`` over its tokens, with and without the adapter;
* ``forgetting/kl``: the mean ``KL(p_adapter || p_base)`` of the next-token distributions.

The first half of this file is pure PyTorch (logits in, numbers out), usable and tested without a
Trainer; the callback below it only gathers the batches and runs the model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_peft.api.adapters import disable_adapter
from lightning_peft.core.config import check_positive_int, invalid
from lightning_peft.core.state import get_info
from lightning_peft.core.targeting import find_base_model

IGNORE_INDEX = -100
#: Cached base log-probabilities above this size get a warning (they live in CPU memory).
CACHE_WARN_BYTES = 2**30

# --------------------------------------------------------------------------- pure functions


def next_token_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
) -> torch.Tensor:
    """The labels a causal LM is scored on: ``labels`` if given, else ``input_ids`` with padding as -100.

    Args:
        input_ids: ``(B, T)`` token ids.
        attention_mask: ``(B, T)``, 0 at padding; ``None``: no padding.
        labels: ``(B, T)`` labels already masked by the data (prompt tokens as -100, say).
    """
    if labels is not None:
        return labels
    if attention_mask is None:
        return input_ids
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


def next_token_log_probs(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities at the positions that are scored, and the tokens they predict.

    Position ``t`` predicts token ``t + 1``: its distribution counts when ``labels[:, t + 1]`` is
    not ``ignore_index`` (padding and masked prompt tokens are left out).

    Args:
        logits: ``(B, T, V)`` a causal LM's output for the ``(B, T)`` inputs.
        labels: ``(B, T)`` labels aligned with the inputs (not shifted), -100 where not scored.

    Returns:
        ``(N, V)`` float32 ``log p(. | x_<=t)`` at the ``N`` scored positions and the ``(N,)`` targets.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"logits must be (B, T, V) and labels (B, T) with the same B, T; got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    logits, targets = logits[:, :-1], labels[:, 1:]  # (B, T-1, V), (B, T-1)
    scored = targets != ignore_index
    return F.log_softmax(logits[scored].float(), dim=-1), targets[scored]


def nll_sum(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``sum_i -log p(y_i)``: the summed negative log-likelihood of ``(N,)`` targets under ``(N, V)`` log-probs."""
    return -log_probs.gather(-1, targets.unsqueeze(-1)).sum()


def kl_sum(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_i KL(p_i || q_i) = sum_i sum_v p_i(v) (log p_i(v) - log q_i(v))`` over ``(N, V)`` log-probs.

    Terms with ``p_i(v) = 0`` are 0 (the ``0 log 0 = 0`` convention), also where ``q_i(v) = 0``.
    """
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum()


def perplexity(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``exp(-(1/N) sum_i log p(y_i | x_<i))`` over the ``N`` scored next tokens of one batch.

    Args:
        logits: ``(B, T, V)`` causal-LM logits; ``labels``: ``(B, T)`` with -100 where not scored.
    """
    log_probs, targets = next_token_log_probs(logits, labels)
    return (nll_sum(log_probs, targets) / targets.numel()).exp()


def next_token_kl(logits_p: torch.Tensor, logits_q: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean ``KL(p || q)`` of next-token distributions over the positions whose next label is scored.

    ``(1/N) sum_t sum_v p_t(v) (log p_t(v) - log q_t(v))`` with ``p_t = softmax(logits_p[:, t])``.

    Args:
        logits_p, logits_q: ``(B, T, V)`` logits of the two models for the same inputs.
        labels: ``(B, T)`` labels; positions ``t`` with ``labels[:, t + 1] == -100`` are left out.
    """
    log_p, targets = next_token_log_probs(logits_p, labels)
    log_q, _ = next_token_log_probs(logits_q, labels)
    return kl_sum(log_p, log_q) / targets.numel()


@dataclass(frozen=True)
class ForgettingStats:
    """Sums over held-out tokens, added across batches; the means come from the totals.

    Means over all tokens, not means of batch means: a batch of long texts weighs more.

    Attributes:
        nll_adapter: ``sum_i -log p_adapter(y_i)`` over the scored tokens.
        nll_base: ``sum_i -log p_base(y_i)``.
        kl: ``sum_i KL(p_adapter,i || p_base,i)`` over the same positions.
        tokens: the number ``N`` of scored tokens (= positions).
    """

    nll_adapter: float = 0.0
    nll_base: float = 0.0
    kl: float = 0.0
    tokens: int = 0

    @classmethod
    def from_log_probs(
        cls, log_p_adapter: torch.Tensor, log_p_base: torch.Tensor, targets: torch.Tensor
    ) -> ForgettingStats:
        """Stats of one batch from ``(N, V)`` log-probs at the scored positions (see :func:`next_token_log_probs`)."""
        return cls(
            nll_adapter=nll_sum(log_p_adapter, targets).item(),
            nll_base=nll_sum(log_p_base, targets).item(),
            kl=kl_sum(log_p_adapter, log_p_base).item(),
            tokens=targets.numel(),
        )

    @classmethod
    def from_logits(
        cls, logits_adapter: torch.Tensor, logits_base: torch.Tensor, labels: torch.Tensor
    ) -> ForgettingStats:
        """Stats of one batch from ``(B, T, V)`` logits with and without the adapter and ``(B, T)`` labels."""
        log_p_adapter, targets = next_token_log_probs(logits_adapter, labels)
        log_p_base, _ = next_token_log_probs(logits_base, labels)
        return cls.from_log_probs(log_p_adapter, log_p_base, targets)

    def __add__(self, other: ForgettingStats) -> ForgettingStats:
        return ForgettingStats(
            self.nll_adapter + other.nll_adapter,
            self.nll_base + other.nll_base,
            self.kl + other.kl,
            self.tokens + other.tokens,
        )

    def _mean(self, total: float) -> float:
        if self.tokens == 0:
            raise ValueError("ForgettingStats holds no scored tokens: the held-out texts are empty or all padding.")
        return total / self.tokens

    @property
    def ppl_adapter(self) -> float:
        """``exp(nll_adapter / tokens)``."""
        return math.exp(self._mean(self.nll_adapter))

    @property
    def ppl_base(self) -> float:
        """``exp(nll_base / tokens)``."""
        return math.exp(self._mean(self.nll_base))

    @property
    def mean_kl(self) -> float:
        """``kl / tokens``, in nats per token."""
        return self._mean(self.kl)

    def metrics(self, prefix: str = "forgetting") -> dict[str, float]:
        """``{prefix}/ppl_adapter``, ``{prefix}/ppl_base`` and ``{prefix}/kl``."""
        return {
            f"{prefix}/ppl_adapter": self.ppl_adapter,
            f"{prefix}/ppl_base": self.ppl_base,
            f"{prefix}/kl": self.mean_kl,
        }


# --------------------------------------------------------------------------- running a model


Batch = dict[str, torch.Tensor]


def adapter_root(module: nn.Module) -> nn.Module:
    """The module that ``lightning_peft.inject`` was called on: ``module`` or the first one inside it.

    Raises:
        ValueError: when nothing in ``module`` holds an adapter.
    """
    for candidate in module.modules():
        if get_info(candidate) is not None:
            return candidate
    raise ValueError(
        f"{type(module).__name__} has no lightning_peft adapter, so there is nothing to compare with the base: add a "
        "PEFTCallback to the Trainer (or call lightning_peft.inject on the module) before ForgettingProbe runs."
    )


def _as_batch(batch: Any) -> Batch:
    """``input_ids``, ``attention_mask`` and ``labels`` of a loader's batch (a dict, a tensor or a tuple of one)."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"ForgettingProbe: a held-out batch has no 'input_ids'; its keys are {sorted(batch)}.")
        return {k: batch[k] for k in ("input_ids", "attention_mask", "labels") if batch.get(k) is not None}
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        batch = batch[0]
    if isinstance(batch, torch.Tensor) and batch.dim() == 2:
        return {"input_ids": batch}
    raise ValueError(
        "ForgettingProbe: held-out batches must be dicts with 'input_ids' (and optionally 'attention_mask', "
        f"'labels'), or (B, T) tensors of token ids; got {type(batch).__name__}."
    )


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    out = model(**inputs)
    logits: torch.Tensor = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    # Input-side methods (prompt tuning) put virtual tokens first, so their output is longer: keep the last T.
    return logits[:, -batch["input_ids"].shape[1] :]  # (B, T, V)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode, each put back in its own mode afterwards (frozen parts may be in eval)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def measure_forgetting(
    module: nn.Module,
    batches: Iterable[Any],
    *,
    base_cache: list[torch.Tensor] | None = None,
) -> ForgettingStats:
    """Forgetting stats of an injected causal LM over ``batches``, with the adapter and without it.

    Runs in eval mode under ``torch.no_grad``; the modules' modes are restored afterwards.

    Args:
        module: what ``lightning_peft.inject`` was called on (or a module holding it), with a
            causal LM inside: the transformers model that :func:`find_base_model` finds is called
            as ``model(input_ids=..., attention_mask=...)``, the adapter off via
            :func:`lightning_peft.disable_adapter` on the injected module.
        batches: dicts with ``input_ids`` (and ``attention_mask``, ``labels``) or ``(B, T)`` id
            tensors, on the model's device.
        base_cache: a list to read and write the base model's scored log-probabilities, one entry
            per batch (CPU). Empty: the base runs and fills it; full: the base does not run again.
            Valid only while the batches and the base weights stay the same.
    """
    root = adapter_root(module)
    _, model = find_base_model(module)
    total = ForgettingStats()
    with eval_mode(module), torch.no_grad():
        for index, raw in enumerate(batches):
            batch = _as_batch(raw)
            labels = next_token_labels(batch["input_ids"], batch.get("attention_mask"), batch.get("labels"))
            log_p_adapter, targets = next_token_log_probs(_logits(model, batch), labels)
            if base_cache is not None and index < len(base_cache):
                log_p_base = base_cache[index].to(log_p_adapter.device)
            else:
                with disable_adapter(root):
                    log_p_base, _ = next_token_log_probs(_logits(model, batch), labels)
                if base_cache is not None:
                    base_cache.append(log_p_base.cpu())
            total = total + ForgettingStats.from_log_probs(log_p_adapter, log_p_base, targets)
    return total


# --------------------------------------------------------------------------- the callback


class ForgettingProbe(Callback):
    """Log how far the adapter has moved a causal LM from its base on held-out text, while training.

    At the start of training and after every ``every_n_epochs``-th training epoch, the held-out
    batches run through the model with the adapter and inside :func:`lightning_peft.disable_adapter`
    (in eval mode, without gradients; the modules' modes are restored), and three numbers are
    logged with ``pl_module.log`` (so they reach the loggers, ``trainer.callback_metrics`` and
    ``EarlyStopping``) and appended to :attr:`history`:

    * ``{prefix}/ppl_adapter = exp((1/N) sum_i -log p_adapter(y_i | y_<i))`` over the ``N`` held-out
      tokens (padding and ``-100`` labels left out); ``{prefix}/ppl_base`` the same without the adapter;
    * ``{prefix}/kl = (1/N) sum_t KL(p_adapter,t || p_base,t)`` with
      ``KL(p || q) = sum_v p(v) (log p(v) - log q(v))``, over the next-token distributions at the
      positions whose next token is scored (the same ``N`` predictions the perplexities score).

    The KL is taken under the adapted model, ``KL(p_adapter || p_base)``: the expected log-ratio over
    what the tuned model predicts, the quantity KL penalties against a reference model (RLHF) bound,
    so it reads on the same scale as such a budget. It is large where the adapter became confident
    on tokens the base found unlikely; the perplexity gap shows the other side, the base's
    predictions of real text that the adapter lost. For an adapter that is the identity at init
    (LoRA, whose ``B = 0``) the first probe gives a KL of exactly 0 and equal perplexities.

    The base is frozen, so its half never changes: with ``cache_base`` the base runs once, at the
    first probe, and its log-probabilities at the scored positions are kept on the CPU
    (``N x vocab x 4`` bytes; a warning above 1 GiB), so later probes run only the adapter. The
    held-out batches are built once, too. Every rank evaluates the whole held-out set (sharded
    strategies' forwards are collective, so ranks must run the same batches); the values agree
    across ranks and are logged with ``sync_dist=True``, which changes nothing but keeps Lightning's
    distributed-logging check quiet. The baseline at train start is written to the loggers
    directly at that step: logged with ``self.log`` there, the first epoch's value of the same
    name would replace it before Lightning writes either.

    Put it after the ``PEFTCallback`` in ``callbacks``, so that a method's own train-start work
    (calibration) is done before the first probe.

    Args:
        texts: held-out general text, tokenized with ``tokenizer`` (default: the LightningModule's
            ``tokenizer`` attribute, as the task modules have), truncated to ``max_length`` tokens.
        datamodule: held-out data instead of ``texts``: its ``probe_dataloader()`` if it has one,
            else ``val_dataloader()``; batches are dicts with ``input_ids`` (and ``attention_mask``,
            ``labels``) or ``(B, T)`` id tensors. It is attached to the trainer when it has none,
            so a task datamodule borrows the task module's tokenizer.
        every_n_epochs: probe after every n-th training epoch (also after the last one when it falls on n).
        batch_size: texts per batch (``texts`` only).
        max_length: tokens per text at most (``texts`` only).
        tokenizer: the tokenizer for ``texts``; default: ``pl_module.tokenizer``.
        prefix: the metrics' prefix, and part of the ``state_key``, so two probes (say, general text
            and code) can run side by side.
        probe_at_start: also probe at train start, the baseline (KL 0 for identity-at-init adapters);
            taken once: a resumed run (whose history comes back from the checkpoint) or a second fit skips it.
        cache_base: compute the base's side once and reuse it (see above); ``False`` recomputes it.

    Raises:
        ValueError: at construction for bad arguments (naming them); at train start when the module
            has no adapter or no tokenizer for ``texts``, or no held-out token is scored.
    """

    def __init__(
        self,
        texts: Sequence[str] | None = None,
        datamodule: pl.LightningDataModule | None = None,
        *,
        every_n_epochs: int = 1,
        batch_size: int = 8,
        max_length: int = 256,
        tokenizer: Any = None,
        prefix: str = "forgetting",
        probe_at_start: bool = True,
        cache_base: bool = True,
    ) -> None:
        name = type(self).__name__
        if (texts is None) == (datamodule is None):
            raise ValueError(
                f"{name} needs exactly one of texts= (held-out strings) or datamodule= (a LightningDataModule "
                f"whose val_dataloader gives held-out batches); got {'both' if texts is not None else 'neither'}."
            )
        if texts is not None:
            if isinstance(texts, str) or not isinstance(texts, Sequence):
                raise invalid(name, "texts", texts, "a sequence of strings (a list, not one string)")
            if not texts:
                raise invalid(name, "texts", texts, "a non-empty sequence of strings")
            bad = next((t for t in texts if not isinstance(t, str)), None)
            if bad is not None:
                raise invalid(name, "texts", bad, "a sequence of strings only (this item is not one)")
        if datamodule is not None and not isinstance(datamodule, pl.LightningDataModule):
            raise invalid(name, "datamodule", datamodule, "a LightningDataModule")
        check_positive_int(name, "every_n_epochs", every_n_epochs)
        check_positive_int(name, "batch_size", batch_size)
        check_positive_int(name, "max_length", max_length)
        if not isinstance(prefix, str) or not prefix:
            raise invalid(name, "prefix", prefix, "a non-empty string")
        for field, value in (("probe_at_start", probe_at_start), ("cache_base", cache_base)):
            if not isinstance(value, bool):
                raise invalid(name, field, value, "True or False")
        self.texts = list(texts) if texts is not None else None
        self.datamodule = datamodule
        self.every_n_epochs, self.batch_size, self.max_length = every_n_epochs, batch_size, max_length
        self.tokenizer, self.prefix = tokenizer, prefix
        self.probe_at_start, self.cache_base = probe_at_start, cache_base
        #: One entry per probe: ``{"step", "epoch", "ppl_adapter", "ppl_base", "kl"}`` (kept in checkpoints).
        self.history: list[dict[str, float]] = []
        self._batches: list[Batch] | None = None  # held-out batches on the CPU, built at the first probe
        self._base_cache: list[torch.Tensor] = []

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)

    # ------------------------------------------------------------------ held-out batches

    def tokenize(self, tokenizer: Any) -> list[Batch]:
        """``texts`` as right-padded batches of ``batch_size`` (padding masked; no pad token needed)."""
        assert self.texts is not None
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # any id: it is masked out
        batches = []
        for start in range(0, len(self.texts), self.batch_size):
            ids = [
                tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
                for text in self.texts[start : start + self.batch_size]
            ]
            width = max(1, max(len(row) for row in ids))
            input_ids = torch.full((len(ids), width), pad, dtype=torch.long)
            mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, tokens in enumerate(ids):
                input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
                mask[row, : len(tokens)] = 1
            batches.append({"input_ids": input_ids, "attention_mask": mask})
        return batches

    def held_out_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Batch]:
        """The held-out batches (CPU), built on first use and reused, so every probe sees the same tokens."""
        if self._batches is not None:
            return self._batches
        name = type(self).__name__
        if self.texts is not None:
            tokenizer = self.tokenizer if self.tokenizer is not None else getattr(pl_module, "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    f"{name}(texts=...) needs a tokenizer: pass tokenizer=, or give {type(pl_module).__name__} a "
                    "`tokenizer` attribute (the task modules have one)."
                )
            batches = self.tokenize(tokenizer)
        else:
            dm = self.datamodule
            assert dm is not None
            if dm.trainer is None:
                dm.trainer = trainer  # a task datamodule then borrows the task module's tokenizer
            dm.setup("validate")
            loader = dm.probe_dataloader() if hasattr(dm, "probe_dataloader") else dm.val_dataloader()
            batches = [_as_batch(b) for b in loader]
        counted = sum(int((next_token_labels(**b)[:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        if counted == 0:
            raise ValueError(
                f"{name}: the held-out data has no token to score (each text needs at least 2 tokens, not all padding)."
            )
        self._batches = batches
        return batches

    # ------------------------------------------------------------------ probing

    def probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Measure now; return ``{prefix}/ppl_adapter, /ppl_base, /kl`` and append them to :attr:`history`."""
        adapter_root(pl_module)  # fail with a clear message before building the batches
        device = pl_module.device
        batches = [{k: v.to(device) for k, v in b.items()} for b in self.held_out_batches(trainer, pl_module)]
        cache = self._base_cache if self.cache_base else None
        cached_before = bool(self._base_cache)
        with trainer.precision_plugin.forward_context():
            stats = measure_forgetting(pl_module, batches, base_cache=cache)
        if cache is not None and not cached_before:
            size = sum(log_p.numel() * log_p.element_size() for log_p in cache)
            if size > CACHE_WARN_BYTES:
                rank_zero_warn(
                    f"{type(self).__name__} keeps the base's held-out log-probabilities in {size / 2**30:.1f} GiB of "
                    "CPU memory; pass cache_base=False to recompute them at each probe, or hold out fewer tokens."
                )
        metrics = stats.metrics(self.prefix)
        self.history.append(
            {
                "step": trainer.global_step,
                "epoch": trainer.current_epoch,
                **{k.removeprefix(f"{self.prefix}/"): v for k, v in metrics.items()},
            }
        )
        return metrics

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.probe_at_start or self.history:
            return  # the baseline was taken: a resumed run restored it with the history
        metrics = self.probe(trainer, pl_module)
        for logger in trainer.loggers:  # rank-zero only: Lightning's loggers are
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        for key, value in self.probe(trainer, pl_module).items():
            pl_module.log(key, value, on_step=False, on_epoch=True, sync_dist=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
