"""Prompt tuning (Lester et al., 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

N trainable embeddings ``P`` (N x H) go before the embedded input ``X = E[x]`` (T x H) of a frozen
model; only ``P`` trains::

    h = model([P; X]),    mask = [1_N; m],    labels = [-100_N; y]

``P`` starts random (``init="random"``: normal with the spread of the vocabulary embeddings),
as the embeddings of N random vocabulary tokens (``"vocab"``), or as the embeddings of a text
(``"text"``; the paper's class-label / prompt-text initialization), its tokens repeated to fill N.
There is nothing to merge: the prompt is an input, not a weight update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_peft.core.config import AdapterConfig, check_choice, check_positive_int, init_only, invalid
from lightning_peft.core.virtual import VirtualTokens, attach, input_embeddings
from lightning_peft.registry import ALL_SHARDINGS, Method, register


@dataclass(kw_only=True)
class PromptTuningConfig(AdapterConfig):
    """Prompt tuning options.

    Args:
        num_virtual_tokens: N, the number of trainable prompt embeddings put before the input.
        init: initial prompt: ``"random"``, ``"vocab"`` (embeddings of random vocabulary tokens) or
            ``"text"`` (embeddings of ``init_text``).
        init_text: the text whose token embeddings start the prompt (``init="text"``); tokenized
            without special tokens (no BOS / [CLS]), at most N tokens, repeated to fill N.
        tokenizer: a tokenizer (anything called as ``tokenizer(text, add_special_tokens=False)``
            returning ``{"input_ids": [...]}``) or a name or path for ``AutoTokenizer.from_pretrained``;
            needed for ``init="text"``.
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.

    ``init``, ``init_text`` and ``tokenizer`` only choose the starting values: checkpoints do not
    record them, so an adapter loads without the tokenizer.
    """

    num_virtual_tokens: int = 20
    init: Literal["random", "vocab", "text"] = init_only("random")
    init_text: str | None = init_only()
    tokenizer: Any = init_only()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        check_choice(self, "init", self.init, ("random", "vocab", "text"))
        if self.init == "text":
            if not isinstance(self.init_text, str) or not self.init_text.strip():
                raise invalid(self, "init_text", self.init_text, "a non-empty string when init='text'")
            if self.tokenizer is None:
                raise invalid(
                    self, "tokenizer", None, "a tokenizer, or its name or path, to turn init_text into tokens"
                )
        else:
            for name in ("init_text", "tokenizer"):
                if getattr(self, name) is not None:
                    raise invalid(self, name, getattr(self, name), f"None unless init='text' (init={self.init!r})")


def text_token_ids(config: PromptTuningConfig, vocab_size: int) -> list[int]:
    """The token ids of ``config.init_text``, checked to fit in N virtual tokens and the vocabulary."""
    tokenizer = config.tokenizer
    if isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tokenizer)
    if not callable(tokenizer):
        raise invalid(config, "tokenizer", tokenizer, "a callable tokenizer or a name or path for AutoTokenizer")
    ids = list(tokenizer(config.init_text, add_special_tokens=False)["input_ids"])
    n = config.num_virtual_tokens
    if not ids:
        raise invalid(config, "init_text", config.init_text, "a text with at least one token")
    if len(ids) > n:
        raise invalid(
            config,
            "init_text",
            config.init_text,
            f"at most num_virtual_tokens={n} tokens long (it has {len(ids)} with this tokenizer); "
            "shorten it or raise num_virtual_tokens",
        )
    if max(ids) >= vocab_size:
        raise invalid(
            config, "tokenizer", tokenizer, f"a tokenizer of this model (it gave id {max(ids)} >= {vocab_size})"
        )
    return ids


class PromptEmbedding(VirtualTokens):
    """The N trainable prompt embeddings of prompt tuning."""

    adapter_names = ("embedding",)
    method = "prompt_tuning"

    def __init__(self, config: PromptTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config.num_virtual_tokens)
        table = word_embeddings.weight.detach()  # (V, H)
        dtype = table.dtype if table.is_floating_point() else torch.float32
        n = config.num_virtual_tokens
        with torch.no_grad():
            if config.init == "text":
                ids = text_token_ids(config, table.shape[0])
                values = word_embeddings(torch.tensor((ids * n)[:n], device=table.device))
            elif config.init == "vocab":
                values = word_embeddings(torch.randint(0, table.shape[0], (n,), device=table.device))
            else:
                values = torch.randn(n, table.shape[1], device=table.device) * table.float().std()
        self.embedding = nn.Parameter(values.detach().to(dtype).clone())  # (N, H)

    def prompts(self) -> Tensor:
        return self.embedding


def apply(model: nn.Module, config: PromptTuningConfig) -> list[str]:
    return attach(model, "prompt_tuning", lambda base: PromptEmbedding(config, input_embeddings(base, "prompt_tuning")))


register(
    Method(
        name="prompt_tuning",
        config_cls=PromptTuningConfig,
        kind="input",
        sharding=ALL_SHARDINGS,
        peft_type="PROMPT_TUNING",  # peft's name for it; no PeftFormat mapping yet
        apply=apply,
        summary="N trainable embeddings put before the input embeddings; init random, from the vocabulary or a text",
        paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning",
    )
)
