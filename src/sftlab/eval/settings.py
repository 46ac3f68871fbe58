"""The settings of `sftlab eval`: defaults and meanings in one place (the CLI's --help reads them)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, field_validator

from sftlab.eval.errors import EvalError
from sftlab.settings import Settings


class EvalSettings(Settings):
    """What `sftlab eval` measures and how; every field is a command-line option."""

    error: ClassVar = EvalError

    base: str | None = Field(None, description="base model to compare with; default: the run's base_model")
    data: Path | None = Field(None, description="held-out Alpaca .json/.jsonl; default: the run's validation data")
    suite: Path | None = Field(None, description="instruction-following suite JSONL; default: the built-in one")
    corpus: Path | None = Field(None, description="general text for forgetting: .txt (split at blank lines) or .jsonl "
                                                  "with a 'text' field; default: text sampled from the base model")
    lm_eval: str | None = Field(None, description="comma-separated lm-eval tasks, e.g. sftlab_mini_qa (local) or "
                                                  "hellaswag,arc_challenge (network)")
    lm_eval_include: list[Path] = Field(default_factory=list, description="a folder of lm-eval task YAMLs (repeatable)")
    lm_eval_limit: int | float | None = Field(None, gt=0, description="examples per lm-eval task (default: all)")
    lm_eval_fewshot: int | None = Field(None, ge=0, description="few-shot examples (default: the task's)")
    lm_eval_base: bool = Field(True, description="also run the lm-eval tasks on the base model")
    tool_calls: Path | None = Field(None, description="held-out agent rows (.jsonl, OpenAI format with tools): tool "
                                                      "calling scored on each row's last assistant turn")
    output: Path | None = Field(None, description="report folder; default RUN_DIR/eval")
    limit: int | None = Field(60, description="suite prompts to run (0 = skip instruction following; None = all)")
    max_new_tokens: int = Field(128, ge=1, description="longest generated response")
    batch_size: int = Field(8, ge=1, description="examples per forward/generation batch")
    side_by_side: int = Field(5, ge=0, description="held-out prompts answered by both models")
    forgetting_threshold: float = Field(0.10, description="flag forgetting when general-text perplexity rises by "
                                                                "more than this share (0.10 = +10%)")
    corpus_samples: int = Field(8, ge=0, description="texts to sample from the base model when no --corpus (0 = skip)")
    corpus_tokens: int = Field(96, ge=1, description="tokens per sampled text")
    block_size: int = Field(256, ge=8, description="tokens per chunk of general text")
    max_corpus_chunks: int | None = Field(64, ge=1, description="most chunks of general text to score")
    seed: int = Field(0, description="seed for sampling the forgetting corpus and lm-eval")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda")
    cache: bool = Field(True, description="reuse the base model's generated text from an earlier eval with the same "
                                          "base model files, prompts and settings ($SFTLAB_HOME/cache/memo)")

    @field_validator("limit")
    @classmethod
    def _limit(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise EvalError(f"--limit {value}: give 0 (skip), a positive number, or --full-suite")
        return value

    @field_validator("lm_eval", mode="before")
    @classmethod
    def _tasks(cls, value):
        if isinstance(value, (list, tuple)):
            value = ",".join(value)
        return value or None

    def as_report(self) -> dict:
        """The settings as the report records them."""
        return {k: (str(v) if isinstance(v, Path) else [str(x) for x in v] if k == "lm_eval_include" else v)
                for k, v in self.model_dump().items()}
