"""A bridge to EleutherAI's lm-evaluation-harness, through its Python API.

The model sftlab already loaded (LoRA merged by `load_for_inference`) is handed to
`lm_eval.models.huggingface.HFLM(pretrained=<model object>, tokenizer=...)` and evaluated with
`lm_eval.simple_evaluate`. Tasks are lm-eval task names: the built-in ones (hellaswag,
arc_challenge, winogrande, ... — their datasets come from the Hugging Face hub, so they need
the network), the local tasks shipped in `sftlab/eval/data/lm_eval_tasks/` (`sftlab_mini_qa`,
no network), and task folders of your own (`include_paths`).

A relative `dataset_kwargs.data_files` in a task YAML is resolved against the YAML's folder
(plain lm-eval resolves it against the working directory), so a task folder works from anywhere.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from pathlib import Path

from sftlab.eval.errors import EvalError

LOCAL_TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"


def _resolve_data_files(value, folder: Path):
    if isinstance(value, str):
        candidate = folder / value
        return str(candidate.resolve()) if not Path(value).is_absolute() and candidate.exists() else value
    if isinstance(value, list):
        return [_resolve_data_files(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_data_files(v, folder) for k, v in value.items()}
    return value


def materialize_task_folder(folder: Path, target: Path) -> Path:
    """Mirror `folder` into `target` (files as symlinks), rewriting YAMLs whose relative
    data_files exist beside them to absolute paths. YAMLs with custom tags (!function) stay
    symlinks: lm-eval resolves the link, so their helper modules are found beside the original."""
    import yaml

    folder = folder.resolve()
    shutil.copytree(folder, target, copy_function=os.symlink, dirs_exist_ok=True)
    for path in list(target.rglob("*.yaml")) + list(target.rglob("*.yml")):
        original = folder / path.relative_to(target)
        try:
            config = yaml.safe_load(original.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        kwargs = config.get("dataset_kwargs") if isinstance(config, dict) else None
        if not isinstance(kwargs, dict) or "data_files" not in kwargs:
            continue
        resolved = _resolve_data_files(kwargs["data_files"], original.parent)
        if resolved != kwargs["data_files"]:
            kwargs["data_files"] = resolved
            path.unlink()
            path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


@contextlib.contextmanager
def _no_git_subprocess():
    """simple_evaluate records `git describe` of the working directory by running git; sftlab's
    report does not need it, and an evaluation should not shell out to git in the user's repo."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is not None:
        evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        if original is not None:
            evaluator.get_git_commit_hash = original


def _clean_metrics(metrics: dict) -> dict:
    """{'acc,none': 0.5, 'acc_stderr,none': 'N/A', 'alias': ...} -> {'acc': 0.5, ...} (numbers only)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key == "sample_len":
            continue
        name, _, filter_name = key.partition(",")
        out[name if filter_name in ("", "none") else f"{name} ({filter_name})"] = float(value)
    return out


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise EvalError("--lm-eval needs lm-evaluation-harness: pip install 'sftlab[lmeval]' (or lm-eval)") from None


def _task_names(tasks: list[str] | str) -> list[str]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise EvalError("--lm-eval: give at least one task name, e.g. --lm-eval sftlab_mini_qa")
    return list(tasks)


@contextlib.contextmanager
def task_manager(tasks: list[str] | str, include_paths: list[str | Path] = ()):
    """A TaskManager that knows the shipped local tasks and the user's folders (a context: the
    mirrored task folders live until it exits). lm-eval's built-in tasks are indexed (about
    8 s) only when a requested task is not found locally."""
    _require_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = _task_names(tasks)
    folders = [LOCAL_TASKS_DIR] + [Path(p) for p in include_paths]
    for folder in folders:
        if not folder.is_dir():
            raise EvalError(f"--lm-eval-include {folder}: not a folder")
    workdir = Path(tempfile.mkdtemp(prefix="sftlab-lm-eval-"))
    try:
        paths = [str(materialize_task_folder(f, workdir / f"tasks{i}")) for i, f in enumerate(folders)]
        manager = TaskManager(include_path=paths, include_defaults=False)
        if not all(t in manager.all_tasks for t in tasks):
            manager = TaskManager(include_path=paths)
            unknown = [t for t in tasks if t not in manager.all_tasks]
            if unknown:
                raise EvalError(f"lm-eval: unknown task(s) {', '.join(unknown)}; list them with `lm_eval ls tasks`, "
                                "or pass --lm-eval-include DIR for a folder of task YAMLs")
        yield manager
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_lm_eval(model, tokenizer, tasks: list[str] | str, include_paths: list[str | Path] = (),
                limit: int | float | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                seed: int = 0, manager=None) -> dict:
    """Run lm-eval tasks on an already loaded model: {'tasks': {task: {metric: value}}, ...}.

    Pass `manager` (from `task_manager(...)`) to evaluate several models with one task index.
    """
    if manager is None:
        with task_manager(tasks, include_paths) as manager:
            return run_lm_eval(model, tokenizer, tasks, include_paths, limit, num_fewshot, batch_size, seed, manager)
    _require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = _task_names(tasks)
    started = time.perf_counter()
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        with _no_git_subprocess():
            results = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except (ConnectionError, OSError) as exc:
        raise EvalError(f"lm-eval could not load the data of {', '.join(tasks)} ({type(exc).__name__}: {exc}); "
                        "hub tasks (hellaswag, arc_challenge, winogrande) need the network") from None
    return {
        "tasks": {name: _clean_metrics(metrics) for name, metrics in results["results"].items()},
        "n_samples": {name: v.get("effective", v.get("original")) if isinstance(v, dict) else v
                      for name, v in results.get("n-samples", {}).items()},
        "versions": dict(results.get("versions", {})),
        "limit": limit,
        "num_fewshot": num_fewshot,
        "seconds": round(time.perf_counter() - started, 2),
    }
