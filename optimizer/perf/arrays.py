"""The array types of the performance model's vectorised hot path.

Inputs are `npt.ArrayLike` (a scalar or an array of candidates: they broadcast); results are
float64 arrays. Naming the dtype lets numpy's stubs keep it through arithmetic, where a bare
`np.ndarray` would decay to Any.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
