"""Exact loss masks: which tokens are -100, with the real SmolLM2 tokenizer (where pad == eos)."""

import pytest

from sftlab.config import load_config
from sftlab.data.batching import collate
from sftlab.data.formats import alpaca_to_conversation
from sftlab.data.prepare import prepare_data
from sftlab.data.readers import RawRow
from sftlab.data.templates import AlpacaTemplate
from sftlab.data.tokenize import IGNORE_INDEX, tokenize_rendered
from conftest import write_json


def _example(tokenizer, row, max_length=512):
    template = AlpacaTemplate(tokenizer.eos_token)
    conversation = alpaca_to_conversation(RawRow(row, "test[0]"))
    rendered = template.render(conversation)
    return template, conversation, tokenize_rendered(tokenizer, [rendered], ["test[0]"], max_length)[0]


@pytest.mark.parametrize(
    "row",
    [
        {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    ],
    ids=["without-input", "with-input"],
)
def test_labels_are_minus_100_on_the_prompt_and_the_response_ids_plus_eos_after(tokenizer, row):
    template, conversation, example = _example(tokenizer, row)
    prompt_ids = tokenizer(template.render_prompt(conversation))["input_ids"]
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert list(example.input_ids) == prompt_ids + response_ids + [tokenizer.eos_token_id]
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    assert tokenizer.decode(trained) == row["output"] + tokenizer.eos_token


def test_inference_prompt_tokens_equal_the_training_prompt_tokens(tokenizer):
    template, conversation, example = _example(
        tokenizer, {"instruction": "Sort the list.", "input": "3, 1, 2", "output": "1, 2, 3"}
    )
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)
    assert tokenizer(template.render_prompt(conversation))["input_ids"] == list(example.input_ids[:first_trained])
    assert not example.boundary_merged


def test_pad_equal_to_eos_does_not_mask_the_eos_label(tokenizer):
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # SmolLM2: the case that breaks other tools
    _, _, long = _example(tokenizer, {"instruction": "Count to five.", "input": "", "output": "1, 2, 3, 4, 5"})
    _, _, short = _example(tokenizer, {"instruction": "Say yes.", "input": "", "output": "Yes."})
    batch = collate([long, short], tokenizer.pad_token_id)
    n_short = len(short)
    assert batch["labels"][1, n_short - 1] == tokenizer.eos_token_id  # the real EOS is trained
    assert (batch["labels"][1, n_short:] == IGNORE_INDEX).all()  # the padding (same id) is not
    assert (batch["input_ids"][1, n_short:] == tokenizer.eos_token_id).all()
    assert batch["attention_mask"][1].sum() == n_short


def test_truncation_inside_the_response_keeps_the_row_and_marks_it(tokenizer):
    template, conversation, full = _example(tokenizer, {"instruction": "List numbers.", "input": "", "output": "one two three four five six"})
    prompt_len = len(tokenizer(template.render_prompt(conversation))["input_ids"])
    _, _, cut = _example(tokenizer, {"instruction": "List numbers.", "input": "", "output": "one two three four five six"}, max_length=prompt_len + 2)
    assert cut.truncated and len(cut) == prompt_len + 2
    assert list(cut.labels) == list(full.labels[: prompt_len + 2])
    assert cut.labels[-1] != tokenizer.eos_token_id  # the EOS was cut away
    assert cut.trained_token_count == 2


def test_a_response_cut_away_entirely_is_dropped_and_counted(tokenizer, tmp_path):
    rows = [
        {"instruction": "Short.", "input": "", "output": "Fine."},
        {"instruction": "Summarise the text.", "input": "word " * 300, "output": "A summary."},
    ]
    config = load_config(overrides=[f"data={write_json(tmp_path / 'd.json', rows)}", "max_length=64"])
    data = prepare_data(config, tokenizer)
    assert [e.source for e in data.train] == [f"{tmp_path / 'd.json'}[0]"]
    assert data.report["total"]["dropped_by_reason"] == {"response_truncated_away": 1}
    assert data.report["sources"][0]["rows_read"] == 2
    assert data.dropped[0].source.endswith("d.json[1]")


def test_data_report_counts_tokens_and_trained_tokens(tokenizer, tmp_path):
    rows = [{"instruction": "Say yes.", "input": "", "output": "Yes."}, {"instruction": "Say no.", "input": "", "output": "No."}]
    config = load_config(overrides=[f"data={write_json(tmp_path / 'd.json', rows)}", "val_fraction=0.5"])
    data = prepare_data(config, tokenizer)
    total = data.report["total"]
    assert total["tokens"] == sum(len(e) for e in [*data.train, *data.val])
    assert total["trained_tokens"] == sum(e.trained_token_count for e in [*data.train, *data.val])
    assert total["trained_tokens"] == len(tokenizer("Yes.", add_special_tokens=False)["input_ids"]) + len(
        tokenizer("No.", add_special_tokens=False)["input_ids"]) + 2  # + one EOS each
    assert (len(data.train), len(data.val)) == (1, 1)


@pytest.mark.slow
def test_gemma_masks_exactly_and_keeps_its_bos(gemma_tokenizer):
    tokenizer = gemma_tokenizer
    row = {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"}
    template, conversation, example = _example(tokenizer, row)
    prompt_ids = tokenizer(template.render_prompt(conversation))["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id  # Gemma adds a BOS, at training as at inference
    response_ids = tokenizer(row["output"], add_special_tokens=False)["input_ids"]
    assert list(example.input_ids) == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]


def test_boundary_lookup_equals_the_every_offset_reference(tokenizer):
    import numpy as np

    from sftlab.data.templates import Rendered
    from sftlab.data.tokenize import _labels_from_offsets, _mask

    texts = [
        ("### Response:\n\n\nCafé ☕ naïve — déjà vu<|im_end|>", 14),  # "\n\n\n" straddles the boundary
        ("Q: 2+2?\nA:4<|im_end|>\nQ: and 3+3?\nA: 6<|im_end|>", 10),
        ("日本語のテキスト。答え：はい<|im_end|>", 9),
    ]
    rendered = [Rendered(t, ((start, len(t)),)) for t, start in texts]
    rendered.append(Rendered(texts[1][0], ((10, 22), (36, len(texts[1][0])))))
    fast = _mask(tokenizer, [r.text for r in rendered], [r.trained_spans for r in rendered])
    encoded = tokenizer([r.text for r in rendered], return_offsets_mapping=True)
    for (ids, trained, merged), offsets, r in zip(fast, encoded["offset_mapping"], rendered):
        reference, reference_merged = _labels_from_offsets(ids, np.asarray(offsets).reshape(-1, 2), r.trained_spans)
        assert trained.tolist() == reference.tolist()
        assert merged == reference_merged
    assert fast[0][2] is True  # the straddling newline token is detected
