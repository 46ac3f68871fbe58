"""A folder of runs for the `sftlab ui` tests: a tiny run trained and evaluated in the test, with a
dropped row, and the app over it."""

from __future__ import annotations

import json
from pathlib import Path

from sftlab.config import load_config
from sftlab.eval import run_eval
from sftlab.train.loop import train

FIXTURES = Path(__file__).parent / "fixtures"
BAD_LINE = 3  # the row of the training file with an empty response (dropped: empty_response)


def make_runs(root: Path, tiny_model_dir: Path) -> Path:
    """RUNS/tiny: 3 steps on the tiny fixtures plus one empty-response row, then `sftlab eval`."""
    rows = json.loads((FIXTURES / "tiny_train.json").read_text())
    rows.insert(BAD_LINE - 1, {"instruction": "Say nothing.", "input": "", "output": ""})
    data = root / "data" / "train.jsonl"
    data.parent.mkdir(parents=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = root / "runs"
    train(load_config(overrides=[
        f"model={tiny_model_dir}", f"data={data}", f"eval_data={FIXTURES / 'tiny_eval.json'}", "on_error=skip",
        f"output_dir={runs / 'tiny'}", "max_steps=3", "max_length=128", "batch_size=4", "learning_rate=1e-3",
        "warmup_ratio=0", "logging_steps=1", "eval_steps=3",
    ]))
    run_eval(runs / "tiny", limit=2, max_new_tokens=4, corpus_samples=2, corpus_tokens=12, side_by_side=2,
             batch_size=2)
    return runs


def ui_client(app):
    """A TestClient for an app of sftlab's servers as a local client reaches it: on 127.0.0.1 (the
    Host check), with the page's CSRF token on every request (what the page's own requests carry)."""
    from fastapi.testclient import TestClient

    token = getattr(app.state, "csrf_token", None)
    return TestClient(app, base_url="http://127.0.0.1:7860", headers={"X-CSRF-Token": token} if token else {})
