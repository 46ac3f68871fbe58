"""Data preparation throughput: read -> validate -> render -> tokenize with offsets -> mask -> store.

Generates long multi-turn ShareGPT conversations (~1,600 tokens each, varied text), then times
`prepare_data` end to end with the cache off and compares with the bare fast tokenizer (batched,
with offsets) on the same rendered texts. Prints tokens/s; asserts nothing about time.

    .venv/bin/python bench/prepare_speed.py [--conversations 2000] [--template chatml]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

WORDS = ("the model learns to follow instructions from examples of prompts and responses while the loss "
         "is computed only on response tokens which keeps it from imitating user text and makes training "
         "efficient data quality matters more than quantity so we check duplicates contamination and diversity "
         "before we spend compute on a run 42 3.14 2026 numbers dates names Paris Tokyo Lagos").split()


def make_conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = []
        for _ in range(rng.randint(3, 6)):
            turns.append({"from": "human", "value": " ".join(rng.choices(WORDS, k=rng.randint(40, 120))) + "?"})
            turns.append({"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(150, 300))) + "."})
        rows.append({"system": "You are a helpful assistant.", "conversations": turns})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--template", default="chatml")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="bench/results/prepare_speed.json")
    args = parser.parse_args()

    from sftlab.config import load_config
    from sftlab.data.prepare import load_conversations, prepare_data
    from sftlab.data.templates import get_template
    from sftlab.models.loading import load_tokenizer

    tokenizer = load_tokenizer(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in make_conversations(args.conversations)))
        config = load_config(overrides=[f"data={path}", f"template={args.template}", "max_length=4096", "cache=false"])
        start = time.perf_counter()
        data = prepare_data(config, tokenizer)
        seconds = time.perf_counter() - start
        tokens = data.report["total"]["tokens"]

        # reference: the bare fast tokenizer, batched, with offsets, on the already-rendered texts
        template = get_template(args.template, tokenizer)
        texts = [template.render(c).text for c in load_conversations(config.data[0]).conversations]
        start = time.perf_counter()
        for i in range(0, len(texts), 256):
            tokenizer(texts[i : i + 256], return_offsets_mapping=True)
        bare_seconds = time.perf_counter() - start

    result = {
        "conversations": args.conversations, "template": args.template, "tokens": tokens,
        "tokens_per_conversation": round(tokens / args.conversations),
        "prepare_seconds": round(seconds, 3), "prepare_tokens_per_s": round(tokens / seconds),
        "bare_tokenizer_seconds": round(bare_seconds, 3), "bare_tokenizer_tokens_per_s": round(tokens / bare_seconds),
        "file_mb": round(path.stat().st_size / 1e6, 1) if path.exists() else None,
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
