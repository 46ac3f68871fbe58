"""The run config: one YAML file per run, every default in one place.

    model: smollm2-135m-instruct
    data: [examples/data/alpaca_demo.json]
    method: lora

Every key has a default and a one-line meaning (``sftlab config`` prints them all);
``--set a.b=c`` overrides any key; unknown keys are an error that suggests the closest
valid key. Relative data paths in a YAML file are resolved against that file's folder;
paths given with ``--set`` and ``output_dir`` are relative to the working directory.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sftlab.errors import SftlabError

# SFT uses small learning rates so the model keeps what it learned in pre-training
# (Alpaca: 2e-5 for full fine-tuning; LoRA's adapters start at zero and need ~10x more).
DEFAULT_LR = {"full": 2e-5, "lora": 2e-4}


class ConfigError(SftlabError, ValueError):
    """A config file or override that cannot be used; the message says what to change."""


MAX_YAML_BYTES = 1 << 20  # a run config is a few kB; anything near this is not one
MAX_YAML_NODES = 100_000  # values after aliases are expanded (a 436-byte "billion laughs" is billions)
MAX_SHOWN_VALUE = 200  # characters of an offending value quoted in an error


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a document whose aliases expand past MAX_YAML_NODES values."""

    def compose_document(self):
        node = super().compose_document()
        sizes: dict[int, int] = {}

        def size(n) -> int:  # values once aliases are expanded, memoized per node (aliases share nodes)
            if id(n) in sizes:
                return sizes[id(n)]
            sizes[id(n)] = 1  # a node that refers to itself counts once
            if isinstance(n, yaml.SequenceNode):
                total = 1 + sum(size(c) for c in n.value)
            elif isinstance(n, yaml.MappingNode):
                total = 1 + sum(size(k) + size(v) for k, v in n.value)
            else:
                total = 1
            sizes[id(n)] = min(total, MAX_YAML_NODES + 1)
            return sizes[id(n)]

        if node is not None and size(node) > MAX_YAML_NODES:
            raise yaml.YAMLError(f"its aliases expand to more than {MAX_YAML_NODES:,} values")
        return node


def load_yaml(text: str, where: str):
    """YAML text -> data, the one way sftlab reads YAML it is given: safe types only, at most
    MAX_YAML_BYTES and MAX_YAML_NODES values after aliases; ConfigError (short) otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise ConfigError(f"{where}: {len(text):,} characters of YAML, over the {MAX_YAML_BYTES:,} a config may have")
    try:
        return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass
    except (yaml.YAMLError, RecursionError) as exc:
        raise ConfigError(f"{where}: not valid YAML: {_shorten(str(exc), 4 * MAX_SHOWN_VALUE)}") from None


def _shorten(text: str, limit: int = MAX_SHOWN_VALUE) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FORMAT_NAMES = Literal["auto", "alpaca", "dolly", "openorca", "sharegpt", "openai", "prompt_completion", "text"]


class DataSource(_Strict):
    path: str = Field(
        description="a .json/.jsonl/.csv/.parquet file (optionally .gz/.zst), a datasets folder, or hf:owner/name"
    )
    format: FORMAT_NAMES = Field("auto", description="row format; auto detects it from the fields of the first row")
    fields: dict[str, str] = Field(
        default_factory=dict, description="field map, e.g. {instruction: question, output: answer}"
    )
    split: str = Field("train", description="split of a Hugging Face dataset")
    weight: float = Field(1.0, gt=0, description="sampling weight in a mix: 0.5 takes half the rows, 2 repeats them")
    max_rows: int | None = Field(None, gt=0, description="cap on rows taken from this source (a seeded sample)")


class LoraSettings(_Strict):
    r: int = Field(16, gt=0, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input (peft refuses it on MoE experts; "
                           "with dropout > 0, N processes draw other masks than 1)")
    target_modules: str | list[str] = Field(
        "all-linear", description="module names to adapt; 'all-linear' = every linear layer but the output head"
    )


class RunConfig(_Strict):
    model: str = Field(
        "smollm2-135m-instruct",
        description="registry name (sftlab models list), local Hugging Face folder, or hub id",
    )
    data: list[DataSource] = Field(
        default_factory=lambda: [DataSource(path="examples/data/alpaca_demo.json")],
        description="training files: a list of {path, format} or plain paths",
    )
    eval_data: list[DataSource] = Field(
        default_factory=list, description="held-out files for the validation loss (optional)"
    )
    val_fraction: float = Field(
        0.0, ge=0, lt=1, description="share of training rows held out for validation when eval_data is empty"
    )
    template: str = Field(
        "alpaca", description="prompt template: alpaca, chatml, tokenizer (the model's own), or a .jinja file"
    )
    template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="variables for a Jinja chat template (template: tokenizer or a .jinja file) at training, "
        "inference, serving and export alike, e.g. {enable_thinking: false}",
    )
    train_on: Literal["assistant", "last", "all"] = Field(
        "assistant", description="which tokens carry loss: every trained assistant turn (weight 1), the last one, or "
        "all tokens"
    )
    special_tokens_in_content: Literal["text", "allow", "drop_row"] = Field(
        "text", description="text in messages that spells a control token (<|im_end|>, ...): 'text' tokenizes it as "
        "text, 'allow' as the control token, 'drop_row' drops the row; the data report counts such rows"
    )
    tool_parser: Literal["auto", "hermes", "mistral", "llama3", "none"] = Field(
        "auto", description="how serve, chat and eval read tool calls back from the model's output; auto = from the "
        "template (chatml and <tool_call> templates: hermes, [TOOL_CALLS]: mistral, Llama-3 JSON: llama3)"
    )
    train_reasoning: bool = Field(
        True, description="train the reasoning of trained assistant turns; false keeps it in the text as masked context"
    )
    train_empty_think: bool = Field(
        False, description="train the empty think block a template writes for a turn without reasoning (false: "
        "masked and counted in the data report; training it teaches the model to skip thinking)"
    )
    drop_leading_assistant: bool = Field(False, description="repair: drop assistant turns before the first user turn")
    merge_consecutive_roles: bool = Field(False, description="repair: join consecutive turns of the same role")
    drop_trailing_user: bool = Field(False, description="repair: drop unanswered user turns at the end")
    drop_duplicates: bool = Field(False, description="drop exact duplicate conversations (always counted)")
    cache: bool = Field(True, description="reuse tokenized data keyed by data, tokenizer, template and max_length")
    num_proc: int | Literal["auto"] = Field(
        "auto", description="processes that render and tokenize while preparing big data (auto = the CPU count; "
        "workers start after the first 20,000 rows)",
    )
    max_length: int = Field(512, gt=8, description="longest example in tokens; longer ones are truncated")
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="malformed rows: 'raise' stops with the location, 'skip' drops and counts them"
    )
    method: Literal["full", "lora"] = Field("full", description="full fine-tune or LoRA adapters (peft)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="compute precision: bf16/fp16 mixed precision (fp32 master weights, fp32 loss), fp32; "
        "auto = bf16 where the hardware multiplies it natively (CUDA with bf16, a CPU with AMX or AVX512-BF16), "
        "else fp32"
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="LoRA settings (method: lora)")
    learning_rate: float | None = Field(
        None, gt=0, description="peak learning rate; default 2e-5 (full) or 2e-4 (lora)"
    )
    num_epochs: float = Field(3, gt=0, description="passes over the training data (SFT: 1-3)")
    max_steps: int | None = Field(None, gt=0, description="optimizer steps; when set, overrides num_epochs")
    batch_size: int = Field(8, gt=0, description="examples per micro-batch")
    gradient_accumulation_steps: int = Field(1, gt=0, description="micro-batches per optimizer step")
    micro_batch_tokens: Literal["auto"] | int = Field(
        "auto",
        description="most padded tokens in one forward/backward: a micro-batch above it runs in pieces "
        "(same loss and gradients, less memory); auto = from the model size, max_length and free memory",
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="share of steps with linear warm-up")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate schedule after warm-up"
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to norms and biases)")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables clipping")
    group_by_length: bool = Field(True, description="batch examples of similar length to waste less padding")
    packing: bool = Field(
        False, description="pack examples into rows of max_length tokens (no padding); batch_size then counts rows"
    )
    gradient_checkpointing: Literal["auto"] | bool = Field(
        "auto",
        description="recompute activations in backward: less memory, slower; auto = on where the recompute adds "
        "under 15% to a step (large-vocabulary models) or one max_length row would not fit",
    )
    compile: bool = Field(False, description="torch.compile the model's decoder (dynamic shapes)")
    loss_impl: Literal["fused", "chunked", "model"] = Field(
        "fused",
        description="output layer + loss: fused (gradients computed in forward, no recompute), chunked "
        "(logits recomputed in backward: least memory), or model (the model's own head and full logits: slowest, "
        "for a head sftlab does not reproduce); a start-up check compares it with the model's own forward",
    )
    fused_optimizer: bool = Field(True, description="use PyTorch's fused AdamW kernel (CPU and CUDA)")
    embedding_grad_in_place: bool = Field(
        True,
        description="full fine-tune: the input embedding's backward adds its rows straight into weight.grad "
        "(no dense vocabulary x hidden buffer per micro-batch); off under compile",
    )
    loss_chunk_size: int = Field(
        0, ge=0, description="trained positions per chunk of the output layer + loss; 0 = auto (~64M logits a chunk)"
    )
    seed: int = Field(42, description="seed for data order, initialisation and dropout")
    output_dir: str = Field("runs/default", description="run directory: checkpoints, metrics, reports")
    logging_steps: int = Field(1, gt=0, description="print a progress line every N steps (metrics.jsonl logs every step)")
    save_steps: int = Field(0, ge=0, description="save a resumable checkpoint every N steps; 0 = only the final model")
    keep_last_checkpoints: int = Field(
        2, ge=1, description="how many resumable checkpoints to keep (older ones are removed); alias save_total_limit"
    )
    eval_steps: int = Field(0, ge=0, description="validation loss every N steps; 0 = only before and after training")
    save_best: bool = Field(True, description="keep the model with the lowest validation loss in OUTPUT_DIR/best")
    early_stopping_patience: int = Field(
        0, ge=0, description="stop after N validations without improvement (needs eval_steps); 0 = never"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where to train; auto picks CUDA when present")
    parallelism: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="under torchrun: DDP (replicas) or FSDP2 (sharded); auto = DDP when weights, gradients and "
        "optimizer state fit in half of one device, FSDP2 otherwise",
    )
    fsdp_cpu_offload: bool = Field(
        False, description="FSDP2 on CUDA: keep sharded parameters, gradients and optimizer state in CPU memory"
    )
    on_nan: Literal["error", "skip"] = Field(
        "error", description="a NaN/Inf loss or gradient: stop naming the step and its rows, or skip the step and count it"
    )

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, value: Any) -> Any:
        if isinstance(value, dict) and "save_total_limit" in value:  # the Hugging Face Trainer's name
            value = dict(value)
            value.setdefault("keep_last_checkpoints", value.pop("save_total_limit"))
        return value

    @field_validator("data", "eval_data", mode="before")
    @classmethod
    def _plain_paths(cls, value: Any) -> Any:
        if value is None:  # `eval_data: null` (or `data: null`, refused below): no files
            return []
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value

    @field_validator("num_proc")
    @classmethod
    def _positive_processes(cls, value: Any) -> Any:
        if value != "auto" and value < 1:
            raise ValueError("give a number of processes >= 1, or auto")
        return value

    @field_validator("micro_batch_tokens")
    @classmethod
    def _positive_budget(cls, value: Any) -> Any:
        if value != "auto" and value <= 0:
            raise ValueError("give a number of tokens > 0, or auto")
        return value

    @model_validator(mode="after")
    def _check(self) -> "RunConfig":
        if not self.data:
            raise ValueError("data: give at least one training file")
        return self

    @property
    def resolved_learning_rate(self) -> float:
        return self.learning_rate if self.learning_rate is not None else DEFAULT_LR[self.method]


REQUIRED = "(required)"


def describe_keys(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[tuple[str, Any, str]]:
    """(key, default, meaning) for every key, nested keys dotted — for `sftlab config` and docs.

    A key with no default (a data source's `path`) has the default REQUIRED.
    """
    rows = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            rows += describe_keys(annotation, prefix + name + ".")
            continue
        default = REQUIRED if field.is_required() else field.get_default(call_default_factory=True)
        if isinstance(default, list):
            default = [d.model_dump() if isinstance(d, BaseModel) else d for d in default]
        rows.append((prefix + name, default, field.description or ""))
        if model is RunConfig and name == "data":
            rows += describe_keys(DataSource, "data[].")
    return rows


KEY_ALIASES = {"save_total_limit": "keep_last_checkpoints"}


def _check_unknown_keys(raw: dict, model: type[BaseModel], where: str, prefix: str = "") -> None:
    for key, value in raw.items():
        if model is RunConfig and key in KEY_ALIASES:
            continue
        if key not in model.model_fields:
            valid = list(model.model_fields)
            close = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.5) or [
                v for v in valid if str(key).startswith(v) or v.startswith(str(key))
            ]
            hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
            raise ConfigError(
                f"{where}: unknown config key '{prefix}{key}'.{hint} "
                f"Valid keys here: {', '.join(prefix + v for v in valid)}."
            )
        annotation = model.model_fields[key].annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            _check_unknown_keys(value, annotation, where, prefix + key + ".")
        if model is RunConfig and key in ("data", "eval_data") and isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, dict):
                    _check_unknown_keys(item, DataSource, where, f"{key}[{index}].")


def parse_override(text: str) -> tuple[list[str], Any]:
    """'lora.r=8' -> (['lora', 'r'], 8). The value is read as YAML, so numbers, lists and null work."""
    if "=" not in text:
        raise ConfigError(f"--set '{text}': expected KEY=VALUE, e.g. --set learning_rate=1e-4")
    key, value = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set '{text}': the key is empty")
    try:
        parsed = load_yaml(value, f"--set {key.strip()}") if value.strip() else ""
    except ConfigError:
        parsed = value
    # YAML 1.1 reads 2e-5 as a string; a learning rate is meant
    if isinstance(parsed, str):
        try:
            parsed = float(parsed) if any(c in parsed for c in "eE.") else parsed
        except ValueError:
            pass
    return key.strip().split("."), parsed


def _resolve_data_paths(raw: dict, base: Path) -> None:
    template = raw.get("template")
    if isinstance(template, str) and template.endswith((".jinja", ".j2")) and not Path(template).is_absolute():
        raw["template"] = str(base / template)
    for key in ("data", "eval_data"):
        value = raw.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        resolved = []
        for item in items:
            entry = {"path": item} if isinstance(item, str) else dict(item) if isinstance(item, dict) else item
            if isinstance(entry, dict) and isinstance(entry.get("path"), str) and not entry["path"].startswith("hf:"):
                path = Path(entry["path"]).expanduser()
                if not path.is_absolute():
                    entry["path"] = str(base / path)
            resolved.append(entry)
        raw[key] = resolved


def _format_validation_error(error: ValidationError, where: str) -> str:
    lines = [f"{where}: invalid config"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"  {key}: {item['msg']} (got {_shorten(repr(item.get('input')))})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a run config from YAML (or defaults when path is None) and apply KEY=VALUE overrides."""
    if path is None:
        return config_from_yaml("", "config", Path.cwd(), overrides)
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    return config_from_yaml(path.read_text(), str(path), path.parent.resolve(), overrides)


def config_from_yaml(text: str, where: str, base: Path, overrides: list[str] | None = None) -> RunConfig:
    """A run config from YAML text; `where` names it in errors, relative data paths are under `base`."""
    raw = load_yaml(text, where) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of config keys, found {type(raw).__name__}")
    _check_unknown_keys(raw, RunConfig, where)
    _resolve_data_paths(raw, base)  # absolute: the saved config reloads from anywhere
    for override in overrides or []:
        keys, value = parse_override(override)
        _check_unknown_keys(_nest(keys, value), RunConfig, f"--set {override}")
        node = raw
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {override}: '{key}' is not a group of keys")
        node[keys[-1]] = value
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, where)) from None


def _nest(keys: list[str], value: Any) -> dict:
    out: Any = value
    for key in reversed(keys):
        out = {key: out}
    return out


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every key, defaults included) as YAML."""
    data = config.model_dump(mode="json")
    data["learning_rate"] = config.resolved_learning_rate
    Path(path).write_text(yaml.safe_dump(data, sort_keys=False))
