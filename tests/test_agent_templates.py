"""Agent and reasoning conversations on templates that behave like today's model families: every
weighted assistant turn is trained once, in the context the model sees when it generates that
turn, checked against an independent rendering by transformers' own apply_chat_template.

The family templates are in tests/fixtures/templates (and examples/templates/qwen3_like.jinja):
Qwen3-like (earlier turns' reasoning dropped, an empty think block for the newest turn),
Mistral-like (system and tools in the last user turn), Llama-3-like (a dedicated end-of-turn
token, <|eom_id|> after a call, a dated header), Gemma-like (no system role, no tool role)."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from sftlab.config import load_config
from sftlab.data.formats import FormatOptions, from_openai
from sftlab.data.prepare import prepare_data
from sftlab.data.readers import DataError, RawRow
from sftlab.data.templates import CHAT_TEMPLATES, check_consistency, get_template
from sftlab.data.tokenize import IGNORE_INDEX

ROOT = Path(__file__).resolve().parents[1]
AGENT_DEMO = ROOT / "examples" / "data" / "agent_demo.jsonl"
QWEN3 = ROOT / "examples" / "templates" / "qwen3_like.jinja"
FAMILIES = Path(__file__).parent / "fixtures" / "templates"
THINK_EMPTY = re.compile(r"<think>\s*</think>\s*")
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _rows(path=AGENT_DEMO):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def _hf_messages(row):
    """The row as Hugging Face chat templates take it, written out by the test itself: arguments
    as objects, null content as "", a leading <think> block moved to reasoning_content."""
    out = []
    for m in row["messages"]:
        m = {k: v for k, v in m.items() if k != "weight"}
        m["content"] = m.get("content") or ""
        if m["role"] == "assistant" and m["content"].startswith("<think>"):
            think, _, rest = m["content"].partition("</think>")
            m["reasoning_content"], m["content"] = think[len("<think>"):].strip("\n"), rest.lstrip("\n")
        if m["role"] == "assistant" and "<tool_call>" in m["content"]:
            text, _, block = m["content"].partition("<tool_call>")
            call = json.loads(block.split("</tool_call>")[0])
            m["content"], m["tool_calls"] = text.rstrip("\n"), [{"type": "function", "function": call}]
        for call in m.get("tool_calls") or []:
            if isinstance(call["function"]["arguments"], str):
                call["function"] = {**call["function"], "arguments": json.loads(call["function"]["arguments"])}
        out.append(m)
    return out


def independent_turns(tokenizer, template_text, row, end_tokens, train_empty_think=False, **kwargs):
    """(token ids, trained flags, prompt tokens) for each weighted assistant turn: the prompt the
    template renders for it with the generation prompt, tokenized as inference tokenizes it, then
    the tokens of the turn's reply up to its end token; an empty think block of a turn without
    reasoning is not trained."""
    messages, tools = _hf_messages(row), row.get("tools")
    render = lambda msgs, generation: tokenizer.apply_chat_template(
        msgs, tools=tools, chat_template=template_text, tokenize=False, add_generation_prompt=generation, **kwargs)
    turns = []
    for i, m in enumerate(row["messages"]):
        if m["role"] != "assistant" or m.get("weight", 1) == 0:
            continue
        context, upto = render(messages[:i], True), render(messages[: i + 1], False)
        assert upto.startswith(context)
        reply = upto[len(context):]
        end = max(reply.rfind(t) + len(t) for t in end_tokens if t in reply)
        trained_from = len(context)
        empty = THINK_EMPTY.match(reply)
        if empty and not messages[i].get("reasoning_content") and not train_empty_think:
            trained_from += empty.end()
        # the prompt tokenized as inference tokenizes it, then the reply's own tokens
        prompt_ids = tokenizer(context)["input_ids"]
        reply_encoded = tokenizer(reply[:end], add_special_tokens=False, return_offsets_mapping=True)
        trained = [False] * len(prompt_ids) + [len(context) + s >= trained_from for s, _ in reply_encoded["offset_mapping"]]
        turns.append((prompt_ids + reply_encoded["input_ids"], trained, len(prompt_ids)))
    return turns


def _sequences_by_row(data):
    by_row: dict[str, list] = {}
    for example in data.train:
        by_row.setdefault(example.source.split(" · ")[0], []).append(example)
    return by_row


def assert_each_turn_trained_once_in_its_context(tokenizer, template_text, rows, sequences, end_tokens, **kwargs):
    """Every expected turn's context is the prefix of one stored sequence, whose trained tokens
    from there to the turn's end are exactly the turn's; no row trains more tokens than its turns."""
    for row, stored in zip(rows, sequences):
        expected = independent_turns(tokenizer, template_text, row, end_tokens, **kwargs)
        for ids, trained, context_tokens in expected:
            holder = [e for e in stored if list(e.input_ids[: len(ids)]) == ids]
            assert holder, f"no sequence holds the turn's context: {tokenizer.decode(ids[:context_tokens])[-80:]!r}"
            labels = holder[0].labels[: len(ids)]
            assert [int(label != IGNORE_INDEX) for label in labels[context_tokens:]] == \
                [int(flag) for flag in trained[context_tokens:]]
        assert sum(e.trained_token_count for e in stored) == sum(sum(t[1:]) for _, t, _ in expected)


def _prepare(model_dir, tmp_path, template, *extra, data=AGENT_DEMO):
    config = load_config(overrides=[f"model={model_dir}", f"data={data}", f"template={template}", "max_length=1024",
                                    "cache=false", f"output_dir={tmp_path / 'run'}", *extra])
    return config, prepare_data(config)


def test_chatml_writes_tools_calls_results_and_reasoning_in_the_hermes_form(tokenizer):
    conversation = from_openai(RawRow({"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "reasoning_content": "Call it.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
            {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Nice"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
        {"role": "tool", "tool_call_id": "c2", "content": "20 C"},
        {"role": "assistant", "content": "18 C and 20 C."}]}, "t:1"), FormatOptions())
    template = get_template("chatml", tokenizer)
    text = template.render(conversation).text
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n")
    assert "\n<tools>\n" + json.dumps(WEATHER) + "\n</tools>\n" in text
    assert text.endswith(
        "<|im_start|>user\nParis?<|im_end|>\n<|im_start|>assistant\n<think>\nCall it.\n</think>\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_weather", "arguments": {"city": "Nice"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n18 C\n</tool_response>\n<tool_response>\n20 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n18 C and 20 C.<|im_end|>\n")
    template.check_jinja(conversation)  # the exported Jinja text renders the same characters
    check_consistency(template, tokenizer, conversation)


def test_chatml_trains_the_agent_file_as_one_sequence_a_row_exactly_as_its_jinja_text(tiny_model_dir, tokenizer, tmp_path):
    _, data = _prepare(tiny_model_dir, tmp_path, "chatml")
    rows = _rows()
    assert data.report["total"]["turn_views"]["rows_with_turn_views"] == 0  # chatml shows history as it was
    assert len(data.train) == len(rows)
    by_row = _sequences_by_row(data)
    sequences = [by_row[f"{AGENT_DEMO}:{k + 1}"] for k in range(len(rows))]
    assert_each_turn_trained_once_in_its_context(tokenizer, (CHAT_TEMPLATES / "chatml.jinja").read_text(), rows,
                                                 sequences, ["<|im_end|>"])


def test_the_agent_report_counts_every_row_and_each_kind(tiny_model_dir, tmp_path):
    _, data = _prepare(tiny_model_dir, tmp_path, str(QWEN3))
    total = data.report["total"]
    assert total["rows_read"] == total["rows_kept"] + total["rows_dropped"] == 12
    assert total["agent_rows"] == {"rows_with_tools": 7, "rows_with_tool_calls": 7, "rows_with_parallel_tool_calls": 2,
                                   "rows_with_tool_results": 7, "rows_with_reasoning": 4, "rows_with_untrained_turns": 1}
    views = total["turn_views"]
    # every row with an earlier trained turn needs it (Qwen3-like drops earlier reasoning, writes an empty block last)
    assert views["rows_with_turn_views"] == 8 and views["turn_view_sequences"] == 8
    assert views["turn_view_tokens"] == sum(len(e) for e in data.train if " · turn " in e.source)
    assert data.report["split"] == {**data.report["split"], "train_rows": 12, "train_sequences": 20}


def test_qwen3_like_trains_each_turn_in_its_own_context(tiny_model_dir, tokenizer, tmp_path):
    _, data = _prepare(tiny_model_dir, tmp_path, str(QWEN3))
    rows = _rows()
    by_row = _sequences_by_row(data)
    assert_each_turn_trained_once_in_its_context(tokenizer, QWEN3.read_text(), rows,
                                                 [by_row[f"{AGENT_DEMO}:{k + 1}"] for k in range(len(rows))], ["<|im_end|>"])
    # the two-turn reasoning row: turn 1's reasoning is trained in its own view, and kept out of turn 3's context
    two_turns = by_row[f"{AGENT_DEMO}:9"]
    assert len(two_turns) == 2
    decoded = [tokenizer.decode(e.input_ids) for e in two_turns]
    assert "11, 13, 17 and 19 are prime" not in decoded[0] and "13 was given" in decoded[0]
    trained = tokenizer.decode(two_turns[1].input_ids[two_turns[1].labels != IGNORE_INDEX])
    assert trained == "<think>\n11, 13, 17 and 19 are prime; any one will do.\n</think>\n\n13.<|im_end|>"


def test_empty_think_blocks_are_masked_and_counted_unless_asked(tiny_model_dir, tokenizer, tmp_path):
    _, data = _prepare(tiny_model_dir, tmp_path, str(QWEN3))
    hello = _sequences_by_row(data)[f"{AGENT_DEMO}:12"][0]  # "Say hello." has no reasoning
    assert tokenizer.decode(hello.input_ids[hello.labels != IGNORE_INDEX]) == "Hello!<|im_end|>"
    assert "<think>\n\n</think>\n\nHello!" in tokenizer.decode(hello.input_ids)  # still in the text, as context
    assert data.report["total"]["turn_views"]["empty_think_masked"] == 14
    _, trained = _prepare(tiny_model_dir, tmp_path / "b", str(QWEN3), "train_empty_think=true")
    hello = _sequences_by_row(trained)[f"{AGENT_DEMO}:12"][0]
    assert tokenizer.decode(hello.input_ids[hello.labels != IGNORE_INDEX]) == "<think>\n\n</think>\n\nHello!<|im_end|>"


def test_enable_thinking_false_puts_the_empty_block_in_the_prompt(tiny_model_dir, tokenizer, tmp_path):
    rows = [r for r in _rows() if not any(m.get("reasoning_content") or "<think>" in (m.get("content") or "")
                                          for m in r["messages"])]
    config, data = _prepare(tiny_model_dir, tmp_path, str(QWEN3), "template_kwargs={enable_thinking: false}",
                            data=_write(tmp_path, rows))
    by_row = _sequences_by_row(data)
    sequences = [by_row[f"{tmp_path / 'rows.jsonl'}:{k + 1}"] for k in range(len(rows))]
    assert_each_turn_trained_once_in_its_context(tokenizer, QWEN3.read_text(), rows, sequences, ["<|im_end|>"],
                                                 enable_thinking=False)
    template = get_template(config.template, tokenizer, config.template_kwargs)
    from sftlab.data.formats import Message

    assert template.generation_prompt((Message("user", "Hi"),)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert data.report["total"]["turn_views"]["empty_think_masked"] == 0  # the block is context: nothing to mask


def test_a_row_whose_reasoning_contradicts_the_template_kwargs_is_a_located_error(tiny_model_dir, tmp_path):
    from sftlab.data.templates import TemplateConsistencyError

    with pytest.raises(TemplateConsistencyError, match=r"agent_demo\.jsonl:6: template 'qwen3_like.jinja' renders turn 1 "
                                                       r"differently as an inference prompt"):
        _prepare(tiny_model_dir, tmp_path, str(QWEN3), "template_kwargs={enable_thinking: false}")
    _, data = _prepare(tiny_model_dir, tmp_path, str(QWEN3), "template_kwargs={enable_thinking: false}", "on_error=skip")
    assert data.report["total"]["dropped_by_reason"] == {"template_mismatch": 4}


def test_train_reasoning_false_keeps_reasoning_as_masked_context(tiny_model_dir, tokenizer, tmp_path):
    for template in ("chatml", str(QWEN3)):
        _, data = _prepare(tiny_model_dir, tmp_path / Path(template).stem, template, "train_reasoning=false")
        row = _sequences_by_row(data)[f"{AGENT_DEMO}:6"]  # "Is 91 prime?" with reasoning_content
        assert tokenizer.decode(row[0].input_ids[row[0].labels != IGNORE_INDEX]) == "No: 91 = 7 × 13.<|im_end|>"
        assert "91 = 7 x 13, so it has divisors" in tokenizer.decode(row[0].input_ids)
        assert data.report["total"]["turn_views"]["reasoning_masked"] == 7


def test_train_on_last_trains_only_the_last_weighted_turn(tiny_model_dir, tokenizer, tmp_path):
    _, data = _prepare(tiny_model_dir, tmp_path, str(QWEN3), "train_on=last")
    assert len(data.train) == 12  # the last turn is always the whole conversation's: no views
    weighted = _sequences_by_row(data)[f"{AGENT_DEMO}:10"][0]  # the weight-0 first answer: context only
    assert tokenizer.decode(weighted.input_ids[weighted.labels != IGNORE_INDEX]) == "Danke.<|im_end|>"


def test_weight_zero_turns_are_context_on_every_template(tiny_model_dir, tokenizer, tmp_path):
    _, data = _prepare(tiny_model_dir, tmp_path, "chatml")
    row = _sequences_by_row(data)[f"{AGENT_DEMO}:10"][0]
    text, trained = tokenizer.decode(row.input_ids), tokenizer.decode(row.input_ids[row.labels != IGNORE_INDEX])
    assert "Merci." in text and trained == "Danke.<|im_end|>"


MISTRAL_ROW = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "Answer in French."},
    {"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Bonjour."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a1b2c3d4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "18 C"},
    {"role": "assistant", "content": "Il fait 18 degrés."}]}


def _write(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_mistral_like_system_in_the_last_user_turn_trains_earlier_turns_in_views(family_model_dir, family_tokenizer,
                                                                                 tmp_path):
    template = FAMILIES / "mistral_like.jinja"
    _, data = _prepare(family_model_dir, tmp_path, str(template), data=_write(tmp_path, [MISTRAL_ROW]))
    assert data.report["total"]["turn_views"]["rows_with_turn_views"] == 1
    sequences = list(data.train)
    assert len(sequences) == 2  # "Bonjour." is shown with the system prompt in its turn only in its own view
    first = family_tokenizer.decode(sequences[1].input_ids)
    assert first.startswith("[AVAILABLE_TOOLS]") and "[INST]Answer in French.\n\nHello.[/INST]Bonjour.<|im_end|>" in first
    trained = [family_tokenizer.decode(e.input_ids[e.labels != IGNORE_INDEX]) for e in sequences]
    assert trained == ['[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}]<|im_end|>'
                       "Il fait 18 degrés.<|im_end|>", "Bonjour.<|im_end|>"]
    assert_each_turn_trained_once_in_its_context(family_tokenizer, template.read_text(), [MISTRAL_ROW], [sequences],
                                                 ["<|im_end|>"])


LLAMA_ROW = {"tools": [WEATHER], "messages": [
    {"role": "system", "content": "You help."},
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "4 C"},
    {"role": "assistant", "content": "4 C in Oslo."}]}


def test_llama3_like_trains_its_end_of_turn_and_end_of_call_tokens(family_model_dir, family_tokenizer, tmp_path):
    template_path = FAMILIES / "llama3_like.jinja"
    template = get_template(str(template_path), family_tokenizer)
    assert template.end_tokens == ("<|eot_id|>", "<|eom_id|>")  # found by probing: the call closes with <|eom_id|>
    _, data = _prepare(family_model_dir, tmp_path, str(template_path), "template_kwargs={date_string: 4 Dec 2026}",
                       data=_write(tmp_path, [LLAMA_ROW]))
    # the prompt ends "<|end_header_id|>\n\n", which SmolLM2's tokenizer writes as one token at the end of
    # the text and as two before the reply: each turn trains on the prompt's own tokens, in a view of its own
    sequences = list(data.train)
    assert len(sequences) == 2 and data.report["total"]["turn_views"]["turn_view_sequences"] == 1
    text = family_tokenizer.decode(sequences[0].input_ids)
    assert "Today Date: 4 Dec 2026" in text and "Functions you can call:\n" in text
    assert [family_tokenizer.decode(e.input_ids[e.labels != IGNORE_INDEX]) for e in sequences] == \
        ['{"name": "get_weather", "parameters": {"city": "Oslo"}}<|eom_id|>', "4 C in Oslo.<|eot_id|>"]
    assert_each_turn_trained_once_in_its_context(family_tokenizer, template_path.read_text(), [LLAMA_ROW], [sequences],
                                                 ["<|eot_id|>", "<|eom_id|>"], date_string="4 Dec 2026")
    from sftlab.infer.engine import stop_tokens

    ids, _ = stop_tokens(family_tokenizer, None, template)
    assert family_tokenizer.convert_tokens_to_ids("<|eom_id|>") in ids  # generation stops after a call too


def test_a_template_that_refuses_a_row_is_a_located_error_or_a_counted_drop(family_model_dir, tmp_path):
    parallel = json.loads(json.dumps(LLAMA_ROW))
    parallel["messages"][2]["tool_calls"].append(
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Bergen"}'}})
    parallel["messages"].insert(4, {"role": "tool", "tool_call_id": "c2", "content": "6 C"})
    path = _write(tmp_path, [LLAMA_ROW, parallel])
    template = str(FAMILIES / "llama3_like.jinja")
    with pytest.raises(DataError, match=r"rows\.jsonl:2: template 'llama3_like.jinja' cannot render this row: "
                                        r"This model only supports single tool-calls"):
        _prepare(family_model_dir, tmp_path, template, data=path)
    _, data = _prepare(family_model_dir, tmp_path, template, "on_error=skip", data=path)
    assert data.report["total"]["dropped_by_reason"] == {"template_error": 1} and data.report["total"]["rows_kept"] == 1


def test_gemma_like_merges_the_system_turn_and_refuses_tool_rows(family_model_dir, family_tokenizer, tmp_path):
    template_path = FAMILIES / "gemma_like.jinja"
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye."},
                         {"role": "assistant", "content": "Goodbye."}]}
    _, data = _prepare(family_model_dir, tmp_path, str(template_path), "on_error=skip",
                       data=_write(tmp_path, [chat, LLAMA_ROW]))
    (sequence,) = list(data.train)
    assert family_tokenizer.decode(sequence.input_ids).startswith("<start_of_turn>user\nBe brief.\n\nHi.<end_of_turn>")
    assert family_tokenizer.decode(sequence.input_ids[sequence.labels != IGNORE_INDEX]) == \
        "Hello.<end_of_turn>Goodbye.<end_of_turn>"
    assert data.report["total"]["dropped_by_reason"] == {"template_cannot_show_tools": 1}
    assert "does not render them" in data.dropped[0].detail
    assert_each_turn_trained_once_in_its_context(family_tokenizer, template_path.read_text(), [chat], [[sequence]],
                                                 ["<end_of_turn>"])


def test_reasoning_a_template_does_not_render_is_written_inline(tokenizer, tmp_path):
    template = get_template("tokenizer", tokenizer)  # SmolLM2's own template reads only role and content
    assert "reasoning" not in template.shows and "tool_results" in template.shows
    conversation = from_openai(RawRow({"messages": [{"role": "user", "content": "2+2?"},
                                                    {"role": "assistant", "content": "4.", "reasoning_content": "Add."}]},
                                      "r:1"), FormatOptions())
    row = template.render(conversation)
    assert row.text[row.trained_spans[0][0]:row.trained_spans[0][1]] == "<think>\nAdd.\n</think>\n\n4.<|im_end|>"
    masked = template.render(conversation, train_reasoning=False)
    assert masked.text[masked.trained_spans[0][0]:masked.trained_spans[0][1]] == "4.<|im_end|>"


@pytest.mark.parametrize("name", ["alpaca", "tokenizer"])
def test_a_row_with_tools_on_a_template_that_cannot_show_them_is_refused(tokenizer, name):
    conversation = from_openai(RawRow({"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]}, "t:3"), FormatOptions())
    with pytest.raises(DataError, match=r"t:3: the row has tools \(the functions offered\), but template .* does not "
                                        r"render them.*template: chatml") as error:
        get_template(name, tokenizer).render(conversation)
    assert error.value.reason == "template_cannot_show_tools"


def test_exported_chat_template_carries_the_template_kwargs_as_defaults(tokenizer):
    template = get_template(str(QWEN3), tokenizer, {"enable_thinking": False})
    exported = template.export_jinja
    plain = [{"role": "user", "content": "Hi"}]
    render = lambda **kw: tokenizer.apply_chat_template(plain, chat_template=exported, tokenize=False,
                                                        add_generation_prompt=True, **kw)
    assert render().endswith("<think>\n\n</think>\n\n")  # the run's enable_thinking: false, without passing it
    assert render(enable_thinking=True).endswith("<|im_start|>assistant\n")  # a caller's own value wins


def test_template_kwargs_are_refused_by_the_builtin_templates(tokenizer):
    from sftlab.data.templates import TemplateError

    with pytest.raises(TemplateError, match="built-in 'chatml' template reads none"):
        get_template("chatml", tokenizer, {"enable_thinking": False})


@pytest.mark.slow
@pytest.mark.parametrize("template", ["chatml", "qwen3"])
def test_first_step_loss_equals_the_independent_span_reference(tiny_model_dir, tokenizer, tmp_path, template):
    """The mixed agent file trains with the loss an independent computation gives: the model's own
    forward on each turn's context + reply, cross-entropy on the reply tokens, summed over every
    turn of every row and divided by their count."""
    from transformers import AutoModelForCausalLM

    from sftlab.train.loop import train

    template_text = (CHAT_TEMPLATES / "chatml.jinja").read_text() if template == "chatml" else QWEN3.read_text()
    config = load_config(overrides=[
        f"model={tiny_model_dir}", f"data={AGENT_DEMO}", f"template={'chatml' if template == 'chatml' else QWEN3}",
        "max_length=1024", "batch_size=32", "max_steps=1", "group_by_length=false", "warmup_ratio=0",
        f"output_dir={tmp_path / 'run'}"])
    result = train(config)
    logged = json.loads(Path(result.output_dir, "metrics.jsonl").read_text().splitlines()[0])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in _rows():
            for ids, trained, _ in independent_turns(tokenizer, template_text, row, ["<|im_end|>"]):
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                targets = torch.tensor(ids[1:])
                losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
                flags = torch.tensor(trained[1:])
                total += float(losses[flags].sum())
                count += int(flags.sum())
    assert logged["tokens"] == count
    assert logged["loss"] == pytest.approx(total / count, rel=1e-5)


def test_template_kwargs_and_mask_options_are_part_of_the_data_cache_key(tiny_model_dir, tokenizer, tmp_path):
    from sftlab.data.prepare import cache_key

    def key(*extra):
        config = load_config(overrides=[f"model={tiny_model_dir}", f"data={AGENT_DEMO}", f"template={QWEN3}", *extra])
        return cache_key(config, tokenizer, get_template(config.template, tokenizer, config.template_kwargs))

    keys = {key(), key("template_kwargs={enable_thinking: false}"), key("train_reasoning=false"),
            key("train_empty_think=true")}
    assert len(keys) == 4


def test_inspect_shows_the_rows_of_one_kind_with_every_view(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from sftlab.cli import app

    args = ["inspect", str(ROOT / "examples" / "agent-formats.yaml"), "--set", f"model={tiny_model_dir}", "--set",
            f"template={QWEN3}", "--set", f"output_dir={tmp_path}", "--set", "cache=false"]
    result = CliRunner().invoke(app, [*args, "--kind", "parallel_tool_calls", "-n", "1"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "agent_demo.jsonl:4 " in result.output and "agent_demo.jsonl:4 · turn 2 view" in result.output
    assert "agent_demo.jsonl:5" not in result.output and "Weather in Paris and the time in Tokyo?" in result.output
    result = CliRunner().invoke(app, [*args, "--kind", "wings"])
    assert result.exit_code == 1 and "use one of tools, tool_calls" in result.output


R1_LIKE = ("{%- for m in messages -%}{%- if m['role'] == 'assistant' -%}"
           "{{- '<|im_start|>assistant\\n' ~ m['content'].split('</think>')[-1] ~ '<|im_end|>\\n' -}}"
           "{%- else -%}{{- '<|im_start|>' ~ m['role'] ~ '\\n' ~ m['content'] ~ '<|im_end|>\\n' -}}{%- endif -%}"
           "{%- endfor -%}{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")


def test_a_template_that_strips_reasoning_is_an_error_not_a_silent_loss(tokenizer, tmp_path):
    path = tmp_path / "r1_like.jinja"
    path.write_text(R1_LIKE)  # like DeepSeek-R1's own template: `content.split('</think>')[-1]` on every turn
    conversation = from_openai(RawRow({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "The answer.", "reasoning_content": "long reasoning here"}]}, "r1:1"),
        FormatOptions())
    with pytest.raises(DataError, match=r"r1:1: template 'r1_like.jinja' does not write turn 1's reasoning") as error:
        get_template(str(path), tokenizer).render(conversation)
    assert error.value.reason == "reasoning_not_rendered"


def test_train_reasoning_false_masks_a_reasoning_that_also_spells_its_tag(tokenizer):
    conversation = from_openai(RawRow({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "The answer.", "reasoning_content": "think"}]}, "t:1"), FormatOptions())
    row = get_template("chatml", tokenizer).render(conversation, train_reasoning=False)
    (start, end), = row.trained_spans
    assert row.text[start:end] == "The answer.<|im_end|>"


def test_a_row_of_one_sequence_adds_no_view_cost(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n\nHello"}]}]
    _, data = _prepare(tiny_model_dir, tmp_path, "chatml", data=_write(tmp_path, rows))
    assert len(data.train) == 1 and data.report["total"]["turn_views"]["turn_view_sequences"] == 0
    assert data.report["total"]["turn_views"]["rows_with_turn_views"] == 0
