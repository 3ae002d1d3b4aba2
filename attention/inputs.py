"""Checks of node input values that need no model: each returns why a value is refused (naming the input and the
fix), or None when it is fine. The nodes run them when ComfyUI validates a prompt, before anything executes."""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from typing import Any

from .schedule import parse_refinement


def _fmt(v: float) -> str:
    return f"{v:g}"


def _limits(lo: float | None, hi: float | None, default: Any) -> str:
    if lo is not None and hi is not None:
        span = f" from {_fmt(lo)} to {_fmt(hi)}"
    elif lo is not None:
        span = f" of at least {_fmt(lo)}"
    elif hi is not None:
        span = f" of at most {_fmt(hi)}"
    else:
        span = ""
    tail = f" (default {_fmt(default)})" if isinstance(default, (int, float)) and not isinstance(default, bool) else ""
    return f"Give a number{span}{tail}."


def number_problem(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                   default: Any = None) -> str | None:
    """A number input that is not finite or lies outside ``[lo, hi]``."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return f"{name} = {value!r} is not a number. {_limits(lo, hi, default)}"
    if not math.isfinite(v):
        return f"{name} = {value!r} is not a finite number. {_limits(lo, hi, default)}"
    if lo is not None and v < lo:
        return f"{name} = {_fmt(v)} is below its minimum {_fmt(lo)}. {_limits(lo, hi, default)}"
    if hi is not None and v > hi:
        return f"{name} = {_fmt(v)} is above its maximum {_fmt(hi)}. {_limits(lo, hi, default)}"
    return None


def odd_problem(name: str, value: int) -> str | None:
    """An odd-only integer (a smoothing kernel size) that is even."""
    return None if int(value) % 2 == 1 else f"{name} = {value} is even. Give an odd size such as 3 (the paper's)."


def choice_problem(name: str, value: Any, options: Sequence[Any], what: str = "") -> str | None:
    """A combo value that is not one of ``options`` (an API client may send any string)."""
    if value in options:
        return None
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1)
    hint = f"Did you mean {close[0]!r}? " if close else ""
    listed = ", ".join(map(str, options)) if len(options) <= 12 else f"{len(options)} names; see the node's list"
    return f"{name} {value!r} is not one of {what or 'its options'} ({listed}). {hint}Choose one from the list."


def order_problem(first: str, a: float, second: str, b: float) -> str | None:
    """Two ends of a range given in the wrong order."""
    if a <= b:
        return None
    return (f"{first} ({_fmt(a)}) is after {second} ({_fmt(b)}). Give {first} <= {second}, e.g. 0 and 0.5 for "
            f"the guided half of the schedule.")


def refinement_problem(text: Any) -> str | None:
    """Refinement text that is not ``fraction:threshold`` pairs."""
    try:
        parse_refinement(str(text))
    except ValueError as e:
        return f"{e}. Leave refinement empty to turn refinement off."
    return None


def verdict(*problems: str | None) -> bool | str:
    """What a ``validate_inputs`` returns: ``True``, or the problems found, one sentence group each."""
    found = [p for p in problems if p]
    return " ".join(found) if found else True
