"""Map subject words (or explicit indices) to cross-attention key indices of a tokenised prompt.

Key index = the column of the attention map: for CLIP ``chunk * 77 + position`` with position 0 the start token,
exactly as ComfyUI's encoded conditioning (``[B, 77 * chunks, D]``) holds them; for T5 (Flux, SD3) the token's
position in its stream plus the stream's offset in the conditioning. Weighted text ``(word:1.2)`` keeps
positions (the tokenizer strips the syntax), so words are found by their BPE id sequence.

CLIP's vocabulary is byte-level BPE: each token is a run of UTF-8 bytes spelled with one printable character per
byte (GPT-2's ``bytes_to_unicode`` table) and ``</w>`` marks the end of a word, so ``🐢`` is stored as
``ðŁĲ¢</w>``. :func:`token_table` turns that back into words for people.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

CHUNK = 77
END_OF_WORD = "</w>"
EMBEDDING = "embedding:"
_WEIGHT = re.compile(r"^\((.*?)(?::\s*[-+]?\d*\.?\d+)?\)$")


def _byte_table() -> Mapping[str, int]:
    """Character -> byte of GPT-2's ``bytes_to_unicode`` (CLIP's tokenizer uses the same table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return MappingProxyType(chars)


_BYTE_OF = _byte_table()


@dataclass(frozen=True)
class SubjectTokens:
    """Resolved subjects of one prompt; travels in the CONDITIONING dict under ``"attend_excite"``."""

    indices: tuple[int, ...]  # key indices that are excited
    labels: tuple[str, ...]  # one label per index, e.g. "cat"
    prompt_positions: tuple[int, ...]  # key indices of every real prompt token (no start/end/padding)
    num_keys: int  # keys of the conditioning: 77 * chunks for CLIP, all tokens for Flux / SD3
    family: str  # tokenizer key of the stream read: "l" (SD1, SDXL, SD3 without T5), "h" (SD2), "t5xxl" (Flux, SD3)


@dataclass(frozen=True)
class Token:
    index: int  # global key index
    id: int | None  # vocabulary id, None for an embedding vector
    text: str  # the vocabulary entry as stored ("cat</w>", "cafÃ©</w>"); "<embedding>" for an embedding vector


def prompt_tokens(chunks: Sequence[Sequence[tuple]], special_ids: set[int],
                  decode: Callable[[int], str], has_start: bool = True, offset: int = 0) -> list[Token]:
    """Real prompt tokens (start, end and padding removed) of ComfyUI tokenizer output ``[[(token, weight, ...)]]``.

    Padding is recognised as everything after a chunk's first end token, so tokenizers that pad with the end
    token (SD1) and with id 0 (SD2, SDXL's CLIP-G, T5) are both handled. ``has_start``: each chunk begins with a
    start token (CLIP; T5 has none). ``offset``: key index of the stream's first token in the conditioning (SD3's
    T5 tokens follow the CLIP ones).
    """
    out: list[Token] = []
    base = offset
    for chunk in chunks:
        for p, item in enumerate(chunk):
            tok = item[0]
            if isinstance(tok, int) or (hasattr(tok, "__index__") and not hasattr(tok, "shape")):
                tid = int(tok)
                if p == 0 and has_start:
                    continue
                if tid in special_ids:
                    break  # end token: the rest of the chunk is padding
                out.append(Token(base + p, tid, decode(tid)))
            else:  # an embedding vector from "embedding:name"
                out.append(Token(base + p, None, "<embedding>"))
        base += len(chunk)
    return out


SENTENCEPIECE_SPACE = "\u2581"  # "▁": SentencePiece's mark of a piece that starts a word
_CHAR_OF = {b: c for c, b in _BYTE_OF.items()}


def sentencepiece_as_bpe(tokens: Sequence[Token]) -> list[Token]:
    """T5's SentencePiece pieces (``"▁cat"``: a word *starts* with ``▁``) spelled as byte-level BPE tokens (a word
    *ends* with ``</w>``), so that :func:`words`, :func:`token_text` and the token table read them the same way."""
    out: list[Token] = []
    for i, t in enumerate(tokens):
        if t.id is None:
            out.append(t)
            continue
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        ends = nxt is None or nxt.id is None or nxt.text.startswith(SENTENCEPIECE_SPACE)
        text = "".join(_CHAR_OF[b] for b in t.text.replace(SENTENCEPIECE_SPACE, "").encode("utf-8"))
        out.append(Token(t.index, t.id, text + (END_OF_WORD if ends else "")))
    return out


def bpe_bytes(text: str) -> bytes:
    """The UTF-8 bytes a byte-level BPE token spells (``</w>`` dropped): ``"cafÃ©</w>"`` -> ``b"caf\\xc3\\xa9"``."""
    text = text.removesuffix(END_OF_WORD)
    return b"".join(bytes([_BYTE_OF[ch]]) if ch in _BYTE_OF else ch.encode() for ch in text)


def words(tokens: Sequence[Token]) -> list[tuple[str, list[Token]]]:
    """Tokens grouped into the words they spell, decoded to text: ``[("🐢", [tok]), ("axolotl", [4 toks])]``.

    A word ends at a token that ends with ``</w>``; an embedding vector is a word of its own (``<embedding>``).
    Bytes that do not form valid UTF-8 (a word cut by a chunk boundary) show as the replacement character.
    """
    out: list[tuple[str, list[Token]]] = []
    run: list[Token] = []

    def flush() -> None:
        if run:
            out.append((b"".join(bpe_bytes(t.text) for t in run).decode("utf-8", errors="replace"), list(run)))
            run.clear()

    for t in tokens:
        if t.id is None:
            flush()
            out.append((t.text, [t]))
            continue
        run.append(t)
        if t.text.endswith(END_OF_WORD):
            flush()
    flush()
    return out


def token_text(tokens: Sequence[Token]) -> dict[int, str]:
    """Readable text per key index: the decoded token; ``…`` for a piece that is not text on its own (part of a
    character split over tokens); a piece of a longer word is followed by that word in parentheses."""
    out: dict[int, str] = {}
    for word, toks in words(tokens):
        for t in toks:
            if t.id is None:
                out[t.index] = "<embedding vector>"
                continue
            try:
                piece = bpe_bytes(t.text).decode("utf-8")
            except UnicodeDecodeError:
                piece = "…"
            piece = piece or SENTENCEPIECE_SPACE  # T5's lone word-start mark
            out[t.index] = piece if len(toks) == 1 else f"{piece} ({word})"
    return out


def token_table(tokens: Sequence[Token], excited: Sequence[int] = ()) -> str:
    """One line per prompt token, ``- index: text`` (``← excited`` on the subjects' tokens).

    Lines are a Markdown list, so the table keeps one token per line in previews that render Markdown too.
    """
    chosen = set(excited)
    text = token_text(tokens)
    return "\n".join(f"- {t.index}: {text[t.index]}" + ("  ← excited" if t.index in chosen else "") for t in tokens)


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


def _embedding_problem(item: str, name: str, installed: Callable[[str], bool] | None, table: str) -> str:
    """Why an ``embedding:name`` subject cannot be resolved by name."""
    if installed is not None and not installed(name):
        return (f"subject {item!r}: the embedding {name!r} is not installed, so the prompt has no token for it "
                f"(ComfyUI skips it with a warning in the log). Put its file into models/embeddings, or remove it "
                f"from the prompt and the subjects.")
    return (f"subject {item!r} is an embedding: its vectors have no word to search for. List the index of one of "
            f"its rows ('<embedding vector>') from the prompt tokens instead:\n{table}")


def resolve_subjects(
    subjects: str,
    tokens: Sequence[Token],
    encode_word: Callable[[str], list[int]],
    embedding_installed: Callable[[str], bool] | None = None,
) -> tuple[list[int], list[str]]:
    """Resolve ``"cat, dog"`` or ``"2, 5"`` to key indices and labels.

    Rules: an integer is a key index as shown in the token table; a word (or phrase) is found by its token ids;
    a word made of several tokens is excited through its **last** token; a word listed once that occurs several
    times excites every occurrence, listed n times it excites its first n occurrences one each. An
    ``embedding:name`` subject is refused with a reason (not installed, or: give its index);
    ``embedding_installed(name)`` tells the two apart.
    """
    items = [s.strip() for s in subjects.replace(";", ",").split(",") if s.strip()]
    if not items:
        raise ValueError("subjects is empty. List the nouns to excite, e.g. 'cat, dog', or token indices "
                         "such as '2, 5' from the token table.")
    by_index = {t.index: t for t in tokens}
    text = token_text(tokens)
    word_of = {t.index: (w if t.id is not None else "embedding") for w, toks in words(tokens) for t in toks}
    ids = [t.id for t in tokens]
    table = token_table(tokens)
    indices: list[int] = []
    labels: list[str] = []
    sources: list[str] = []
    counts = {i: items.count(i) for i in items}
    used: dict[str, int] = {}
    for item in items:
        if re.fullmatch(r"\d+", item):
            idx = int(item)
            if idx not in by_index:
                raise ValueError(f"subject {item!r}: {idx} is not the index of a prompt token (start, end and "
                                 f"padding slots cannot be excited). Prompt tokens:\n{table}")
            indices.append(idx)
            labels.append(word_of[idx])
            sources.append(item)
            continue
        word = clean_word(item)
        if word.startswith(EMBEDDING):
            raise ValueError(_embedding_problem(item, word[len(EMBEDDING):].strip(), embedding_installed, table))
        sub = encode_word(word)
        if not sub:
            raise ValueError(f"subject {item!r} has no text to search for. List a word of the prompt.")
        hits = _find(ids, sub)
        if not hits:
            raise ValueError(f"subject {item!r} is not in the prompt. List a word of the prompt, or a token index "
                             f"from the prompt tokens:\n{table}")
        last = [tokens[h + len(sub) - 1].index for h in hits]
        if counts[item] > 1:
            k = used.get(item, 0)
            if k >= len(last):
                raise ValueError(f"subject {item!r} is listed {counts[item]} times but occurs only {len(last)} "
                                 f"times in the prompt. List it at most {len(last)} times.")
            used[item] = k + 1
            last = [last[k]]
        for idx in last:
            indices.append(idx)
            labels.append(word)
            sources.append(item)
    seen: dict[int, str] = {}
    for idx, src in zip(indices, sources):
        if idx in seen and seen[idx] != src:
            raise ValueError(f"subjects {seen[idx]!r} and {src!r} name the same token ({idx}: {text[idx]}). "
                             f"List each subject once.")
        seen[idx] = src
    if len(seen) != len(indices):
        dup = next(i for i in seen if indices.count(i) > 1)
        raise ValueError(f"subject {seen[dup]!r} names token {dup} ({text[dup]}) twice. List each subject once.")
    return indices, labels
