"""`sftlab export`: the exported folder loads in plain transformers with the run's logits, its
chat template renders the training prompt's token ids, every end token stops generation, and
the GGUF file reads back through transformers with the same model and tokenizer."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftlab.config import load_config
from sftlab.data.formats import FORMATS, Conversation, Message, detect_format
from sftlab.data.prepare import _format_options
from sftlab.data.readers import DataError, read_rows
from sftlab.data.templates import get_template, render_jinja
from sftlab.export import ExportError, export
from sftlab.gguf_export import GGUFExportError, OLLAMA_TEMPLATES, write_gguf
from sftlab.train.loop import train

FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")
TEXT = "Hello there, how are you? Name three primary colours."
CONVERSATIONS = [
    [Message("user", "Name a colour.")],
    [Message("system", "Answer in one word."), Message("user", "Name a colour.")],
    [Message("user", "Name a colour."), Message("assistant", "Red."), Message("user", "Another one?")],
    [Message("system", "Be brief."), Message("user", "Hi"), Message("assistant", "Hello."), Message("user", "Bye")],
]


def _run(tiny_model_dir, folder: Path, *extra) -> Path:
    train(load_config(overrides=[
        f"model={tiny_model_dir}", f"data={FIXTURES / 'tiny_train.json'}", f"eval_data={FIXTURES / 'tiny_eval.json'}",
        f"output_dir={folder}", "max_steps=2", "max_length=128", "batch_size=4", "learning_rate=1e-2",
        "warmup_ratio=0", *extra,
    ]))
    return folder


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(TEXT)["input_ids"]])).logits


def _training_prompt_ids(template, tokenizer, messages) -> list[int]:
    prompt = template.render_prompt(Conversation(tuple(messages) + (Message("assistant", ""),)))
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _chat_template_ids(tokenizer, messages) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


@pytest.fixture(scope="module")
def full_chatml(tiny_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    run = _run(tiny_model_dir, tmp_path_factory.mktemp("full") / "run", "template=chatml")
    out = run.parent / "out"
    export(run, out, say=lambda text: None)
    return run, out


def test_a_full_export_loads_in_plain_transformers_and_prompts_as_training_did(full_chatml, tokenizer):
    run, out = full_chatml
    trained = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(_logits(trained, tokenizer), _logits(exported, tokenizer), atol=1e-4)
    exported_tokenizer = AutoTokenizer.from_pretrained(out)
    template = get_template("chatml", tokenizer)
    for messages in CONVERSATIONS:
        assert _chat_template_ids(exported_tokenizer, messages) == _training_prompt_ids(template, tokenizer, messages)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    info = json.loads((out / "sftlab.json").read_text())
    assert info["method"] == "full" and info["template"] == "chatml"
    card = (out / "README.md").read_text()
    assert "tiny_train.json" in card and "chatml" in card and "## Run config" in card


def test_serve_chat_and_generate_take_the_exported_folder(full_chatml):
    from sftlab.infer.engine import InferenceModel
    from sftlab.infer.generate import Generator

    _, out = full_chatml
    inference = InferenceModel.load(str(out))
    try:
        assert inference.template_name == "chatml"
    finally:
        inference.engine.close()
    answers = Generator.load(str(out), device=CPU).generate([("Name a colour.", "")], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


@pytest.mark.slow
def test_the_gguf_reads_back_through_transformers_with_the_same_model_and_tokenizer(full_chatml, tokenizer):
    _, out = full_chatml
    gguf_file = write_gguf(out, "f32", say=lambda text: None).name
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf_file).eval()
    assert torch.allclose(_logits(exported, tokenizer), _logits(from_gguf, tokenizer), atol=1e-4)
    gguf_tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf_file)
    text = "Hello <|im_start|>user ünïcödé 123\n\n### Response:"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    import gguf

    fields = gguf.GGUFReader(out / gguf_file).fields
    template = bytes(fields["tokenizer.chat_template"].parts[-1]).decode()
    assert template == get_template("chatml", tokenizer).jinja


@pytest.mark.slow
def test_q8_0_stays_close_to_the_exported_model(full_chatml, tokenizer):
    _, out = full_chatml
    path = write_gguf(out, "q8_0", say=lambda text: None)
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    quantized = AutoModelForCausalLM.from_pretrained(out, gguf_file=path.name).eval()
    a, b = _logits(exported, tokenizer), _logits(quantized, tokenizer)
    cosine = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
    assert cosine > 0.999 and (a - b).abs().max() < 0.1
    full = write_gguf(out, "f32", say=lambda text: None)
    assert path.stat().st_size < full.stat().st_size / 2  # 8.5 bits a weight, not 32 (+ the vocabulary)


@pytest.mark.slow
def test_a_lora_export_is_the_base_plus_adapter_merged(tiny_model_dir, tmp_path, tokenizer):
    from peft import PeftModel

    run = _run(tiny_model_dir, tmp_path / "run", "method=lora", "template=alpaca")
    export(run, tmp_path / "out", dtype="fp32", say=lambda text: None)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    adapted = PeftModel.from_pretrained(base, run / "final").eval()  # not merged
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert not any("lora" in name for name, _ in exported.named_parameters())
    assert torch.allclose(_logits(adapted, tokenizer), _logits(exported, tokenizer), atol=1e-4)
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    template = get_template("alpaca", tokenizer)
    for messages in CONVERSATIONS:
        assert _chat_template_ids(exported_tokenizer, messages) == _training_prompt_ids(template, tokenizer, messages)


@pytest.mark.slow
def test_a_tokenizer_template_run_exports_its_own_chat_template(tiny_model_dir, tmp_path, tokenizer):
    run = _run(tiny_model_dir, tmp_path / "run", "template=tokenizer")
    export(run, tmp_path / "out", dtype="bf16", say=lambda text: None)
    exported_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    template = get_template("tokenizer", tokenizer)
    for messages in CONVERSATIONS:
        assert _chat_template_ids(exported_tokenizer, messages) == _training_prompt_ids(template, tokenizer, messages)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert next(exported.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["alpaca", "chatml"])
def test_the_builtin_templates_jinja_renders_every_fixture_exactly(name, tokenizer):
    template = get_template(name, tokenizer)
    conversations = []
    for path in sorted((FIXTURES / "formats").iterdir()):
        if path.suffix not in (".json", ".jsonl", ".csv") or path.stem in ("invalid_utf8", "truncated", "text"):
            continue
        config = load_config(overrides=[f"data={path}"])
        options, fmt = _format_options(config, config.data[0]), None
        for row in read_rows(path):
            try:
                fmt = fmt or detect_format(row, options)
                conversations.append(FORMATS[fmt](row, options))
            except DataError:  # the fixtures' malformed rows
                continue
    conversations += [Conversation(tuple(m)) for m in CONVERSATIONS]
    conversations.append(Conversation((Message("user", "Sum these."), Message("input", "1, 2"), Message("assistant", "3"))))
    assert len(conversations) > 10
    for conversation in conversations:
        for messages, generation in ((conversation.messages, False), (conversation.prompt_messages(), True)):
            assert render_jinja(template.jinja, template.jinja_messages(messages), generation, conversation.tools,
                                eos_token=template.eos_token) == template.render_messages(messages, generation,
                                                                                          conversation.tools)
        template.check_jinja(conversation)


def test_clear_errors(tmp_path, full_chatml):
    run, _ = full_chatml
    with pytest.raises(ExportError, match="no such run"):
        export(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no final checkpoint"):
        export(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ExportError, match="--gguf"):
        export(run, tmp_path / "o", ollama=True)
    with pytest.raises(ExportError, match="--dtype"):
        export(run, tmp_path / "o", dtype="fp8")
    with pytest.raises(GGUFExportError, match="q2_k"):
        export(run, tmp_path / "o", gguf="q2_k")
    with pytest.raises(ExportError, match="over the run"):
        export(run, run / "final" / "x")


def test_an_architecture_without_a_gguf_layout_is_named(tmp_path, tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(GGUFExportError, match="Qwen2ForCausalLM"):
        write_gguf(tmp_path, "f16", say=lambda text: None)


# -- the Ollama Modelfile: its Go template renders the training prompt ---------------------------

def _go_render(template: str, messages: list[dict]) -> str:
    """Go text/template, the subset the Modelfiles use: {{- ... -}} trimming, range .Messages,
    if / else if / else with eq, variables ($x := and $x =), and .Role, .Content, $x output."""
    tokens = re.split(r"({{-?.*?-?}})", template)
    items = []  # ("text", str) | ("action", str)
    for i, token in enumerate(tokens):
        if token.startswith("{{"):
            items.append(("action", token[2:-2].strip("-").strip()))
            continue
        if i > 0 and tokens[i - 1].endswith("-}}"):
            token = token.lstrip()
        if i + 1 < len(tokens) and tokens[i + 1].startswith("{{-"):
            token = token.rstrip()
        items.append(("text", token))

    def parse(at: int, stops: tuple) -> tuple[list, int]:
        nodes = []
        while at < len(items):
            kind, body = items[at]
            word = body.split()[0] if kind == "action" and body else ""
            if kind == "action" and (word in stops or body.startswith("else")):
                return nodes, at
            if kind == "text":
                nodes.append(("text", body))
            elif word == "range":
                inner, at = parse(at + 1, ("end",))
                nodes.append(("range", inner))
            elif word == "if":
                branches, condition = [], body[3:]
                while True:
                    inner, at = parse(at + 1, ("end",))
                    branches.append((condition, inner))
                    stop = items[at][1]
                    if stop == "end":
                        break
                    condition = stop[len("else if "):] if stop.startswith("else if") else None
                nodes.append(("if", branches))
            elif re.match(r"^\$\w+\s*:?=", body):
                name, expr = re.split(r"\s*:?=\s*", body, maxsplit=1)
                nodes.append(("set", (name, expr)))
            else:
                nodes.append(("print", body))
            at += 1
        return nodes, at

    def value(expr: str, scope: dict):
        expr = expr.strip()
        if expr.startswith('"'):
            return expr[1:-1]
        if expr.startswith("$"):
            return scope["vars"][expr]
        return scope["item"][expr[1:].lower()]

    def true(condition: str, scope: dict) -> bool:
        if condition.startswith("eq "):
            left, right = condition[3:].split(None, 1)
            return value(left, scope) == value(right, scope)
        return bool(value(condition, scope))

    def run(nodes: list, scope: dict, out: list) -> None:
        for kind, body in nodes:
            if kind == "text":
                out.append(body)
            elif kind == "print":
                out.append(value(body, scope))
            elif kind == "set":
                scope["vars"][body[0]] = value(body[1], scope)
            elif kind == "range":
                for item in messages:
                    run(body, {**scope, "item": item}, out)
            elif kind == "if":
                for condition, inner in body:
                    if condition is None or true(condition, scope):
                        run(inner, scope, out)
                        break

    nodes, _ = parse(0, ())
    out: list = []
    run(nodes, {"vars": {}, "item": None}, out)
    return "".join(out)


@pytest.mark.parametrize("name", ["alpaca", "chatml"])
def test_the_modelfile_template_renders_the_training_prompt(name, tokenizer):
    from sftlab.gguf_export import ollama_template

    template = get_template(name, tokenizer)
    go = ollama_template(template, tokenizer.eos_token)
    assert "{{ EOS }}" not in go and set(OLLAMA_TEMPLATES) >= {name}
    for messages in CONVERSATIONS:
        dicts = [{"role": m.role, "content": m.content} for m in messages]
        assert _go_render(go, dicts) == template.render_prompt(Conversation(tuple(messages) + (Message("assistant", ""),)))


@pytest.mark.slow
def test_the_export_command(full_chatml, tmp_path):
    run, _ = full_chatml
    result = subprocess.run([sys.executable, "-m", "sftlab", "export", str(run), "-o", str(tmp_path / "cli"),
                             "--gguf", "q8_0", "--ollama"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "cli" / "Modelfile").read_text().startswith("FROM ./cli-q8_0.gguf")
    assert "exported" in result.stdout and "ollama create" in result.stdout


@pytest.mark.slow
def test_gemma3_layout_reads_back_with_the_same_logits(tmp_path, tokenizer):
    """Gemma 3's GGUF layout (norms stored as 1 + w, no q/k permutation, key/value lengths,
    sliding window) on a tiny Gemma 3 with SmolLM2's small tokenizer, so the file stays small;
    the real Gemma tokenizer (SentencePiece-style, 262k tokens) reads back identically too, but
    takes minutes in transformers' GGUF reader."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                              query_pre_attn_scalar=256, sliding_window=512, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["Gemma3ForCausalLM"]
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():  # norms away from their zero init, so a missing +1 / -1 would show
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0, 0.5)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    path = write_gguf(tmp_path, "f32", say=lambda text: None)
    from_gguf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    assert torch.allclose(_logits(model.eval(), tokenizer), _logits(from_gguf, tokenizer), atol=1e-4)


@pytest.mark.slow
def test_a_gemma3_lora_export_is_the_base_plus_adapter_merged(tmp_path, tokenizer):
    """The merge on Gemma 3 (its own attention and norm modules), a tiny one on SmolLM2's tokenizer."""
    from peft import PeftModel
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    config.architectures = ["Gemma3ForCausalLM"]
    base_dir = tmp_path / "tiny-gemma3"
    Gemma3ForCausalLM(config).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    run = _run(base_dir, tmp_path / "run", "method=lora", "template=alpaca")
    export(run, tmp_path / "out", say=lambda text: None)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), run / "final").eval()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(exported).__name__ == "Gemma3ForCausalLM"
    assert torch.allclose(_logits(adapted, tokenizer), _logits(exported, tokenizer), atol=1e-4)
