"""Map subject words (or explicit indices) to cross-attention key indices of a CLIP-tokenised prompt.

Key index = ``chunk * 77 + position`` with position 0 the start token, exactly the column of the cross-attention
map that ComfyUI's encoded conditioning (``[B, 77 * chunks, D]``) produces. Weighted text ``(word:1.2)`` keeps
positions (the tokenizer strips the syntax), so words are found by their BPE id sequence.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CHUNK = 77
_WEIGHT = re.compile(r"^\((.*?)(?::\s*[-+]?\d*\.?\d+)?\)$")


@dataclass(frozen=True)
class SubjectTokens:
    """Resolved subjects of one prompt; travels in the CONDITIONING dict under ``"attend_excite"``."""

    indices: tuple[int, ...]  # key indices that are excited
    labels: tuple[str, ...]  # one label per index, e.g. "cat"
    prompt_positions: tuple[int, ...]  # key indices of every real prompt token (no start/end/padding)
    num_keys: int  # 77 * chunks
    family: str  # tokenizer key: "l" (SD1), "h" (SD2), "g"/"l" (SDXL)


@dataclass(frozen=True)
class Token:
    index: int  # global key index
    id: int | None  # vocabulary id, None for an embedding vector
    text: str


def prompt_tokens(chunks: Sequence[Sequence[tuple]], special_ids: set[int],
                  decode: Callable[[int], str]) -> list[Token]:
    """Real prompt tokens (start, end and padding removed) of ComfyUI tokenizer output ``[[(token, weight, ...)]]``.

    Padding is recognised as everything after a chunk's first end token, so tokenizers that pad with the end
    token (SD1) and with id 0 (SD2, SDXL's CLIP-G) are both handled.
    """
    out: list[Token] = []
    for c, chunk in enumerate(chunks):
        for p, item in enumerate(chunk):
            tok = item[0]
            if isinstance(tok, int) or (hasattr(tok, "__index__") and not hasattr(tok, "shape")):
                tid = int(tok)
                if p == 0:
                    continue
                if tid in special_ids:
                    break  # end token: the rest of the chunk is padding
                out.append(Token(c * CHUNK + p, tid, decode(tid)))
            else:  # an embedding vector from "embedding:name"
                out.append(Token(c * CHUNK + p, None, "<embedding>"))
    return out


def token_table(tokens: Sequence[Token]) -> str:
    """Human-readable ``index: token`` lines."""
    return "\n".join(f"{t.index}: {t.text}" for t in tokens)


def clean_word(word: str) -> str:
    """Strip ComfyUI weight syntax and escapes from a subject word: ``(cat:1.2)`` -> ``cat``."""
    w = word.strip()
    while True:
        m = _WEIGHT.match(w)
        if not m:
            break
        w = m.group(1).strip()
    return w.replace("\\(", "(").replace("\\)", ")").strip()


def _find(seq: list[int | None], sub: list[int]) -> list[int]:
    n = len(sub)
    return [i for i in range(len(seq) - n + 1) if seq[i : i + n] == sub]


def resolve_subjects(
    subjects: str,
    tokens: Sequence[Token],
    encode_word: Callable[[str], list[int]],
    node: str = "AttendExciteTextEncode",
) -> tuple[list[int], list[str]]:
    """Resolve ``"cat, dog"`` or ``"2, 5"`` to key indices and labels.

    Rules: an integer is a key index as shown in the token table; a word (or phrase) is found by its token ids;
    a word made of several tokens is excited through its **last** token; a word listed once that occurs several
    times excites every occurrence, listed n times it excites its first n occurrences one each.
    """
    items = [s.strip() for s in subjects.replace(";", ",").split(",") if s.strip()]
    if not items:
        raise ValueError(f"{node}: no subjects given. List the nouns to excite, e.g. 'cat, dog', or token indices "
                         f"such as '2, 5' from the token table.")
    by_index = {t.index: t for t in tokens}
    ids = [t.id for t in tokens]
    table = token_table(tokens)
    indices: list[int] = []
    labels: list[str] = []
    counts = {i: items.count(i) for i in items}
    used: dict[str, int] = {}
    for item in items:
        if re.fullmatch(r"\d+", item):
            idx = int(item)
            if idx not in by_index:
                raise ValueError(f"{node}: token index {idx} is not a prompt token (start, end and padding slots "
                                 f"cannot be excited). Prompt tokens:\n{table}")
            indices.append(idx)
            labels.append(by_index[idx].text.replace("</w>", ""))
            continue
        word = clean_word(item)
        if word.startswith("embedding:"):
            raise ValueError(f"{node}: subject {item!r} is an embedding; give its token index from the table "
                             f"instead:\n{table}")
        sub = encode_word(word)
        if not sub:
            raise ValueError(f"{node}: subject {item!r} has no tokens.")
        hits = _find(ids, sub)
        if not hits:
            raise ValueError(f"{node}: subject {item!r} (tokens {[t for t in sub]}) is not in the prompt. "
                             f"Use a word of the prompt or a token index. Prompt tokens:\n{table}")
        last = [tokens[h + len(sub) - 1].index for h in hits]
        if counts[item] > 1:
            k = used.get(item, 0)
            if k >= len(last):
                raise ValueError(f"{node}: subject {item!r} is listed {counts[item]} times but occurs only "
                                 f"{len(last)} times in the prompt.")
            used[item] = k + 1
            last = [last[k]]
        for idx in last:
            indices.append(idx)
            labels.append(word)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{node}: the same token is listed twice ({indices}). List each subject once.")
    return indices, labels
