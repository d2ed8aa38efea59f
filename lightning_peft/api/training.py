"""What a training loop calls besides the optimizer: the methods' optional training hooks.

Most methods only need their tensors updated by the optimizer. Some do more, and declare it on
their registry entry (:class:`~lightning_peft.registry.Method`): AdaLoRA reallocates its rank budget
after every step and adds an orthogonality penalty to the loss; importance-based selection picks
the entries it trains from a few batches before training. These functions run whatever the injected
method declares and do nothing for the others, so one loop serves every method. ``PEFTCallback``
calls them for a Lightning ``Trainer``; a plain PyTorch loop calls them itself::

    lp.inject(model, "adalora", init_r=12, target_r=4, tinit=10, tfinal=20)
    lp.calibrate(model, batches[:8], loss_fn)  # a no-op for methods that need no calibration
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])  # after calibrate
    for step, batch in enumerate(batches, start=1):
        loss = loss_fn(batch)
        penalty = lp.regularization(model)
        if penalty is not None:
            loss = loss + penalty
        loss.backward()
        optimizer.step()
        lp.on_step(model, step, total_steps=len(batches))  # after the step, before zero_grad
        optimizer.zero_grad()

The method's state (AdaLoRA's rank masks and importance statistics, the selected entries) lives in
the model's adapter tensors, so ``lp.trainable_state_dict(model)`` saved with the optimizer's state
is all a loop needs to resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_peft import registry
from lightning_peft.core import state


def _method(model: nn.Module) -> tuple[registry.Method, Any]:
    info = state.require_info(model)
    return registry.get(info.method), info.config


def on_step(model: nn.Module, step: int, total_steps: int | None = None) -> None:
    """Run the method's per-step work: after ``optimizer.step()``, before gradients are cleared.

    Args:
        model: the model the method was injected into.
        step: optimizer steps taken so far, counting the one just taken (1 after the first).
        total_steps: the number of optimizer steps the run will take, for methods with a schedule
            (``None`` if unknown; AdaLoRA then needs its ``total_step`` option).
    """
    method, config = _method(model)
    if method.on_step is not None:
        method.on_step(model, config, step, total_steps)


def regularization(model: nn.Module) -> Tensor | None:
    """The method's penalty to add to the training loss, or ``None`` when it has none."""
    method, config = _method(model)
    return method.regularization(model, config) if method.regularization is not None else None


def add_regularization_grad(model: nn.Module) -> Tensor | None:
    """Add the gradient of :func:`regularization` to the adapter's ``.grad``; returns the penalty.

    Equivalent to having added the penalty to the loss before ``backward``, for loops that cannot
    change the loss (a Lightning callback). Call it once per optimizer step, after the gradients
    are accumulated and unscaled. The gradient is computed with ``torch.autograd.grad`` rather than
    ``backward``, so no gradient hook (DDP's reducer) fires a second time.
    """
    penalty = regularization(model)
    if penalty is None:
        return None
    params = [p for _, p in state.adapter_parameters(model) if p.requires_grad]
    grads = torch.autograd.grad(penalty, params, allow_unused=True)
    with torch.no_grad():
        for param, grad in zip(params, grads, strict=True):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))
    return penalty.detach()


def calibrate(model: nn.Module, batches: Iterable[Any], loss_fn: Callable[[Any], Tensor]) -> None:
    """Let the method look at a few training batches before training (e.g. to select entries).

    Args:
        model: the model the method was injected into.
        batches: training batches; the method takes as many as its options say, and none when it
            needs no calibration or its choices were already restored from a checkpoint.
        loss_fn: the training loss of one batch (a scalar tensor).

    A calibration may change the adapter's tensors, not only their values: LoRA's EVA init with
    ``rho > 1`` gives layers new ranks (new A and B parameters) or removes them, and records the
    new ranks in the adapter's config. Build the optimizer after calibrating, from the parameters
    the model has then (``PEFTCallback``, whose optimizer exists already, swaps them in its groups).
    """
    method, config = _method(model)
    if method.calibrate is not None and method.needs_calibration(config):
        method.calibrate(model, config, batches, loss_fn)
