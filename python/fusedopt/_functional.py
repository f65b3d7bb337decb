"""The fused, in-place update functions.

Every function updates its arrays in place in one fused pass and returns ``None``. Each array
argument is either one ``numpy.ndarray`` (one tensor) or a list of them (many tensors in one
call: one parallel region over all of them). Within a tensor every array has the param's dtype
(float32 or float64), shape and memory layout (C- or F-contiguous), and the arrays that are
written must be writeable; one call takes one dtype. Anything else raises ``TypeError`` or
``ValueError`` before any array is touched: an array that would need a copy is an error, never
a silent no-op. The formulas are those of :mod:`fusedopt.reference`.

By default NaN and infinity in a gradient propagate exactly as the formulas say. With
``skip_if_nonfinite=True`` a step whose gradients hold any is skipped whole (the behaviour of
mixed-precision loss scaling) and the function returns False; otherwise it returns True.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

from ._dispatch import core as _core

__all__ = ["adagrad_", "adam_", "adamw_", "all_finite", "lion_", "momentum_", "rmsprop_",
           "sgd_"]

Arrays = Union[np.ndarray, Sequence[np.ndarray]]


def all_finite(arrays: Arrays) -> bool:
    """Whether every element of ``arrays`` (one array or a list, float32 or float64, one dtype)
    is finite: one fused, parallel pass that stops at the first NaN or infinity."""
    return _core.all_finite(arrays)


def sgd_(param: Arrays, grad: Arrays, *, lr: float, weight_decay: float = 0.0,
         maximize: bool = False, skip_if_nonfinite: bool = False) -> bool:
    r"""Stochastic gradient descent (Robbins & Monro 1951), in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        \theta_t &= \theta_{t-1} - \gamma\, g_t

    with :math:`\gamma` = ``lr``, :math:`\lambda` = ``weight_decay`` (L2 penalty) and the
    gradient negated when ``maximize``.

    Args:
        param: parameters, updated in place.
        grad: gradients (read only).
        lr: learning rate, >= 0.
        weight_decay: L2 penalty coefficient, >= 0.
        maximize: ascend the objective instead of descending it.
        skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
    """
    return _core.sgd(param, grad, lr=lr, weight_decay=weight_decay, maximize=maximize,
                     skip_if_nonfinite=skip_if_nonfinite)


def momentum_(param: Arrays, grad: Arrays, buf: Arrays, *, lr: float, momentum: float,
              dampening: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0,
              maximize: bool = False, skip_if_nonfinite: bool = False) -> bool:
    r"""SGD with momentum (Polyak 1964), or Nesterov momentum (Sutskever et al. 2013), in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        b_t &= \mu\, b_{t-1} + (1 - \tau)\, g_t \\
        \theta_t &= \theta_{t-1} - \gamma \begin{cases}
            g_t + \mu\, b_t & \text{nesterov} \\ b_t & \text{otherwise} \end{cases}

    with :math:`\gamma` = ``lr``, :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening``,
    :math:`\lambda` = ``weight_decay``. With :math:`\tau = \mu` this is the exponential moving
    average of the textbooks (:math:`v \leftarrow \beta v + (1-\beta) g`,
    :math:`\theta \leftarrow \theta - \alpha v`); :math:`\tau = 0` is PyTorch's heavy ball.

    Warning:
        ``torch.optim.SGD`` initialises the buffer with the first gradient, undamped; this
        function always applies the rule above (start ``buf`` at zero for the textbook form).

    Args:
        param: parameters, updated in place.
        grad: gradients (read only).
        buf: momentum buffer :math:`b`, updated in place.
        lr: learning rate, >= 0.
        momentum: :math:`\mu \ge 0`.
        dampening: :math:`\tau \in [0, 1]`.
        nesterov: use Nesterov momentum (needs momentum > 0 and dampening = 0).
        weight_decay: L2 penalty coefficient, >= 0.
        maximize: ascend the objective instead of descending it.
        skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
    """
    return _core.momentum(param, grad, buf, lr=lr, momentum=momentum, dampening=dampening,
                          nesterov=nesterov, weight_decay=weight_decay, maximize=maximize,
                          skip_if_nonfinite=skip_if_nonfinite)


def adam_(param: Arrays, grad: Arrays, exp_avg: Arrays, exp_avg_sq: Arrays, *, step: int,
          lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
          weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
          amsgrad: bool = False, max_exp_avg_sq: Optional[Arrays] = None,
          maximize: bool = False, skip_if_nonfinite: bool = False) -> bool:
    r"""Adam (Kingma & Ba 2015, Algorithm 1), in place; AMSGrad and AdamW as options.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`v` = ``exp_avg_sq``,
    :math:`t` = ``step``, :math:`\lambda` = ``weight_decay``. With ``decoupled_weight_decay``
    (AdamW, Loshchilov & Hutter 2019) the L2 term is dropped from :math:`g_t` and
    :math:`\theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)` comes first. With
    ``amsgrad`` (Reddi et al. 2018) :math:`\hat v_t = \max(\hat v_{t-1}, v_t)` is kept in
    ``max_exp_avg_sq`` and replaces :math:`v_t` in the denominator.

    Note:
        :math:`\epsilon` is added after the bias correction of :math:`\sqrt{v_t}`, as in the
        paper and ``torch.optim.Adam``; TensorFlow's Adam adds it before (its
        :math:`\hat\epsilon`).

    Args:
        param: parameters, updated in place.
        grad: gradients (read only).
        exp_avg: first moment :math:`m`, updated in place (start at zero).
        exp_avg_sq: second moment :math:`v`, updated in place (start at zero).
        step: number of steps taken including this one, from 1 (drives the bias corrections).
        lr: learning rate, >= 0.
        beta1, beta2: decay rates of the moments, in [0, 1).
        eps: term added to the denominator, > 0.
        weight_decay: L2 (or decoupled) weight decay coefficient, >= 0.
        decoupled_weight_decay: AdamW's decay instead of an L2 term in the gradient.
        amsgrad: use the running maximum of :math:`v`, kept in ``max_exp_avg_sq``.
        max_exp_avg_sq: the running maximum, updated in place; required with ``amsgrad``.
        maximize: ascend the objective instead of descending it.
        skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
    """
    return _core.adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr,
                      beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decoupled_weight_decay=decoupled_weight_decay, amsgrad=amsgrad,
                      maximize=maximize, skip_if_nonfinite=skip_if_nonfinite)


def adamw_(param: Arrays, grad: Arrays, exp_avg: Arrays, exp_avg_sq: Arrays, *, step: int,
           lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
           weight_decay: float = 1e-2, amsgrad: bool = False,
           max_exp_avg_sq: Optional[Arrays] = None, maximize: bool = False,
           skip_if_nonfinite: bool = False) -> bool:
    r"""AdamW (Loshchilov & Hutter 2019): :func:`adam_` with decoupled weight decay, in place.

    .. math::
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 - \beta_1^t}\,
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon}

    Arguments and return value as for :func:`adam_`; ``weight_decay`` defaults to ``1e-2`` as
    in ``torch.optim.AdamW``.
    """
    return _core.adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, step=step, lr=lr,
                      beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay,
                      decoupled_weight_decay=True, amsgrad=amsgrad, maximize=maximize,
                      skip_if_nonfinite=skip_if_nonfinite)


def adagrad_(param: Arrays, grad: Arrays, sum_sq: Arrays, *, step: int, lr: float = 1e-2,
             lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
             maximize: bool = False, skip_if_nonfinite: bool = False) -> bool:
    r"""Adagrad (Duchi, Hazan & Singer 2011), in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        s_t &= s_{t-1} + g_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1 + (t - 1)\,\eta}\,
            \frac{g_t}{\sqrt{s_t} + \epsilon}

    with :math:`\gamma` = ``lr``, :math:`\eta` = ``lr_decay``, :math:`s` = ``sum_sq``,
    :math:`t` = ``step``, :math:`\lambda` = ``weight_decay``.

    Args:
        param: parameters, updated in place.
        grad: gradients (read only).
        sum_sq: sum of squared gradients :math:`s`, updated in place (start at
            ``initial_accumulator_value``, usually 0).
        step: number of steps taken including this one, from 1.
        lr: learning rate, >= 0.
        lr_decay: learning-rate decay :math:`\eta \ge 0`.
        weight_decay: L2 penalty coefficient, >= 0.
        eps: term added to the denominator, > 0.
        maximize: ascend the objective instead of descending it.
        skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
    """
    return _core.adagrad(param, grad, sum_sq, step=step, lr=lr, lr_decay=lr_decay,
                         weight_decay=weight_decay, eps=eps, maximize=maximize,
                         skip_if_nonfinite=skip_if_nonfinite)


def rmsprop_(param: Arrays, grad: Arrays, square_avg: Arrays, *, lr: float = 1e-2,
             alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0,
             momentum: float = 0.0, momentum_buf: Optional[Arrays] = None,
             centered: bool = False, grad_avg: Optional[Arrays] = None,
             maximize: bool = False, skip_if_nonfinite: bool = False) -> bool:
    r"""RMSprop (Hinton 2012), optionally centered (Graves 2013) and with momentum, in place.

    .. math::
        g_t &= \pm\nabla_\theta f_t(\theta_{t-1}) + \lambda\,\theta_{t-1} \\
        s_t &= \alpha\, s_{t-1} + (1 - \alpha)\, g_t^2 \\
        \bar g_t &= \alpha\, \bar g_{t-1} + (1 - \alpha)\, g_t
            \quad\text{(centered only)} \\
        d_t &= \sqrt{s_t - \bar g_t^2} + \epsilon \ \text{ if centered, else }
            \sqrt{s_t} + \epsilon \\
        b_t &= \mu\, b_{t-1} + g_t / d_t, \quad \theta_t = \theta_{t-1} - \gamma\, b_t
            \quad\text{if } \mu > 0 \\
        \theta_t &= \theta_{t-1} - \gamma\, g_t / d_t \quad\text{otherwise}

    with :math:`\gamma` = ``lr``, :math:`s` = ``square_avg``, :math:`\bar g` = ``grad_avg``,
    :math:`b` = ``momentum_buf``, :math:`\mu` = ``momentum``, :math:`\lambda` = ``weight_decay``.

    Note:
        :math:`\epsilon` is added outside the square root, as in ``torch.optim.RMSprop``;
        TensorFlow adds it inside.

    Args:
        param: parameters, updated in place.
        grad: gradients (read only).
        square_avg: running average of squared gradients :math:`s`, updated in place.
        lr: learning rate, >= 0.
        alpha: smoothing constant, in [0, 1].
        eps: term added to the denominator, > 0.
        weight_decay: L2 penalty coefficient, >= 0.
        momentum: :math:`\mu \ge 0`; with :math:`\mu > 0`, ``momentum_buf`` is required.
        momentum_buf: momentum buffer :math:`b`, updated in place.
        centered: normalise by the estimated variance; requires ``grad_avg``.
        grad_avg: running average of gradients :math:`\bar g`, updated in place.
        maximize: ascend the objective instead of descending it.
        skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
    """
    return _core.rmsprop(param, grad, square_avg, momentum_buf, grad_avg, lr=lr, alpha=alpha,
                         eps=eps, weight_decay=weight_decay, momentum=momentum,
                         centered=centered, maximize=maximize,
                         skip_if_nonfinite=skip_if_nonfinite)


def lion_(param: Arrays, grad: Arrays, exp_avg: Arrays, *, lr: float = 1e-4, beta1: float = 0.9,
          beta2: float = 0.99, weight_decay: float = 0.0, maximize: bool = False,
          skip_if_nonfinite: bool = False) -> bool:
    r"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"), in place.

    .. math::
        \theta_{t-1} &\leftarrow \theta_{t-1}(1 - \gamma\lambda) \\
        c_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g_t \\
        \theta_t &= \theta_{t-1} - \gamma\, \operatorname{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1 - \beta_2)\, g_t

    with :math:`\gamma` = ``lr``, :math:`m` = ``exp_avg``, :math:`\lambda` = ``weight_decay``
    (decoupled) and :math:`g_t` the gradient, negated when ``maximize``. The update has the
    same size for every coordinate: Lion usually wants a learning rate 3-10x smaller and a
    weight decay 3-10x larger than AdamW.

    Args:
        param: parameters, updated in place.
        grad: gradients (read only).
        exp_avg: momentum :math:`m`, updated in place (start at zero).
        lr: learning rate, >= 0.
        beta1: interpolation factor of the update direction, in [0, 1).
        beta2: decay rate of the momentum, in [0, 1).
        weight_decay: decoupled weight decay coefficient, >= 0.
        maximize: ascend the objective instead of descending it.
        skip_if_nonfinite: if any gradient holds a NaN or an infinity, change nothing.

    Returns:
        True if the step was applied; False if ``skip_if_nonfinite`` skipped it.
    """
    return _core.lion(param, grad, exp_avg, lr=lr, beta1=beta1, beta2=beta2,
                      weight_decay=weight_decay, maximize=maximize,
                      skip_if_nonfinite=skip_if_nonfinite)
