"""P-tuning (Liu et al., 2021, "GPT Understands, Too").

Like prompt tuning, N virtual token embeddings go before the embedded input of a frozen model,
but they are the output of a small trained prompt encoder over N trained inputs ``E`` (N x H)::

    P = MLP(E)                          MLP: Linear(H, h) ReLU Linear(h, h) ReLU Linear(h, H)
    P = MLP2(BiLSTM(E))                 BiLSTM: h per direction; MLP2: Linear(2h, 2h) ReLU Linear(2h, H)
    output = model([P; X]),   mask = [1_N; m],   labels = [-100_N; y]

The encoder couples the virtual tokens, which the paper found to train more stably than free
embeddings. The layout matches Hugging Face peft's ``PromptEncoder`` (for encoder-decoder models
peft runs its encoder over 2N inputs and keeps the first N outputs; here it runs over N, which is
the same for the MLP but not for the LSTM). Nothing to merge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_peft.core.config import AdapterConfig, check_choice, check_positive_int, check_probability, invalid
from lightning_peft.core.targeting import find_base_model
from lightning_peft.core.virtual import VirtualTokens, attach, input_embeddings
from lightning_peft.methods.prompt_tuning import peft_prompt_fields, peft_tokens, refuse_peft_fields
from lightning_peft.registry import ALL_SHARDINGS, Method, PeftFormat, register

#: The MLP encoder's depth is fixed (three linear layers, as in the paper's code and peft).
LSTM_DEFAULT_LAYERS = 2


@dataclass(kw_only=True)
class PTuningConfig(AdapterConfig):
    """P-tuning options.

    Args:
        num_virtual_tokens: N, the number of virtual tokens put before the input.
        encoder: the prompt encoder: ``"mlp"`` (three linear layers) or ``"lstm"`` (a bidirectional
            LSTM followed by a two-layer MLP).
        encoder_hidden_size: hidden size h of the encoder; ``None`` uses the model's hidden size.
        encoder_num_layers: LSTM layers (``encoder="lstm"`` only).
        encoder_dropout: dropout between LSTM layers, in [0, 1) (``encoder="lstm"`` only).
        modules_to_save: see :class:`~lightning_peft.core.config.AdapterConfig`.
    """

    num_virtual_tokens: int = 20
    encoder: Literal["mlp", "lstm"] = "mlp"
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = LSTM_DEFAULT_LAYERS
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive_int(self, "num_virtual_tokens", self.num_virtual_tokens)
        check_choice(self, "encoder", self.encoder, ("mlp", "lstm"))
        if self.encoder_hidden_size is not None:
            check_positive_int(self, "encoder_hidden_size", self.encoder_hidden_size)
        check_positive_int(self, "encoder_num_layers", self.encoder_num_layers)
        check_probability(self, "encoder_dropout", self.encoder_dropout)
        if self.encoder == "mlp":
            if self.encoder_num_layers != LSTM_DEFAULT_LAYERS:
                raise invalid(
                    self, "encoder_num_layers", self.encoder_num_layers, "left at 2 with encoder='mlp' (LSTM only)"
                )
            if self.encoder_dropout:
                raise invalid(self, "encoder_dropout", self.encoder_dropout, "0 with encoder='mlp' (LSTM only)")


def resolve(model: nn.Module, config: PTuningConfig) -> PTuningConfig:
    """Fill ``encoder_hidden_size`` with the model's hidden size."""
    if config.encoder_hidden_size is not None:
        return config
    _, base = find_base_model(model)
    return config.replace(encoder_hidden_size=input_embeddings(base, "p_tuning").weight.shape[1])


class PromptEncoder(VirtualTokens):
    """The trained inputs and prompt encoder of P-tuning."""

    adapter_names = ("embedding", "lstm", "mlp")
    method = "p_tuning"

    def __init__(self, config: PTuningConfig, word_embeddings: nn.Module) -> None:
        super().__init__(config.num_virtual_tokens)
        assert config.encoder_hidden_size is not None, "resolve() fills encoder_hidden_size"
        weight = word_embeddings.weight
        factory = {"device": weight.device, "dtype": weight.dtype if weight.is_floating_point() else torch.float32}
        dim, hidden = weight.shape[1], config.encoder_hidden_size
        self.embedding = nn.Parameter(torch.randn(config.num_virtual_tokens, dim, **factory))  # (N, H)
        self.lstm: nn.LSTM | None = None
        if config.encoder == "lstm":
            self.lstm = nn.LSTM(
                dim,
                hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout,
                bidirectional=True,
                batch_first=True,
                **factory,
            )
            self.mlp = nn.Sequential(
                nn.Linear(2 * hidden, 2 * hidden, **factory), nn.ReLU(), nn.Linear(2 * hidden, dim, **factory)
            )
        else:
            self.mlp = nn.Sequential(
                nn.Linear(dim, hidden, **factory),
                nn.ReLU(),
                nn.Linear(hidden, hidden, **factory),
                nn.ReLU(),
                nn.Linear(hidden, dim, **factory),
            )

    def prompts(self) -> Tensor:
        x = self.embedding[None]  # (1, N, H)
        if self.lstm is not None:
            x = self.lstm(x)[0]  # (1, N, 2h)
        return self.mlp(x)[0]  # (N, H)


def apply(model: nn.Module, config: PTuningConfig) -> list[str]:
    return attach(model, "p_tuning", lambda base: PromptEncoder(config, input_embeddings(base, "p_tuning")))


def to_peft(config: PTuningConfig) -> dict[str, Any]:
    """Our options as peft's ``PromptEncoderConfig`` fields.

    The file's tensor is the encoder's output ``P`` (what peft saves, and what peft's inference
    mode runs without building the encoder); the encoder fields record how it was trained.
    """
    return {
        **peft_prompt_fields(config),
        "num_virtual_tokens": config.num_virtual_tokens,
        "encoder_reparameterization_type": config.encoder.upper(),
        "encoder_hidden_size": config.encoder_hidden_size,
        "encoder_num_layers": config.encoder_num_layers,
        "encoder_dropout": config.encoder_dropout,
    }


def from_peft(options: dict[str, Any]) -> AdapterConfig:
    """peft's ``PromptEncoderConfig`` fields as our options: each read exactly, or refused by name.

    peft's P-tuning file holds the prompt encoder's output only (peft saves ``MLP(E)`` or
    ``MLP(LSTM(E))``, not the encoder), so the adapter it describes is a fixed prompt: it loads as a
    ``prompt_tuning`` adapter holding that prompt, as peft's own inference mode runs it (no encoder).
    The encoder fields are checked (peft's ``MLP``/``LSTM``) and describe how it was trained.
    """
    from lightning_peft.methods.prompt_tuning import PromptTuningConfig

    refuse_peft_fields(
        "P_TUNING", options, {"num_virtual_tokens", "encoder_reparameterization_type", "encoder_hidden_size",
                              "encoder_num_layers", "encoder_dropout"}
    )  # fmt: skip
    kind = options.get("encoder_reparameterization_type", "MLP")
    if kind not in ("MLP", "LSTM"):
        raise ValueError(
            f"peft P_TUNING adapter_config.json has encoder_reparameterization_type={kind!r}; peft's are 'MLP' and "
            "'LSTM'."
        )
    return PromptTuningConfig(num_virtual_tokens=peft_tokens("P_TUNING", options))


register(
    Method(
        name="p_tuning",
        config_cls=PTuningConfig,
        kind="input",
        sharding=ALL_SHARDINGS,
        peft=PeftFormat("P_TUNING", to_peft, from_peft),
        apply=apply,
        resolve=resolve,
        summary="N virtual tokens produced by a trained MLP or LSTM prompt encoder, put before the input",
        paper="Liu et al. 2021, GPT Understands, Too",
    )
)
