"""`sftlab self-instruct`: grow an instruction data set from seed tasks with a language model.

A faithful Self-Instruct (Wang et al. 2022), with Stanford Alpaca's batching as a second mode:
prompts of in-context instructions sampled from the seed tasks and the growing pool, the
paper's filters (each drop counted under its reason), ROUGE-L novelty against the pool,
classification identification and instance generation, written as Alpaca-format JSON that
`sftlab train` reads directly. Every candidate is logged with its fate, and a killed run
resumes from the log.

The built-in seed tasks (`sftlab/selfinstruct/data/seed_tasks.jsonl`, 115 tasks, 28 of them
classification) were written for sftlab and are released under CC0 1.0.

    from sftlab.selfinstruct import OpenAIBackend, LocalBackend, Settings, run_self_instruct
    backend = OpenAIBackend("http://127.0.0.1:8000/v1", model="my-model", concurrency=4)
    result = run_self_instruct(backend, "gen.json", Settings(num=1000, mode="self-instruct"))
    print(result.summary)
"""

from sftlab.selfinstruct.backends import Backend, Completion, LocalBackend, OpenAIBackend, Request
from sftlab.selfinstruct.pipeline import MODES, Result, SelfInstruct, Settings, default_log_path, run_self_instruct
from sftlab.selfinstruct.seeds import SeedTask, SeedTaskError, SelfInstructError, default_seed_path, load_seed_tasks

__all__ = [
    "Backend", "Completion", "LocalBackend", "OpenAIBackend", "Request", "MODES", "Result", "SelfInstruct",
    "Settings", "default_log_path", "run_self_instruct", "SeedTask", "SeedTaskError", "SelfInstructError",
    "default_seed_path", "load_seed_tasks",
]
