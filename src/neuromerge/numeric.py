"""The one parameter type every float a user gives goes through: :data:`FiniteFloat`.

Merges compute in float32, so a parameter must be a finite number that float32 holds: ``.nan``, ``.inf``,
``-.inf`` and values that YAML reads as infinite (``1e400``), or that overflow float32 (``1e39``), are refused
when the config is validated (``--dry-run`` included) instead of turning into a wrong model. Every method's
``Params`` model (static, data-aware, routed) declares its float fields with it;
``tests/engine/test_numeric_guards.py`` checks that no float field is left without it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

#: the largest finite float32 (``torch.finfo(torch.float32).max``)
FLOAT32_MAX = 3.4028234663852886e38


def check_finite(value: float) -> float:
    """``value`` when it is finite and within float32's range; a pydantic error (type ``finite_number``) else."""
    if not math.isfinite(value):
        raise PydanticCustomError("finite_number", "must be a finite number, got {value}", {"value": value})
    if abs(value) > FLOAT32_MAX:
        raise PydanticCustomError(
            "finite_number",
            "must be a finite number within float32's range (|x| <= 3.4e38; merges compute in float32), got {value}",
            {"value": value},
        )
    return value


def _finite_first(value: Any, handler: ValidatorFunctionWrapHandler) -> float:
    """Refuse a non-finite number before the field's own checks (``gt`` / ``le`` …), so that ``density: .nan`` says
    *must be a finite number* rather than *should be less than or equal to 1*; everything else is the field's."""
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            number: float | None = float(value)
        except OverflowError:  # an int beyond float's range
            number = math.inf
        except ValueError:  # not a number: the field's own error
            number = None
        if number is not None:
            check_finite(number)
    return handler(value)


#: a float parameter that must be finite in float32 (NaN, ±Inf and |x| > 3.4e38 are refused)
FiniteFloat = Annotated[float, WrapValidator(_finite_first)]

__all__ = ["FLOAT32_MAX", "FiniteFloat", "check_finite"]
