"""An exported Hugging Face folder -> one GGUF file (llama.cpp, Ollama, LM Studio), and an
Ollama Modelfile that prompts the model exactly as training did.

Written with the `gguf` package: its `GGUFWriter`, its tensor-name map and its quantizers.
The Llama layout follows llama.cpp's convert_hf_to_gguf: q/k projection rows permuted to
llama.cpp's rotary layout (transformers undoes it when it reads the file), 1-D tensors kept
in f32, a tied output layer written once (as the embedding). The tokenizer goes in as a
byte-level BPE ("gpt2": vocabulary, merges, token types, special ids) with the run's
chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sftlab.errors import SftlabError

# --gguf TYPE -> (its tensor type, its file type), names in gguf's GGMLQuantizationType and LlamaFileType
KINDS = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0"), "q4_0": ("Q4_0", "MOSTLY_Q4_0"), "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
         "q5_0": ("Q5_0", "MOSTLY_Q5_0"), "q5_1": ("Q5_1", "MOSTLY_Q5_1")}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Gemma3ForCausalLM": "gemma3"}  # what this writer lays out


class GGUFExportError(SftlabError):
    """A GGUF type or architecture the exporter cannot write; the message says which are supported."""


def check_type(kind: str) -> None:
    if kind not in KINDS:
        raise GGUFExportError(f"--gguf {kind}: use one of {', '.join(KINDS)}")


def _qtype(kind: str):
    import gguf

    return getattr(gguf.GGMLQuantizationType, KINDS[kind][0])


def _file_type(kind: str):
    import gguf

    return getattr(gguf.LlamaFileType, KINDS[kind][1])


def _permute(weights: np.ndarray, heads: int, kv_heads: int | None) -> np.ndarray:
    """HF's rotary layout (halves) -> llama.cpp's (interleaved pairs), as convert_hf_to_gguf does."""
    if kv_heads is not None and heads != kv_heads:
        heads = kv_heads
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _tensors(folder: Path):
    """(name, float32 array) of every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def write_gguf(folder: str | Path, kind: str, say=print, pre: str | None = None) -> Path:
    """folder/<name>-<kind>.gguf from an exported folder (config.json, safetensors, tokenizer).

    `pre`: llama.cpp's name for the tokenizer's pre-tokenizer (its regex); by default the one the
    registry gives the run's base model (SmolLM2: "smollm"), else "default"."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    check_type(kind)
    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder)
    architecture = (config.architectures or ["?"])[0]
    arch = ARCHITECTURES.get(architecture)
    if arch is None:
        raise GGUFExportError(f"GGUF export knows {', '.join(ARCHITECTURES)} (llama.cpp's 'llama' layout); "
                              f"{folder} is a {architecture}: its tensor layout and metadata are not written yet")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    name = folder.resolve().name
    path = folder / f"{name}-{kind}.gguf"
    say(f"writing {path.name} ({arch}, {kind})")
    writer = gguf.GGUFWriter(str(path), arch)
    _metadata(writer, config, name, kind, arch)
    _tokenizer(writer, tokenizer, folder, arch, pre or _registry_pre(folder))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.GEMMA3,
                                     config.num_hidden_layers)
    qtype = _qtype(kind)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, data in _tensors(folder):
        if tied and hf_name == "lm_head.weight":
            continue  # one tensor: the embedding
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFExportError(f"{hf_name}: no GGUF name for this tensor in the {arch} layout")
        if arch == "llama" and hf_name.endswith("q_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_attention_heads)
        elif arch == "llama" and hf_name.endswith("k_proj.weight"):
            data = _permute(data, config.num_attention_heads, config.num_key_value_heads)
        elif arch == "gemma3" and hf_name.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by (1 + w); llama.cpp's by w
        _add(writer, gguf_name, data, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer, name: str, data: np.ndarray, qtype) -> None:
    """1-D tensors and rows that do not fill a quantization block stay f32 (as llama.cpp does)."""
    import gguf

    block = gguf.GGML_QUANT_SIZES[qtype][0]
    if data.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32 or data.shape[-1] % block:
        writer.add_tensor(name, data.astype(np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
        writer.add_tensor(name, data.astype(np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def _metadata(writer, config, name: str, kind: str, arch: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_file_type(_file_type(kind))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:  # gemma3: the local (sliding) layers' rope base and their pattern are llama.cpp's defaults
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        writer.add_sliding_window(config.sliding_window)


def _rope_theta(config) -> float:
    """The (global) rope base: rope_theta, or the full-attention layers' in rope_parameters."""
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        parameters = getattr(config, "rope_parameters", None) or {}
        parameters = parameters.get("full_attention", parameters)
        theta = parameters.get("rope_theta", 10000.0)
    return theta


def _registry_pre(folder: Path) -> str:
    from sftlab.models.registry import REGISTRY

    try:
        base = json.loads((folder / "sftlab.json").read_text()).get("base_model")
    except (OSError, ValueError):
        base = None
    return REGISTRY[base].gguf_pre if base in REGISTRY else "default"


def _tokenizer(writer, tokenizer, folder: Path, arch: str, pre: str = "default") -> None:
    """The tokenizer: tokens by id, their types, merges, special ids and the chat template. A
    byte-level BPE (SmolLM2) is "gpt2" in GGUF terms; a SentencePiece-style BPE with byte
    fallback (Gemma 3) is "llama", with each token's score the rank of the merge that makes it
    (the order llama.cpp merges in) and the merges themselves (what transformers reads back)."""
    import gguf

    spec = json.loads((folder / "tokenizer.json").read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise GGUFExportError(f"the tokenizer is {model.get('type')}; GGUF export writes BPE tokenizers only")
    size = max(len(tokenizer), max(model["vocab"].values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    spm = bool(model.get("byte_fallback"))
    for token, index in model["vocab"].items():
        tokens[index] = token
        is_byte = spm and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
        types[index] = gguf.TokenType.BYTE if is_byte else gguf.TokenType.NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    pairs = [m.split(" ", 1) if isinstance(m, str) else list(m) for m in model.get("merges", [])]
    merges = [" ".join(pair) for pair in pairs]
    writer.add_tokenizer_model("llama" if spm else "gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if spm:
        scores = [0.0] * size
        index_of = {t: i for i, t in enumerate(tokens)}
        seen = set()
        for rank, (left, right) in enumerate(pairs):
            merged = left + right
            if merged in index_of and merged not in seen:
                seen.add(merged)
                scores[index_of[merged]] = -float(rank + 1)
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(False)
    writer.add_token_merges(merges)
    for setter, value in ((writer.add_bos_token_id, tokenizer.bos_token_id), (writer.add_eos_token_id, tokenizer.eos_token_id),
                          (writer.add_unk_token_id, tokenizer.unk_token_id), (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if value is not None:
            setter(value)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)) or
                             (spm and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# -- Ollama ------------------------------------------------------------------------------------

OLLAMA_TEMPLATES = {
    # Go text/template: the same prompt text as the Jinja chat template, for system/user/assistant
    # messages (Ollama has no "input" role: an instruction's input goes inside the user message)
    "chatml": (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    ),
    "alpaca": (
        '{{- $system := "" }}{{- range .Messages }}{{- if eq .Role "system" }}{{- $system = .Content }}{{- end }}{{- end }}'
        "{{- if $system }}{{ $system }}{{- else }}Below is an instruction that describes a task. Write a response that "
        "appropriately completes the request.{{- end }}"
        '{{- range .Messages }}{{- if eq .Role "user" }}\n\n### Instruction:\n{{ .Content }}'
        '{{- else if eq .Role "assistant" }}\n\n### Response:\n{{ .Content }}{{ EOS }}{{- end }}{{- end }}'
        "\n\n### Response:\n"
    ),
}


def ollama_template(template, eos_token: str) -> str:
    """The Modelfile TEMPLATE for a built-in template (a Jinja `tokenizer` template has no Go twin)."""
    text = OLLAMA_TEMPLATES.get(template.name)
    if text is None:
        raise GGUFExportError(f"--ollama: the Modelfile template is written for {', '.join(OLLAMA_TEMPLATES)}; "
                              f"this run's template is '{template.name}' (use the GGUF's own chat template instead)")
    return text.replace("{{ EOS }}", eos_token)


def write_modelfile(folder: Path, gguf_path: Path, template, tokenizer, stop_ids: list[int], num_ctx: int = 2048) -> Path:
    body = ollama_template(template, tokenizer.eos_token or "")
    stops = [tokenizer.convert_ids_to_tokens(i) for i in stop_ids]
    lines = [f"FROM ./{gguf_path.name}", f'TEMPLATE """{body}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {num_ctx}", "PARAMETER temperature 0"]
    path = folder / "Modelfile"
    path.write_text("\n".join(lines) + "\n")
    return path
