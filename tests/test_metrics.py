"""Unit tests of the evaluation metrics on tiny tensors with hand-checkable answers (no models, no ComfyUI)."""

from __future__ import annotations

import math

import pytest
import torch

from attention.metrics import (
    IMAGENET_TEMPLATES,
    clean_prompt,
    full_prompt_similarity,
    min_object_similarity,
    neglect_rate,
    neglected,
    split_subjects,
    subject_nouns,
    templated_prompts,
    templated_text_embedding,
    text_text_similarity,
)


def test_there_are_80_distinct_templates_with_one_slot():
    assert len(IMAGENET_TEMPLATES) == 80
    assert len(set(IMAGENET_TEMPLATES)) == 80
    assert all(t.count("{}") == 1 for t in IMAGENET_TEMPLATES)
    assert "a photo of a {}." in IMAGENET_TEMPLATES and "itap of my {}." in IMAGENET_TEMPLATES


def test_clean_prompt_collapses_doubled_articles_on_whole_words_only():
    assert clean_prompt("a photo of a a cat and a dog.") == "a photo of a cat and a dog."
    assert clean_prompt("a photo of the a cat.") == "a photo of a cat."
    assert clean_prompt("a photo of a apple.") == "a photo of a apple."  # 'a apple' is not 'a a'
    assert clean_prompt("the apple") == "the apple"
    prompts = templated_prompts("a cat and a dog")
    assert len(prompts) == 80
    assert prompts[IMAGENET_TEMPLATES.index("a photo of a {}.")] == "a photo of a cat and a dog."
    assert prompts[IMAGENET_TEMPLATES.index("a photo of the {}.")] == "a photo of a cat and a dog."


def test_split_subjects_and_nouns():
    assert split_subjects("a cat and a dog") == ("a cat", "a dog")
    assert split_subjects("a cat with a crown") == ("a cat", "a crown")
    assert split_subjects("a cat with a bow and a dog") == ("a cat with a bow", "a dog")  # ' and ' first
    assert split_subjects("a cat") is None
    assert subject_nouns("a red car and a blue bench") == ["car", "bench"]
    assert subject_nouns("a elephant and a orange suitcase") == ["elephant", "suitcase"]
    with pytest.raises(ValueError, match="two subjects"):
        subject_nouns("a cat")


def test_templated_embedding_is_the_renormalised_mean_of_unit_vectors():
    # template i -> (i+1) * e0 for even i, e1 for odd i: after normalisation half e0, half e1 -> (1,1)/sqrt(2)
    def encode(texts: list[str]) -> torch.Tensor:
        assert len(texts) == 80
        return torch.stack([torch.tensor([i + 1.0, 0.0]) if i % 2 == 0 else torch.tensor([0.0, 3.0])
                            for i in range(len(texts))])

    emb = templated_text_embedding(encode, "a cat")
    assert torch.allclose(emb, torch.tensor([1.0, 1.0]) / math.sqrt(2))
    with pytest.raises(ValueError, match="expected"):
        templated_text_embedding(lambda texts: torch.zeros(3, 2), "a cat")


def test_similarities():
    prompt = torch.tensor([1.0, 0.0])
    images = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, -5.0]])
    assert torch.allclose(full_prompt_similarity(images, prompt), torch.tensor([1.0, 1 / math.sqrt(2), 0.0]))
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # image (1,1): cos 0.707 to both; image (2,0): 1 and 0 -> 0; image (0,-5): 0 and -1 -> -1
    assert torch.allclose(min_object_similarity(images, [a, b]), torch.tensor([0.0, 1 / math.sqrt(2), -1.0]))
    assert torch.allclose(text_text_similarity(torch.tensor([3.0, 4.0]), prompt), torch.tensor(0.6))
    with pytest.raises(ValueError):
        min_object_similarity(images, [])


def test_neglect_rate():
    maxima = torch.tensor([[0.5, 0.9], [0.1, 0.9], [0.3, 0.19], [0.2, 0.2]])
    assert neglected(maxima, 0.2).tolist() == [False, True, True, False]  # exactly the threshold is not neglected
    assert neglect_rate(maxima, 0.2) == pytest.approx(0.5)
    assert neglect_rate(maxima, 0.0) == 0.0
    assert neglect_rate(torch.zeros(0, 2), 0.2) == 0.0
    with pytest.raises(ValueError):
        neglect_rate(torch.zeros(3), 0.2)
