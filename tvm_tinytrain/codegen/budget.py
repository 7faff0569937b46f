"""Memory budgets: ``"256KB"`` → bytes, and the check that refuses a plan over budget."""

from __future__ import annotations

import re

from ..errors import InputError, TinyTrainError

_UNITS = {"": 1, "b": 1, "kb": 1024, "kib": 1024, "k": 1024,
          "mb": 1024 ** 2, "mib": 1024 ** 2, "m": 1024 ** 2}


class BudgetError(TinyTrainError):
    """The plan needs more SRAM than the budget allows."""


def parse_budget(budget: str | int | None) -> int | None:
    """``"256KB"``, ``"256 KiB"``, ``"1MB"`` or a byte count → bytes (KB = 1024 B, as SRAM sizes)."""
    if budget is None or isinstance(budget, int) and not isinstance(budget, bool):
        if isinstance(budget, int) and budget <= 0:
            raise InputError(f"budget must be positive, got {budget}")
        return budget
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(budget))
    if not m or m.group(2).lower() not in _UNITS:
        raise InputError(f"budget {budget!r} is not a size; write it like 256KB, 320KiB, 1MB or 262144")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise InputError(f"budget must be positive, got {budget!r}")
    return value


def check_budget(budget: int | None, contributors: dict[str, int]) -> None:
    """Raise :class:`BudgetError` naming need, budget and the largest contributors."""
    need = sum(contributors.values())
    if budget is None or need <= budget:
        return
    kb = lambda n: f"{n / 1024:,.1f} KB"  # noqa: E731
    parts = ", ".join(f"{name} {kb(size)}" for name, size in
                      sorted(contributors.items(), key=lambda kv: -kv[1])[:6] if size)
    raise BudgetError(
        f"the training step needs {kb(need)} of SRAM but the budget is {kb(budget)} "
        f"(over by {kb(need - budget)}); largest: {parts}. Train fewer layers or channels "
        f"(a sparser scheme), or raise the budget"
    )
