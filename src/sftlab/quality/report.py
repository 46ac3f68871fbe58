"""The quality report: quality.json, a self-contained HTML page (PNG charts embedded, text
escaped), and the terminal summary."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

SHOWN = 30  # clusters / hits shown per section in the HTML (the JSON has more)


def report_paths(path: str | Path) -> dict[str, Path]:
    """{"html": ..., "json": ...}: the HTML page and the JSON beside it (same name, other suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".json":
        return {"html": path.with_suffix(".html"), "json": path}
    return {"html": path if path.suffix else path.with_suffix(".html"), "json": path.with_suffix(".json")}


def write_report(result: dict, path: str | Path) -> dict[str, Path]:
    paths = report_paths(path)
    paths["html"].parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "report": {k: str(v) for k, v in paths.items()}}
    paths["json"].write_text(json.dumps(result, indent=1, ensure_ascii=False))
    paths["html"].write_text(render_html(result), encoding="utf-8")
    return paths


# -- charts -----------------------------------------------------------------------------------

def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def length_chart(lengths: dict) -> str | None:
    panels = [(k, lengths[k]) for k in ("instruction_words", "response_words", "instruction_tokens", "response_tokens")
              if k in lengths and lengths[k].get("histogram", {}).get("counts")]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.0), squeeze=False)
    for ax, (name, section) in zip(axes[0], panels):
        edges, counts = section["histogram"]["edges"], section["histogram"]["counts"]
        ax.bar(edges[:-1], counts, width=[b - a for a, b in zip(edges[:-1], edges[1:])], align="edge",
               color="#4c78a8", edgecolor="white", linewidth=0.4)
        ax.set_title(name.replace("_", " ") + f" (median {section.get('p50', '-')})", fontsize=10)
        ax.set_xlabel("length (last bin: p99 and above)", fontsize=8)
        ax.set_ylabel("rows", fontsize=8)
    return _png(fig)


def verb_noun_chart(summary: dict) -> str | None:
    """Horizontal stacked bars: top verbs, each split into its top nouns and the rest."""
    top = summary.get("top") or []
    if not top:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.36 * len(top) + 1.2))
    colors = ["#4c78a8", "#f58518", "#54a24b", "#e45756"]
    labels = [t["verb"] for t in top][::-1]
    for y, entry in enumerate(top[::-1]):
        left = 0
        for k, noun in enumerate(entry["nouns"]):
            ax.barh(y, noun["count"], left=left, color=colors[k % len(colors)], edgecolor="white")
            if noun["count"] >= entry["count"] * 0.08:
                ax.text(left + noun["count"] / 2, y, noun["noun"], ha="center", va="center", fontsize=7, color="white")
            left += noun["count"]
        rest = entry["count"] - left
        if rest > 0:
            ax.barh(y, rest, left=left, color="#cccccc", edgecolor="white")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("instructions (colours: the verb's top 4 direct-object nouns; grey: other or none)")
    ax.set_title(f"root verb x direct object: top {len(top)} verbs")
    return _png(fig)


def ifd_chart(values: list[float]) -> str | None:
    if not values:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(values, bins=40, color="#4c78a8")
    ax.axvline(1.0, color="#e45756", linestyle="--", label="IFD = 1")
    ax.set_xlabel("IFD = loss(response | instruction) / loss(response)")
    ax.set_ylabel("rows")
    ax.legend()
    return _png(fig)


def metadata_chart(name: str, section: dict) -> str | None:
    top = section.get("top") or []
    if not top or section["distinct"] > 50:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(top) + 1))
    ax.barh(range(len(top)), [n for _, n in top][::-1], color="#54a24b")
    ax.set_yticks(range(len(top)), [v for v, _ in top][::-1])
    ax.set_title(f"metadata: {name}")
    ax.set_xlabel("rows")
    return _png(fig)


# -- HTML ---------------------------------------------------------------------------------------

e = lambda value: html.escape(str(value))

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ddd;padding:.25em .5em;
vertical-align:top;text-align:left} th{background:#f4f4f4} .num{text-align:right} .muted{color:#777}
.text{white-space:pre-wrap;max-width:560px} code{background:#f4f4f4;padding:0 .2em} img{max-width:100%}
.cluster{border:1px solid #e4e4e4;border-radius:4px;padding:.4em .7em;margin:.5em 0}
"""


def _table(header: list[str], rows: list[list], classes: list[str] | None = None) -> str:
    classes = classes or [""] * len(header)
    head = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f'<td class="{c}">{e(v)}</td>' for v, c in zip(r, classes)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(src: str | None, alt: str) -> str:
    return f'<p><img src="{src}" alt="{e(alt)}"></p>' if src else ""


def _pct_row(name: str, p: dict) -> list:
    return [name] + [p.get(k, "-") for k in ("min", "p10", "p50", "p90", "p99", "max", "mean")]


def render_html(r: dict) -> str:
    """The quality report as one self-contained HTML page (charts inlined), section by section."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sftlab quality report</title>"
             f"<style>{CSS}</style></head><body><h1>Data quality report</h1>"]
    inputs = [[i["path"], i["format"], i["rows_read"], i["rows_ok"], i["dropped"],
               ", ".join(f"{k}: {v}" for k, v in i["dropped_by_reason"].items()) or "-"] for i in r["inputs"]]
    parts.append(_table(["file", "format", "rows read", "readable", "unreadable", "reasons"], inputs,
                        ["", "", "num", "num", "num", ""]))
    parts.append(_summary_table_html(r))
    parts += _lengths_html(r)
    parts += _metadata_html(r)
    parts += _duplicates_html(r)
    parts += _diversity_html(r)
    parts += _contamination_html(r)
    parts += _ifd_html(r)
    parts.append("<h2>Timing</h2>" + _table(["step", "seconds"], [[k, v] for k, v in r["seconds"].items()], ["", "num"]))
    parts.append("</body></html>")
    return "\n".join(parts)





def _lengths_html(r: dict) -> list[str]:
    parts: list[str] = []
    lengths = r["lengths"]
    parts.append("<h2>Lengths</h2>")
    rows = [_pct_row(k.replace("_", " "), lengths[k]) for k in
            ("instruction_words", "response_words", "instruction_tokens", "response_tokens", "example_tokens") if k in lengths]
    parts.append(_table(["", "min", "p10", "p50", "p90", "p99", "max", "mean"], rows, [""] + ["num"] * 7))
    parts.append(_img(length_chart(lengths), "length histograms"))
    if "over_max_length" in lengths:
        over = lengths["over_max_length"]
        parts.append(f"<p>{over['count']} rows are longer than max_length={over['max_length']} tokens "
                     f"(template <code>{e(lengths.get('template', ''))}</code>, tokenizer <code>{e(lengths.get('tokenizer', ''))}</code>).</p>")
        if over["rows"]:
            parts.append(_table(["source", "tokens"], [[x["source"], x["tokens"]] for x in over["rows"][:SHOWN]]))
    if lengths.get("special_token_text", {}).get("count"):
        spelled = lengths["special_token_text"]
        parts.append(f"<p>{spelled['count']} rows have text that spells one of the tokenizer's control tokens "
                     "(training tokenizes it as text by default: <code>special_tokens_in_content</code>): "
                     f"{e(', '.join(spelled['rows'][:SHOWN]))}</p>")
    near_empty = r["near_empty_responses"]
    parts.append(f"<h3>Near-empty responses (&lt; {near_empty['min_words']} words): {near_empty['count']}</h3>")
    if near_empty["rows"]:
        parts.append(_table(["source", "instruction", "response"],
                            [[x["source"], x["instruction"], x["response"]] for x in near_empty["rows"][:SHOWN]],
                            ["", "text", "text"]))
    if r["dropped"]["rows"]:
        parts.append(f"<h3>Unreadable rows: {r['dropped']['total']}</h3>")
        parts.append(_table(["source", "reason", "detail"],
                            [[d["source"], d["reason"], d["detail"]] for d in r["dropped"]["rows"][:SHOWN]], ["", "", "text"]))
    return parts


def _metadata_html(r: dict) -> list[str]:
    parts: list[str] = []
    if r["metadata"]:
        parts.append("<h2>Metadata</h2>")
        for name, section in r["metadata"].items():
            parts.append(f"<h3>{e(name)}: {section['distinct']} distinct values over {section['rows']} rows</h3>")
            chart = metadata_chart(name, section)
            parts.append(_img(chart, name) if chart else _table(["value", "rows"], section["top"], ["", "num"]))
    return parts


def _duplicates_html(r: dict) -> list[str]:
    parts: list[str] = []
    exact = r["exact_duplicates"]
    parts.append(f"<h2>Exact duplicates: {exact['clusters']} clusters, {exact['removable']} removable rows</h2>"
                 "<p class='muted'>Equal after lowercasing and removing punctuation and extra whitespace "
                 "(<code>sftlab prepare</code> counts only byte-identical rows as duplicates).</p>")
    parts += [_cluster_html(c) for c in exact["list"][:SHOWN]]
    near = r["near_duplicates"]
    parts.append(f"<h2>Near duplicates: {near['clusters']} clusters, {near['removable']} removable rows</h2>"
                 f"<p class='muted'>MinHash ({near['num_perm']} permutations) + LSH ({near['bands']} bands x "
                 f"{near['rows_per_band']} rows) over word {near['ngram']}-grams of instruction + response; "
                 f"{near['candidate_pairs']} candidate pairs, {near['verified_pairs']} with exact Jaccard &ge; "
                 f"{near['threshold']}.</p>")
    parts += [_cluster_html(c, show_pairs=True) for c in near["list"][:SHOWN]]
    similar = r["similar_instructions"]
    parts.append(f"<h2>Similar instructions (ROUGE-L &gt; {similar['threshold']}): {similar['flagged']} rows "
                 f"({similar['share']:.1%})</h2><p class='muted'>Method: {e(similar['method'])}; "
                 f"{similar['pairs_scored']} pairs scored. Each flagged row is shown with its most similar earlier instruction.</p>")
    if similar["list"]:
        parts.append(_table(["ROUGE-L", "source", "instruction", "earlier", "earlier instruction"],
                            [[x["rouge_l"], x["source"], x["instruction"], x["match_source"], x["match_instruction"]]
                             for x in similar["list"][:SHOWN]], ["num", "", "text", "", "text"]))
    return parts


def _diversity_html(r: dict) -> list[str]:
    parts: list[str] = []
    parts.append("<h2>Diversity</h2>")
    distinct = r["diversity"]["distinct"]
    parts.append("<p>Distinct-n of instructions: " + ", ".join(f"{k.replace('_', '-')} = {v}" for k, v in distinct.items()) + "</p>")
    vn = r["diversity"]["verb_noun"]
    if "skipped" in vn:
        parts.append(f"<p class='muted'>Verb–noun analysis skipped: {e(vn['skipped'])}</p>")
    else:
        parts.append(f"<p>{vn['with_verb_noun']} of {vn['instructions']} instructions ({vn['verb_noun_share']:.1%}) "
                     f"start with a root verb that has a direct-object noun; {vn['distinct_verbs']} distinct verbs, "
                     f"{vn['distinct_pairs']} distinct verb–noun pairs.</p>")
        parts.append(_img(verb_noun_chart(vn), "verb-noun chart"))
    return parts


def _contamination_html(r: dict) -> list[str]:
    parts: list[str] = []
    c = r["contamination"]
    parts.append(f"<h2>Contamination: {c['rows']} rows share a {c['ngram']}-gram with evaluation data</h2>"
                 f"<p class='muted'>{c['eval_items']} evaluation items ({c['eval_ngrams']} distinct {c['ngram']}-grams) "
                 f"from: {e(', '.join(c['eval_files']) or 'none')}</p>")
    if c["list"]:
        parts.append(_table(["row", "instruction", "evaluation item", "matching n-gram", "n-grams"],
                            [[x["source"], x["instruction"], f"{m['item']}: {m['item_text']}", m["ngram"], m["ngrams"]]
                             for x in c["list"][:SHOWN] for m in x["matches"][:3]], ["", "text", "text", "text", "num"]))
    return parts


def _ifd_html(r: dict) -> list[str]:
    parts: list[str] = []
    ifd = r["ifd"]
    parts.append("<h2>Instruction-Following Difficulty (IFD)</h2>")
    if "skipped" in ifd:
        parts.append(f"<p class='muted'>Skipped: {e(ifd['skipped'])}.</p>")
    else:
        parts.append(f"<p>Model <code>{e(ifd['model'])}</code>: {ifd['scored']} rows scored, mean IFD {ifd['mean']}, "
                     f"{ifd['above_1']} rows with IFD &gt; 1 (the instruction does not help predict the response).</p>")
        parts.append(_img(ifd_chart(ifd["values"]), "IFD distribution"))
        high = sorted((x for x in ifd["rows"] if x.get("ifd") is not None), key=lambda x: -x["ifd"])[:SHOWN]
        if high:
            parts.append("<h3>Highest IFD</h3>" + _table(
                ["source", "IFD", "loss | instruction", "loss alone"],
                [[x["source"], x["ifd"], x["conditioned_loss"], x["alone_loss"]] for x in high], ["", "num", "num", "num"]))
    return parts


def _summary_table_html(r: dict) -> str:
    return _table(["measure", "value"], summary_lines(r), ["", "num"])


def _cluster_html(cluster: dict, show_pairs: bool = False) -> str:
    ex = cluster["example"]
    members = ", ".join(m["source"] for m in cluster["members"][:20])
    more = f" and {cluster['size'] - 20} more" if cluster["size"] > 20 else ""
    pairs = ""
    if show_pairs and cluster.get("pairs"):
        pairs = "<br><span class='muted'>" + e("; ".join(f"{p['a']} ~ {p['b']}: {p['jaccard']}" for p in cluster["pairs"][:5])) + "</span>"
    return (f"<div class='cluster'><b>{cluster['size']} rows</b>: {e(members)}{e(more)}{pairs}"
            f"<div class='text'><b>instruction:</b> {e(ex['instruction'])}\n<b>response:</b> {e(ex['response'])}</div></div>")


# -- terminal -----------------------------------------------------------------------------------

def summary_lines(r: dict) -> list[list]:
    lines = [["rows read", r["rows_read"]], ["readable rows", r["rows"]], ["unreadable rows", r["dropped"]["total"]]]
    lengths = r["lengths"]
    for key in ("instruction_words", "response_words", "instruction_tokens", "response_tokens"):
        if key in lengths and "p50" in lengths[key]:
            p = lengths[key]
            lines.append([f"{key.replace('_', ' ')} p50 / p90 / max", f"{p['p50']} / {p['p90']} / {p['max']}"])
    if "over_max_length" in lengths:
        lines.append([f"rows over {lengths['over_max_length']['max_length']} tokens", lengths["over_max_length"]["count"]])
    if "special_token_text" in lengths:
        lines.append(["rows whose text spells a control token", lengths["special_token_text"]["count"]])
    lines.append([f"near-empty responses (< {r['near_empty_responses']['min_words']} words)", r["near_empty_responses"]["count"]])
    ex, near, sim = r["exact_duplicates"], r["near_duplicates"], r["similar_instructions"]
    lines.append(["exact duplicates (normalised text): clusters / removable", f"{ex['clusters']} / {ex['removable']}"])
    lines.append([f"near duplicates (Jaccard >= {near['threshold']}): clusters / removable", f"{near['clusters']} / {near['removable']}"])
    lines.append([f"instructions with ROUGE-L > {sim['threshold']} to an earlier one", f"{sim['flagged']} ({sim['share']:.1%})"])
    d = r["diversity"]
    lines.append(["distinct-1 / 2 / 3 of instructions", " / ".join(str(d["distinct"][k]) for k in ("distinct_1", "distinct_2", "distinct_3"))])
    vn = d["verb_noun"]
    if "skipped" in vn:
        lines.append(["verb-noun analysis", "skipped"])
    else:
        top = ", ".join(t["verb"] for t in vn["top"][:5])
        lines.append(["instructions with a verb-noun pair", f"{vn['with_verb_noun']} ({vn['verb_noun_share']:.1%}); top verbs: {top}"])
    c = r["contamination"]
    lines.append([f"contaminated rows ({c['ngram']}-gram, {c['eval_items']} eval items)", c["rows"]])
    ifd = r["ifd"]
    if "skipped" not in ifd:
        lines.append(["IFD mean / rows with IFD > 1", f"{ifd['mean']} / {ifd['above_1']}"])
    for key, section in r["metadata"].items():
        top = ", ".join(f"{v}: {n}" for v, n in section["top"][:4])
        lines.append([f"metadata '{key}' ({section['distinct']} values)", top])
    return lines


def print_summary(r: dict, console) -> None:
    from rich.table import Table

    table = Table(title="data quality")
    table.add_column("measure", style="bold", overflow="fold")
    table.add_column("value", justify="right", overflow="fold")
    for name, value in summary_lines(r):
        table.add_row(str(name), f"{value:,}" if isinstance(value, int) else str(value))
    console.print(table)
    if r["dropped"]["by_reason"]:
        console.print("unreadable rows by reason: " + ", ".join(f"{k}: {v}" for k, v in r["dropped"]["by_reason"].items()),
                      highlight=False, markup=False)
    if "report" in r:
        console.print(f"report: {r['report']['html']}  ·  {r['report']['json']}", highlight=False, markup=False)
