"""Input-side methods: virtual tokens before a transformers model's input, or a key/value prefix.

Prompt tuning, P-tuning and prefix tuning change no layer. Their parameters live in an
:class:`InputAdapter` attached inside the transformers model (as ``model.<method name>``), and
forward pre-hooks edit the arguments of each call. The model is neither wrapped nor subclassed,
``generate()`` keeps working (the hooks see every step and tell the first from later ones by the
cache), and ``unload`` removes the hooks. A method subclasses one of two mechanisms:

* :class:`VirtualTokens` (``prompts()`` -> ``(N, H)``): N embeddings go in front of the input
  embeddings. The attention mask gets N ones in front, token-type ids N zeros, explicit position
  ids count the virtual tokens first, and per-token labels N ``-100`` (outputs have N more
  positions, as in peft). In encoder-decoder models the encoder input gets the tokens and the
  decoder's cross-attention mask is extended; decoder inputs and labels are untouched.
* :class:`KeyValuePrefix` (``prefix_states()`` -> ``(N, L * 2 * kv_heads * head_dim)``): N keys
  and values are put into the attention cache of every layer before the real tokens, so
  attention sees them at every layer. The attention mask gets N ones; positions start after the
  prefix (as transformers counts a cache). In encoder-decoder models the decoder's
  self-attention gets the prefix (as in peft with transformers 5), and on request the encoder's
  self-attention gets one of its own (see :class:`KeyValuePrefix`).

Where the sequence classifier of a decoder pools the last real token (``score`` heads), that token
is found in ``input_ids`` as transformers does and shifted by N, so right padding stays right.
Encoder classifiers that pool the first position (BERT's pooler) read the first virtual token, as
in peft; a prefix leaves ``[CLS]`` first.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_peft.core.compat import cache_argument, output_cache, take_cache
from lightning_peft.core.layer import AdapterModule
from lightning_peft.core.targeting import find_base_model

Kwargs = dict[str, Any]
HookFn = Callable[[nn.Module, Kwargs], Kwargs]


# --------------------------------------------------------------------------- the model


def transformer_of(model: nn.Module, method: str) -> tuple[str, nn.Module]:
    """The transformers model inside ``model`` (path, module), or a clear error if there is none."""
    path, base = find_base_model(model)
    input_embeddings(base, method)
    return path, base


def input_embeddings(base: nn.Module, method: str) -> nn.Embedding:
    """The token embedding table of a transformers model; input-side methods need one."""
    get = getattr(base, "get_input_embeddings", None)
    try:
        embeddings = get() if callable(get) and hasattr(base, "config") else None
    except NotImplementedError:
        embeddings = None
    weight = getattr(embeddings, "weight", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"{method} needs a transformers model with token input embeddings (get_input_embeddings() "
            f"returning an embedding table); {type(base).__name__} has none. Input-side methods put "
            "virtual tokens before the token embeddings; use a layer method such as lora for this model."
        )
    return embeddings  # type: ignore[return-value]


def is_encoder_decoder(base: nn.Module) -> bool:
    return bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))


def position_limit(base: nn.Module) -> tuple[int, str] | None:
    """(usable positions, where that number comes from), or ``None`` for relative positions (T5).

    RoBERTa-style embeddings number positions from ``padding_idx + 1``, which costs positions.
    """
    config = base.config.get_text_config()
    for field in ("max_position_embeddings", "n_positions"):
        value = getattr(config, field, None)
        if isinstance(value, int) and not isinstance(value, bool):
            break
    else:
        return None
    limit, source = value, f"config.{field}={value}"
    for name, module in base.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            usable = module.num_embeddings - module.padding_idx - 1
            if usable < limit:
                limit, source = usable, f"{source}, less {value - usable} for positions numbered after padding_idx"
    return limit, source


#: Where a key/value prefix can go: the self-attention of the decoder (the only stack of a
#: decoder-only or encoder-only model) and, in encoder-decoder models, of the encoder.
PREFIX_SIDES: tuple[str, ...] = ("decoder", "encoder")


def kv_layout(base: nn.Module, side: str = "decoder") -> tuple[int, int, int]:
    """(layers, key/value heads, head dim) of the attention that a prefix fills.

    Read from the config by transformers' standard names (``head_dim`` is T5's ``d_kv``); in
    encoder-decoder models, of the decoder, or with ``side="encoder"`` of the encoder
    (``encoder_layers``/``encoder_attention_heads``, T5's ``num_layers``/``num_heads``).
    """
    if side not in PREFIX_SIDES:
        raise ValueError(f"kv_layout: side={side!r}; valid: {', '.join(map(repr, PREFIX_SIDES))}")
    config = base.config.get_text_config()

    def first(*names: str) -> int | None:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return None

    if side == "encoder":
        # T5 maps num_hidden_layers/num_attention_heads to its encoder's num_layers/num_heads,
        # BART to encoder_layers/encoder_attention_heads.
        layers = first("encoder_layers", "num_hidden_layers")
        heads = first("encoder_attention_heads", "num_attention_heads")
    elif is_encoder_decoder(base):
        layers = first("num_decoder_layers", "decoder_layers", "num_hidden_layers")
        heads = first("decoder_attention_heads", "num_attention_heads")
    else:
        layers, heads = first("num_hidden_layers"), first("num_attention_heads")
    if layers is None or heads is None:
        raise ValueError(f"cannot tell the {side} attention layout of {type(base).__name__} from its config")
    kv_heads = first("num_key_value_heads") or heads
    head_dim = first("head_dim") or config.hidden_size // heads
    return layers, kv_heads, head_dim


def encoder_self_attentions(base: nn.Module, method: str) -> list[nn.Module]:
    """The self-attention modules of an encoder-decoder model's encoder, by layer index.

    They are the innermost encoder modules with an integer ``layer_idx`` whose forward takes an
    attention cache (T5's ``T5Attention``, BART's ``BartAttention``); there must be one per layer
    the config counts, numbered 0..L-1, each taking an attention mask, or a clear error says why not.
    """
    layers = kv_layout(base, "encoder")[0]
    encoder = base.get_encoder()
    found = [
        m for m in encoder.modules() if isinstance(getattr(m, "layer_idx", None), int) and cache_argument(m) is not None
    ]
    ids = {id(m) for m in found}
    attentions = sorted(
        (m for m in found if not any(id(s) in ids for s in list(m.modules())[1:])), key=lambda m: m.layer_idx
    )
    numbers = [m.layer_idx for m in attentions]
    if numbers != list(range(layers)) or any(_mask_argument(m) is None for m in attentions):
        raise ValueError(
            f"{method} puts an encoder prefix into each encoder self-attention layer, which it finds as modules with a "
            f"layer_idx whose forward takes a cache and an attention mask; in {type(encoder).__name__} it found "
            f"layers {numbers} ({sorted({type(m).__name__ for m in attentions})}), while the config has {layers}. "
            "Leave 'encoder' out of sides for this architecture."
        )
    return attentions


def _mask_argument(module: nn.Module) -> str | None:
    names = _positional_names(type(module)) + tuple(inspect.signature(type(module).forward).parameters)
    return next((name for name in ("attention_mask", "mask") if name in names), None)


# --------------------------------------------------------------------------- hooks


@functools.cache
def _positional_names(cls: type) -> tuple[str, ...]:
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in parameters if p.kind in kinds)


def _dispatch(fn: HookFn, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> tuple[tuple[()], Kwargs]:
    """Forward pre-hook: name the positional arguments, then let ``fn`` edit the keyword arguments."""
    names = _positional_names(type(module))
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward takes {len(names)} positional arguments; got {len(args)}")
    return (), fn(module, {**dict(zip(names, args, strict=False)), **kwargs})


def cache_length(cache: Any) -> int:
    """Tokens already in an attention cache (0 for none)."""
    get = getattr(cache, "get_seq_length", None)
    return int(get()) if callable(get) else 0


def _batch_and_length(kwargs: Kwargs, method: str, ids: str = "input_ids", embeds: str = "inputs_embeds") -> tuple:
    tensor = kwargs.get(ids)
    if tensor is None:
        tensor = kwargs.get(embeds)
    if tensor is None:
        raise ValueError(f"{method} needs {ids} or {embeds} in the model call.")
    return tensor.shape[0], tensor.shape[1]


def _fresh(tensor: Tensor) -> Tensor:
    """A module output that owns its storage: a parameter (or a view of one) returned as is would
    share the storage that a wrapper frees after the forward (FSDP1 reshards its gathered
    parameters, which inside the forward are plain views of the gathered flat parameter)."""
    return tensor.clone() if tensor.is_leaf or tensor._base is not None else tensor


class InputAdapter(AdapterModule):
    """An input-side method's parameters, and the hooks that bring them into the model's forward.

    Args:
        num_virtual_tokens: N, the number of virtual tokens (or prefix positions).
    """

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__()
        self.num_virtual_tokens = num_virtual_tokens
        self._handles: list[RemovableHandle] = []
        self._limit: tuple[int, str] | None = None

    def install(self, base: nn.Module) -> None:
        """Register the hooks on ``base`` (the transformers model this module is attached to)."""
        raise NotImplementedError

    def set_enabled(self, enabled: bool) -> None:
        """Switched off, the hooks are removed (the model runs as the base model); on, installed again."""
        if enabled != self._enabled:
            if enabled:
                self.install(self.__dict__["_installed_on"])
            else:
                self.on_unload()
        super().set_enabled(enabled)

    def forward(self) -> Tensor:
        """The tensors the hooks put into the model (virtual token embeddings, prefix states)."""
        raise NotImplementedError

    def call_through(self, wrapper: nn.Module) -> None:
        """Have the hooks compute this adapter's tensors by calling ``wrapper``, a module whose
        forward calls this one's: an FSDP1 unit, which gathers the parameters only there."""
        self.__dict__["_wrapper"] = wrapper  # not a submodule: the wrapper already holds this one

    def _compute(self) -> Tensor:
        caller: nn.Module = self.__dict__.get("_wrapper", self)
        return caller()

    def _hook(self, module: nn.Module, fn: HookFn) -> None:
        # Hooks are bound methods and partials (not closures), so a deepcopy of the model gets
        # hooks that point to the copied adapter.
        self._handles.append(module.register_forward_pre_hook(functools.partial(_dispatch, fn), with_kwargs=True))

    def on_unload(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def merge(self) -> None:
        raise TypeError(
            f"{self.method} has nothing to merge into base weights: its {self.num_virtual_tokens} virtual tokens "
            "are extra inputs to the model, not an update of a weight. Keep the adapter for inference, or call "
            "lightning_peft.unload(model, merge=False) to get the base model back."
        )

    def extra_repr(self) -> str:
        return f"num_virtual_tokens={self.num_virtual_tokens}"

    # ------------------------------------------------------------------ argument edits

    def _check_length(self, total: int, length: int) -> None:
        """Refuse a call whose ``total`` positions (virtual, cached and ``length`` new) the model lacks."""
        if self._limit is None or total <= self._limit[0]:
            return
        limit, source = self._limit
        n = self.num_virtual_tokens
        earlier = total - length - n
        tokens = f"{length} token{'s' * (length != 1)}" + (f" after {earlier} earlier ones" if earlier else "")
        raise ValueError(
            f"{self.method}: {tokens} plus {n} virtual tokens need {total} positions, more than the {limit} the "
            f"model has ({source}); keep inputs (with earlier tokens) to at most {limit - n} tokens or lower "
            "num_virtual_tokens."
        )

    def _extend_mask(self, mask: Any, total: int, name: str = "attention_mask") -> Any:
        """Put N ones before a (batch, length) padding mask that covers only the real tokens."""
        if mask is None:
            return None
        if not isinstance(mask, Tensor) or mask.dim() != 2:
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(
                f"{self.method} extends {name} by its virtual tokens and needs a 2D (batch, length) padding mask; "
                f"got {shape}."
            )
        n = self.num_virtual_tokens
        if mask.shape[1] == total:
            return mask  # already covers the virtual tokens
        if mask.shape[1] != total - n:
            raise ValueError(
                f"{self.method}: {name} has length {mask.shape[1]}, expected {total - n} (the real tokens; "
                f"the {n} virtual tokens are added here)."
            )
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)

    def _shift_positions(self, kwargs: Kwargs, key: str, prepend: bool) -> None:
        """Explicit position ids count the N virtual tokens first (``prepend`` also numbers them)."""
        positions = kwargs.get(key)
        if positions is None:
            return
        n = self.num_virtual_tokens
        shifted = positions + n
        if prepend:
            first = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(*positions.shape[:-1], n)
            shifted = torch.cat([first, shifted], dim=-1)
        kwargs[key] = shifted


class VirtualTokens(InputAdapter):
    """N virtual token embeddings placed before the input embeddings (prompt tuning, P-tuning)."""

    def __init__(self, num_virtual_tokens: int) -> None:
        super().__init__(num_virtual_tokens)
        self._pools_last = False
        self._pool_index: Tensor | None = None

    def prompts(self) -> Tensor:
        """The N virtual token embeddings, ``(N, hidden)``."""
        raise NotImplementedError

    def forward(self) -> Tensor:
        return _fresh(self.prompts())

    def install(self, base: nn.Module) -> None:
        self._limit = position_limit(base)
        if is_encoder_decoder(base):
            self._hook(base.get_encoder(), functools.partial(self._prepend, base, False))
            self._hook(base.get_decoder(), self._extend_cross_mask)
            return
        self._hook(base, functools.partial(self._prepend, base, True))
        head = getattr(base, "score", None)
        if type(base).__name__.endswith("ForSequenceClassification") and isinstance(head, nn.Module):
            # Decoder classifiers pool the last non-pad token of input_ids; given embeddings, they
            # would pool the last position, which is a pad in right-padded rows.
            self._pools_last = True
            self._handles.append(head.register_forward_pre_hook(self._pool_last_token))
            self._handles.append(base.register_forward_hook(self._clear_pool_index, always_call=True))

    def _prepend(self, base: nn.Module, labels: bool, module: nn.Module, kwargs: Kwargs) -> Kwargs:
        n = self.num_virtual_tokens
        batch, length = _batch_and_length(kwargs, self.method)
        name = cache_argument(module)
        past = cache_length(take_cache(kwargs, name)) if name else 0
        if past:  # a later generation step: the virtual tokens are in the cache already
            self._check_length(past + length, length)
            kwargs["attention_mask"] = self._extend_mask(kwargs.get("attention_mask"), past + length)
            self._shift_positions(kwargs, "position_ids", prepend=False)
            return kwargs
        self._check_length(n + length, length)
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = base.get_input_embeddings()(ids)  # (B, T, H)
        prompts = self._compute().to(embeds.dtype)  # (N, H)
        kwargs["inputs_embeds"] = torch.cat([prompts.expand(batch, -1, -1), embeds], dim=1)  # (B, N + T, H)
        kwargs["input_ids"] = None
        kwargs["attention_mask"] = self._extend_mask(kwargs.get("attention_mask"), n + length)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(batch, n), types], dim=1)
        self._shift_positions(kwargs, "position_ids", prepend=True)
        target = kwargs.get("labels") if labels else None
        if isinstance(target, Tensor) and target.shape == (batch, length) and not target.is_floating_point():
            kwargs["labels"] = torch.cat([target.new_full((batch, n), -100), target], dim=1)  # per-token labels
        pad = getattr(base.config, "pad_token_id", None)
        if self._pools_last and ids is not None and pad is not None:
            steps = torch.arange(length, device=ids.device)
            self._pool_index = (steps * (ids != pad)).argmax(-1) + n  # transformers' rule, shifted by N
        return kwargs

    def _extend_cross_mask(self, module: nn.Module, kwargs: Kwargs) -> Kwargs:
        memory = kwargs.get("encoder_hidden_states")
        if memory is not None:
            kwargs["encoder_attention_mask"] = self._extend_mask(
                kwargs.get("encoder_attention_mask"), memory.shape[1], "the encoder attention mask"
            )
        return kwargs

    def _pool_last_token(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        index = self._pool_index
        if index is None or not args or not isinstance(args[0], Tensor) or args[0].dim() != 3:
            return None
        hidden = args[0]  # (B, N + T, H); the model reads position -1
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), index.to(hidden.device)]
        return (torch.cat([hidden[:, :-1], last[:, None]], dim=1), *args[1:])

    def _clear_pool_index(self, module: nn.Module, args: Any, output: Any) -> None:
        self._pool_index = None


class KeyValuePrefix(InputAdapter):
    """N keys and values put into attention layers before the real tokens' own (prefix tuning).

    Each prefixed self-attention layer l computes, per head::

        softmax(Q [K^P_l; K]^T * scale + B + M) [V^P_l; V],    K^P_l, V^P_l: (N, head_dim)

    where the mask M admits every prefix position (N zeros, or ``True``, before the real keys'
    padding mask) and B is the model's own position bias over the N + T keys.

    ``layouts`` names the sides (:data:`PREFIX_SIDES`) that get a prefix, each with its
    ``(layers, kv heads, head dim)``; one trained tensor holds all of them, the decoder's part first:

    * ``"decoder"``: the prefix goes into the attention cache the model's forward takes (the
      decoder's self-attention cache in encoder-decoder models). Positions start after it, as
      transformers counts a cache, so a model with learned positions has N fewer for tokens.
    * ``"encoder"`` (encoder-decoder models): the encoder takes no cache, so each encoder
      self-attention module is handed one holding its layer's prefix, and its attention mask is
      extended by N admitted positions. The encoder prefix takes no positions: the real tokens
      keep positions 0..T-1 (BART's learned positions are unchanged). T5 computes its relative bias
      from that cache as it does for any cache of N: prefix keys at positions 0..N-1, queries at
      N..N+T-1, so query i and prefix key j get ``b(j - N - i)`` (bidirectional buckets) and the
      bias between real tokens, ``b(j - i)``, is unchanged; its shape is (1, heads, T, N + T).
    """

    def __init__(self, num_virtual_tokens: int, layouts: Mapping[str, tuple[int, int, int]]) -> None:
        super().__init__(num_virtual_tokens)
        unknown = sorted(set(layouts) - set(PREFIX_SIDES))
        if unknown or not layouts:
            raise ValueError(f"prefix sides {sorted(layouts)}; valid: a non-empty subset of {PREFIX_SIDES}")
        #: (layers, kv heads, head dim) per prefixed side, in PREFIX_SIDES order (the tensor's)
        self.layouts = {side: layouts[side] for side in PREFIX_SIDES if side in layouts}
        self._drop_cache = False
        self._encoder_cache: Any = None  # the encoder prefix while the encoder runs

    @property
    def layout(self) -> tuple[int, int, int]:
        """The first prefixed side's ``(layers, kv heads, head dim)`` (the decoder's by default)."""
        return next(iter(self.layouts.values()))

    @property
    def state_size(self) -> int:
        """Size of one virtual token's keys and values over all prefixed layers: ``sum L * 2 * kv_heads * head_dim``."""
        return sum(layers * 2 * heads * head_dim for layers, heads, head_dim in self.layouts.values())

    def prefix_states(self) -> Tensor:
        """``(N, state_size)``: per token, side by side (decoder, encoder), layer by layer, the key then the value."""
        raise NotImplementedError

    def forward(self) -> Tensor:
        return _fresh(self.prefix_states())

    def _side_states(self, states: Tensor, side: str) -> Tensor:
        """One side's part of ``prefix_states()`` as ``(L, 2, kv_heads, N, head_dim)``."""
        start = 0
        for name, (layers, heads, head_dim) in self.layouts.items():
            size = layers * 2 * heads * head_dim
            if name == side:
                part = states[:, start : start + size].reshape(self.num_virtual_tokens, layers, 2, heads, head_dim)
                return part.permute(1, 2, 3, 0, 4)
            start += size
        raise KeyError(side)

    @staticmethod
    def attention_stack(base: nn.Module, method: str) -> tuple[nn.Module, str]:
        """The module whose forward takes the cache and the keyword it takes it by, or a clear error
        if the architecture has none."""
        stack = base.get_decoder() if is_encoder_decoder(base) else base.base_model
        name = cache_argument(stack)
        if name is None:
            raise ValueError(
                f"{method} puts its prefix into the attention's key/value cache, but {type(stack).__name__}.forward "
                f"takes no attention cache (no cache or past_key_values argument: "
                f"{getattr(base.config, 'model_type', '?')} attention has no cache). "
                "Use prompt_tuning or p_tuning for this architecture."
            )
        return stack, name

    def install(self, base: nn.Module) -> None:
        self._limit = position_limit(base)
        if "decoder" in self.layouts:
            stack, name = self.attention_stack(base, self.method)
            self._hook(stack, functools.partial(self._add_prefix, base, name))
            drop = functools.partial(self._drop_unwanted_cache, name)
            self._handles.append(stack.register_forward_hook(drop, always_call=True))
        if "encoder" in self.layouts:
            encoder = base.get_encoder()
            self._hook(encoder, functools.partial(self._open_encoder_prefix, base))
            self._handles.append(encoder.register_forward_hook(self._close_encoder_prefix, always_call=True))
            for attention in encoder_self_attentions(base, self.method):
                cache_name, mask = cache_argument(attention), _mask_argument(attention)
                assert cache_name is not None and mask is not None, "encoder_self_attentions checked both"
                self._hook(attention, functools.partial(self._add_encoder_prefix, cache_name, mask))

    def _refuse_checkpointing(self, module: nn.Module, base: nn.Module) -> None:
        if module.training and any(getattr(m, "gradient_checkpointing", False) for m in base.modules()):
            raise ValueError(
                f"{self.method} does not work with gradient checkpointing: recomputing a layer would add the prefix "
                "to its cache twice. Call model.gradient_checkpointing_disable() or use prompt_tuning."
            )

    def _add_prefix(self, base: nn.Module, name: str, module: nn.Module, kwargs: Kwargs) -> Kwargs:
        self._refuse_checkpointing(module, base)
        batch, length = _batch_and_length(kwargs, self.method)
        cache = take_cache(kwargs, name)
        if cache is None:
            # The prefix needs a cache even when the caller wants none back (use_cache=False).
            use_cache = kwargs.get("use_cache")
            if use_cache is None:
                use_cache = getattr(base.config.get_text_config(), "use_cache", False)
            self._drop_cache = not use_cache
        if cache_length(cache) == 0:
            kwargs[name] = cache = self._fill(cache, base, batch)
        total = cache_length(cache) + length
        self._check_length(total, length)
        kwargs["attention_mask"] = self._extend_mask(kwargs.get("attention_mask"), total)
        self._shift_positions(kwargs, "position_ids", prepend=False)
        return kwargs

    def _drop_unwanted_cache(self, name: str, module: nn.Module, args: Any, output: Any) -> Any:
        """Return no cache to a caller that asked for none (``generate(use_cache=False)`` would reuse it)."""
        drop, self._drop_cache = self._drop_cache, False
        if drop and output_cache(output, name) is not None:
            return type(output)(**{k: v for k, v in output.items() if k != name})
        return None

    def _fill(self, cache: Any, base: nn.Module, batch: int) -> Any:
        """Put the decoder prefix into ``cache`` (an empty one passed by ``generate``) or into a new cache."""
        from transformers import DynamicCache, EncoderDecoderCache

        layers, heads, head_dim = self.layouts["decoder"]
        n = self.num_virtual_tokens
        states = self._side_states(self._compute().to(base.dtype), "decoder")  # (L, 2, kv_heads, N, head_dim)
        if cache is None:
            if is_encoder_decoder(base):
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            else:
                cache = DynamicCache(config=base.config)
        target = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
        for layer in range(layers):
            keys, values = states[layer][:, None].expand(2, batch, heads, n, head_dim)
            target.update(keys, values, layer)
        return cache

    # ------------------------------------------------------------------ the encoder side

    def _open_encoder_prefix(self, base: nn.Module, module: nn.Module, kwargs: Kwargs) -> Kwargs:
        """Before the encoder runs: a fresh cache holding each encoder layer's prefix for this batch."""
        from transformers import DynamicCache

        self._refuse_checkpointing(module, base)
        batch, _ = _batch_and_length(kwargs, self.method)
        layers, heads, head_dim = self.layouts["encoder"]
        n = self.num_virtual_tokens
        states = self._side_states(self._compute().to(base.dtype), "encoder")  # (L, 2, kv_heads, N, head_dim)
        cache = DynamicCache()
        for layer in range(layers):
            keys, values = states[layer][:, None].expand(2, batch, heads, n, head_dim)
            cache.update(keys, values, layer)
        self._encoder_cache = cache
        return kwargs

    def _close_encoder_prefix(self, module: nn.Module, args: Any, output: Any) -> None:
        self._encoder_cache = None

    def _add_encoder_prefix(self, name: str, mask: str, module: nn.Module, kwargs: Kwargs) -> Kwargs:
        """Before an encoder self-attention: its keys and values get the prefix, its mask N admitted positions."""
        cache = self._encoder_cache
        if cache is None:
            raise ValueError(
                f"{self.method}: encoder self-attention layer {module.layer_idx} ({type(module).__name__}) was called "
                "outside the encoder's forward; the encoder prefix is put in when the encoder runs as a whole."
            )
        if take_cache(kwargs, name) is not None:
            raise ValueError(
                f"{self.method}: encoder self-attention layer {module.layer_idx} was given an attention cache "
                f"({name}=); an encoder keeps none, and the encoder prefix needs that argument."
            )
        kwargs[name] = cache
        kwargs[mask] = self._extend_key_mask(kwargs.get(mask), module)
        return kwargs

    def _extend_key_mask(self, mask: Any, module: nn.Module) -> Any:
        """N admitted key positions before a self-attention mask over the T real keys.

        ``None`` (every key admitted) stays ``None``; a 4D mask ``(B, 1, T, T)`` gets N ``True``
        (boolean, sdpa) or N zeros (additive, eager) in front along the key axis; a 2D padding
        mask ``(B, T)`` (flash attention) N ones.
        """
        if mask is None:
            return None
        n = self.num_virtual_tokens
        if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
            kind = f"a {mask.dim()}D tensor" if isinstance(mask, Tensor) else type(mask).__name__
            implementation = getattr(getattr(module, "config", None), "_attn_implementation", "?")
            raise ValueError(
                f"{self.method} extends each encoder self-attention mask by its {n} prefix positions and handles "
                f"2D and 4D tensor masks; encoder layer {module.layer_idx} got {kind} "
                f"(attn_implementation={implementation!r}). Use attn_implementation='eager' or 'sdpa'."
            )
        admitted = 0 if mask.dim() == 4 and mask.is_floating_point() else 1  # additive masks admit with 0
        front = mask.new_full((*mask.shape[:-1], n), admitted)
        return torch.cat([front, mask], dim=-1)  # (..., N + T)


def attach(model: nn.Module, method: str, build: Callable[[nn.Module], InputAdapter]) -> list[str]:
    """``apply`` for input-side methods: build the adapter for the transformers model inside
    ``model``, attach it there as ``<method>`` and install its hooks; returns its full name."""
    path, base = transformer_of(model, method)
    if hasattr(base, method):
        raise ValueError(f"{type(base).__name__} already has an attribute {method!r}; cannot attach {method} there.")
    adapter = build(base).train(base.training)  # new modules start in training mode; match the model
    base.add_module(method, adapter)
    adapter.__dict__["_installed_on"] = base  # not a submodule: the base holds the adapter, not the reverse
    adapter.install(base)  # a failure here is cleaned up by inject (on_unload, then removal)
    return [f"{path}.{method}" if path else method]
