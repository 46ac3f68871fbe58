"""The Self-Instruct loop: rounds of generate → filter → (classify → instances) → commit.

Every candidate the model proposes becomes one record in the log (`OUTPUT.log.jsonl` by
default), with its fate: kept, or dropped under a named reason, plus the most similar pool
instruction and its ROUGE-L score when it reached the novelty check. A round is committed
by appending its records and a `round_end` record in one write (flushed and fsynced); the
Alpaca-format output is then rewritten atomically from the committed rows.

Killing the run loses at most the round in flight. Starting again with the same output path
reads the log, discards an unfinished round, rebuilds the pool, the rows and the counts, and
continues with the next round number. The prompts of round r are sampled with a generator
seeded by (seed, r), and the request seeds are derived the same way, so a resumed run asks
exactly what an uninterrupted one would have asked.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Literal, get_args

from pydantic import Field

from sftlab.quality.similarity import RougePool
from sftlab.selfinstruct import filters as F
from sftlab.selfinstruct import prompts as P
from sftlab.selfinstruct.backends import Backend, Completion, Request
from sftlab.selfinstruct.parsing import (Item, parse_alpaca, parse_classification, parse_input_first,
                                         parse_numbered_list, parse_output_first)
from sftlab.selfinstruct.seeds import SeedTask, SelfInstructError, default_seed_path, load_seed_tasks
from sftlab.settings import Settings as SettingsBase

Mode = Literal["self-instruct", "alpaca"]
MODES = get_args(Mode)
LOG_VERSION = 1


class Settings(SettingsBase):
    """Everything that shapes a run besides the backend and the files (each is a
    `sftlab self-instruct` option; its help text is the description here)."""

    error: ClassVar = SelfInstructError

    mode: Mode = Field(
        "self-instruct", description="self-instruct (8 in-context instructions, instances per task) | alpaca "
                                     "(3 seed tasks, a set of 20 with one instance each)")
    num: int = Field(100, ge=1, description="machine-generated instructions to keep (alpaca mode: rows)")
    seed: int = Field(0, description="seed for prompt sampling and request seeds")
    prompts_per_round: int = Field(5, ge=1, description="instruction-generation requests per round")
    max_tokens: int | None = Field(None, ge=1, description="tokens per instruction-generation response "
                                                           "(default 1024; alpaca 3072)")
    instance_max_tokens: int = Field(300, ge=1, description="tokens per instance-generation response")
    temperature: float = Field(0.7, ge=0, description="sampling temperature for new instructions (paper: 0.7)")
    top_p: float = Field(0.5, gt=0, le=1, description="nucleus sampling for new instructions (paper: 0.5)")
    presence_penalty: float = Field(2.0, description="presence penalty for new instructions (paper: 2)")
    rouge_threshold: float = Field(F.ROUGE_THRESHOLD, ge=0, le=1,
                                   description="drop a new instruction whose ROUGE-L against the pool is above this")
    max_rounds: int | None = Field(None, ge=1, description="stop after this many rounds (resumed ones count)")
    patience: int = Field(20, ge=1, description="stop after this many rounds in a row that keep nothing")
    max_failed_rounds: int = Field(3, ge=1, description="rounds in a row whose every request failed before giving up")

    @property
    def generation_max_tokens(self) -> int:
        return self.max_tokens or (3072 if self.mode == "alpaca" else 1024)


@dataclass
class Counts:
    """Running totals, rebuilt from the log on resume."""

    rounds: int = 0
    requests: Counter = field(default_factory=Counter)  # by stage
    failed_requests: Counter = field(default_factory=Counter)  # by stage
    instructions: Counter = field(default_factory=Counter)  # "kept" and every drop reason
    classification: Counter = field(default_factory=Counter)  # yes / no / unparsed / failed
    instances: Counter = field(default_factory=Counter)  # "kept" and every drop reason
    rows: int = 0

    @property
    def kept(self) -> int:
        return self.instructions["kept"]

    @property
    def dropped(self) -> int:
        return sum(v for k, v in self.instructions.items() if k != "kept")

    def as_dict(self) -> dict:
        def split(counter: Counter) -> dict:
            dropped = {k: v for k, v in sorted(counter.items(), key=lambda kv: -kv[1]) if k != "kept"}
            return {"candidates": sum(counter.values()), "kept": counter["kept"], "dropped": sum(dropped.values()),
                    "dropped_by_reason": dropped}

        return {"rounds": self.rounds, "requests": dict(self.requests), "failed_requests": dict(self.failed_requests),
                "instructions": split(self.instructions), "classification": dict(self.classification),
                "instances": split(self.instances), "rows": self.rows}


@dataclass
class Result:
    output: Path
    log: Path
    counts: Counts
    stopped: str  # "done" | "max_rounds" | "patience"
    resumed_rounds: int  # committed rounds found in the log at start

    @property
    def summary(self) -> dict:
        return {"output": str(self.output), "log": str(self.log), "stopped": self.stopped,
                "resumed_rounds": self.resumed_rounds, **self.counts.as_dict()}


# ---------------------------------------------------------------------------------------------
# files


def default_log_path(output: Path) -> Path:
    return output.with_name(output.stem + ".log.jsonl") if output.suffix else output.with_name(output.name + ".log.jsonl")


def write_json_atomic(path: Path, data) -> None:
    """Write to a temporary file beside path, fsync, and rename over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fingerprint(tasks: list[SeedTask]) -> str:
    text = json.dumps([[t.id, t.instruction, t.is_classification, [[i.input, i.output] for i in t.instances]]
                       for t in tasks], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class _State:
    counts: Counts = field(default_factory=Counts)
    machine: list[str] = field(default_factory=list)  # kept instructions, in order
    rows: list[dict] = field(default_factory=list)


def _apply(state: _State, record: dict, mode: str) -> None:
    kind, counts = record.get("type"), state.counts
    if kind == "instruction":
        counts.instructions["kept" if record["fate"] == "kept" else record["reason"]] += 1
        if record["fate"] == "kept":
            state.machine.append(record["instruction"])
            if mode == "alpaca":
                state.rows.append({"instruction": record["instruction"], "input": record["input"],
                                   "output": record["output"]})
            else:
                counts.classification[record.get("classification", "failed")] += 1
    elif kind == "instance":
        counts.instances["kept" if record["fate"] == "kept" else record["reason"]] += 1
        if record["fate"] == "kept":
            state.rows.append({"instruction": record["instruction"], "input": record["input"],
                               "output": record["output"]})
    elif kind == "requests":
        counts.requests[record["stage"]] += record["sent"]
        counts.failed_requests[record["stage"]] += record["failed"]
    elif kind == "round_end":
        counts.rounds = record["round"]
    counts.rows = len(state.rows)


def read_log(log: Path, header: dict) -> tuple[_State, int]:
    """The committed state of a log (header checked) and how many records of an unfinished round were cut."""
    state = _State()
    raw = log.read_bytes()
    lines = raw.split(b"\n")
    offset = committed_offset = 0
    pending: list[dict] = []
    discarded = 0
    for number, line in enumerate(lines, 1):
        end = offset + len(line) + 1
        last = number == len(lines) or (number == len(lines) - 1 and lines[-1] == b"")
        if not line.strip():
            offset = end
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if last:  # a write cut short by the kill: part of the unfinished round
                discarded += 1
                break
            raise SelfInstructError(f"{log}:{number}: not a JSON record; the log is damaged "
                                    "(move it away, or pass --overwrite to start again)") from None
        if number == 1:
            if record.get("type") != "header":
                raise SelfInstructError(f"{log}:1: not a self-instruct log (no header record)")
            for key in ("mode", "seed_tasks"):
                if record.get(key) != header[key]:
                    raise SelfInstructError(
                        f"{log}: written with {key} {record.get(key)!r}, this run has {header[key]!r}; use the "
                        "same settings to resume, another -o, or --overwrite to start again")
            committed_offset = end
        elif record.get("type") == "round_end":
            for r in pending + [record]:
                _apply(state, r, header["mode"])
            pending = []
            committed_offset = end
        else:
            pending.append(record)
        offset = end
    discarded += len(pending)
    if committed_offset < len(raw):
        with open(log, "r+b") as f:  # drop the unfinished round so the next one follows the last commit
            f.truncate(committed_offset)
    return state, discarded


def _append(log: Path, records: list[dict]) -> None:
    with open(log, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# the loop


def _request_seed(seed: int, round_: int, stage: int, index: int) -> int:
    return (seed * 1_000_003 + round_ * 10_007 + stage * 1_009 + index) % (2**31 - 1)


class _Round:
    """One round's work; its records are committed together at the end."""

    def __init__(self, run: "SelfInstruct", number: int):
        self.run, self.number = run, number
        self.records: list[dict] = []
        self.rng = random.Random(f"self-instruct:{run.settings.seed}:{number}")

    def complete(self, stage: str, requests: list[Request]) -> list[Completion]:
        self.run.status(f"round {self.number}: {stage}")
        completions = self.run.backend.complete(requests) if requests else []
        if len(completions) != len(requests):
            raise SelfInstructError(f"the backend answered {len(completions)} of {len(requests)} requests")
        failed = [c for c in completions if c.error is not None]
        self.records.append({"type": "requests", "round": self.number, "stage": stage, "sent": len(requests),
                             "failed": len(failed)})
        for request_index, c in enumerate(completions):
            if c.error is not None:
                self.records.append({"type": "request_error", "round": self.number, "stage": stage,
                                     "request": request_index, "error": c.error})
        return completions

    def generation_requests(self) -> list[Request]:
        s, run = self.run.settings, self.run
        requests = []
        for i in range(s.prompts_per_round):
            if s.mode == "alpaca":
                prompt, stop = P.alpaca_prompt(P.sample_alpaca(self.rng, run.seed_tasks)), P.alpaca_stop()
            else:
                chosen = P.sample_self_instruct(self.rng, run.seed_instructions, run.state.machine)
                prompt, stop = P.self_instruct_prompt(chosen), P.self_instruct_stop(len(chosen))
            requests.append(Request(prompt, s.generation_max_tokens, s.temperature, s.top_p, s.presence_penalty,
                                    tuple(stop), _request_seed(s.seed, self.number, 0, i)))
        return requests

    def parse(self, request: Request, completion: Completion) -> list[Item]:
        if self.run.settings.mode == "alpaca":
            first = P.ALPACA_EXAMPLES + 1
            return parse_alpaca(completion.text, first, completion.finish_reason)
        first = int(request.prompt.rsplit("\n", 1)[1].rstrip("."))
        return parse_numbered_list(completion.text, first, completion.finish_reason)

    def instructions(self) -> tuple[list[dict], int]:
        """Generate, filter and novelty-check; returns the kept instruction records and requests failed."""
        s, run = self.run.settings, self.run
        requests = self.generation_requests()
        completions = self.complete("instructions", requests)
        candidates: list[dict] = []
        for i, (request, completion) in enumerate(zip(requests, completions)):
            if completion.error is not None:
                continue
            for item in self.parse(request, completion):
                record = {"type": "instruction", "round": self.number, "request": i, "instruction": item.instruction}
                if s.mode == "alpaca":
                    record.update(input=item.input, output=item.output)
                reason, detail = F.item_reason(item)
                if reason is None and s.mode == "alpaca":
                    reason = F.instance_reason(item.input, item.output)
                record.update(fate="dropped" if reason else None, reason=reason, detail=detail,
                              most_similar=None, rouge_l=None)
                self.records.append(record)
                candidates.append(record)
        to_check = [r for r in candidates if r["reason"] is None]
        room = s.num - run.state.counts.kept
        matches = run.pool.add_if_novel([r["instruction"] for r in to_check], s.rouge_threshold, max_added=room)
        kept = []
        for record, match in zip(to_check, matches):
            if match is None:
                record.update(fate="dropped", reason=F.TARGET_REACHED)
                continue
            record.update(most_similar=match.most_similar, rouge_l=round(match.score, 6))
            if match.added:
                record["fate"] = "kept"
                kept.append(record)
            else:
                record.update(fate="dropped", reason=F.SIMILAR)
        return kept, sum(c.error is not None for c in completions)

    def classify(self, kept: list[dict]) -> None:
        s, run = self.run.settings, self.run
        requests = [Request(P.classification_prompt(r["instruction"], run.classification_demos), 3, 0.0, 1.0, 0.0,
                            tuple(P.CLASSIFICATION_STOP), _request_seed(s.seed, self.number, 1, i))
                    for i, r in enumerate(kept)]
        for record, completion in zip(kept, self.complete("classification", requests)):
            if completion.error is not None:
                record.update(is_classification=False, classification="failed")
                continue
            answer = parse_classification(completion.text)
            record.update(is_classification=bool(answer),
                          classification={True: "yes", False: "no", None: "unparsed"}[answer],
                          classification_answer=completion.text.strip()[:40])

    def instances(self, kept: list[dict]) -> None:
        s, run = self.run.settings, self.run
        requests = []
        for i, r in enumerate(kept):
            clf = r["is_classification"]
            demos = run.output_first_demos if clf else run.input_first_demos
            requests.append(Request(P.instance_prompt(r["instruction"], clf, demos), s.instance_max_tokens, 0.0,
                                    1.0, 0.0, tuple(P.instance_stop(clf)), _request_seed(s.seed, self.number, 2, i)))
        for record, completion in zip(kept, self.complete("instances", requests)):
            if completion.error is not None:
                continue
            parse = parse_output_first if record["is_classification"] else parse_input_first
            items = parse(completion.text, completion.finish_reason)
            for item, reason in zip(items, F.filter_instances(items)):
                self.records.append({"type": "instance", "round": self.number, "instruction": record["instruction"],
                                     "input": item.input, "output": item.output,
                                     "fate": "dropped" if reason else "kept", "reason": reason})

    def run_round(self) -> tuple[int, bool]:
        """(instructions kept, every generation request failed)."""
        kept, failed = self.instructions()
        if kept and self.run.settings.mode == "self-instruct":
            self.classify(kept)
            self.instances(kept)
        return len(kept), failed == self.run.settings.prompts_per_round


class SelfInstruct:
    """A run: the seed tasks, the pool, the files. Use run_self_instruct() unless you need the pieces."""

    def __init__(self, backend: Backend, output: str | Path, settings: Settings | None = None,
                 seed_tasks: str | Path | list[SeedTask] | None = None, log: str | Path | None = None,
                 overwrite: bool = False, on_progress: Callable[["SelfInstruct", str], None] | None = None):
        self.backend, self.settings = backend, settings or Settings()
        self.output = Path(output)
        self.log = Path(log) if log is not None else default_log_path(self.output)
        minimum = P.ALPACA_EXAMPLES if self.settings.mode == "alpaca" else P.SELF_INSTRUCT_SEED + P.SELF_INSTRUCT_MACHINE
        if isinstance(seed_tasks, list):
            self.seed_tasks = seed_tasks
            seed_source = "(given)"
            if len(seed_tasks) < minimum:
                raise SelfInstructError(f"{len(seed_tasks)} seed task(s); this mode needs at least {minimum}")
        else:
            self.seed_tasks = load_seed_tasks(seed_tasks, minimum=minimum)
            seed_source = str(seed_tasks or default_seed_path())
        self.seed_instructions = [t.instruction for t in self.seed_tasks]
        self.header = {"type": "header", "version": LOG_VERSION, "mode": self.settings.mode,
                       "seed_tasks": _fingerprint(self.seed_tasks), "seed_source": seed_source,
                       "backend": backend.describe(), "settings": self.settings.model_dump(), "started": time.time()}
        seed = self.settings.seed
        self.classification_demos = P.classification_demos(self.seed_tasks, seed)
        self.input_first_demos = P.instance_demos(self.seed_tasks, seed, classification=False)
        self.output_first_demos = P.instance_demos(self.seed_tasks, seed, classification=True)
        self.on_progress = on_progress
        self.state = _State()
        self.resumed_rounds = 0
        self.discarded_records = 0
        self._open(overwrite)
        self.pool = RougePool(self.seed_instructions + self.state.machine)

    def _open(self, overwrite: bool) -> None:
        if self.output.exists() and self.output.is_dir():
            raise SelfInstructError(f"-o {self.output} is a directory; give a file name such as gen.json")
        if overwrite:
            for path in (self.output, self.log):
                path.unlink(missing_ok=True)
        if self.log.exists() and self.log.stat().st_size > 0:
            self.state, self.discarded_records = read_log(self.log, self.header)
            self.resumed_rounds = self.state.counts.rounds
            if self.log.stat().st_size == 0:  # only a partial header was there
                _append(self.log, [self.header])
        else:
            if self.output.exists():
                raise SelfInstructError(f"{self.output} exists but has no log ({self.log}) to resume from; "
                                        "pass --overwrite to replace it, or choose another -o")
            self.log.parent.mkdir(parents=True, exist_ok=True)
            _append(self.log, [self.header])
        write_json_atomic(self.output, self.state.rows)

    @property
    def counts(self) -> Counts:
        return self.state.counts

    def status(self, stage: str) -> None:
        if self.on_progress is not None:
            self.on_progress(self, stage)

    def run(self) -> Result:
        s = self.settings
        stalled = failed_rounds = 0
        stopped = "done"
        last_write = time.monotonic()
        try:
            while self.counts.kept < s.num:
                if s.max_rounds is not None and self.counts.rounds >= s.max_rounds:
                    stopped = "max_rounds"
                    break
                round_ = _Round(self, self.counts.rounds + 1)
                kept, all_failed = round_.run_round()
                round_.records.append({"type": "round_end", "round": round_.number, "kept": kept,
                                       "kept_total": self.counts.kept + kept, "time": round(time.time(), 3)})
                _append(self.log, round_.records)
                for record in round_.records:
                    _apply(self.state, record, s.mode)
                if time.monotonic() - last_write > 10:
                    write_json_atomic(self.output, self.state.rows)
                    last_write = time.monotonic()
                self.status(f"round {round_.number} done")
                failed_rounds = failed_rounds + 1 if all_failed else 0
                if failed_rounds >= s.max_failed_rounds:
                    errors = [r["error"] for r in round_.records if r.get("type") == "request_error"]
                    raise SelfInstructError(
                        f"every request failed in {failed_rounds} rounds in a row (last error: {errors[-1]}); "
                        f"the {self.counts.rounds} committed rounds are kept and the same command resumes")
                stalled = 0 if kept else stalled + 1
                if stalled >= s.patience:
                    stopped = "patience"
                    break
        finally:
            write_json_atomic(self.output, self.state.rows)
        return Result(self.output, self.log, self.counts, stopped, self.resumed_rounds)


def run_self_instruct(backend: Backend, output: str | Path, settings: Settings | None = None, *,
                      seed_tasks: str | Path | list[SeedTask] | None = None, log: str | Path | None = None,
                      overwrite: bool = False,
                      on_progress: Callable[[SelfInstruct, str], None] | None = None) -> Result:
    """Generate (or continue generating) an Alpaca-format data set at `output` with Self-Instruct.

    Resumes from the log beside `output` when there is one. Returns the files and the counts.
    """
    return SelfInstruct(backend, output, settings, seed_tasks, log, overwrite, on_progress).run()
