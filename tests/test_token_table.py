"""The token table people read: CLIP's byte-level BPE decoded to words, one token per line (no ComfyUI needed)."""

from __future__ import annotations

import pytest

from attention.tokens import Token, bpe_bytes, resolve_subjects, token_table, token_text, words

# The SD1 vocabulary entries of "a 🐢 and a café", "an axolotl" and "東京" (as ComfyUI's CLIP tokenizer stores them)
TURTLE = [Token(1, 320, "a</w>"), Token(2, 46358, "ðŁĲ¢</w>"), Token(3, 537, "and</w>"), Token(4, 320, "a</w>"),
          Token(5, 15304, "cafÃ©</w>")]
AXOLOTL = [Token(1, 550, "an</w>"), Token(2, 3495, "ax"), Token(3, 78, "o"), Token(4, 5053, "lot"),
           Token(5, 330, "l</w>")]
TOKYO = [Token(1, 15592, "æĿ±"), Token(2, 41588, "äº"), Token(3, 370, "¬</w>")]


def test_bpe_bytes_undo_the_byte_to_unicode_spelling():
    assert bpe_bytes("cafÃ©</w>").decode() == "café"
    assert bpe_bytes("ðŁĲ¢</w>").decode() == "🐢"
    assert bpe_bytes("cat</w>") == b"cat"
    assert bpe_bytes("Ġ") == b" "  # GPT-2's spelling of the space byte


def test_words_group_tokens_up_to_the_end_of_word_marker():
    assert [(w, [t.index for t in ts]) for w, ts in words(AXOLOTL)] == [("an", [1]), ("axolotl", [2, 3, 4, 5])]
    assert [w for w, _ in words(TOKYO)] == ["東京"]
    emb = Token(2, None, "<embedding>")
    assert [w for w, _ in words([TURTLE[0], emb, TURTLE[2]])] == ["a", "<embedding>", "and"]


def test_token_text_marks_pieces_of_longer_words_and_split_characters():
    assert token_text(TURTLE)[2] == "🐢" and token_text(TURTLE)[5] == "café"
    assert token_text(AXOLOTL)[2] == "ax (axolotl)" and token_text(AXOLOTL)[5] == "l (axolotl)"
    assert token_text(TOKYO) == {1: "東 (東京)", 2: "… (東京)", 3: "… (東京)"}


def test_table_is_one_decoded_token_per_line_with_excited_ones_marked():
    table = token_table(TURTLE, excited=[2, 5])
    assert table.splitlines() == ["- 1: a", "- 2: 🐢  ← excited", "- 3: and", "- 4: a", "- 5: café  ← excited"]
    assert "</w>" not in table and "Ã" not in table


def test_subject_errors_name_words_not_token_ids():
    with pytest.raises(ValueError, match=r"^subject 'horse' is not in the prompt") as err:
        resolve_subjects("horse", TURTLE, lambda w: [9999])
    text = str(err.value)
    assert "- 5: café" in text and "9999" not in text and "</w>" not in text
    assert not text.startswith("AttendExcite")  # the error dialog already names the node
    with pytest.raises(ValueError, match=r"subjects 'café' and '5' name the same token \(5: café\)"):
        resolve_subjects("café, 5", TURTLE, lambda w: [15304])


def test_numeric_subject_is_labelled_with_its_word():
    assert resolve_subjects("5", AXOLOTL, lambda w: []) == ([5], ["axolotl"])


def test_embedding_subject_that_is_not_installed_says_so():
    with pytest.raises(ValueError, match="the embedding 'my_style' is not installed, so the prompt has no token"):
        resolve_subjects("embedding:my_style", TURTLE, lambda w: [], embedding_installed=lambda name: False)
    with pytest.raises(ValueError, match="is an embedding: .* index"):
        resolve_subjects("embedding:my_style", TURTLE, lambda w: [], embedding_installed=lambda name: True)
