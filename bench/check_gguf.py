"""Does llama.cpp itself run the exported GGUF like transformers runs the exported folder?

Two steps, two environments (`make check-gguf` runs both):

    .venv/bin/python bench/check_gguf.py hf runs/demo-export > answers.json
        # transformers on the Hugging Face folder: prompts (the chat template), their token ids,
        # greedy answers
    .venv-llamacpp/bin/python bench/check_gguf.py llama runs/demo-export answers.json
        # llama-cpp-python on every DIR/*.gguf: the same prompt tokenized by llama.cpp, greedy
        # answers compared token by token; an f32/f16/bf16 file must match (exit 1 otherwise)

Greedy decoding of a quantized file (q8_0) may part from fp32 where two candidates are nearly
tied: the report gives the length of the common prefix of every answer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = [
    "Which planet is famous for its large, bright rings?",
    "Name three primary colours.",
    "Put these months in calendar order: October, March, July, January",
    "Write one sentence about the sea.",
]
NEW_TOKENS = 32


def hf(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    stop = model.generation_config.eos_token_id
    rows = []
    for prompt in PROMPTS:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop)
        rows.append({"prompt": text, "prompt_ids": ids, "answer_ids": out[0, len(ids):].tolist(),
                     "answer": tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)})
    json.dump({"stop": stop if isinstance(stop, list) else [stop], "rows": rows}, sys.stdout, indent=1)


def llama(folder: Path, answers: Path) -> int:
    """Every GGUF in the folder: an f32/f16/bf16 file must give transformers' answers token for
    token (exit 1 otherwise); a quantized one is reported (the common prefix of each answer)."""
    from llama_cpp import Llama

    expected = json.loads(answers.read_text())
    failures = 0
    for path in sorted(folder.glob("*.gguf")):
        exact = path.stem.rsplit("-", 1)[-1] in ("f32", "f16", "bf16")
        model = Llama(model_path=str(path), n_ctx=512, verbose=False, seed=0)
        same = 0
        for row in expected["rows"]:
            ids = model.tokenize(row["prompt"].encode(), add_bos=False, special=True)
            same_prompt = ids == row["prompt_ids"]
            got = []
            for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
                if token in expected["stop"] or len(got) >= NEW_TOKENS:
                    if token in expected["stop"]:
                        got.append(token)
                    break
                got.append(token)
            want = row["answer_ids"]
            common = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
            ok = same_prompt and common == len(want) == len(got)
            same += ok
            print(f"{path.name}: {'OK  ' if ok else 'DIFF'} prompt ids {'equal' if same_prompt else 'DIFFER'}; "
                  f"answer tokens in common {common}/{len(want)}: {row['answer']!r}")
        print(f"{path.name}: {same}/{len(expected['rows'])} prompts give transformers' greedy answer token for token"
              + ("" if exact else " (quantized: answers may part where two tokens are nearly tied)"))
        failures += exact and same < len(expected["rows"])
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "hf":
        hf(Path(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "llama":
        sys.exit(llama(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
