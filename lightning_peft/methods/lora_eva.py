"""EVA: LoRA's A from the principal directions of each layer's inputs (``LoRAConfig(init="eva")``).

Paischer et al., 2024, "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation". For a linear layer with inputs ``X`` (rows: the token positions of the calibration
batches, n x in), centred by their mean ``mu``::

    X - 1 mu^T = U S V^T,      A = V_r^T  (r x in: the top-r right-singular vectors),     B = 0

so the model is unchanged at init and A projects onto the directions that explain most of the
input variance. ``whiten`` divides row i of A by ``sqrt(S_i)``. The SVD is incremental (Ross et
al., 2008, as scikit-learn's ``IncrementalPCA``) over batch after batch until the top components
stop moving: a layer has converged when each of its ``k`` components has a cosine similarity of at
least ``tau`` with the previous batch's. With ``rho > 1`` each layer computes ``round(r rho)``
components and the budget ``sum(r)`` goes to the components with the largest explained variance
ratio ``S_i^2 / (n var)`` over all layers (peft's rank redistribution). ``adjust_scaling_factors``
(peft's ``alpha *= new_rank / r``) acts on a changed rank only, so with every rank kept it changes
nothing, here as in peft.

All of this is peft 0.21.2's ``get_eva_state_dict`` step by step (the same randomized SVD with
seed 42, the same signs, the same dtypes, the same batch order: the first batch once to find the
layers that read the same input, which then share one SVD, then the batches again, cycled), so the
same batches give the same A. It runs as LoRA's calibrate hook (:func:`lightning_peft.calibrate`;
PEFTCallback calls it at train start on the training dataloader), in eval mode and without
gradients, with the batches' token positions selected as peft does for language modelling:
``attention_mask`` and, with ``use_label_mask``, ``labels != label_mask_value``.

When the redistribution gives a layer a rank ``k`` other than its ``r``, the layer gets new A
(k x in) and B (out x k) tensors, or is unwrapped to its base layer for ``k = 0``, and the
adapter's record takes peft's ``rank_pattern``/``alpha_pattern`` (``adjust_scaling_factors``:
``alpha * k / r``) and the targets left, as peft does: see :mod:`lightning_peft.methods.lora_eva_ranks`.
The adapter's shapes thus change at calibration, so an optimizer is built after it (PEFTCallback,
whose optimizer exists by then, puts the new tensors in its param groups).

What lightning_peft refuses by name rather than doing differently: EVA on embeddings, conv,
MultiheadAttention and parameter targets (peft initializes those with ``init_lora_weights=True``
and a warning), a redistribution that changes the rank of a DoRA layer, ``whiten`` on layers
sharing an input (peft 0.21.2 then divides the shared components once more per extra layer, in
place), and ``torch.distributed`` runs. A layer initialized with ``init="eva"`` refuses a training
forward until it is calibrated or its tensors are loaded (a checkpoint, an adapter file).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_peft.core import state
from lightning_peft.core.targeting import find_base_model, relative_name
from lightning_peft.methods import lora, lora_eva_ranks
from lightning_peft.methods.lora import LoRAConfig, LoRALayer, LoRALinear

#: Where peft caps ``rho``: above it, at the largest parameter dimension over ``r``.
_RHO_LIMIT = 1000
#: The seed peft's randomized SVD runs under (its IncrementalPCA's ``lowrank_seed``).
_SEED = 42


class IncrementalSVD:
    """Incremental PCA of rows fed batch by batch (``partial_fit`` of scikit-learn's IncrementalPCA).

    After a batch, ``components`` (k x in) are the top right-singular vectors of all rows seen,
    centred: the previous components scaled by their singular values stand in for the earlier
    rows, plus a row for the shift of the mean. The SVD is ``torch.svd_lowrank`` with ``q = 2k``
    and 4 iterations under seed 42, each vector's largest entry made positive.
    """

    def __init__(self, n_components: int) -> None:
        self.k = n_components
        self.components: Tensor | None = None
        self.singular_values: Tensor | None = None
        self.ratio: Tensor | None = None  # explained variance ratio of each component
        self.mean: Tensor | None = None
        self.var: Tensor | None = None
        self.count: Tensor | None = None

    def _moments(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean and variance per feature of every row seen, ``x`` included (float64, Chan et al.)."""
        new_count = torch.tensor([x.shape[0]], device=x.device)
        seen = torch.tensor([0], device=x.device) if self.count is None else self.count
        total = seen + new_count
        last_sum = (
            torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if self.mean is None else self.mean * seen
        )
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / total
        centred = x - new_sum / new_count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_unnormalized = centred.square_().sum(dim=0, dtype=torch.float64) - correction / new_count
        if self.var is None:
            return mean, new_unnormalized / total, total
        ratio = seen.double() / new_count
        unnormalized = self.var * seen + new_unnormalized + ratio / total * (last_sum / ratio - new_sum).square()
        return mean, unnormalized / total, total

    def fit(self, x: Tensor) -> None:
        """Take in a batch of rows ``x`` (n x in, n >= k)."""
        x = x.to(torch.float32).clone()
        n = x.shape[0]
        mean, var, total = self._moments(x)
        if self.components is None:
            x -= mean
        else:
            assert self.singular_values is not None and self.mean is not None and self.count is not None
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            shift = torch.sqrt((self.count.double() / total) * n) * (self.mean - batch_mean)
            x = torch.vstack((self.singular_values.view(-1, 1) * self.components, x, shift))
        with torch.random.fork_rng():
            torch.manual_seed(_SEED)
            _, s, v = torch.svd_lowrank(x, q=2 * self.k, niter=4)
        vh = v.mH
        signs = torch.sign(vh[torch.arange(vh.shape[0]), vh.abs().argmax(dim=1)])
        vh = vh * signs.view(-1, 1)
        self.count, self.mean, self.var = total, mean, var
        self.components, self.singular_values = vh[: self.k], s[: self.k]
        self.ratio = (s**2 / torch.sum(var * total))[: self.k]


class _Layer:
    """One EVA layer's calibration state: its SVD and which of its components have converged."""

    def __init__(self, n_components: int, tau: float) -> None:
        self.svd = IncrementalSVD(n_components)
        self.tau = tau
        self.converged = torch.zeros(n_components, dtype=torch.bool)

    def step(self, x: Tensor, name: str) -> None:
        if x.shape[0] < self.svd.k:  # too few positions in this batch for k components: as peft, skip it
            return
        previous = None if self.svd.components is None else self.svd.components.clone()
        self.svd.fit(x)
        if previous is not None:
            assert self.svd.components is not None
            self.converged = F.cosine_similarity(self.svd.components, previous) >= self.tau


def _positions(batch: Any, options: Mapping[str, Any]) -> Tensor | None:
    """Which (batch, position) entries EVA reads in a language-model batch (peft's rule); ``None``: all rows."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        return None
    mask = batch.get("attention_mask")
    mask = (torch.ones_like(batch["input_ids"]) if mask is None else mask).bool()
    if options["use_label_mask"] and batch.get("labels") is not None:
        mask = torch.logical_and(mask, batch["labels"] != options["label_mask_value"])
    return mask


def _rows(x: Tensor, mask: Tensor | None, name: str) -> Tensor:
    """A layer input as the rows EVA decomposes (n x in): the kept token positions, in order."""
    if mask is None:
        return x.reshape(-1, x.shape[-1]) if x.ndim > 2 else x
    if x.ndim != 3 or tuple(x.shape[:2]) != tuple(mask.shape):
        raise ValueError(
            f"LoRAConfig.init='eva': layer {name!r} gets an input of shape {tuple(x.shape)}, which does not line up "
            f"with the batch's input_ids/attention_mask {tuple(mask.shape)}; EVA selects token positions by them (as "
            "peft does), so it needs layers that read one row per input token: exclude this layer from "
            "target_modules or use another init"
        )
    return x[mask.to(x.device)]


def _pending(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear) and m.__dict__.get("eva_pending")]


def _record(
    layers: Mapping[str, LoRALinear], sink: Callable[[str, Tensor], object], positions: list[Tensor | None]
) -> list[torch.utils.hooks.RemovableHandle]:
    def hook(name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            sink(name, _rows(args[0], positions[0], name))

        return record

    return [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]


def calibrate(model: nn.Module, config: LoRAConfig, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor]) -> None:
    """Set every uncalibrated EVA layer's A from the SVD of its inputs over ``batches`` (see the module doc).

    Does nothing when no layer waits for it (a resumed run, a loaded adapter). ``loss_fn`` runs
    each batch through the model (its loss is not used); the model is in eval mode meanwhile.
    Layers whose rank the redistribution changes get new tensors (or are unwrapped, at rank 0) and
    the adapter a new recorded config, all or nothing (see :mod:`~lightning_peft.methods.lora_eva_ranks`).

    Raises:
        ValueError: with no batch, a layer whose input has fewer features than its components, or
            whitening of shared inputs (see the module doc).
        TypeError: for a redistribution changing the rank of a merged or DoRA layer.
        RuntimeError: when the components have not converged within ``max_batches`` forward passes,
            or under ``torch.distributed``.
    """
    info = next((i for i in state.adapters(model).values() if i.config is config), None) or state.require_info(model)
    pending = {name: layer for name, layer in _pending(model) if layer.adapter_name == info.name}
    if not pending:
        return
    options = config.eva_config
    assert options is not None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        raise RuntimeError(
            "LoRAConfig.init='eva' is not implemented under torch.distributed in lightning_peft (peft gathers every "
            "rank's layer inputs into one SVD); calibrate on one process and load the adapter, or use another init"
        )
    rho = options["rho"]
    if rho > _RHO_LIMIT:
        rho = min(rho, max(max(p.shape, default=1) for p in model.parameters()) // config.r)
    wanted = {name: round(layer.r * rho) for name, layer in pending.items()}
    for name, layer in pending.items():
        if wanted[name] > layer.lora_A.shape[1]:
            raise ValueError(
                f"LoRAConfig.init='eva': layer {name!r} has {layer.lora_A.shape[1]} input features, fewer than the "
                f"{wanted[name]} components r * rho = {layer.r} * {rho} asks for; lower r or eva_config['rho']"
            )
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            inputs, ranks = _decompose(model, pending, wanted, options, batches, loss_fn)
    finally:
        for module, mode in modes.items():
            module.training = mode
    base_path = find_base_model(model)[0]
    changes = []
    for path, layer in pending.items():
        name = relative_name(path, base_path)
        own, rank = config.for_layer(name), ranks[path]
        alpha = own.alpha * rank / own.r if options["adjust_scaling_factors"] and rank != own.r else own.alpha
        scaling = lora_eva_ranks.scale(config, rank, alpha) if rank else 0.0
        changes.append(lora_eva_ranks.Change(path, name, layer, rank, alpha, scaling, inputs[path]))
    recorded = config
    if any(c.rank != c.layer.r for c in changes):  # a new record (peft's rank/alpha patterns), not the user's
        kept = [relative_name(p, base_path) for p, _ in lora_eva_ranks.eva_layers(model, info.name) if ranks.get(p, 1)]
        recorded = lora_eva_ranks.new_config(config, changes, kept)
    lora_eva_ranks.apply(model, info, changes, recorded)
    for layer in pending.values():
        _done(layer)


def _decompose(
    model: nn.Module,
    pending: Mapping[str, LoRALinear],
    wanted: dict[str, int],
    options: Mapping[str, Any],
    batches: Iterable[Any],
    loss_fn: Callable[[Any], Tensor],
) -> tuple[dict[str, Tensor], dict[str, int]]:
    """peft's loop: group equal inputs on the first batch, then fit until converged; returns (A rows, ranks)."""
    stream = iter(batches)
    first = next(stream, None)
    if first is None:
        raise ValueError("LoRAConfig.init='eva' needs training batches to initialize A from, but got none.")
    positions: list[Tensor | None] = [_positions(first, options)]
    seen: dict[str, Tensor] = {}
    handles = _record(pending, lambda name, x: seen.setdefault(name, x), positions)
    try:
        loss_fn(first)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in pending if name not in seen]
    if missing:
        raise ValueError(f"LoRAConfig.init='eva': layer {missing[0]!r} is not reached by a forward pass of the batch")
    groups: dict[str, list[str]] = {}  # the first layer reading an input -> every layer reading it
    for name in pending:
        leader = next((n for n in groups if _same(seen[n], seen[name])), name)
        groups.setdefault(leader, []).append(name)
    seen.clear()  # the first batch's inputs: no longer needed
    # layer -> the first layer reading the same input, whose SVD it uses (group by group, as peft lists them)
    shared = {n: leader for leader, members in groups.items() for n in members[1:]}
    if shared and options["whiten"]:
        raise ValueError(
            f"LoRAConfig.eva_config whiten=True with layers reading the same input ({', '.join(list(shared)[:3])}): "
            "peft 0.21.2 divides their shared components by sqrt(S) once more for each further layer (in place), "
            "which is not EVA's whitening; lightning_peft refuses it rather than differ. Set whiten=False"
        )
    for members in groups.values():
        top = max(wanted[n] for n in members)
        for n in members:
            wanted[n] = top
    leaders = list(groups)
    states = {name: _Layer(wanted[name], options["tau"]) for name in leaders}
    budget = sum(layer.r for layer in pending.values())
    ranks = dict(wanted)
    active = dict.fromkeys(leaders, True)
    done = dict.fromkeys(leaders, False)
    handles = []
    try:
        for count, batch in enumerate(itertools.cycle(itertools.chain([first], stream))):
            for name in leaders:
                converged = bool(torch.all(states[name].converged[: ranks[name]]))
                if not done[name] and converged and active[name]:
                    active[name], done[name] = False, True
                elif done[name] and not converged:
                    active[name], done[name] = True, False
            if all(done.values()):
                break
            if count == options["max_batches"]:
                late = [n for n in leaders if not done[n]]
                raise RuntimeError(
                    f"LoRAConfig.init='eva': the SVD of {', '.join(late[:3])}{'...' * (len(late) > 3)} did not "
                    f"converge (cosine similarity >= tau={options['tau']}) within eva_config "
                    f"max_batches={options['max_batches']} forward passes; raise max_batches or lower tau"
                )
            positions[0] = _positions(batch, options)
            handles = _record(
                {n: pending[n] for n in leaders if active[n]}, lambda name, x: states[name].step(x, name), positions
            )
            try:
                loss_fn(batch)
            finally:
                for handle in handles:
                    handle.remove()
            if all(states[n].svd.components is not None for n in leaders):
                ranks = _distribution(states, shared, wanted, budget, list(pending))
    finally:
        for handle in handles:
            handle.remove()
    rows = {}
    for name in pending:
        state = states[shared.get(name, name)]
        assert state.svd.components is not None and state.svd.singular_values is not None
        u = state.svd.components[: ranks[name]]
        if options["whiten"]:
            u = u / state.svd.singular_values[: ranks[name]].sqrt().reshape(-1, 1)
        rows[name] = u
    return rows, ranks


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.device == b.device and torch.equal(a, b)


def _distribution(
    states: Mapping[str, _Layer], shared: Mapping[str, str], wanted: Mapping[str, int], budget: int, names: list[str]
) -> dict[str, int]:
    """Ranks by explained variance: the ``budget`` largest ratios over all layers' first ``wanted`` components."""
    order = [n for n in names if n not in shared] + list(shared)  # peft's: the SVD layers first, then the sharing ones
    leader = {n: shared.get(n, n) for n in order}
    ratios = {n: states[n].svd.ratio[: wanted[n]] for n in set(leader.values())}  # type: ignore[index]
    keys, values = zip(*[(n, c) for n in order for c in ratios[leader[n]]], strict=True)
    best = torch.stack(values).argsort(descending=True)
    counts = Counter(keys[i] for i in best[:budget])
    ranks = {n: counts.get(n, 0) for n in order}
    for n, first in shared.items():  # the layer holding the SVD takes the largest rank of its group
        if ranks[first] < ranks[n]:
            ranks[first], ranks[n] = ranks[n], ranks[first]
    return ranks


def _done(layer: LoRALinear) -> None:
    """Calibrated or loaded: drop the layer's EVA hooks (by id, so a deep copy drops its own)."""
    layer.__dict__["eva_pending"] = False
    forward_id, load_id = layer.__dict__.pop("eva_hooks", (None, None))
    layer._forward_pre_hooks.pop(forward_id, None)
    layer._load_state_dict_pre_hooks.pop(load_id, None)


def _refuse_training(module: nn.Module, args: tuple[Any, ...]) -> None:
    if module.training and torch.is_grad_enabled() and module.__dict__.get("eva_pending"):
        raise RuntimeError(
            "LoRAConfig.init='eva' trains before EVA set its A: call lightning_peft.calibrate(model, batches, loss_fn) "
            "before the first step (PEFTCallback does this at train start), or load a trained adapter"
        )


def _loaded(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *args: Any) -> None:
    if f"{prefix}lora_A" in state_dict and isinstance(module, LoRALinear):
        _done(module)


def prepare(model: nn.Module, config: LoRAConfig) -> list[str]:
    """After injection: mark the EVA layers as waiting for calibration; refuse the layers EVA cannot set."""
    for name, module in model.named_modules():
        if not isinstance(module, LoRALayer) or module.init != "eva" or "eva_pending" in module.__dict__:
            continue
        if not isinstance(module, LoRALinear):
            raise TypeError(
                f"LoRAConfig.init='eva' initializes linear layers from their inputs, and {name!r} is a "
                f"{type(module).__name__} (peft gives such layers init_lora_weights=True with a warning); exclude "
                "it from target_modules or use another init"
            )
        module.__dict__["eva_pending"] = True
        module.__dict__["eva_hooks"] = (
            module.register_forward_pre_hook(_refuse_training).id,
            module.register_load_state_dict_pre_hook(_loaded).id,
        )
    return []


lora.OPTIONS["eva_config"] = prepare
lora.CALIBRATIONS["eva"] = calibrate
