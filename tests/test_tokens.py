"""Subject words -> key indices with ComfyUI's real SD1 tokenizer (needs the ComfyUI source, no weights)."""

from __future__ import annotations

import pytest
import torch

from attention.tokens import clean_word, prompt_tokens, resolve_subjects

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def sd1(comfy_inprocess):
    import comfy.sd1_clip

    tok = comfy.sd1_clip.SD1Tokenizer()
    inner = tok.clip_l
    specials = {inner.start_token, inner.end_token}

    def resolve(text: str, subjects: str):
        chunks = tok.tokenize_with_weights(text)["l"]
        toks = prompt_tokens(chunks, specials, lambda i: inner.inv_vocab[i])

        def encode_word(w):
            return [i for i in inner.tokenizer(w)["input_ids"][1:] if i not in specials]

        idx, labels = resolve_subjects(subjects, toks, encode_word)
        return idx, labels, toks, chunks

    return resolve


def test_readme_example_cat_and_dog(sd1):
    idx, labels, toks, _ = sd1("a cat and a dog", "cat, dog")
    assert idx == [2, 5] and labels == ["cat", "dog"]
    assert [t.text for t in toks] == ["a</w>", "cat</w>", "and</w>", "a</w>", "dog</w>"]


def test_explicit_indices_and_benchmark_templates(sd1):
    assert sd1("a cat and a dog", "2, 5")[0] == [2, 5]
    assert sd1("a bear and a red car", "bear, car")[0] == [2, 6]
    assert sd1("a red apple and a blue bowl", "apple, bowl")[0] == [3, 7]


def test_weight_syntax_keeps_positions(sd1):
    idx, _, _, chunks = sd1("a photo of a cat and a (frog:1.3) wearing sunglasses", "cat, (frog:1.3), sunglasses")
    assert idx == [5, 8, 10]  # the positions the internals note verified
    assert chunks[0][8][1] == pytest.approx(1.3)


def test_multi_token_word_excites_its_last_token(sd1):
    idx, labels, toks, _ = sd1("an axolotl and a teddybear", "axolotl, teddybear")
    ax = [t.index for t in toks][1:5]  # axolotl = 4 BPE tokens after "an"
    assert len(ax) == 4 and idx[0] == ax[-1]
    assert toks[idx[1] - 1].text == "bear</w>" and labels == ["axolotl", "teddybear"]


def test_word_occurring_twice(sd1):
    assert sd1("a cat and a cat", "cat")[0] == [2, 5]  # listed once: every occurrence
    assert sd1("a cat and a cat", "cat, cat")[0] == [2, 5]  # listed twice: one occurrence each
    with pytest.raises(ValueError, match="occurs only 2 times"):
        sd1("a cat and a cat", "cat, cat, cat")


def test_prompt_past_77_tokens_uses_global_key_indices(sd1):
    text = "a photo " * 40 + "of a cat"
    idx, _, toks, chunks = sd1(text, "cat")
    assert len(chunks) == 2
    assert idx[0] >= 77 and toks[-1].index == idx[0]
    assert idx[0] % 77 != 0  # never a start slot


def test_unknown_word_lists_the_token_table(sd1):
    with pytest.raises(ValueError, match=r"(?s)^subject 'horse' is not in the prompt.*\n- 2: cat\n") as err:
        sd1("a cat and a dog", "horse")
    assert "</w>" not in str(err.value) and "tokens [" not in str(err.value)  # words, no raw token ids
    with pytest.raises(ValueError, match="not the index of a prompt token"):
        sd1("a cat and a dog", "0")
    with pytest.raises(ValueError, match="subjects is empty"):
        sd1("a cat and a dog", " , ")


def test_non_ascii_words_are_found_and_shown_decoded(sd1):
    idx, labels, toks, _ = sd1("a 🐢 and a café", "🐢, café")
    assert idx == [2, 5] and labels == ["🐢", "café"]
    assert [t.text for t in toks][1] == "ðŁĲ¢</w>"  # byte-level BPE as the vocabulary stores it


def test_embeddings_occupy_positions_and_must_be_given_by_index():
    emb = torch.zeros(768)
    chunks = [[(49406, 1.0), (320, 1.0), (emb, 1.0), (537, 1.0), (2368, 1.0), (49407, 1.0)] + [(49407, 1.0)] * 71]
    vocab = {320: "a</w>", 537: "and</w>", 2368: "dog</w>"}
    toks = prompt_tokens(chunks, {49406, 49407}, vocab.__getitem__)
    assert [(t.index, t.text) for t in toks] == [(1, "a</w>"), (2, "<embedding>"), (3, "and</w>"), (4, "dog</w>")]
    assert resolve_subjects("2, dog", toks, lambda w: [2368])[0] == [2, 4]
    with pytest.raises(ValueError, match="is an embedding.*index"):
        resolve_subjects("embedding:foo", toks, lambda w: [1])
    with pytest.raises(ValueError, match="embedding 'foo' is not installed") as err:
        resolve_subjects("embedding:foo", toks, lambda w: [1], embedding_installed=lambda name: False)
    assert "index" not in str(err.value)


def test_clean_word():
    assert clean_word("((cat:1.2))") == "cat"
    assert clean_word(" (red apple) ") == "red apple"
