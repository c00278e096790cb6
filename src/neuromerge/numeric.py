"""Numbers that must stay what they are: :data:`FiniteFloat`, the one parameter type every float a user gives goes
through, and :func:`to_output_dtype`, the one conversion of a result to a narrower output dtype.

Merges compute in float32, so a parameter must be a finite number that float32 holds: ``.nan``, ``.inf``,
``-.inf`` and values that YAML reads as infinite (``1e400``), or that overflow float32 (``1e39``), are refused
when the config is validated (``--dry-run`` included) instead of turning into a wrong model. Every method's
``Params`` model (static, data-aware, routed) declares its float fields with it;
``tests/engine/test_numeric_guards.py`` checks that no float field is left without it.

A finite value that the output dtype cannot hold (70000 in float16, whose largest finite value is 65504) would be
written as ``inf``: :func:`to_output_dtype` makes that an error naming the tensor and the largest value, or, with the
config's ``overflow: clamp``, clamps it to the dtype's finite range and counts it.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from .errors import DtypeOverflowError

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

OverflowMode = Literal["error", "clamp"]
#: dtypes whose finite range is narrower than float32's (bfloat16 by a rounding margin: fp32 values above 3.3895e38)
_NARROW = (torch.float16, torch.bfloat16)


def may_overflow(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether converting finite ``src`` values to ``dst`` can give ±Inf (float32 → float16 / bfloat16, bfloat16 →
    float16; never to float32 or a wider or equal range)."""
    if dst not in _NARROW or not src.is_floating_point or src == dst:
        return False
    return not (src == torch.float16 and dst == torch.bfloat16)


def to_output_dtype(t: torch.Tensor, dtype: torch.dtype, *, tensor: str, mode: OverflowMode, what: str = "merged"
                    ) -> tuple[torch.Tensor, int]:
    """``t`` converted to ``dtype`` and the number of finite values that were beyond its range.

    Such a value would become ±Inf: with ``mode="error"`` that raises :class:`~neuromerge.errors.DtypeOverflowError`
    naming ``tensor`` and the value of largest magnitude; with ``mode="clamp"`` it is written as ±(the dtype's
    largest finite value) and counted. NaN/Inf already in ``t`` (``allow_nonfinite``) stay as they are and are not
    counted. The check is one float32 sum over the converted values (the exact test runs only when it is not
    finite), and only where the conversion can overflow (:func:`may_overflow`)."""
    out = t.to(dtype)
    if not may_overflow(t.dtype, dtype) or math.isfinite(float(torch.sum(out, dtype=torch.float32))):
        return out, 0
    over = torch.isinf(out) & torch.isfinite(t)
    count = int(over.sum())
    if count == 0:
        return out, 0
    if mode == "clamp":
        limit = torch.finfo(dtype).max
        out = torch.where(over, torch.where(t > 0, limit, -limit).to(dtype), out)
        return out, count
    values = t[over].to(torch.float64)
    largest = float(values[values.abs().argmax()])
    name = str(dtype).removeprefix("torch.")
    raise DtypeOverflowError(
        f"{what} tensor {tensor!r}: {count} value(s) beyond {name}'s range (largest finite "
        f"{torch.finfo(dtype).max:g}), the largest is {largest:g}; set `overflow: clamp` to clamp them to that range "
        "(counted in merge_report.json) or choose a wider `dtype`"
    )


__all__ = ["FLOAT32_MAX", "FiniteFloat", "OverflowMode", "check_finite", "may_overflow", "to_output_dtype"]
