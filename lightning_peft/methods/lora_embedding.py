"""LoRA on ``nn.Embedding`` (see :mod:`lightning_peft.methods.lora`): ``A`` a rank-r table, ``B`` maps it up.

    h = E[x] + s * A^T[x] B^T,      A: r x num_embeddings,  B: dim x r,  s = alpha / r

with no dropout (as peft), merged into the table as ``E + s (B A)^T``. A scaled embedding's
``embed_scale`` applies to the update too (see :class:`LoRAEmbedding`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.methods.lora import LAYER_TYPES, LoRAConfig, LoRALayer


class LoRAEmbedding(LoRALayer):
    """LoRA around ``nn.Embedding``: ``A`` is a rank-r embedding table, ``B`` maps it up.

    A scaled embedding (Gemma's ``embed_tokens``, BART's with ``scale_embedding=True``) returns
    ``c * W[x]`` for its ``embed_scale`` ``c``; the update is scaled the same way, as peft does::

        h = c * (W[x] + s * A^T[x] B^T)

    so that merging ``s (B A)^T`` into ``W`` gives exactly the unmerged output.
    """

    peft_names = {"lora_A": "lora_embedding_A", "lora_B": "lora_embedding_B"}

    def __init__(self, base_layer: nn.Embedding, config: LoRAConfig) -> None:
        super().__init__(base_layer, config)
        if config.lora_bias:
            raise TypeError(
                "it is an nn.Embedding, and LoRAConfig.lora_bias=True is for linear and conv layers (peft refuses it "
                "on embeddings too); exclude the embedding from target_modules or set lora_bias=False"
            )
        factory = self.adapter_factory(base_layer.weight)
        self.lora_A = nn.Parameter(torch.empty(config.r, base_layer.num_embeddings, **factory))
        self.lora_B = nn.Parameter(torch.empty(base_layer.embedding_dim, config.r, **factory))
        self.reset_adapter_parameters()

    def reset_adapter_parameters(self) -> None:
        if self.init == "random":  # peft's init_lora_weights=False keeps its randn tables
            nn.init.normal_(self.lora_A)
        else:  # every other init, PiSSA/OLoRA too: peft initializes embeddings this way for all of them
            nn.init.zeros_(self.lora_A)
        nn.init.normal_(self.lora_B)

    def embed_scale(self) -> Tensor | None:
        """The base layer's ``embed_scale`` (a scalar) or ``None``; anything else is refused."""
        scale = getattr(self.base, "embed_scale", None)
        if scale is None:
            return None
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            return torch.tensor(float(scale), device=self.lora_B.device)
        if isinstance(scale, Tensor) and scale.numel() == 1:
            return scale
        raise TypeError(
            f"{type(self.base).__name__}.embed_scale is {scale!r}; LoRA on an embedding needs a scalar embed_scale "
            "(a number or a one-element tensor) to scale its update as the layer scales its output"
        )

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A).t() * self.scaling  # (num_embeddings, embedding_dim)

    def _hidden(self, x: Tensor) -> Tensor:
        base = self.base
        return F.embedding(
            x, self.lora_A.t(), base.padding_idx, base.max_norm, base.norm_type, base.scale_grad_by_freq, base.sparse
        )  # (..., r)

    def update(self, x: Tensor) -> Tensor:
        out = F.linear(self._hidden(x), self.lora_B) * self.scaling
        scale = self.embed_scale()
        return out if scale is None else out * scale.to(out.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.bypassed:
            return self.base_layer(x)
        if self.rows is not None:
            return self.mixed_forward(x, self.update)
        result = self.base_layer(x)  # (..., dim)
        if self.embed_scale() is not None:
            return result + self.update(x).to(result.dtype)
        return self._add_update(result, self._hidden(x))


def wrap(module: nn.Module, config: LoRAConfig) -> LoRALayer:
    """The LoRA wrapper for an embedding (see :data:`lightning_peft.methods.lora.LAYER_TYPES`)."""
    return LoRAEmbedding(module, config)


LAYER_TYPES[nn.Embedding] = wrap
