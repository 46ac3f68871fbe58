"""Generate responses with the template the run trained with.

The decoding is sftlab's one engine (`sftlab.infer.engine.BatchEngine`): left-padded batches
with a KV cache, stopping at EOS and the template's end-of-turn token — the same code that
`serve`, `chat`, `eval` and the local self-instruct backend run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import get_template
from sftlab.infer.engine import InferenceModel, SamplingParams
from sftlab.models.loading import load_for_inference


@dataclass
class Generator:
    model: object
    tokenizer: object
    template_name: str
    template_kwargs: dict = field(default_factory=dict)  # the run's template_kwargs
    special_tokens: str = "text"  # the run's special_tokens_in_content

    @classmethod
    def load(cls, model_or_run: str, template: str | None = None, device: torch.device | None = None) -> "Generator":
        """A run directory uses its saved template; a plain model uses `template` (default alpaca)."""
        model, tokenizer, info = load_for_inference(model_or_run, device)
        kwargs = {} if template in ("alpaca", "chatml") else dict(info.get("template_kwargs") or {})
        return cls(model, tokenizer, template or info.get("template", "alpaca"), kwargs,
                   info.get("special_tokens_in_content", "allow" if info else "text"))

    def template(self):
        """The run's template, as training rendered with it (kwargs and special-token mode included)."""
        return get_template(self.template_name, self.tokenizer, self.template_kwargs or None, self.special_tokens)

    def prompt_text(self, instruction: str, input: str = "") -> str:
        messages = [Message("user", instruction)] + ([Message("input", input)] if input.strip() else [])
        return self.template().render_prompt(Conversation(tuple(messages)))

    def complete(self, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
                 keep: tuple[str, ...] = ()) -> list[str]:
        """Greedy continuations of prompt texts (rendered by `template()`), special tokens skipped
        but those in `keep` (a tool parser's markers); the text as generated, unstripped."""
        inference = InferenceModel.from_model(self.model, self.tokenizer, self.template_name,
                                              {"template_kwargs": self.template_kwargs,
                                               "special_tokens_in_content": self.special_tokens},
                                              max_batch_size=batch_size, batch_window_ms=0.0)
        ids = [inference.encode(p) for p in prompts]
        params = [SamplingParams(max_tokens=max_new_tokens) for _ in ids]
        with inference.engine:
            done = inference.engine.generate_all(ids, params, self.tokenizer, inference.stop_strings, keep)
        failed = next((d.error for d in done if d.error), None)
        if failed:
            raise RuntimeError(f"generation failed: {failed}")
        return [d.text for d in done]

    def generate(
        self,
        prompts: list[tuple[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        seed: int | None = None,
    ) -> list[str]:
        """Responses to (instruction, input) pairs; greedy when temperature is 0 (with a seed,
        prompt i samples with seed + i). Decoded by the engine `serve` and `chat` use, batch_size
        rows at a time, stopping at EOS and at the template's end-of-turn token."""
        inference = InferenceModel.from_model(self.model, self.tokenizer, self.template_name,
                                              {"template_kwargs": self.template_kwargs,
                                               "special_tokens_in_content": self.special_tokens},
                                              max_batch_size=batch_size, batch_window_ms=0.0)
        ids = [inference.encode(self.prompt_text(instruction, context)) for instruction, context in prompts]
        params = [SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 seed=None if seed is None else seed + i) for i in range(len(ids))]
        with inference.engine:
            done = inference.engine.generate_all(ids, params, self.tokenizer, inference.stop_strings)
        failed = next((d.error for d in done if d.error), None)
        if failed:
            raise RuntimeError(f"generation failed: {failed}")
        return [d.text.strip() for d in done]


def generate(model_or_run: str, instruction: str, input: str = "", template: str | None = None, **kwargs) -> str:
    """One response; see Generator.generate for the options."""
    return Generator.load(model_or_run, template).generate([(instruction, input)], **kwargs)[0]

