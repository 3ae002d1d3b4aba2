"""AttendExciteTextEncode: CLIPTextEncode plus the subject token indices A&E needs."""

from __future__ import annotations

from comfy_api.latest import io

from ..attention.tokens import CHUNK, SubjectTokens, prompt_tokens, resolve_subjects, token_table
from .sampling import COND_KEY

NODE = "AttendExciteTextEncode"


def _tokenizer_for(clip, tokens: dict):
    """The family key ("l", "h", "g") whose token positions we read, and its ``SDTokenizer``."""
    family = "l" if "l" in tokens else next(iter(tokens))
    tok = getattr(clip.tokenizer, f"clip_{family}", None)
    if tok is None or not hasattr(tok, "inv_vocab"):
        raise ValueError(f"{NODE}: this CLIP ({type(clip.tokenizer).__name__}) is not a CLIP-L/H/G tokenizer; "
                         f"Attend-and-Excite supports SD1.x, SD2.x and SDXL text encoders.")
    return family, tok


def encode_subjects(clip, text: str, subjects: str) -> tuple[list, str, SubjectTokens]:
    """Tokenise, resolve the subjects, encode exactly like CLIPTextEncode and attach the subjects to each cond."""
    if clip is None:
        raise RuntimeError(f"{NODE}: the clip input is None; the checkpoint has no text encoder. Load one with a "
                           f"CLIP loader node.")
    tokens = clip.tokenize(text)
    family, tok = _tokenizer_for(clip, tokens)
    chunks = tokens[family]
    specials = {t for t in (tok.start_token, tok.end_token) if t is not None}
    ptoks = prompt_tokens(chunks, specials, lambda i: tok.inv_vocab.get(i, f"<{i}>"))

    def encode_word(word: str) -> list[int]:
        ids = tok.tokenizer(word)["input_ids"]
        return [int(i) for i in ids[tok.tokens_start:] if i not in specials]

    indices, labels = resolve_subjects(subjects, ptoks, encode_word, NODE)
    spec = SubjectTokens(tuple(indices), tuple(labels), tuple(t.index for t in ptoks), CHUNK * len(chunks), family)
    conds = clip.encode_from_tokens_scheduled(tokens)
    if conds and conds[0][0].shape[1] != spec.num_keys:
        raise ValueError(f"{NODE}: the encoder returned {conds[0][0].shape[1]} keys for {len(chunks)} chunks of "
                         f"{CHUNK}; this text encoder is not supported.")
    conds = [[c, {**d, COND_KEY: spec}] for c, d in conds]
    chosen = {i: lbl for i, lbl in zip(indices, labels)}
    lines = [f"{t.index}: {t.text}" + ("   <- excited" if t.index in chosen else "") for t in ptoks]
    return conds, "\n".join(lines) if lines else token_table(ptoks), spec


class AttendExciteTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Attend-and-Excite Text Encode",
            category="attend_excite",
            description="Encodes the prompt exactly like CLIPTextEncode and marks the subject tokens that "
                        "Attend-and-Excite should excite. Use it as the positive prompt of the A&E samplers.",
            inputs=[
                io.Clip.Input("clip"),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a cat and a frog",
                                tooltip="The prompt. Weights such as (frog:1.2) and embeddings work as usual."),
                io.String.Input("subjects", default="cat, frog",
                                tooltip="Nouns to excite, separated by commas ('cat, frog'), or token indices from "
                                        "the token table ('2, 5'). A word of several tokens is excited through its "
                                        "last token; a word listed once excites all its occurrences, listed twice "
                                        "its first two. Excite nouns, not colours (the paper's advice)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING"),
                io.String.Output(display_name="token_table",
                                 tooltip="'index: token' for every prompt token; excited ones are marked."),
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, subjects: str) -> io.NodeOutput:
        conds, table, _ = encode_subjects(clip, text, subjects)
        return io.NodeOutput(conds, table)
