"""`sftlab filter`: remove rows by rules, write the rest in the input's own format and file type.

Rules run in this order, each on the rows that survived the ones before it (so, e.g., the kept
member of a duplicate cluster is never a row an earlier rule removed):

    rule                  removes
    malformed             rows sftlab cannot read as a conversation (always; reason in the log)
    blacklist             rows whose instruction or response contains a blacklisted word or
                          phrase (case-insensitive, whole words)
    length                instruction/response word counts outside [min, max] (words = whitespace-
                          separated pieces; --min-response-words is the "minimum response length")
    contaminated          rows sharing a 13-gram with evaluation data (`contamination.py`)
    exact_duplicate       all but the first row (file order) of each exact-duplicate cluster
    near_duplicate        all but the first row of each near-duplicate cluster (MinHash, Jaccard >= t)
    similar_instruction   all but the first row of each cluster of instructions linked by
                          ROUGE-L > t to their most similar earlier instruction
    ifd                   rows with IFD > 1 (Cherry LLM drops them before ranking; rule
                          `ifd_above_1`), rows that cannot be scored (`ifd_unscored`), then all but
                          the top fraction by IFD (`ifd_below_top`): keep round(top x n) of the n
                          rows reaching this rule, highest IFD first, ties in file order
    category_cap          per metadata key (or raw column) value, a seeded sample of at most `cap`
                          rows; rows without the key are not capped

Output naming: with one input and `-o FILE`, the cleaned rows go to FILE, which must have the
input's file type (e.g. `.jsonl.gz` for a `.jsonl.gz` input); the log is FILE's name with its
data suffixes replaced by `.removed.jsonl` and the summary by `.summary.json`. With several
inputs, or when `-o` is a folder (an existing folder, or a name without a data suffix), each
input's cleaned file is `FOLDER/<input file name>` (prefixed `<n>-`, its position from 0, when
two inputs share a name or a name is `removed.jsonl` / `summary.json`), beside `removed.jsonl`
and `summary.json`. A Hugging Face dataset input is
written as `<name>.jsonl`. Kept rows are the original row objects, unchanged and in their order.

Every removed row is one line of the log: {"source", "rule", "evidence", "row"} (row: the
original object, or null when the record could not be read at all).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, ClassVar

from pydantic import Field, model_validator

from sftlab.data.readers import DataError, file_kind
from sftlab.quality.rows import QualityRow, load_dataset
from sftlab.settings import Settings as SettingsBase

DEDUP_KINDS = ("exact", "near", "instruction")
DATA_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")


class RulesError(DataError):
    """A rule of `sftlab filter` out of its range (counted under the reason "bad_rules")."""

    def __init__(self, message: str, reason: str = "bad_rules"):
        super().__init__(message, reason)


class FilterRules(SettingsBase):
    """The rules of `sftlab filter` (also the keys of a rules YAML file); each is an option of
    the command, whose help text is the description here."""

    error: ClassVar = RulesError

    dedup: list[str] = Field(default_factory=list, description="comma-separated: exact, near, instruction (ROUGE-L)")
    near_threshold: float = Field(0.7, description="Jaccard for near duplicates")
    rouge_threshold: float = Field(0.7, description="instruction ROUGE-L threshold")
    drop_contaminated: bool = Field(False, description="drop rows sharing a 13-gram with eval data")
    against: list[str] = Field(default_factory=list, description="evaluation file for --drop-contaminated (repeatable)")
    builtin_suite: bool = Field(True, description="include the built-in eval suite in contamination checks")
    min_instruction_words: int | None = Field(None, description="drop shorter instructions")
    max_instruction_words: int | None = Field(None, description="drop longer instructions")
    min_response_words: int | None = Field(None, description="drop shorter responses")
    max_response_words: int | None = Field(None, description="drop longer responses")
    blacklist: list[str] = Field(default_factory=list,
                                 description="comma-separated words/phrases; rows containing one are dropped")
    ifd_top: float | None = Field(None, description="keep this top fraction by IFD (0.1 = 10%); needs --ifd-model")
    ifd_model: str | None = Field(None, description="model for IFD (registry name, HF folder or run directory)")
    ifd_max_length: int = Field(512, description="token limit for IFD scoring")
    ifd_batch_size: int = Field(8, description="rows per IFD forward batch")
    cap: dict[str, int] = Field(default_factory=dict, description="KEY=N: at most N rows per value of a metadata key "
                                                                   "or column (repeatable)")
    seed: int = Field(0, description="seed for --cap sampling")

    @model_validator(mode="after")
    def _check(self) -> FilterRules:
        bad = [d for d in self.dedup if d not in DEDUP_KINDS]
        if bad:
            raise RulesError(f"dedup: unknown kind(s) {', '.join(bad)}; use {', '.join(DEDUP_KINDS)}")
        for name in ("near_threshold", "rouge_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise RulesError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        if self.ifd_top is not None:
            if not 0 < self.ifd_top <= 1:
                raise RulesError(f"ifd_top is a fraction in (0, 1] (0.1 keeps the top 10%), got {self.ifd_top}")
            if not self.ifd_model:
                raise RulesError("ifd_top needs ifd_model (a registry name, HF folder or run directory)")
        for name in ("min_instruction_words", "max_instruction_words", "min_response_words", "max_response_words"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise RulesError(f"{name} must be >= 0, got {value}")
        for key, value in self.cap.items():
            if not isinstance(value, int) or value < 0:
                raise RulesError(f"cap {key}={value!r}: the cap must be a whole number >= 0")
        return self


def load_rules(path: str | Path | None = None, **overrides) -> FilterRules:
    """Rules from a YAML file (keys = FilterRules fields), then `overrides` that are not None."""

    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: rules file not found", "bad_rules")
        from sftlab.config import ConfigError, load_yaml

        try:
            loaded = load_yaml(path.read_text(), str(path)) or {}
        except ConfigError as exc:
            raise DataError(str(exc), "bad_rules") from None
        if not isinstance(loaded, dict):
            raise DataError(f"{path}: a rules file is a YAML mapping of rule: value", "bad_rules")
        data.update(loaded)
    data.update({k: v for k, v in overrides.items() if v is not None})
    known = set(FilterRules.model_fields)
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataError(f"unknown rule(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}", "bad_rules")
    for name in ("dedup", "blacklist", "against"):
        if isinstance(data.get(name), str):
            data[name] = [x.strip() for x in data[name].split(",") if x.strip()]
    if isinstance(data.get("cap"), (list, tuple)):
        data["cap"] = parse_caps(data["cap"])
    return FilterRules(**data)


def parse_caps(items) -> dict[str, int]:
    caps = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or not value.strip().isdigit():
            raise DataError(f"--cap {item}: expected KEY=N, e.g. category=100", "bad_rules")
        caps[key.strip()] = int(value)
    return caps


# -- the rules ----------------------------------------------------------------------------------

class _State:
    """The surviving rows and the log of removals."""

    def __init__(self, rows: list[QualityRow]) -> None:
        self.alive = list(rows)
        self.removed: list[dict] = []

    def remove(self, drop: dict[int, tuple[str, dict]]) -> None:
        """drop: {row.index: (rule, evidence)}."""
        if not drop:
            return
        for row in self.alive:
            if row.index in drop:
                rule, evidence = drop[row.index]
                self.removed.append({"source": row.source, "file": row.file, "index": row.index, "rule": rule,
                                     "evidence": evidence, "row": row.raw})
        self.alive = [r for r in self.alive if r.index not in drop]


def _words(text: str) -> int:
    return len(text.split())


def _blacklist(rows, words: list[str]) -> dict:
    if not words:
        return {}
    pattern = re.compile(r"(?<!\w)(" + "|".join(re.escape(w.strip()) for w in words if w.strip()) + r")(?!\w)", re.IGNORECASE)
    drop = {}
    for r in rows:
        for name, text in (("instruction", r.instruction), ("response", r.response)):
            m = pattern.search(text)
            if m:
                drop[r.index] = ("blacklist", {"word": m.group(1), "field": name})
                break
    return drop


def _length(rows, rules: FilterRules) -> dict:
    drop = {}
    bounds = [("instruction", "min", rules.min_instruction_words), ("instruction", "max", rules.max_instruction_words),
              ("response", "min", rules.min_response_words), ("response", "max", rules.max_response_words)]
    for r in rows:
        counts = {"instruction": _words(r.instruction), "response": _words(r.response)}
        for name, kind, bound in bounds:
            if bound is None:
                continue
            n = counts[name]
            if (kind == "min" and n < bound) or (kind == "max" and n > bound):
                drop[r.index] = ("length", {"field": name, "words": n, kind: bound})
                break
    return drop


def _contaminated(rows, rules: FilterRules) -> dict:
    from sftlab.quality.contamination import build_index, find_contamination

    index = build_index(rules.against, rules.builtin_suite)
    hits = find_contamination([r.texts for r in rows], index)
    drop = {}
    for pos, found in hits.items():
        first = found[0]
        drop[rows[pos].index] = ("contaminated", {
            "item": index.items[first["item"]].source, "ngram": first["ngram"], "ngrams": first["ngrams"],
            "items": [index.items[h["item"]].source for h in found[:10]]})
    return drop


def _cluster_drops(rows, clusters, rule: str, evidence: Callable[[int, int], dict]) -> dict:
    drop = {}
    for members in clusters:
        first = members[0]
        for m in members[1:]:
            drop[rows[m].index] = (rule, {"kept": rows[first].source, "cluster_size": len(members), **evidence(m, first)})
    return drop


def _exact(rows) -> dict:
    from sftlab.quality.dedup import exact_duplicates

    return _cluster_drops(rows, exact_duplicates([r.conversation for r in rows]), "exact_duplicate", lambda m, f: {})


def _near(rows, threshold: float) -> dict:
    from sftlab.quality.dedup import near_duplicates

    near = near_duplicates([f"{r.instruction}\n\n{r.response}" for r in rows], threshold)
    links = near.links()
    # Jaccard to the kept row, exactly (it can be below the threshold when linked through others)
    pairs = [(c[0], m) for c in near.clusters for m in c[1:]]
    to_kept = dict(zip(pairs, near.jaccard_of(pairs).tolist())) if pairs else {}

    def evidence(m, first):
        partner, score = links.get(m, (first, to_kept[(first, m)]))
        return {"matched": rows[partner].source, "jaccard": round(score, 4),
                "jaccard_to_kept": round(to_kept[(first, m)], 4), "threshold": threshold}

    return _cluster_drops(rows, near.clusters, "near_duplicate", evidence)


def _instruction(rows, threshold: float) -> dict:
    from sftlab.quality.dedup import similar_instructions

    having = [r for r in rows if r.instruction.strip()]
    similar = similar_instructions([r.instruction for r in having], threshold)

    def evidence(m, first):
        j = int(similar.best_index[m])
        return {"matched": having[j].source, "rouge_l": round(float(similar.best_score[m]), 4), "threshold": threshold,
                "instruction": having[m].instruction[:300], "matched_instruction": having[j].instruction[:300],
                "method": similar.method}

    return _cluster_drops(having, similar.clusters(), "similar_instruction", evidence)


def _ifd(rows, rules: FilterRules, progress) -> tuple[dict, dict]:
    from sftlab.quality.ifd import compute_ifd

    scores = compute_ifd([r.conversation for r in rows], rules.ifd_model, max_length=rules.ifd_max_length,
                         batch_size=rules.ifd_batch_size)
    drop = {}
    ranked = []
    for r, s in zip(rows, scores):
        if s is None:
            drop[r.index] = ("ifd_unscored", {"why": "no instruction, or the response was truncated away"})
        elif s.ifd > 1:
            drop[r.index] = ("ifd_above_1", {"ifd": round(s.ifd, 5)})
        else:
            ranked.append((r, s))
    keep = round(rules.ifd_top * len(rows))
    ranked.sort(key=lambda rs: (-rs[1].ifd, rs[0].index))
    cutoff = ranked[keep - 1][1].ifd if 0 < keep <= len(ranked) else None
    for r, s in ranked[keep:]:
        drop[r.index] = ("ifd_below_top", {"ifd": round(s.ifd, 5), "top": rules.ifd_top, "kept": min(keep, len(ranked)),
                                           "cutoff": round(cutoff, 5) if cutoff is not None else None})
    info = {"scored": sum(s is not None for s in scores), "above_1": sum(1 for s in scores if s and s.ifd > 1),
            "kept": min(keep, len(ranked)), "cutoff": cutoff}
    return drop, info


def _caps(rows, caps: dict[str, int], seed: int) -> dict:
    drop = {}
    for key, cap in caps.items():
        groups: dict[str, list[QualityRow]] = {}
        for r in rows:
            value = r.metadata.get(key)
            if value is None and isinstance(r.raw, dict):
                value = r.raw.get(key)
            if value is None or r.index in drop:
                continue
            groups.setdefault(str(value), []).append(r)
        for value, members in sorted(groups.items()):
            if len(members) <= cap:
                continue
            rng = random.Random(f"{seed}|{key}|{value}")
            kept = {r.index for r in rng.sample(members, cap)}
            for r in members:
                if r.index not in kept:
                    drop[r.index] = ("category_cap", {"key": key, "value": value, "cap": cap, "group_size": len(members),
                                                      "seed": seed})
    return drop


# -- writing ------------------------------------------------------------------------------------

def _open_text(path: Path, compression: str | None):
    if compression == ".gz":
        return gzip.open(path, "wt", encoding="utf-8", newline="")
    if compression == ".zst":
        import zstandard

        raw = open(path, "wb")
        return io.TextIOWrapper(zstandard.ZstdCompressor().stream_writer(raw, closefd=True), encoding="utf-8", newline="")
    return open(path, "w", encoding="utf-8", newline="")


def write_rows(path: str | Path, rows: list, kind: str, compression: str | None = None, columns=None,
               parquet_schema=None) -> Path:
    """Write raw row objects as .json (a list), .jsonl, .csv or .parquet, gz/zst-compressed on request."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(rows, schema=parquet_schema) if (rows or parquet_schema is not None) \
            else pa.table({c: pa.array([], pa.string()) for c in (columns or [])})
        pq.write_table(table, path)
        return path
    with _open_text(path, compression) as handle:
        if kind == ".json":
            handle.write("[\n" + ",\n".join("  " + json.dumps(r, ensure_ascii=False) for r in rows) + ("\n]\n" if rows else "]\n"))
        elif kind == ".jsonl":
            for r in rows:
                handle.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif kind == ".csv":
            import csv

            header = list(columns or [])
            for r in rows:
                header += [k for k in r if k not in header]
            writer = csv.DictWriter(handle, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        else:
            raise DataError(f"{path}: cannot write file type '{kind}'", "unsupported_file")
    return path


def _is_data_name(path: Path) -> bool:
    kind, _ = file_kind(path)
    return kind in DATA_SUFFIXES


def _strip_data_suffixes(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".zst", ".json", ".jsonl", ".csv", ".parquet"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def output_plan(inputs: list[str], output: str | Path) -> tuple[list[Path], Path, Path]:
    """(cleaned file per input, log path, summary path): the naming of the module docstring."""
    output = Path(output)
    if len(inputs) > 1 and _is_data_name(output) and not output.is_dir():
        raise DataError(f"-o {output}: with several inputs, -o names a folder (one cleaned file per input)", "bad_output")
    folder_mode = len(inputs) > 1 or output.is_dir() or not _is_data_name(output)
    if not folder_mode:
        source = inputs[0]
        if source.startswith("hf:") or Path(source).is_dir():
            want = (".jsonl", None)
        else:
            want = file_kind(source)
        if file_kind(output) != want:
            expected = want[0] + (want[1] or "")
            raise DataError(f"-o {output}: the cleaned file keeps the input's file type; name it *{expected} "
                            f"(or give a folder)", "bad_output")
        stem = output.with_name(_strip_data_suffixes(output))
        return [output], Path(f"{stem}.removed.jsonl"), Path(f"{stem}.summary.json")
    names = []
    for source in inputs:
        if source.startswith("hf:") or Path(source).is_dir():
            names.append(re.sub(r"[^\w.-]+", "_", source.removeprefix("hf:")) + ".jsonl")
        else:
            names.append(Path(source).name)
    counts = Counter(names)
    reserved = {"removed.jsonl", "summary.json"}
    names = [f"{i}-{n}" if counts[n] > 1 or n in reserved else n for i, n in enumerate(names)]
    return [output / n for n in names], output / "removed.jsonl", output / "summary.json"


def filter_rows(paths, output: str | Path, rules: FilterRules | None = None, *, format: str = "auto",
                fields: dict | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """Apply the rules to the rows of `paths`; write the cleaned files, the removal log and a summary.

    Returns the summary: per input, rows read / kept / removed and its output file; removals by
    rule; the paths of the log and the summary.
    """
    rules = rules or FilterRules()
    say = progress or (lambda message: None)
    paths = [str(p) for p in paths]
    outputs, log_path, summary_path = output_plan(paths, output)
    for src, dst in zip(paths, outputs):
        if not src.startswith("hf:") and Path(src).resolve() == dst.resolve():
            raise DataError(f"-o {output}: would overwrite the input {src}; write the cleaned data elsewhere", "bad_output")
    say("read")
    data = load_dataset(paths, format, fields, keep_raw=True)
    state = _State(data.rows)
    for file_index, info in enumerate(data.files):
        for d in info.dropped:
            state.removed.append({"source": d.source, "file": file_index, "index": None, "rule": "malformed",
                                  "evidence": {"reason": d.reason, "detail": d.detail}, "row": info.raw.get(d.source)})
    extra: dict[str, Any] = {}
    steps: list[tuple[str, Callable[[], dict]]] = [
        ("blacklist", lambda: _blacklist(state.alive, rules.blacklist)),
        ("length", lambda: _length(state.alive, rules)),
    ]
    if rules.drop_contaminated:
        steps.append(("contaminated", lambda: _contaminated(state.alive, rules)))
    if "exact" in rules.dedup:
        steps.append(("exact_duplicate", lambda: _exact(state.alive)))
    if "near" in rules.dedup:
        steps.append(("near_duplicate", lambda: _near(state.alive, rules.near_threshold)))
    if "instruction" in rules.dedup:
        steps.append(("similar_instruction", lambda: _instruction(state.alive, rules.rouge_threshold)))
    if rules.ifd_top is not None:
        def ifd_step():
            drop, info = _ifd(state.alive, rules, say)
            extra["ifd"] = info
            return drop
        steps.append(("ifd", ifd_step))
    if rules.cap:
        steps.append(("category_cap", lambda: _caps(state.alive, rules.cap, rules.seed)))
    for name, step in steps:
        say(name)
        state.remove(step())

    say("write")
    kept_by_file: dict[int, list] = {i: [] for i in range(len(paths))}
    for r in state.alive:
        kept_by_file[r.file].append(r.raw)
    inputs = []
    for i, (src, dst, info) in enumerate(zip(paths, outputs, data.files)):
        kind, compression = (".jsonl", None) if (src.startswith("hf:") or Path(src).is_dir()) else file_kind(src)
        schema = None
        if kind == ".parquet":
            import pyarrow.parquet as pq

            schema = pq.read_schema(src)
        write_rows(dst, kept_by_file[i], kind, compression, info.columns, schema)
        removed = sum(1 for x in state.removed if x["file"] == i)
        inputs.append({"path": src, "output": str(dst), "rows_read": info.rows_read, "kept": len(kept_by_file[i]),
                       "removed": removed})
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as handle:
        for entry in sorted(state.removed, key=lambda x: (x["file"], x["index"] if x["index"] is not None else -1)):
            handle.write(json.dumps({k: v for k, v in entry.items() if k not in ("file", "index")}, ensure_ascii=False,
                                    default=str) + "\n")
    summary = {
        "inputs": inputs,
        "rows_read": sum(x["rows_read"] for x in inputs),
        "kept": sum(x["kept"] for x in inputs),
        "removed": len(state.removed),
        "removed_by_rule": dict(Counter(x["rule"] for x in state.removed)),
        "rules": rules.model_dump(),
        "log": str(log_path),
        "summary": str(summary_path),
        **extra,
    }
    summary_path.write_text(json.dumps(summary, indent=1, ensure_ascii=False, default=str))
    return summary
