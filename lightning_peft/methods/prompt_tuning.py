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
from lightning_peft.registry import ALL_SHARDINGS, Method, PeftFormat, register


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


#: peft prompt-learning config fields that say what the file is, or that the interop layer checks
#: against the model (``task_type``, ``num_transformer_submodules``, ``token_dim``, ``num_layers``,
#: ``num_attention_heads``: see ``lightning_peft.interop.peft_layouts.check_prompt_options``).
_PEFT_PROMPT_COMMON = frozenset(
    {
        "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "num_transformer_submodules", "token_dim", "num_layers", "num_attention_heads",
    }
)  # fmt: skip


def refuse_peft_fields(peft_type: str, options: dict[str, Any], read: set[str]) -> None:
    """Refuse any field that is neither metadata nor in ``read``, and any non-empty ``modules_to_save``."""
    for name, value in options.items():
        if name == "modules_to_save" and value not in (None, []):
            raise ValueError(
                f"peft {peft_type} adapter_config.json has modules_to_save={value!r}, which lightning_peft does not "
                "read for prompt-learning adapters (supported: None)."
            )
        if name not in _PEFT_PROMPT_COMMON and name not in read and name != "modules_to_save":
            raise ValueError(
                f"peft {peft_type} adapter_config.json has field {name!r}={value!r}, which lightning_peft does not "
                "know; it refuses an option it cannot interpret rather than dropping it."
            )


def peft_tokens(peft_type: str, options: dict[str, Any]) -> int:
    value = options["num_virtual_tokens"]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"peft {peft_type} adapter_config.json has num_virtual_tokens={value!r}; a positive int.")
    return value


def peft_prompt_fields(config: AdapterConfig) -> dict[str, Any]:
    if config.modules_to_save:
        raise ValueError(
            f"modules_to_save={config.modules_to_save!r}: lightning_peft does not write modules_to_save in peft's "
            "prompt-learning format; save this adapter with lightning_peft.save_adapter."
        )
    # None: peft fills them from the model's config on loading (the interop layer checks them on reading)
    return {"num_transformer_submodules": 1, "token_dim": None, "num_layers": None, "num_attention_heads": None,
            "modules_to_save": None}  # fmt: skip


#: Our ``init`` as peft's ``prompt_tuning_init``, and back.
_PEFT_INIT = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


def to_peft(config: PromptTuningConfig) -> dict[str, Any]:
    """Our options as peft's ``PromptTuningConfig`` fields (the file's tensor is the prompt ``P``)."""
    tokenizer = config.tokenizer
    name = tokenizer if isinstance(tokenizer, str) or tokenizer is None else getattr(tokenizer, "name_or_path", None)
    if config.init == "text" and not name:
        raise ValueError(
            "peft's PromptTuningConfig(prompt_tuning_init='TEXT') needs tokenizer_name_or_path, and this adapter's "
            f"tokenizer ({type(tokenizer).__name__}) has no name_or_path; pass the tokenizer by name."
        )
    return {
        **peft_prompt_fields(config),
        "num_virtual_tokens": config.num_virtual_tokens,
        "prompt_tuning_init": _PEFT_INIT[config.init],
        "prompt_tuning_init_text": config.init_text,
        "tokenizer_name_or_path": name if config.init == "text" else None,
        "tokenizer_kwargs": None,
    }


def from_peft(options: dict[str, Any]) -> PromptTuningConfig:
    """peft's ``PromptTuningConfig`` fields as our options: each read exactly, or refused by name.

    ``prompt_tuning_init`` (with its text and tokenizer) only chose the starting values, which the
    file's prompt replaces; ``"RANDOM"`` and ``"SAMPLE_VOCAB"`` map to ``init="random"``/``"vocab"``,
    ``"TEXT"`` to ``"random"`` (tokenizing the text again would need the tokenizer, for values that
    are overwritten; like ours, the init is not part of a saved adapter's identity).
    """
    refuse_peft_fields(
        "PROMPT_TUNING", options, {"num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text",
                                   "tokenizer_name_or_path", "tokenizer_kwargs"}
    )  # fmt: skip
    init = options.get("prompt_tuning_init", "RANDOM")
    if init not in _FROM_PEFT_INIT:
        raise ValueError(
            f"peft PROMPT_TUNING adapter_config.json has prompt_tuning_init={init!r}, which lightning_peft's "
            f"prompt_tuning does not know (supported: {', '.join(map(repr, _FROM_PEFT_INIT))})."
        )
    return PromptTuningConfig(num_virtual_tokens=peft_tokens("PROMPT_TUNING", options), init=_FROM_PEFT_INIT[init])


#: peft's ``prompt_tuning_init`` as our ``init`` (``"TEXT"``: see :func:`from_peft`).
_FROM_PEFT_INIT: dict[str, Literal["random", "vocab", "text"]] = {
    "RANDOM": "random",
    "SAMPLE_VOCAB": "vocab",
    "TEXT": "random",
}


register(
    Method(
        name="prompt_tuning",
        config_cls=PromptTuningConfig,
        kind="input",
        sharding=ALL_SHARDINGS,
        peft=PeftFormat("PROMPT_TUNING", to_peft, from_peft),
        apply=apply,
        summary="N trainable embeddings put before the input embeddings; init random, from the vocabulary or a text",
        paper="Lester et al. 2021, The Power of Scale for Parameter-Efficient Prompt Tuning",
    )
)
