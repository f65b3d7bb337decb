# Typed interface of the compiled kernels; _core_avx2 and _core_avx512 have the same one.
# Array arguments: one ndarray, or a list/tuple of them (one per tensor); None for an absent
# optional buffer. Hyperparameters are keyword arguments, validated by fusedopt._functional.
from typing import Optional, Sequence, Union

import numpy as np

_Arrays = Union[np.ndarray, Sequence[np.ndarray]]

__version__: str
SIMD_LEVEL: str
SIMD_INSTRUCTIONS: str
EIGEN_VERSION: str
COMPILER: str
OPENMP: Optional[int]
CHUNK: int

def sgd(param: _Arrays, grad: _Arrays, /, *, lr: float, weight_decay: float,
        maximize: bool) -> None: ...
def momentum(param: _Arrays, grad: _Arrays, buf: _Arrays, /, *, lr: float, momentum: float,
             dampening: float, nesterov: bool, weight_decay: float, maximize: bool) -> None: ...
def adam(param: _Arrays, grad: _Arrays, exp_avg: _Arrays, exp_avg_sq: _Arrays,
         max_exp_avg_sq: Optional[_Arrays], /, *, step: int, lr: float, beta1: float,
         beta2: float, eps: float, weight_decay: float, decoupled_weight_decay: bool,
         maximize: bool) -> None: ...
def adagrad(param: _Arrays, grad: _Arrays, sum_sq: _Arrays, /, *, step: int, lr: float,
            lr_decay: float, weight_decay: float, eps: float, maximize: bool) -> None: ...
def rmsprop(param: _Arrays, grad: _Arrays, square_avg: _Arrays,
            momentum_buf: Optional[_Arrays], grad_avg: Optional[_Arrays], /, *, lr: float,
            alpha: float, eps: float, weight_decay: float, momentum: float,
            maximize: bool) -> None: ...
def roofline(param: _Arrays, grad: _Arrays, buffer1: Optional[_Arrays],
             buffer2: Optional[_Arrays], buffer3: Optional[_Arrays],
             buffer4: Optional[_Arrays], /) -> None: ...
def get_num_threads() -> int: ...
def set_num_threads(threads: int, /) -> None: ...
def get_parallel_min() -> int: ...
def set_parallel_min(elements: int, /) -> None: ...
def cpu_supports() -> dict[str, bool]: ...
