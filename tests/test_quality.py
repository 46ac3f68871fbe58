"""`sftlab quality` measures: duplicates, near duplicates, ROUGE-L, contamination, diversity, IFD.

The fixture rows and why each expected value is right: tests/fixtures/quality/README.md.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from sftlab.quality import contamination, dedup, diversity, minhash
from sftlab.quality.analysis import analyze
from sftlab.quality.rows import load_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "quality"
ROWS = FIXTURES / "rows.jsonl"
EVAL = FIXTURES / "eval_items.jsonl"
DOLLY = FIXTURES / "dolly.jsonl"


@pytest.fixture(scope="module")
def rows():
    data = load_dataset([ROWS])
    return data.rows


def test_rows_are_read_with_the_project_readers_and_bad_rows_counted():
    data = load_dataset([ROWS])
    assert data.files[0].rows_read == 13 and len(data.rows) == 12
    assert [(d.source, d.reason) for d in data.dropped] == [(f"{ROWS}:13", "empty_response")]
    assert data.rows[2].instruction == "Explain how a rainbow forms." and data.rows[2].response.startswith("A rainbow")


def test_exact_duplicates_differ_only_in_case_whitespace_and_punctuation(rows):
    assert dedup.normalize("  Red, yellow and BLUE!! ") == "red yellow and blue"
    assert dedup.exact_duplicates([r.conversation for r in rows]) == [[0, 1]]


def test_near_duplicates_find_the_planted_pair_and_not_the_others(rows):
    near = dedup.near_duplicates([f"{r.instruction}\n\n{r.response}" for r in rows], threshold=0.7)
    assert near.clusters == [[0, 1], [2, 3]]  # the exact pair is also a near pair (Jaccard 1)
    pairs = {tuple(p): j for p, j in zip(near.pairs.tolist(), near.jaccard.tolist())}
    assert pairs[(2, 3)] == pytest.approx(45 / 53)  # 49 shingles each, one changed word breaks 4
    # same instruction, different answer; and a reworded answer: clearly not near duplicates
    assert near.jaccard_of([(2, 4), (5, 6)]).max() < 0.1
    assert near.params["bands"] * near.params["rows_per_band"] <= 256
    # at a threshold above the pair's similarity only the exact pair remains
    assert dedup.near_duplicates([f"{r.instruction}\n\n{r.response}" for r in rows], threshold=0.9).clusters == [[0, 1]]


def test_minhash_estimate_tracks_exact_jaccard_and_lsh_recall_setting():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(3000)]
    base = [rng.choice(vocab) for _ in range(200)]
    docs = [base]
    for changed in (5, 15, 40, 100):  # substitute `changed` words of the base text
        doc = list(base)
        for k in rng.sample(range(200), changed):
            doc[k] = rng.choice(vocab)
        docs.append(doc)
    hashes, offsets = minhash.ngram_hashes(docs, 5)
    sig = minhash.signatures(hashes, offsets, 256)
    pairs = np.array([[0, i] for i in range(1, len(docs))])
    exact = minhash.exact_jaccard(hashes, offsets, pairs)
    estimate = minhash.estimated_jaccard(sig, pairs)
    assert np.all(np.abs(exact - estimate) < 0.1), (exact, estimate)
    assert exact[0] > 0.7 > exact[-1]
    bands, rows = minhash.lsh_params_for_recall(0.7, 256, 0.99)
    assert (bands, rows) == (42, 6) and 1 - (1 - 0.7**rows) ** bands >= 0.99


def _brute_force_best_earlier(texts):
    from sftlab.quality.similarity import rouge_l

    best, index = np.zeros(len(texts)), np.full(len(texts), -1)
    for i in range(len(texts)):
        for j in range(i):
            s = rouge_l(texts[i], texts[j])
            if s > best[i]:
                best[i], index[i] = s, j
    return best, index


def test_similar_instructions_equal_brute_force_rouge_l():
    rng = random.Random(1)
    verbs, objects = ["Write", "List", "Give", "Explain"], ["a poem", "three tips", "a summary", "two reasons"]
    topics = ["about cats", "about the sea", "for a party", "on sleep", "about rain and wind"]
    texts = [f"{rng.choice(verbs)} {rng.choice(objects)} {rng.choice(topics)}" + rng.choice(["", " please", "."])
             for _ in range(90)]
    best, index = _brute_force_best_earlier(texts)
    exact = dedup.similar_instructions(texts, 0.7, method="all")
    assert np.array_equal(exact.best_score, best)  # bit for bit: same formula as rouge-score
    assert np.array_equal(exact.best_index[best > 0], index[best > 0])  # ties -> the earliest row
    lsh = dedup.similar_instructions(texts, 0.7, method="lsh")
    found = set(lsh.flagged.tolist())
    assert found <= set(exact.flagged.tolist())  # lsh never invents a match ...
    assert np.array_equal(lsh.best_score[lsh.flagged], best[lsh.flagged])  # ... and its scores are exact
    assert len(found) >= 0.9 * len(exact.flagged)


def test_similar_instructions_on_the_fixture(rows):
    having = [r for r in rows if r.instruction.strip()]
    similar = dedup.similar_instructions([r.instruction for r in having], 0.7)
    flagged = {having[i].source.rsplit(":", 1)[1]: having[int(similar.best_index[i])].source.rsplit(":", 1)[1]
               for i in similar.flagged.tolist()}
    # jsonl sources are 1-based lines: rows 1->0, 3->2, 4->2 (ties go to the earliest), 6->5
    assert flagged == {"2": "1", "4": "3", "5": "3", "7": "6"}


def test_contamination_13_gram_is_flagged_12_gram_is_not(rows):
    index = contamination.build_index([EVAL], use_builtin=False)
    assert len(index) == 2 and index.ngram_count == 19 - 13 + 1  # the 3-word item has no 13-gram
    hits = contamination.find_contamination([r.texts for r in rows], index)
    assert list(hits) == [7]  # row 8 shares only a 12-gram
    (hit,) = hits[7]
    assert index.items[hit["item"]].source == f"{EVAL}:1 id=story-1"
    assert hit["ngram"] == "a lighthouse keeper who finds a message in a bottle on a stormy"
    assert hit["ngrams"] == 2  # "... stormy" and "... stormy night"
    assert contamination.eval_tokens("A Bottle, on a stormy-night!") == ["a", "bottle", "on", "a", "stormynight"]


def test_builtin_suite_is_used_when_present():
    suite = contamination.builtin_suite()
    if suite is None:
        pytest.skip("the eval suite is not installed")
    index = contamination.build_index([], use_builtin=True)
    assert index.files == [str(suite)] and len(index) > 0


def test_verb_noun_pairs_with_spacy():
    nlp = diversity.load_spacy()
    if nlp is None:
        pytest.skip("spaCy is not installed")
    texts = ["Write a poem about cats.", "What is the capital of France?", "Give three tips for staying healthy.",
             "Summarize the article below. It is long.", "Write a story about a dragon."]
    pairs = diversity.verb_noun_pairs(texts, nlp)
    assert pairs == [("write", "poem"), (None, None), ("give", "tip"), ("summarize", "article"), ("write", "story")]
    summary = diversity.verb_noun_summary(pairs)
    assert summary["with_verb_noun"] == 4 and summary["verb_noun_share"] == 0.8
    assert summary["top"][0] == {"verb": "write", "count": 2,
                                 "nouns": [{"noun": "poem", "count": 1}, {"noun": "story", "count": 1}]}


def test_distinct_n():
    # unigrams a b a a b: 2 distinct of 5; bigrams ab ba ab: 2 of 3; trigrams aba: 1 of 1
    assert diversity.distinct_n(["a b a", "A, b"]) == {"distinct_1": 0.4, "distinct_2": 0.6667, "distinct_3": 1.0}


def test_analyze_fixture_report(tmp_path, monkeypatch):
    monkeypatch.setattr(diversity, "load_spacy", lambda: None)  # spaCy "not installed"
    result = analyze([ROWS], against=[EVAL], builtin_suite=False, report=tmp_path / "q.html")
    assert (result["rows_read"], result["rows"], result["dropped"]["by_reason"]) == (13, 12, {"empty_response": 1})
    assert result["near_empty_responses"]["count"] == 1 and result["near_empty_responses"]["rows"][0]["response"] == "Yes."
    assert result["exact_duplicates"]["clusters"] == 1 and result["exact_duplicates"]["removable"] == 1
    members = [[m["source"] for m in c["members"]] for c in result["near_duplicates"]["list"]]
    assert members == [[f"{ROWS}:1", f"{ROWS}:2"], [f"{ROWS}:3", f"{ROWS}:4"]]
    assert result["contamination"]["rows"] == 1 and result["contamination"]["list"][0]["source"] == f"{ROWS}:8"
    assert result["similar_instructions"]["flagged"] == 4
    assert "skipped" in result["diversity"]["verb_noun"] and "pip install" in result["diversity"]["verb_noun"]["skipped"]
    assert result["lengths"]["response_words"]["max"] == 48
    saved = json.loads((tmp_path / "q.json").read_text())
    assert saved["near_duplicates"]["clusters"] == 2
    page = (tmp_path / "q.html").read_text()
    assert "<img src=\"data:image/png;base64," in page and "Verb–noun analysis skipped" in page


def test_report_escapes_text_and_counts_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(diversity, "load_spacy", lambda: None)
    rows = [json.loads(line) for line in DOLLY.read_text().splitlines()]
    rows.append({"instruction": "Explain <b>bold</b> & <script>x</script> tags", "context": "",
                 "response": "Tags <b>mark up</b> text.", "category": "open_qa"})
    rows.append(dict(rows[-1]))  # a duplicate, so the row is shown in a cluster
    path = tmp_path / "dolly.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = analyze([path], builtin_suite=False, report=tmp_path / "r.html")
    assert result["metadata"]["category"]["top"] == [["open_qa", 6], ["brainstorming", 2]]
    page = (tmp_path / "r.html").read_text()
    assert "&lt;script&gt;x&lt;/script&gt;" in page and "<script>" not in page


def test_token_lengths_and_rows_over_max_length(tokenizer, smollm2_dir, monkeypatch):
    monkeypatch.setattr(diversity, "load_spacy", lambda: None)
    result = analyze([ROWS], model=str(smollm2_dir), max_length=80, builtin_suite=False, diversity=False)
    lengths = result["lengths"]
    counts = [len(tokenizer(r.response, add_special_tokens=False)["input_ids"]) for r in load_dataset([ROWS]).rows]
    assert lengths["response_tokens"]["max"] == max(counts) and lengths["response_tokens"]["min"] == min(counts)
    from sftlab.data.templates import get_template

    template = get_template("alpaca", tokenizer)
    full = [len(tokenizer(template.render(r.conversation).text)["input_ids"]) for r in load_dataset([ROWS]).rows]
    assert lengths["over_max_length"]["count"] == sum(n > 80 for n in full) > 0


# -- IFD ---------------------------------------------------------------------------------------

def _direct_mean_loss(model, tokenizer, conversation):
    """One row, one forward pass, through the project's own token_loss_sum."""
    import torch

    from sftlab.data.batching import collate
    from sftlab.data.templates import get_template
    from sftlab.data.tokenize import tokenize_rendered
    from sftlab.train.loss import token_loss_sum

    rendered = get_template("alpaca", tokenizer).render(conversation)
    (example,) = tokenize_rendered(tokenizer, [rendered], [conversation.source], 512)
    with torch.no_grad():
        total, count = token_loss_sum(model, collate([example], tokenizer.pad_token_id))
    return float(total) / count, count


def test_ifd_equals_the_ratio_of_two_separate_loss_evaluations(tiny_model_dir, rows):
    from sftlab.data.formats import Conversation, Message
    from sftlab.models.loading import load_causal_lm, load_tokenizer
    from sftlab.quality.ifd import compute_ifd

    model, tokenizer = load_causal_lm(str(tiny_model_dir)), load_tokenizer(str(tiny_model_dir))
    model.eval()
    chosen = [rows[i].conversation for i in (2, 9, 10, 11)]  # different lengths: batched with padding
    scores = compute_ifd(chosen, lm=model, tokenizer=tokenizer, batch_size=4)
    for conversation, score in zip(chosen, scores):
        response = [m.content for m in conversation.messages if m.role == "assistant"][0]
        conditioned, n_cond = _direct_mean_loss(model, tokenizer, conversation)
        alone, n_alone = _direct_mean_loss(model, tokenizer, Conversation((Message("text", response, True),)))
        assert score.ifd == pytest.approx(conditioned / alone, rel=1e-5)
        assert (score.conditioned_tokens, score.alone_tokens) == (n_cond, n_alone)
        # response alone: every token but the first (SmolLM2 adds no BOS) plus EOS is scored
        n_response = len(tokenizer(response, add_special_tokens=False)["input_ids"])
        assert n_alone == n_response and n_cond >= n_response  # EOS trained; first token has context
    # a text row has no instruction: no score
    assert compute_ifd([Conversation((Message("text", "Just text.", True),))], lm=model, tokenizer=tokenizer) == [None]
