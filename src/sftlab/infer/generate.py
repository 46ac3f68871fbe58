"""Generate responses with the template the run trained with, batched with a KV cache.

Prompts are left-padded so every row's next token sits in the last column, and generation
stops at the tokenizer's EOS (the token the template trained the model to emit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sftlab.data.formats import Conversation, Message
from sftlab.data.templates import get_template
from sftlab.infer.engine import stop_tokens
from sftlab.models.loading import load_for_inference


@dataclass
class Generator:
    model: object
    tokenizer: object
    template_name: str

    @classmethod
    def load(cls, model_or_run: str, template: str | None = None, device: torch.device | None = None) -> "Generator":
        """A run directory uses its saved template; a plain model uses `template` (default alpaca)."""
        model, tokenizer, info = load_for_inference(model_or_run, device)
        return cls(model, tokenizer, template or info.get("template", "alpaca"))

    def prompt_text(self, instruction: str, input: str = "") -> str:
        messages = [Message("user", instruction)] + ([Message("input", input)] if input.strip() else [])
        return get_template(self.template_name, self.tokenizer).render_prompt(Conversation(tuple(messages)))

    @torch.no_grad()
    def generate(
        self,
        prompts: list[tuple[str, str]],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        batch_size: int = 8,
        seed: int | None = None,
    ) -> list[str]:
        """Responses to (instruction, input) pairs; greedy when temperature is 0."""
        if seed is not None:
            torch.manual_seed(seed)
        texts = [self.prompt_text(instruction, context) for instruction, context in prompts]
        device = next(self.model.parameters()).device
        tokenizer = self.tokenizer
        # stop at EOS and at the template's end-of-turn token (e.g. chatml's <|im_end|>)
        stop_ids = sorted(stop_tokens(tokenizer, self.model, get_template(self.template_name, tokenizer))[0])
        previous_side, tokenizer.padding_side = tokenizer.padding_side, "left"
        responses: list[str] = []
        try:
            for start in range(0, len(texts), batch_size):
                enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(device)
                sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0 else {"do_sample": False}
                out = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, eos_token_id=stop_ids,
                    pad_token_id=tokenizer.pad_token_id, **sampling,
                )
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                responses += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
        finally:
            tokenizer.padding_side = previous_side
        return responses


def generate(model_or_run: str, instruction: str, input: str = "", template: str | None = None, **kwargs) -> str:
    """One response; see Generator.generate for the options."""
    return Generator.load(model_or_run, template).generate([(instruction, input)], **kwargs)[0]
