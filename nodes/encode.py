"""AttendExciteTextEncode: CLIPTextEncode plus the subject token indices A&E needs."""

from __future__ import annotations

import comfy.sd1_clip
from comfy_api.latest import io

from ..attention.tokens import (
    CHUNK,
    SubjectTokens,
    prompt_tokens,
    resolve_subjects,
    sentencepiece_as_bpe,
    token_table,
)
from .sampling import COND_KEY

NODE = "AttendExciteTextEncode"


def _clip_key(tokens: dict) -> str:
    return "l" if "l" in tokens else next(k for k in tokens if k != "t5xxl")


def token_stream(tokens: dict, num_keys: int, has_t5: bool = True) -> tuple[str, int]:
    """``(tokenizer key, offset)`` of the stream whose tokens the subjects are found in, from the tokenizer output
    and the number of keys the encoder returned (``has_t5``: whether the text encoder has a T5 model; SD3's
    tokenizer makes T5 tokens also when it has none):

    - CLIP only (SD1.x, SD2.x, SDXL; SD3 without T5): the CLIP-L stream (CLIP-H, CLIP-G where it is alone), keys
      ``77 * chunks`` at offset 0.
    - Flux: the T5 tokens are the conditioning (CLIP-L gives only the pooled vector).
    - SD3 with T5: the T5 stream, after the CLIP-L/G chunks. SD3 attends to both copies of each word; A&E excites
      the T5 one because the SD3 paper finds T5 carries the prompt adherence on complex prompts (Esser et al.
      2024, "flexible text encoders": without T5 aesthetics hold, complex prompts suffer). Without T5 the CLIP
      stream is read.
    """
    t5 = sum(len(c) for c in tokens.get("t5xxl", [])) if has_t5 else 0
    clip = [k for k in tokens if k != "t5xxl"]
    clip_keys = len(tokens[_clip_key(tokens)]) * CHUNK if clip else 0
    if t5 and num_keys == t5:
        return "t5xxl", 0
    if t5 and clip and num_keys == clip_keys + t5:
        return "t5xxl", clip_keys
    if clip and num_keys == clip_keys:
        return _clip_key(tokens), 0
    raise ValueError(f"clip: the encoder returned {num_keys} keys for the tokenizer's "
                     f"{', '.join(f'{k}: {sum(len(c) for c in v)}' for k, v in tokens.items())} tokens; this text "
                     f"encoder is not supported (Attend-and-Excite reads CLIP and T5 streams).")


def _tokenizer_for(clip, key: str):
    tok = getattr(clip.tokenizer, "t5xxl" if key == "t5xxl" else f"clip_{key}", None)
    if tok is None or not hasattr(tok, "inv_vocab"):
        raise ValueError(f"clip: this text encoder ({type(clip.tokenizer).__name__}) is not one Attend-and-Excite "
                         f"reads: CLIP-L/H/G (SD1.x, SD2.x, SDXL) or T5 (Flux, SD3).")
    return tok


def _embedding_check(tok):
    """``name -> installed?`` as ComfyUI's tokenizer decides it, or None when it reads no embeddings at all."""
    if getattr(tok, "embedding_directory", None) is None:
        return None

    def installed(name: str) -> bool:
        return comfy.sd1_clip.load_embed(name, tok.embedding_directory, tok.embedding_size,
                                         tok.embedding_key) is not None

    return installed


def encode_subjects(clip, text: str, subjects: str) -> tuple[list, str, SubjectTokens]:
    """Tokenise, resolve the subjects, encode exactly like CLIPTextEncode and attach the subjects to each cond.

    Returns the conditioning, the token table (one token per line, excited ones marked) and the subjects.
    """
    if clip is None:
        raise RuntimeError("clip is None: the checkpoint has no text encoder. Load one with a CLIP loader node.")
    tokens = clip.tokenize(text)
    conds = clip.encode_from_tokens_scheduled(tokens)
    has_t5 = getattr(getattr(clip, "cond_stage_model", None), "t5xxl", None) is not None
    key, offset = token_stream(tokens, conds[0][0].shape[1], has_t5)
    tok = _tokenizer_for(clip, key)
    chunks = tokens[key]
    specials = {t for t in (tok.start_token, tok.end_token) if t is not None}
    ptoks = prompt_tokens(chunks, specials, lambda i: tok.inv_vocab.get(i, "?"), tok.start_token is not None, offset)
    if key == "t5xxl":
        ptoks = sentencepiece_as_bpe(ptoks)

    def encode_word(word: str) -> list[int]:
        ids = tok.tokenizer(word)["input_ids"]
        return [int(i) for i in ids[tok.tokens_start:] if i not in specials]

    indices, labels = resolve_subjects(subjects, ptoks, encode_word, _embedding_check(tok))
    spec = SubjectTokens(tuple(indices), tuple(labels), tuple(t.index for t in ptoks), conds[0][0].shape[1], key)
    conds = [[c, {**d, COND_KEY: spec}] for c, d in conds]
    return conds, token_table(ptoks, indices), spec


class AttendExciteTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=NODE,
            display_name="Attend-and-Excite Text Encode",
            category="attend_excite",
            description="Encodes the prompt exactly like CLIPTextEncode and marks the subject tokens that "
                        "Attend-and-Excite should excite. Use it as the positive prompt of the A&E samplers. "
                        "After a run the node shows the prompt's tokens, one per line, the excited ones marked.",
            inputs=[
                io.Clip.Input("clip", tooltip="The text encoder of the model (CLIP-L for SD1.x, CLIP-H for SD2.x, "
                                              "CLIP-L + CLIP-G for SDXL, CLIP-L + T5 for Flux, CLIP-L/G (+ T5) "
                                              "for SD3); the paper used SD 1.4's CLIP-L. Subjects are found in T5's "
                                              "tokens where the model attends to them (Flux, SD3 with T5)."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a cat and a frog",
                                tooltip="The prompt. Weights such as (frog:1.2) and embeddings work as usual. The "
                                        "paper's prompts name two subjects: 'a cat and a frog'."),
                io.String.Input("subjects", default="cat, frog",
                                tooltip="Nouns to excite, separated by commas ('cat, frog'), or token indices from "
                                        "the token table ('2, 5'). A word of several tokens is excited through its "
                                        "last token; a word listed once excites all its occurrences, listed twice "
                                        "its first two. Excite nouns, not colours (the paper's advice)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="CONDITIONING",
                                       tooltip="The encoded prompt (as CLIPTextEncode makes it) carrying the "
                                               "subjects' token indices; connect it to the positive input of an "
                                               "Attend-and-Excite sampler."),
                io.String.Output(display_name="token_table",
                                 tooltip="The prompt's tokens, one per line as '- index: word' (decoded text); "
                                         "the excited ones end with '← excited'. Also shown on this node after "
                                         "a run."),
            ],
        )

    @classmethod
    def execute(cls, clip, text: str, subjects: str) -> io.NodeOutput:
        conds, table, _ = encode_subjects(clip, text, subjects)
        return io.NodeOutput(conds, table, ui={"text": [table]})
