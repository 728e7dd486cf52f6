"""Schedules for the learning rate and, independently, the weight decay.

- :class:`WarmRestarts`: SGDR / AdamWR (Loshchilov & Hutter), stepped every
  batch. Under ``decay="independent"`` the decay follows the same multiplier
  ``eta_t = lr_t / lr_max``, which is the paper's Alg. 2; under
  ``"decoupled"`` it follows ``lr_t`` as torch's AdamW does.
- :class:`WeightDecayScheduler`: a weight-decay schedule that does not touch the
  lr (no decay during warmup, cosine decay, ...): users have asked torch for this
  since 2019 (pytorch issue 22343).
- :func:`normalized_weight_decay`: the paper's App. B.1,
  ``lambda = lambda_norm * sqrt(b / (B * T))``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmRestarts", "WeightDecayScheduler", "normalized_weight_decay"]


def normalized_weight_decay(lambda_norm: float, batch_size: int, num_train: int, epochs: float) -> float:
    """Weight decay normalized by the number of updates (Loshchilov & Hutter 2019, App. B.1).

    .. math:: \\lambda = \\lambda_{norm} \\sqrt{\\frac{b}{B\\,T}}

    Args:
        lambda_norm: the normalized decay (the paper found 0.025 to 0.05 best).
        batch_size: b, samples per update.
        num_train: B, training samples per epoch.
        epochs: T, epochs of the run (under restarts: of the current period).

    Returns:
        The raw weight decay for ``decay="independent"`` (the paper's lambda).
    """
    for name, value in (("batch_size", batch_size), ("num_train", num_train), ("epochs", epochs)):
        if not value > 0:
            raise ValueError(f"Invalid {name}: {value!r} (expected > 0)")
    if not lambda_norm >= 0:
        raise ValueError(f"Invalid lambda_norm: {lambda_norm!r} (expected >= 0)")
    return lambda_norm * math.sqrt(batch_size / (num_train * epochs))


class WarmRestarts(LRScheduler):
    r"""Cosine annealing with warm restarts (SGDR, AdamWR), stepped once per batch.

    .. math::
        \eta_t = \eta_{min} + \tfrac12(1 - \eta_{min})\,(1 + \cos(\pi\, T_{cur} / T_i)),
        \qquad \mathrm{lr}_t = \mathrm{lr}_{max}\,\eta_t

    ``T_cur`` counts epochs since the last restart and advances by
    ``1/steps_per_epoch`` every batch; period ``i+1`` lasts ``T_mult`` times
    period ``i``. ``eta_min`` is a fraction of each group's initial lr, as the
    paper's multiplier. With ``decay="independent"`` the weight decay follows
    ``eta_t`` too, since its multiplier is ``lr/lr_max``. With
    ``lambda_norm`` set, each group's ``weight_decay`` is recomputed at every
    restart by :func:`normalized_weight_decay` for the new period's length
    (groups whose ``weight_decay`` is 0 when the scheduler is built, such as the
    no-decay group of :func:`fusedwd.param_groups`, keep 0).

    Composes with torch's schedulers (e.g. after a warmup in
    ``torch.optim.lr_scheduler.SequentialLR``).

    Args:
        optimizer: the wrapped optimizer.
        T_0: epochs of the first period.
        T_mult: growth factor of each period's length.
        eta_min: the lowest multiplier, a fraction of each group's initial lr.
        steps_per_epoch: batches per epoch (``step()`` is called once per batch).
        lambda_norm, batch_size, num_train: normalized decay per period (all or none).
        last_epoch: as in torch's schedulers (number of steps taken; -1 to start).

    Example:
        >>> opt = fusedwd.AdamW(fusedwd.param_groups(model), lr=1e-3, decay="independent")
        >>> sched = WarmRestarts(opt, T_0=10, T_mult=2, steps_per_epoch=len(loader),
        ...                      lambda_norm=0.05, batch_size=128, num_train=50000)
        >>> for epoch in range(70):
        ...     for x, y in loader:
        ...         train_step(x, y); opt.step(); sched.step()

    References:
        Loshchilov & Hutter, *SGDR*, ICLR 2017, Eq. 5; *Decoupled Weight Decay
        Regularization*, ICLR 2019, Sec. 3 and App. B.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: float,
        T_mult: float = 1.0,
        eta_min: float = 0.0,
        steps_per_epoch: int = 1,
        *,
        lambda_norm: Optional[float] = None,
        batch_size: Optional[int] = None,
        num_train: Optional[int] = None,
        last_epoch: int = -1,
    ) -> None:
        if not T_0 > 0:
            raise ValueError(f"Invalid T_0: {T_0!r} (expected > 0)")
        if not T_mult >= 1:
            raise ValueError(f"Invalid T_mult: {T_mult!r} (expected >= 1)")
        if not 0 <= eta_min <= 1:
            raise ValueError(f"Invalid eta_min: {eta_min!r} (expected a fraction in [0, 1])")
        if not (isinstance(steps_per_epoch, int) and steps_per_epoch >= 1):
            raise ValueError(f"Invalid steps_per_epoch: {steps_per_epoch!r} (expected an int >= 1)")
        normalized = (lambda_norm, batch_size, num_train)
        if any(v is not None for v in normalized) and any(v is None for v in normalized):
            raise ValueError("lambda_norm, batch_size and num_train go together")
        self.T_0, self.T_mult, self.eta_min = float(T_0), float(T_mult), float(eta_min)
        self.steps_per_epoch = steps_per_epoch
        self.lambda_norm, self.batch_size, self.num_train = lambda_norm, batch_size, num_train
        self._period_index = -1
        # groups built with weight_decay=0 (no-decay groups) keep it; the others get the
        # normalized value of each period
        self._decaying = [g.get("weight_decay", 0) != 0 for g in optimizer.param_groups]
        super().__init__(optimizer, last_epoch)

    def period(self, epochs: float) -> tuple[int, float, float]:
        """``(i, T_cur, T_i)`` at ``epochs`` epochs into training."""
        if self.T_mult == 1.0:
            i = int(epochs // self.T_0)
            return i, epochs - i * self.T_0, self.T_0

        def start(k: int) -> float:  # epochs before period k: a geometric series
            return self.T_0 * (self.T_mult**k - 1) / (self.T_mult - 1)

        i = int(math.log(1 + epochs * (self.T_mult - 1) / self.T_0, self.T_mult))
        # the logarithm may round across a boundary: settle on start(i) <= epochs < start(i+1)
        while i > 0 and epochs < start(i):
            i -= 1
        while epochs >= start(i + 1):
            i += 1
        return i, epochs - start(i), self.T_0 * self.T_mult**i

    def multiplier(self) -> float:
        """eta_t for the current step."""
        _, t_cur, t_i = self.period(max(self.last_epoch, 0) / self.steps_per_epoch)
        return self.eta_min + 0.5 * (1 - self.eta_min) * (1 + math.cos(math.pi * t_cur / t_i))

    def get_lr(self) -> list[float]:
        eta = self.multiplier()
        i, _, t_i = self.period(max(self.last_epoch, 0) / self.steps_per_epoch)
        if self.lambda_norm is not None and i != self._period_index:
            wd = normalized_weight_decay(self.lambda_norm, self.batch_size, self.num_train, t_i)
            for group, decaying in zip(self.optimizer.param_groups, self._decaying):
                if decaying:
                    group["weight_decay"] = wd
        self._period_index = i
        return [base_lr * eta for base_lr in self.base_lrs]


class WeightDecayScheduler:
    """Sets each group's ``weight_decay`` to its initial value times ``fn(step)``, leaving lr alone.

    The initial value is recorded as ``initial_weight_decay`` in each group (as
    torch's lr schedulers record ``initial_lr``). Call :meth:`step` once per
    optimizer step, after ``optimizer.step()``.

    Args:
        optimizer: the wrapped optimizer.
        fn: step -> multiplier, or one callable per param group; or a name:
            ``"cosine"`` (needs ``total_steps``). ``warmup_steps`` holds the
            multiplier at 0 for the first steps (no decay during lr warmup).
        total_steps: length of the schedule, for ``"cosine"``.
        warmup_steps: steps with no decay at all.

    Example:
        >>> wd_sched = WeightDecayScheduler(opt, "cosine", total_steps=10_000, warmup_steps=500)
        >>> for batch in loader:
        ...     train_step(batch); opt.step(); lr_sched.step(); wd_sched.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        fn: Union[str, Callable[[int], float], list[Callable[[int], float]]],
        *,
        total_steps: Optional[int] = None,
        warmup_steps: int = 0,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        if not (isinstance(warmup_steps, int) and warmup_steps >= 0):
            raise ValueError(f"Invalid warmup_steps: {warmup_steps!r} (expected an int >= 0)")
        if fn == "cosine":
            if not (isinstance(total_steps, int) and total_steps > warmup_steps):
                raise ValueError("'cosine' needs total_steps, an int > warmup_steps")
            span = total_steps - warmup_steps
            fn = lambda step: 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))  # noqa: E731
        elif isinstance(fn, str):
            raise ValueError(f"Invalid fn: {fn!r} (expected a callable, a list of callables or 'cosine')")
        fns = list(fn) if isinstance(fn, (list, tuple)) else [fn] * len(optimizer.param_groups)
        if len(fns) != len(optimizer.param_groups) or not all(callable(f) for f in fns):
            raise ValueError(f"Expected one callable per param group ({len(optimizer.param_groups)}), got {len(fns)}")
        self.optimizer, self.fns, self.warmup_steps = optimizer, fns, warmup_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_weight_decay", group["weight_decay"])
        self.last_step = -1
        self.step()

    def multipliers(self, step: int) -> list[float]:
        return [0.0 if step < self.warmup_steps else float(f(step)) for f in self.fns]

    def step(self) -> None:
        self.last_step += 1
        for group, m in zip(self.optimizer.param_groups, self.multipliers(self.last_step)):
            if not m >= 0:
                raise ValueError(f"weight-decay multiplier must be >= 0, got {m!r} at step {self.last_step}")
            group["weight_decay"] = group["initial_weight_decay"] * m

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "warmup_steps": self.warmup_steps}

    def load_state_dict(self, state: dict) -> None:
        self.last_step, self.warmup_steps = state["last_step"] - 1, state["warmup_steps"]
        self.step()
