"""ROUGE-L in sftlab.quality.similarity equals the rouge-score package, pair by pair and in bulk."""

from __future__ import annotations

import random

import numpy as np
import pytest
from rouge_score import rouge_scorer, tokenize

from sftlab.quality.similarity import RougePool, max_rouge_l, rouge_l, rouge_l_tokens

SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def reference(a: str, b: str) -> float:
    return SCORER.score(a, b)["rougeL"].fmeasure


PAIRS = [
    ("Sort the numbers from smallest to largest.", "Sort these numbers from the largest to the smallest."),
    ("Write a haiku about the given subject.", "Write a haiku about autumn rain."),
    ("Give three synonyms for the word.", "Give the antonym of the given word."),
    ("Translate the sentence into German.", "Translate the sentence into German."),
    ("Classify the animal as a mammal, bird, reptile, amphibian or fish.", "Is this animal a mammal or a bird?"),
    ("What's the capital of Canada?", "what is the CAPITAL of canada"),
    ("Explain the idiom 'break the ice'.", "Explain the idiom \u201cbreak the ice\u201d, please!"),
    ("Count the words in the sentence.", "The quick brown fox jumps over the lazy dog."),
    ("Café culture in Zürich: describe it.", "Describe the café culture of Zürich."),  # non-ASCII letters vanish
    ("Convert 98.6°F to Celsius.", "Convert 50 °F to Celsius, rounded to 0.1."),
    ("a a a b b", "b a b a a b"),  # repeated tokens: LCS, not bag-of-words overlap
    ("", "Write a poem."),  # empty scores 0
    ("!!! ???", "..."),  # no tokens on either side
    ("Summarize the paragraph in one sentence.", "Summarize the paragraph in 1 sentence"),
    ("List 3 pros and 3 cons of remote work", "List three pros and three cons of working remotely"),
]


def test_tokens_match_rouge_score_without_stemming():
    for a, b in PAIRS:
        for text in (a, b):
            assert rouge_l_tokens(text) == tokenize.tokenize(text, None)


@pytest.mark.parametrize("a,b", PAIRS)
def test_rouge_l_equals_rouge_score_exactly(a, b):
    assert rouge_l(a, b) == reference(a, b)
    assert rouge_l(b, a) == reference(b, a)


def test_known_values():
    assert rouge_l("Write a haiku about the given subject.", "Write a haiku about autumn rain.") == pytest.approx(
        2 * 4 / (7 + 6))
    assert rouge_l("same words here", "Same, words... HERE") == 1.0
    assert rouge_l("", "") == 0.0


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = ("write sort give the a list of numbers poem about explain why sky is blue three two "
             "classify sentiment review translate into french summarize paragraph Café über 42").split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) + rng.choice(["", ".", "?", " !!"])
            for _ in range(n)]


def test_max_rouge_l_agrees_with_brute_force():
    candidates, pool = _texts(150, 1), _texts(90, 2)
    scores, index = max_rouge_l(candidates, pool)
    for i, candidate in enumerate(candidates):
        brute = [reference(candidate, p) for p in pool]
        assert scores[i] == max(brute)
        assert index[i] == int(np.argmax(brute))  # the first pool text with the best score


def test_max_rouge_l_edge_cases():
    scores, index = max_rouge_l(["Write a poem."], [])
    assert scores.tolist() == [0.0] and index.tolist() == [-1]
    scores, index = max_rouge_l([], ["Write a poem."])
    assert len(scores) == len(index) == 0
    scores, _ = max_rouge_l(["", "..."], ["", "...", "Write a poem."])
    assert scores.tolist() == [0.0, 0.0]  # rapidfuzz calls two empty strings identical; ROUGE-L does not


def test_growing_pool_checks_in_order_against_pool_and_earlier_accepted(monkeypatch):
    import sftlab.quality.similarity as similarity

    monkeypatch.setattr(similarity, "_CHUNK_ROWS", 64)  # several blocks, as 10,000 candidates would use
    seeds, candidates = _texts(30, 3), _texts(250, 4)
    pool = RougePool(seeds)
    matches = pool.add_if_novel(candidates, threshold=0.7)
    texts = list(seeds)
    for candidate, match in zip(candidates, matches):
        brute = [reference(candidate, t) for t in texts]
        best = max(brute) if brute else 0.0
        assert match.score == best
        assert match.added == (best <= 0.7)
        if best > 0:
            assert match.most_similar_index == int(np.argmax(brute))
            assert match.most_similar == texts[match.most_similar_index]
        if match.added:
            texts.append(candidate)
    assert pool.texts == texts
    assert 0 < sum(m.added for m in matches) < len(candidates)  # the filter both kept and dropped


def test_growing_pool_drops_a_repeat_within_one_batch_and_stops_at_max_added():
    pool = RougePool(["Sort the numbers from smallest to largest."])
    batch = ["Write a haiku about autumn rain.", "Write a haiku about autumn rain!", "Name three primary colours.",
             "Translate the sentence into German.", "Give three synonyms for happy."]
    matches = pool.add_if_novel(batch, threshold=0.7, max_added=2)
    assert [m.added if m else None for m in matches] == [True, False, True, None, None]
    assert matches[1].most_similar == "Write a haiku about autumn rain." and matches[1].score == 1.0
    assert len(pool) == 3
    scores, index = pool.max_similarity(["Name three primary colors."])
    assert index.tolist() == [2] and scores[0] == reference("Name three primary colors.", "Name three primary colours.")
