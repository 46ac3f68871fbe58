"""`sftlab eval`: what supervised fine-tuning gained and what it forgot.

    from sftlab.eval import run_eval
    report = run_eval("runs/demo", limit=60, max_new_tokens=128)
    report["heldout"]["tuned"]["loss"], report["instruction_following"]["tuned"]["prompt_strict"]

Modules: `measures` (held-out loss, perplexity on text, KL), `ifeval` (instruction checkers and
scoring), `suite` (the seeded prompt suite), `lm_eval_bridge` (EleutherAI lm-eval), `report`
(JSON, HTML, terminal summary), `runner` (run_eval). Heavy libraries load inside functions.
"""

from __future__ import annotations

from sftlab.eval.errors import EvalError


def run_eval(run_dir, **kwargs) -> dict:
    """See `sftlab.eval.runner.run_eval`."""
    from sftlab.eval.runner import run_eval as _run_eval

    return _run_eval(run_dir, **kwargs)


def __getattr__(name: str):
    # lazy: `from sftlab.eval import generate_suite, score, run_lm_eval, ...`
    import importlib

    for module in ("suite", "ifeval", "measures", "lm_eval_bridge", "report", "runner"):
        mod = importlib.import_module(f"sftlab.eval.{module}")
        if hasattr(mod, name):
            return getattr(mod, name)
    raise AttributeError(f"module 'sftlab.eval' has no attribute '{name}'")


__all__ = ["EvalError", "run_eval"]
