# Typed interface of the compiled binding. Array arguments: one ndarray, or a list/tuple of them
# (one per tensor); None for an absent optional buffer (a buffer of an option that is off is
# ignored). Hyperparameters are keyword arguments, validated against the kernel's declaration.
# One function per declaration in OPTIMIZERS, named as its key; fusedopt._functional wraps
# each with its signature and docstring.
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

_Arrays = Union[np.ndarray, Sequence[np.ndarray]]

__version__: str
EIGEN_VERSION: str
COMPILER: str
OPENMP: Optional[int]  # _OPENMP's date (yyyymm), None in a serial build
THREADS: str  # how the build got its threads: "OpenMP 4.5" or "serial (...)"
CHUNK: int
OPTIMIZERS: dict[str, dict[str, Any]]
STORAGE_ROWS: tuple[tuple[str, str, str], ...]  # (param, grad, state) dtype names
# per OPTIMIZERS key: its function's checks of the same arguments, nothing run
CHECKS: dict[str, Callable[..., None]]

def __getattr__(name: str) -> Any: ...  # the optimizer functions
def all_finite(arrays: _Arrays, /) -> bool: ...
def sum_squares(arrays: _Arrays, /) -> float: ...
def scale(arrays: _Arrays, /, *, factor: float = ...) -> bool: ...
def roofline(
    param: _Arrays,
    grad: _Arrays,
    buffer1: Optional[_Arrays] = ...,
    buffer2: Optional[_Arrays] = ...,
    buffer3: Optional[_Arrays] = ...,
    buffer4: Optional[_Arrays] = ...,
) -> bool: ...
def simd_level() -> str: ...
def simd_instructions() -> str: ...
def get_num_threads() -> int: ...
def set_num_threads(threads: int, /) -> None: ...
def get_parallel_min() -> int: ...
def set_parallel_min(elements: int, /) -> None: ...
def cpu_supports() -> dict[str, bool]: ...
def _use_kernels(address: int, /) -> None: ...
def _thread_ranges(sizes: list[int], team: int, /) -> list[tuple[int, int]]: ...

class Borrowed:
    """Memory of objects lent to one list call in place of a list of arrays, for an argument
    the kernel only reads (fusedopt.torch's new gradients); made by _borrow only."""

def _borrow(objects: list[Any], like: list[np.ndarray], dtype: np.dtype) -> Optional[Borrowed]: ...
def _byte_extents(arrays: list[np.ndarray | Borrowed]) -> np.ndarray: ...
