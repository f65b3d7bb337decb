"""Learning-rate schedules for :mod:`fusedopt.optim`, with torch.optim.lr_scheduler's semantics.

A schedule sets ``lr`` in every parameter group of its optimizer: once when it is created (step
0), then at each ``step()``, which a training loop calls after ``optimizer.step(...)``. Each
schedule is a closed form of the step count, from the learning rates the groups had when the
schedule was created; ``state_dict()`` / ``load_state_dict()`` resume it exactly. A group
added to the optimizer after a closed-form schedule was created keeps its own rate (torch's
chainable schedules would scale it from its rate when added) and ``OneCycleLR`` refuses to
step, as torch's does: create the schedule after the last ``add_param_group``.
``ReduceLROnPlateau`` reduces an added group as torch's does: down to ``min_lr``, or, made
with a list of them, a RuntimeError.

>>> opt = fusedopt.optim.AdamW(params, lr=1e-3)
>>> sched = fusedopt.schedules.WarmupCosineLR(opt, warmup_steps=100, total_steps=10_000)
>>> for batch in data:
...     opt.step(grads(batch))
...     sched.step()
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Callable, Dict, List, Sequence, Union

from .optim import Optimizer

__all__ = [
    "ConstantLR",
    "CosineAnnealingLR",
    "ExponentialLR",
    "LRScheduler",
    "LinearLR",
    "OneCycleLR",
    "ReduceLROnPlateau",
    "StepLR",
    "WarmupCosineLR",
]


# what torch's schedulers' state_dict has beyond the schedule (its step bookkeeping, the last
# rates, ReduceLROnPlateau's derived values): ignored by load_state_dict, so that a torch
# scheduler's checkpoint loads into the fusedopt schedule of the same name
_TORCH_BOOKKEEPING = frozenset(
    {
        "_step_count",
        "_is_initial",
        "_get_lr_called_within_step",
        "_last_lr",
        "verbose",
        "mode_worse",
    }
)


def _kind(value: Any) -> str:
    """What _check_like compares: a sequence, a bool, a number, a string, or anything else."""
    if isinstance(value, (list, tuple)):
        return "sequence"
    for kind, name in ((bool, "bool"), (numbers.Real, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "other"


def _check_like(what: str, value: Any, like: Any) -> None:
    """TypeError unless ``value`` is of the kind ``like`` is: a bool, a number, a string, a
    sequence of the kind of its items where they are of one kind (the groups' rates), else
    item by item (a record: OneCycleLR's phases, tuples that a JSON round trip makes lists)."""
    if isinstance(like, (list, tuple)):
        record = isinstance(like, tuple) or len({_kind(x) for x in like}) > 1
        if not isinstance(value, (list, tuple)) or (record and len(value) != len(like)):
            raise TypeError(f"{what}: expected a sequence like {like!r}, got {value!r}")
        for i, v in enumerate(value):
            if like:
                _check_like(what, v, like[i] if record else like[0])
        return
    kind = _kind(like)
    if kind != "other" and _kind(value) != kind:
        raise TypeError(f"{what}: expected a {kind}, got {value!r}")


def _per_group_values(name: str, optimizer: Optimizer, value: Any) -> List[Any]:
    """``value`` for each of the optimizer's groups: a list or tuple of one per group (else
    ValueError, as torch's schedulers raise), or one for all."""
    groups = len(optimizer.param_groups)
    if not isinstance(value, (list, tuple)):
        return [value] * groups
    if len(value) != groups:
        raise ValueError(
            f"{name}: expected one value per parameter group ({groups}), got {len(value)}"
        )
    return list(value)


def _checked_optimizer(optimizer: Any) -> Optimizer:
    """``optimizer``, if it is a fusedopt.optim.Optimizer or has its param_groups and defaults
    (a distributed.ZeroRedundancyOptimizer), else TypeError."""
    if not isinstance(optimizer, Optimizer) and not (
        isinstance(getattr(optimizer, "param_groups", None), list)
        and isinstance(getattr(optimizer, "defaults", None), dict)
    ):
        raise TypeError(f"expected a fusedopt.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


class _Schedule:
    optimizer: Optimizer
    #: the state keys with one value per parameter group the schedule was made for (groups
    #: added to the optimizer since keep their rates: see the module's docstring)
    _per_group = ("base_lrs",)
    #: state keys that checkpoints of earlier versions lack: their value derived from the rest
    _derived: Dict[str, Callable[[Dict[str, Any]], Any]] = {}

    def get_last_lr(self) -> List[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "optimizer"}

    def _check(self) -> None:
        """TypeError/ValueError for an invalid setting (the constructor's checks)."""

    def _loaded(self, state_dict: Any) -> "_Schedule":
        """A copy of this schedule with ``state_dict`` loaded, every value checked to be of the
        kind this schedule's is (a number, a flag, a string, per-group lists as long as the
        optimizer has groups) and the settings as the constructor checks them; raises
        TypeError/ValueError before anything of this one changes."""
        name = type(self).__name__
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        own = self.state_dict()
        loaded = {k: v for k, v in state_dict.items() if k not in _TORCH_BOOKKEEPING}
        unknown = set(loaded) - set(own)
        missing = set(own) - set(loaded) - set(self._derived)
        if unknown or missing:  # another schedule's
            keys = {"unknown": sorted(unknown), "missing": sorted(missing)}
            raise ValueError(
                f"not a {name} state: "
                + ", ".join(f"{kind} keys {found}" for kind, found in keys.items() if found)
            )
        groups = len(self.optimizer.param_groups)
        for key, value in loaded.items():
            what = f"state_dict[{key!r}]"
            if key in self._per_group:
                if not isinstance(value, (list, tuple)) or not 1 <= len(value) <= groups:
                    raise ValueError(
                        f"{what}: expected one value per parameter group ({groups}, or fewer "
                        f"for a schedule made before groups were added), got {value!r}"
                    )
                for v in value:
                    _check_like(what, v, own[key][0])
            elif key not in self._derived:  # checked by _check
                _check_like(what, value, own[key])
        if len({len(loaded[key]) for key in self._per_group}) > 1:  # the same groups, each
            raise ValueError(
                "state_dict: expected as many values in each of "
                f"{', '.join(self._per_group)}, got "
                + ", ".join(str(len(loaded[key])) for key in self._per_group)
            )
        last_epoch = loaded["last_epoch"]
        if not isinstance(last_epoch, numbers.Integral) or last_epoch < 0:
            raise (ValueError if isinstance(last_epoch, numbers.Integral) else TypeError)(
                f"state_dict['last_epoch']: expected an int >= 0, got {last_epoch!r}"
            )
        loaded.update({k: derive(loaded) for k, derive in self._derived.items() if k not in loaded})
        trial = copy.copy(self)
        vars(trial).update(loaded)
        trial._check()
        return trial


class LRScheduler(_Schedule):
    """Base class: ``lr(step, base_lr)`` gives a group's learning rate at a step."""

    def __init__(self, optimizer: Optimizer):
        self.optimizer = _checked_optimizer(optimizer)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = -1
        self.step()

    def lr(self, step: int, base_lr: float) -> float:
        raise NotImplementedError

    def step(self) -> None:
        """Advance one step and set every group's learning rate."""
        values = self._values(self.last_epoch + 1)  # first: a refused step changes nothing
        self.last_epoch += 1
        self._set(values)

    def _values(self, step: int) -> List[Dict[str, Any]]:
        """What each group's entries become at ``step``."""
        return [{"lr": self.lr(step, base)} for base in self.base_lrs]

    def _set(self, values: List[Dict[str, Any]]) -> None:
        for group, entries in zip(self.optimizer.param_groups, values):
            group.update(entries)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from ``state_dict``: this schedule's, or the checkpoint of torch's scheduler
        of the same name where it holds the same settings (all but OneCycleLR). Checked, and
        the groups' rates at its step computed, before anything changes."""
        trial = self._loaded(state_dict)
        values = trial._values(trial.last_epoch)
        vars(self).update(vars(trial))
        self._set(values)


class ConstantLR(LRScheduler):
    """``base_lr * factor`` for the first ``total_iters`` steps, then ``base_lr``."""

    def __init__(self, optimizer: Optimizer, factor: float = 1.0 / 3, total_iters: int = 5):
        self.factor, self.total_iters = factor, total_iters
        self._check()
        super().__init__(optimizer)

    def _check(self):
        if not 0 <= self.factor <= 1:
            raise ValueError("Constant multiplicative factor expected to be between 0 and 1.")

    def lr(self, step, base_lr):
        return base_lr * self.factor if step < self.total_iters else base_lr


class StepLR(LRScheduler):
    """``base_lr * gamma ** (step // step_size)``."""

    def __init__(self, optimizer: Optimizer, step_size: int, gamma: float = 0.1):
        self.step_size, self.gamma = step_size, gamma
        self._check()
        super().__init__(optimizer)

    def _check(self):
        if self.step_size < 1:
            raise ValueError(f"Invalid step_size: {self.step_size}")

    def lr(self, step, base_lr):
        return base_lr * self.gamma ** (step // self.step_size)


class ExponentialLR(LRScheduler):
    """``base_lr * gamma ** step``."""

    def __init__(self, optimizer: Optimizer, gamma: float):
        self.gamma = gamma
        super().__init__(optimizer)

    def lr(self, step, base_lr):
        return base_lr * self.gamma**step


class CosineAnnealingLR(LRScheduler):
    r""":math:`\eta_{min} + (\eta_{base} - \eta_{min}) (1 + \cos(\pi t / T_{max})) / 2`
    (Loshchilov & Hutter 2017, without restarts)."""

    def __init__(self, optimizer: Optimizer, T_max: int, eta_min: float = 0.0):  # noqa: N803
        self.T_max, self.eta_min = T_max, eta_min
        self._check()
        super().__init__(optimizer)

    def _check(self):
        if self.T_max < 1:
            raise ValueError(f"Invalid T_max: {self.T_max}")

    def lr(self, step, base_lr):
        return (
            self.eta_min
            + (base_lr - self.eta_min) * (1 + math.cos(math.pi * step / self.T_max)) / 2
        )


class LinearLR(LRScheduler):
    """Linear warm-up (or decay): the factor goes from ``start_factor`` to ``end_factor`` over
    ``total_iters`` steps, then stays."""

    def __init__(
        self,
        optimizer: Optimizer,
        start_factor: float = 1.0 / 3,
        end_factor: float = 1.0,
        total_iters: int = 5,
    ):
        self.start_factor, self.end_factor, self.total_iters = start_factor, end_factor, total_iters
        self._check()
        super().__init__(optimizer)

    def _check(self):
        if not 0 < self.start_factor <= 1:
            raise ValueError(
                "Starting multiplicative factor expected to be greater than 0 and "
                "less or equal to 1."
            )
        if not 0 <= self.end_factor <= 1:
            raise ValueError("Ending multiplicative factor expected to be between 0 and 1.")

    def lr(self, step, base_lr):
        progress = min(step, self.total_iters) / self.total_iters if self.total_iters else 1.0
        return base_lr * (self.start_factor + (self.end_factor - self.start_factor) * progress)


class WarmupCosineLR(LRScheduler):
    """Linear warm-up from ``base_lr * warmup_start_factor`` to ``base_lr`` over
    ``warmup_steps``, then cosine annealing to ``eta_min`` at ``total_steps``: torch's
    ``SequentialLR([LinearLR(...), CosineAnnealingLR(...)], milestones=[warmup_steps])``."""

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int,
        eta_min: float = 0.0,
        warmup_start_factor: float = 1e-3,
    ):
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.eta_min, self.warmup_start_factor = eta_min, warmup_start_factor
        self._check()
        super().__init__(optimizer)

    def _check(self):
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps < total_steps, got {self.warmup_steps}, {self.total_steps}"
            )

    def lr(self, step, base_lr):
        if step < self.warmup_steps:
            s = self.warmup_start_factor
            return base_lr * (s + (1 - s) * step / self.warmup_steps)
        t = step - self.warmup_steps
        return (
            self.eta_min
            + (base_lr - self.eta_min)
            * (1 + math.cos(math.pi * t / (self.total_steps - self.warmup_steps)))
            / 2
        )


class OneCycleLR(LRScheduler):
    """The 1cycle policy (Smith & Topin 2018), as torch's OneCycleLR: the learning rate rises
    from ``max_lr / div_factor`` to ``max_lr`` over ``pct_start`` of ``total_steps``, then falls
    to ``max_lr / div_factor / final_div_factor``; momentum (or Adam's beta1) moves inversely
    between ``max_momentum`` and ``base_momentum`` when ``cycle_momentum``."""

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: Union[float, Sequence[float]],
        total_steps: int,
        pct_start: float = 0.3,
        anneal_strategy: str = "cos",
        cycle_momentum: bool = True,
        base_momentum: float = 0.85,
        max_momentum: float = 0.95,
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
    ):
        if not 0 <= pct_start <= 1:
            raise ValueError(f"Expected float between 0 and 1 pct_start, but got {pct_start}")
        self.optimizer = _checked_optimizer(optimizer)  # read below and by _check
        max_lrs = _per_group_values("max_lr", optimizer, max_lr)
        self.max_lrs, self.total_steps, self.anneal_strategy = max_lrs, total_steps, anneal_strategy
        self.cycle_momentum = cycle_momentum
        self.base_momentum, self.max_momentum = base_momentum, max_momentum
        self.initial_lrs = [m / div_factor for m in max_lrs]
        self.min_lrs = [lr / final_div_factor for lr in self.initial_lrs]
        end_1 = float(pct_start * total_steps) - 1
        if three_phase:
            # (end step, lr from, lr to, momentum from, momentum to) by phase; "i"nitial,
            # "m"ax, "f"inal learning rate
            self.phases = [
                (end_1, "i", "m", max_momentum, base_momentum),
                (float(2 * pct_start * total_steps) - 2, "m", "i", base_momentum, max_momentum),
                (total_steps - 1, "i", "f", max_momentum, max_momentum),
            ]
        else:
            self.phases = [
                (end_1, "i", "m", max_momentum, base_momentum),
                (total_steps - 1, "m", "f", base_momentum, max_momentum),
            ]
        self._check()
        super().__init__(optimizer)

    _per_group = ("base_lrs", "max_lrs", "initial_lrs", "min_lrs")

    def _check(self):
        if self.total_steps < 1:
            raise ValueError(f"Expected positive integer total_steps, but got {self.total_steps}")
        if self.anneal_strategy not in ("cos", "linear"):
            raise ValueError(
                f"anneal_strategy must be one of 'cos' or 'linear', got {self.anneal_strategy}"
            )
        if self.cycle_momentum and not any(
            k in self.optimizer.defaults for k in ("momentum", "betas")
        ):
            raise ValueError(
                "optimizer must support momentum or beta1 with `cycle_momentum` option enabled"
            )
        if not 2 <= len(self.phases) <= 3 or any(
            lr_from not in "imf" or lr_to not in "imf" for _, lr_from, lr_to, _, _ in self.phases
        ):
            raise ValueError(f"phases: expected 2 or 3 of OneCycleLR's, got {self.phases!r}")

    def _anneal(self, start, end, pct):
        if self.anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def _values(self, step):
        if step > self.total_steps:
            raise ValueError(
                f"Tried to step {step} times. The specified number of total steps "
                f"is {self.total_steps}"
            )
        groups = self.optimizer.param_groups
        if len(groups) > len(self.max_lrs):  # torch's fails on the group's missing max_lr
            raise ValueError(
                f"OneCycleLR made for {len(self.max_lrs)} parameter groups, the optimizer has "
                f"{len(groups)}: a group added since has no max_lr (make the schedule after "
                "adding it)"
            )
        values = []
        for i, group in enumerate(groups):
            lrs = {"i": self.initial_lrs[i], "m": self.max_lrs[i], "f": self.min_lrs[i]}
            start_step = 0.0
            for index, (end_step, lr_from, lr_to, m_from, m_to) in enumerate(self.phases):
                if step <= end_step or index == len(self.phases) - 1:
                    pct = (step - start_step) / (end_step - start_step)
                    entries = {"lr": self._anneal(lrs[lr_from], lrs[lr_to], pct)}
                    momentum = self._anneal(m_from, m_to, pct)
                    break
                start_step = end_step
            if self.cycle_momentum:
                if "betas" in group:
                    entries["betas"] = (momentum, *group["betas"][1:])
                else:
                    entries["momentum"] = momentum
            values.append(entries)
        return values


class ReduceLROnPlateau(_Schedule):
    """Multiply the learning rate by ``factor`` once a metric has stopped improving for
    ``patience`` steps, as torch's ReduceLROnPlateau: ``step(metric)`` after each evaluation."""

    def __init__(
        self,
        optimizer: Optimizer,
        mode: str = "min",
        factor: float = 0.1,
        patience: int = 10,
        threshold: float = 1e-4,
        threshold_mode: str = "rel",
        cooldown: int = 0,
        min_lr: Union[float, Sequence[float]] = 0.0,
        eps: float = 1e-8,
    ):
        self.mode, self.factor, self.patience = mode, factor, patience
        self.threshold, self.threshold_mode = threshold, threshold_mode
        self._check()
        self.optimizer = _checked_optimizer(optimizer)
        self.min_lrs = _per_group_values("min_lr", optimizer, min_lr)
        # groups added since take the default, as in torch; with a list, there is none
        self.default_min_lr = None if isinstance(min_lr, (list, tuple)) else min_lr
        self.cooldown, self.eps = cooldown, eps
        self.best = math.inf if mode == "min" else -math.inf
        self.num_bad_epochs, self.cooldown_counter, self.last_epoch = 0, 0, 0

    _per_group = ("min_lrs",)
    # this library's checkpoints from before default_min_lr was kept: the one value of their
    # min_lrs, if one
    _derived = {
        "default_min_lr": lambda state: (
            state["min_lrs"][0] if len(set(state["min_lrs"])) == 1 else None
        )
    }

    def _check(self):
        if self.factor >= 1.0:
            raise ValueError("Factor should be < 1.0.")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode {self.mode} is unknown!")
        if self.threshold_mode not in ("rel", "abs"):
            raise ValueError(f"threshold mode {self.threshold_mode} is unknown!")
        default = getattr(self, "default_min_lr", None)
        if default is not None and _kind(default) != "number":
            raise TypeError(f"default_min_lr: expected None or a number, got {default!r}")

    def _is_better(self, a: float) -> bool:
        if self.mode == "min":
            return a < (
                self.best * (1 - self.threshold)
                if self.threshold_mode == "rel"
                else self.best - self.threshold
            )
        return a > (
            self.best * (1 + self.threshold)
            if self.threshold_mode == "rel"
            else self.best + self.threshold
        )

    def step(self, metric: float) -> None:
        current = float(metric)
        best, bad = (
            (current, 0) if self._is_better(current) else (self.best, self.num_bad_epochs + 1)
        )
        cooldown = self.cooldown_counter
        if cooldown > 0:
            cooldown, bad = cooldown - 1, 0
        min_lrs = self.min_lrs
        groups = self.optimizer.param_groups
        reduce = bad > self.patience
        if reduce and len(groups) != len(min_lrs):  # a group added: refused before any change
            if self.default_min_lr is None:
                raise RuntimeError(
                    f"ReduceLROnPlateau made with a min_lr for each of {len(min_lrs)} parameter "
                    f"groups, the optimizer has {len(groups)} (a group added): set its min_lrs "
                    "to one value per group"
                )
            min_lrs = [self.default_min_lr] * len(groups)
        self.last_epoch += 1
        self.best, self.num_bad_epochs, self.cooldown_counter = best, bad, cooldown
        if reduce:
            self.min_lrs = min_lrs
            for group, min_lr in zip(groups, min_lrs):
                new_lr = max(group["lr"] * self.factor, min_lr)
                if group["lr"] - new_lr > self.eps:
                    group["lr"] = new_lr
            self.cooldown_counter, self.num_bad_epochs = self.cooldown, 0

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resume from ``state_dict`` (this schedule's, or torch's ReduceLROnPlateau's):
        checked before anything changes; the rates are the optimizer's own state."""
        vars(self).update(vars(self._loaded(state_dict)))
