"""Prompt text for every step of Self-Instruct, and the sampling of in-context instructions.

Two ways to ask for new instructions:

- `self-instruct` (Wang et al. 2022): "Come up with a series of tasks:" followed by 8 numbered
  instructions (6 seed + 2 machine-generated, shuffled); the prompt ends with "9." and the
  model continues the list. Classification identification and instance generation follow.
- `alpaca` (Stanford Alpaca): 3 seed tasks shown in full (instruction, input, output) in a
  request for a set of 20; the model writes the remaining tasks, one instance each.

All wording here was written for sftlab; the structure follows the two papers.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from sftlab.selfinstruct.seeds import SeedTask

SELF_INSTRUCT_HEADER = "Come up with a series of tasks:"
SELF_INSTRUCT_SEED = 6  # in-context instructions from the seed pool ...
SELF_INSTRUCT_MACHINE = 2  # ... and from the machine-generated pool (seeds fill in while it is short)
ALPACA_EXAMPLES = 3
ALPACA_SET_SIZE = 20
NO_INPUT = "<noinput>"

ALPACA_HEADER = f"""Write a set of {ALPACA_SET_SIZE} varied tasks that a language model could be asked to do. Each task has an instruction, an optional input, and the correct output.

Guidelines:
1. Vary the verbs: do not start two instructions with the same word.
2. Vary the phrasing: mix direct commands with questions.
3. Vary the kind of task: brainstorming, open questions, classification, rewriting, extraction, reasoning, writing, coding, and so on.
4. Every task must be doable by a text-only model: nothing that needs seeing or making pictures, sound or video, and no actions in the world such as setting a reminder.
5. Write each instruction in English, in one or two sentences.
6. Give an input only when the task needs one: a concrete, realistic piece of text, a list, a question or some code, of at most about 100 words. Otherwise write {NO_INPUT}.
7. The output is a correct and complete answer to the instruction and input, in under 100 words.

List of {ALPACA_SET_SIZE} tasks:
"""

CLASSIFICATION_HEADER = (
    "Decide whether each task is a classification task: a task whose answer is one label from a small, "
    "fixed set of possible labels.\n\n"
)
CLASSIFICATION_QUESTION = "Is it classification?"

INPUT_FIRST_HEADER = (
    "Write examples for each task below. Give several examples when the task allows it. When a task "
    "needs no input, write the output directly.\n\n"
)
OUTPUT_FIRST_HEADER = (
    "Each task below is a classification task. First name a class label, then write an input that "
    "belongs to that label; cover different labels. When a task needs no input, write only the label.\n\n"
)
MAX_INSTANCES = 5


def clean_instruction(text: str) -> str:
    """Whitespace runs become one space; no trailing colon (as the in-context list shows them)."""
    return re.sub(r"\s+", " ", text).strip().rstrip(":")


# ---------------------------------------------------------------------------------------------
# new instructions


def sample_self_instruct(rng: random.Random, seed_instructions: Sequence[str], machine_instructions: Sequence[str],
                         num_seed: int = SELF_INSTRUCT_SEED, num_machine: int = SELF_INSTRUCT_MACHINE) -> list[str]:
    """num_machine machine instructions (fewer while the pool is short), seeds up to the total, shuffled."""
    machine = rng.sample(list(machine_instructions), min(num_machine, len(machine_instructions)))
    total = num_seed + num_machine
    seeds = rng.sample(list(seed_instructions), min(total - len(machine), len(seed_instructions)))
    chosen = machine + seeds
    rng.shuffle(chosen)
    return chosen


def self_instruct_prompt(instructions: Sequence[str]) -> str:
    """'Come up with a series of tasks:', the numbered instructions, and the next number to continue."""
    lines = [SELF_INSTRUCT_HEADER] + [f"{i}. {clean_instruction(t)}" for i, t in enumerate(instructions, 1)]
    return "\n".join(lines) + f"\n{len(instructions) + 1}."


def self_instruct_stop(num_in_context: int) -> list[str]:
    """Stop at a blank line or when the list reaches twice its in-context length (as the paper)."""
    end = 2 * num_in_context
    return ["\n\n", f"\n{end}", f"{end}.", f"{end} ."]


def sample_alpaca(rng: random.Random, seed_tasks: Sequence[SeedTask], k: int = ALPACA_EXAMPLES) -> list[SeedTask]:
    return rng.sample(list(seed_tasks), min(k, len(seed_tasks)))


def alpaca_prompt(examples: Sequence[SeedTask]) -> str:
    """The set-of-20 request with the examples in full (their first instance); ends at the next instruction."""
    parts = [ALPACA_HEADER]
    for i, task in enumerate(examples, 1):
        instance = task.instances[0]
        parts.append(f"###\n{i}. Instruction: {clean_instruction(task.instruction)}\n"
                     f"{i}. Input:\n{instance.input.strip() or NO_INPUT}\n"
                     f"{i}. Output:\n{instance.output.strip()}\n")
    parts.append(f"###\n{len(examples) + 1}. Instruction:")
    return "".join(parts)


def alpaca_stop() -> list[str]:
    end = ALPACA_SET_SIZE + 1
    return [f"###\n{end}.", f"\n{end}. Instruction"]


# ---------------------------------------------------------------------------------------------
# classification identification and instances


def pick_demos(rng: random.Random, tasks: Sequence[SeedTask], count: int) -> list[SeedTask]:
    return rng.sample(list(tasks), min(count, len(tasks)))


def classification_demos(seed_tasks: Sequence[SeedTask], seed: int, per_label: int = 6) -> list[SeedTask]:
    """Up to per_label classification and per_label other seed tasks, alternating."""
    rng = random.Random(f"classification-demos-{seed}")
    yes = pick_demos(rng, [t for t in seed_tasks if t.is_classification], per_label)
    no = pick_demos(rng, [t for t in seed_tasks if not t.is_classification], per_label)
    demos: list[SeedTask] = []
    for i in range(max(len(yes), len(no))):
        demos += [t[i] for t in (no, yes) if i < len(t)]
    return demos


def classification_prompt(instruction: str, demos: Sequence[SeedTask]) -> str:
    shots = "".join(f"Task: {clean_instruction(t.instruction)}\n{CLASSIFICATION_QUESTION} "
                    f"{'Yes' if t.is_classification else 'No'}\n\n" for t in demos)
    return f"{CLASSIFICATION_HEADER}{shots}Task: {clean_instruction(instruction)}\n{CLASSIFICATION_QUESTION}"


CLASSIFICATION_STOP = ["\n", "Task:"]


def instance_demos(seed_tasks: Sequence[SeedTask], seed: int, classification: bool, count: int = 4) -> list[SeedTask]:
    """Few-shot seed tasks for instance generation (classification ones for output-first)."""
    rng = random.Random(f"instance-demos-{classification}-{seed}")
    pool = [t for t in seed_tasks if t.is_classification == classification] or list(seed_tasks)
    # tasks with several instances show the model that it may give several
    pool.sort(key=lambda t: -min(len(t.instances), MAX_INSTANCES))
    richest = [t for t in pool if len(t.instances) == len(pool[0].instances)]
    chosen = pick_demos(rng, richest, min(count // 2, len(richest)))
    rest = [t for t in pool if t not in chosen]
    return chosen + pick_demos(rng, rest, count - len(chosen))


def _input_first_block(task: SeedTask) -> str:
    lines = [f"Task: {clean_instruction(task.instruction)}"]
    for i, instance in enumerate(task.instances[:MAX_INSTANCES], 1):
        lines.append(f"Example {i}")
        if instance.input.strip():
            lines.append(f"Input: {instance.input.strip()}")
        lines.append(f"Output: {instance.output.strip()}")
    return "\n".join(lines) + "\n\n"


def _output_first_block(task: SeedTask) -> str:
    lines = [f"Task: {clean_instruction(task.instruction)}"]
    for instance in task.instances[:MAX_INSTANCES]:
        lines.append(f"Class label: {instance.output.strip()}")
        if instance.input.strip():
            lines.append(f"Input: {instance.input.strip()}")
    return "\n".join(lines) + "\n\n"


def instance_prompt(instruction: str, classification: bool, demos: Sequence[SeedTask]) -> str:
    """Output-first (label, then input) for classification tasks, input-first otherwise."""
    if classification:
        return OUTPUT_FIRST_HEADER + "".join(map(_output_first_block, demos)) + \
            f"Task: {clean_instruction(instruction)}\n"
    return INPUT_FIRST_HEADER + "".join(map(_input_first_block, demos)) + f"Task: {clean_instruction(instruction)}\n"


def instance_stop(classification: bool) -> list[str]:
    return ["Task:"] if classification else [f"Example {MAX_INSTANCES + 1}", "Task:"]
