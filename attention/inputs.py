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


JOINT_BLOCK_WORDS = ("auto", "all", "double", "single")


def parse_joint_blocks(text: str) -> str | tuple[int, ...]:
    """``joint_blocks`` of a joint-attention model: one of :data:`JOINT_BLOCK_WORDS`, or block numbers in execution
    order as a list of numbers and ranges, ``"6-11"`` or ``"0, 2, 4-7"`` (sorted, duplicates removed)."""
    t = str(text).strip().lower()
    if t in JOINT_BLOCK_WORDS:
        return t
    out: set[int] = set()
    for part in filter(None, (p.strip() for p in t.split(","))):
        a, sep, b = part.partition("-")
        if not (a.strip().isdigit() and (not sep or b.strip().isdigit())):
            raise ValueError(f"joint_blocks = {text!r}: {part!r} is not a block number or a range such as 6-11")
        lo, hi = int(a), int(b) if sep else int(a)
        if hi < lo:
            raise ValueError(f"joint_blocks = {text!r}: the range {part!r} ends before it starts")
        out.update(range(lo, hi + 1))
    if not out:
        raise ValueError(f"joint_blocks = {text!r} names no block")
    return tuple(sorted(out))


def joint_blocks_problem(text: Any) -> str | None:
    """``joint_blocks`` text that :func:`parse_joint_blocks` refuses."""
    try:
        parse_joint_blocks(str(text))
    except ValueError as e:
        return (f"{e}. Give auto (the model family's default), all, double or single (Flux), or block numbers "
                f"such as 6-11.")
    return None
