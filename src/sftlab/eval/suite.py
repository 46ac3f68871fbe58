"""The built-in instruction-following suite: base tasks x verifiable instructions, seeded.

`generate_suite(seed, n)` is a pure function of its arguments. The shipped file
`src/sftlab/eval/data/ifeval_suite.jsonl` is exactly `generate_suite()` (a test checks it);
regenerate it after changing tasks or instructions with

    python -m sftlab.eval.suite            # rewrites the shipped file
    python -m sftlab.eval.suite -o my.jsonl --seed 7 -n 500

Each JSONL row: {"id", "prompt", "instruction_ids": [...], "kwargs": [{...} per instruction],
"task"}. A row of your own needs id, prompt, instruction_ids and kwargs; the prompt must state
the instructions in words, since only the ids and kwargs are checked.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftlab.data.readers import json_lines
from sftlab.eval.errors import EvalError
from sftlab.eval.ifeval import INSTRUCTIONS, Task, conflicting, get_instruction

SUITE_PATH = Path(__file__).parent / "data" / "ifeval_suite.jsonl"
DEFAULT_SEED = 1234
DEFAULT_SIZE = 260

# Neutral tasks; the keywords fit the topic and are not in the request (for keyword instructions).
TASKS: tuple[Task, ...] = (
    Task("Write a short story about a lighthouse keeper.", ("storm", "lamp", "ship", "night")),
    Task("Explain how rain forms.", ("cloud", "water", "cool", "droplets")),
    Task("Describe how a bicycle works.", ("pedal", "chain", "wheel", "gear")),
    Task("Write a product description for a reusable water bottle.", ("steel", "leak", "cold", "travel")),
    Task("Explain why the sky looks blue during the day.", ("light", "scatter", "sun", "air")),
    Task("Give advice to someone starting to learn the guitar.", ("chord", "practice", "finger", "string")),
    Task("Describe a busy market on a Saturday morning.", ("fruit", "crowd", "voice", "stall")),
    Task("Write a thank-you note to a neighbour who watered your plants.", ("grateful", "garden", "week", "kind")),
    Task("Explain what a budget is and why it helps.", ("money", "spend", "save", "plan")),
    Task("Write a short poem about autumn.", ("leaves", "wind", "gold", "cold")),
    Task("Summarize the benefits of regular exercise.", ("heart", "sleep", "strength", "mood")),
    Task("Describe how to make a cup of tea.", ("kettle", "leaves", "boil", "cup")),
    Task("Write an email inviting colleagues to a team lunch.", ("Friday", "restaurant", "team", "noon")),
    Task("Explain how a library organizes its books.", ("shelf", "catalog", "author", "number")),
    Task("Describe the life cycle of a butterfly.", ("egg", "caterpillar", "wings", "pupa")),
    Task("Give tips for a good night's sleep.", ("screen", "dark", "routine", "bed")),
    Task("Write a short review of an imaginary cafe.", ("coffee", "cake", "staff", "cozy")),
    Task("Explain what a volcano is.", ("lava", "magma", "crust", "erupt")),
    Task("Describe a walk along a beach at sunset.", ("waves", "sand", "orange", "shells")),
    Task("Explain how to plant a tree.", ("soil", "roots", "water", "hole")),
    Task("Write a short speech for a school's sports day.", ("team", "effort", "win", "cheer")),
    Task("Describe how bread is made.", ("flour", "yeast", "oven", "dough")),
    Task("Explain why people keep pets.", ("company", "dog", "care", "love")),
    Task("Give advice on packing for a weekend camping trip.", ("tent", "torch", "water", "boots")),
    Task("Explain how the moon affects the tides.", ("gravity", "ocean", "pull", "earth")),
    Task("Describe your ideal weekend.", ("relax", "friends", "book", "morning")),
    Task("Write a short guide to recycling at home.", ("plastic", "paper", "glass", "bin")),
    Task("Explain what a computer's memory does.", ("data", "program", "fast", "store")),
    Task("Describe a snowy village in winter.", ("roof", "smoke", "white", "quiet")),
    Task("Give advice for a first job interview.", ("prepare", "questions", "smile", "time")),
    Task("Explain how bees make honey.", ("nectar", "hive", "flowers", "wax")),
    Task("Write a short letter to your future self.", ("hope", "years", "change", "remember")),
    Task("Describe how a train journey feels.", ("window", "station", "tracks", "seat")),
    Task("Explain why recycling paper saves trees.", ("forest", "pulp", "energy", "waste")),
    Task("Write a short fable about a fox and a crow.", ("cheese", "flattery", "branch", "lesson")),
    Task("Explain how to care for a houseplant.", ("light", "water", "pot", "leaves")),
    Task("Describe a thunderstorm from inside a house.", ("rain", "lightning", "window", "thunder")),
    Task("Explain the rules of a simple card game.", ("cards", "deal", "turn", "points")),
    Task("Write an advertisement for a neighbourhood bakery.", ("fresh", "bread", "morning", "pastry")),
    Task("Describe what makes a good friend.", ("trust", "listen", "honest", "help")),
)


def _combine(rng: random.Random, first: str, extra: int) -> list[str]:
    chosen = [first]
    candidates = [i for i in INSTRUCTIONS if i != first]
    rng.shuffle(candidates)
    for candidate in candidates:
        if len(chosen) == 1 + extra:
            break
        if not any(conflicting(candidate, c) for c in chosen):
            chosen.append(candidate)
    return chosen


def _join(sentences: list[str]) -> str:
    text = sentences[0]
    for previous, sentence in zip(sentences, sentences[1:]):
        text += ("\n" if "\n" in previous else " ") + sentence
    return text


def generate_suite(seed: int = DEFAULT_SEED, n: int = DEFAULT_SIZE) -> list[dict]:
    """n prompts: task x instruction combinations, deterministic under `seed`.

    Row i's first instruction cycles through every type, so each type appears about n/types
    times; 0-2 compatible instructions are added at random.
    """
    rng = random.Random(seed)
    ids = list(INSTRUCTIONS)
    rows = []
    for index in range(n):
        task = TASKS[rng.randrange(len(TASKS))]
        first = ids[index % len(ids)]
        extra = rng.choices([0, 1, 2], weights=[3, 4, 3])[0]
        chosen = _combine(rng, first, extra)
        kwargs = [INSTRUCTIONS[i].sample(rng, task) for i in chosen]
        sentences = [INSTRUCTIONS[i].describe(**k) for i, k in zip(chosen, kwargs)]
        rows.append({
            "id": f"ifeval-{index:04d}",
            "prompt": _join([task.text, *sentences]),
            "instruction_ids": chosen,
            "kwargs": kwargs,
            "task": task.text,
        })
    return rows


def write_suite(path: str | Path = SUITE_PATH, seed: int = DEFAULT_SEED, n: int = DEFAULT_SIZE) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in generate_suite(seed, n)))
    return path


def load_suite(path: str | Path | None = None) -> list[dict]:
    """Read and validate a suite JSONL (default: the shipped one); errors name the line."""
    path = Path(path) if path else SUITE_PATH
    if not path.is_file():
        raise EvalError(f"{path}: suite file not found")
    rows = []
    for where, row in json_lines(path, EvalError):
        if not isinstance(row, dict):
            raise EvalError(f"{where}: expected a JSON object")
        missing = [k for k in ("id", "prompt", "instruction_ids", "kwargs") if k not in row]
        if missing:
            raise EvalError(f"{where}: missing field(s) {', '.join(missing)}")
        if not isinstance(row["instruction_ids"], list) or not isinstance(row["kwargs"], list) \
                or len(row["instruction_ids"]) != len(row["kwargs"]):
            raise EvalError(f"{where}: instruction_ids and kwargs must be lists of the same length")
        for instruction_id, kwargs in zip(row["instruction_ids"], row["kwargs"]):
            try:
                get_instruction(instruction_id)
            except EvalError as exc:
                raise EvalError(f"{where}: {exc}") from None
            if not isinstance(kwargs, dict):
                raise EvalError(f"{where}: kwargs of '{instruction_id}' must be an object")
        rows.append(row)
    if not rows:
        raise EvalError(f"{path}: the suite holds no rows")
    return rows


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Regenerate the instruction-following suite JSONL.")
    parser.add_argument("-o", "--output", default=str(SUITE_PATH), help="where to write (default: the shipped file)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("-n", type=int, default=DEFAULT_SIZE, help="number of prompts")
    args = parser.parse_args(argv)
    path = write_suite(args.output, args.seed, args.n)
    print(f"wrote {args.n} prompts to {path}")


if __name__ == "__main__":
    main()
