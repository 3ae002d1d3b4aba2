"""AttendExciteTextEncode: CLIPTextEncode plus the subject token indices A&E needs."""

from __future__ import annotations

import comfy.sd1_clip
from comfy_api.latest import io

from ..attention.tokens import CHUNK, SubjectTokens, prompt_tokens, resolve_subjects, token_table
from .sampling import COND_KEY

NODE = "AttendExciteTextEncode"


def _tokenizer_for(clip, tokens: dict):
    """The family key ("l", "h", "g") whose token positions we read, and its ``SDTokenizer``."""
    family = "l" if "l" in tokens else next(iter(tokens))
    tok = getattr(clip.tokenizer, f"clip_{family}", None)
    if tok is None or not hasattr(tok, "inv_vocab"):
        raise ValueError(f"clip: this text encoder ({type(clip.tokenizer).__name__}) is not CLIP-L/H/G. "
                         f"Attend-and-Excite supports the text encoders of SD1.x, SD2.x and SDXL checkpoints.")
    return family, tok


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
    family, tok = _tokenizer_for(clip, tokens)
    chunks = tokens[family]
    specials = {t for t in (tok.start_token, tok.end_token) if t is not None}
    ptoks = prompt_tokens(chunks, specials, lambda i: tok.inv_vocab.get(i, "?"))

    def encode_word(word: str) -> list[int]:
        ids = tok.tokenizer(word)["input_ids"]
        return [int(i) for i in ids[tok.tokens_start:] if i not in specials]

    indices, labels = resolve_subjects(subjects, ptoks, encode_word, _embedding_check(tok))
    spec = SubjectTokens(tuple(indices), tuple(labels), tuple(t.index for t in ptoks), CHUNK * len(chunks), family)
    conds = clip.encode_from_tokens_scheduled(tokens)
    if conds and conds[0][0].shape[1] != spec.num_keys:
        raise ValueError(f"clip: the encoder returned {conds[0][0].shape[1]} keys for {len(chunks)} chunks of "
                         f"{CHUNK}; this text encoder is not supported.")
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
                io.Clip.Input("clip", tooltip="The text encoder of the checkpoint (CLIP-L for SD1.x, CLIP-H for "
                                              "SD2.x, CLIP-L + CLIP-G for SDXL); the paper used SD 1.4's CLIP-L."),
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
