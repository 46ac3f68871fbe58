"""The evaluation report: eval_report.json, a self-contained eval_report.html, a terminal summary.

The HTML embeds the training curves as a base64 PNG (matplotlib, Agg backend) and escapes
every model output, so it can be opened from anywhere and cannot be broken by what a model says.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table


def plot_curves(metrics: list[dict], val_loss_before: float | None = None) -> str | None:
    """Training loss, val_loss where logged (and before training, at step 0), and the learning
    rate per step -> a base64 PNG."""
    steps = [m["step"] for m in metrics if m.get("loss") is not None]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    if val_loss_before is not None:
        val.insert(0, (0, val_loss_before))
    lr = [(m["step"], m["learning_rate"]) for m in metrics if m.get("learning_rate") is not None]
    fig, (ax_loss, ax_lr) = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [2, 1]})
    ax_loss.plot(steps, losses, label="train loss", color="#1f77b4", linewidth=1.2)
    if val:
        ax_loss.plot(*zip(*val), "o-", label="val_loss", color="#d62728", markersize=4)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("response loss (nats/token)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_loss.set_title("training curves")
    if lr:
        ax_lr.plot(*zip(*lr), color="#2ca02c")
    ax_lr.set_xlabel("step")
    ax_lr.set_title("learning rate")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# -- formatting ----------------------------------------------------------------------------------

def _num(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _change(value) -> str:
    return "–" if value is None else f"{100 * value:+.1f}%"


def _points(value) -> str:
    return "–" if value is None else f"{100 * value:+.1f} pts"


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def _table(headers: list[str], rows: list[list], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def heldout_rows(report: dict) -> list[list]:
    h = report.get("heldout") or {}
    if "tuned" not in h:
        return []
    return [
        ["response loss", _num(h["base"]["loss"]), _num(h["tuned"]["loss"]), _num(h["delta_loss"], 4)],
        ["perplexity", _num(h["base"]["perplexity"], 3), _num(h["tuned"]["perplexity"], 3),
         _change(h["tuned"]["perplexity"] / h["base"]["perplexity"] - 1)],
        ["trained tokens", h["base"]["tokens"], h["tuned"]["tokens"], ""],
    ]


IF_METRICS = (("prompt-level strict", "prompt_strict"), ("prompt-level loose", "prompt_loose"),
              ("instruction-level strict", "instruction_strict"), ("instruction-level loose", "instruction_loose"))


def if_rows(report: dict) -> list[list]:
    f = report.get("instruction_following")
    if not f:
        return []
    rows = [[label, _pct(f["base"][key]), _pct(f["tuned"][key]), _points(f["tuned"][key] - f["base"][key])]
            for label, key in IF_METRICS]
    rows.append(["generation tokens/s", _num(f["base"]["generation"]["tokens_per_second"], 1),
                 _num(f["tuned"]["generation"]["tokens_per_second"], 1), ""])
    return rows


def if_type_rows(report: dict) -> list[list]:
    f = report.get("instruction_following")
    if not f:
        return []
    rows = []
    for instruction_id, tuned in f["tuned"]["per_instruction"].items():
        base = f["base"]["per_instruction"].get(instruction_id, {})
        rows.append([instruction_id, tuned["count"], _pct(base.get("strict")), _pct(tuned["strict"]),
                     _pct(base.get("loose")), _pct(tuned["loose"])])
    return rows


TOOL_METRICS = (("tool-call accuracy (all rows)", "tool_call_accuracy"), ("right function", "function_accuracy"),
                ("right function and arguments", "arguments_accuracy"), ("calls that parse", "valid_call_rate"),
                ("no call when none was needed", "no_call_accuracy"))


def tool_rows(report: dict) -> list[list]:
    t = report.get("tool_calls")
    if not t:
        return []
    rows = []
    for label, key in TOOL_METRICS:
        base, tuned = t["base"].get(key), t["tuned"].get(key)
        rows.append([label, _pct(base), _pct(tuned), _points(tuned - base) if None not in (base, tuned) else ""])
    return rows


def forgetting_rows(report: dict) -> list[list]:
    f = report.get("forgetting") or {}
    rows = []
    if "tuned" in f:
        flag = "FLAGGED: above the threshold" if f.get("flagged") else "within the threshold"
        rows.append(["perplexity on general text", _num(f["base"]["perplexity"], 3), _num(f["tuned"]["perplexity"], 3),
                     f"{_change(f['relative_change'])} ({flag} {_change(f['threshold'])})"])
        if f.get("kl"):
            rows.append(["KL(base ‖ tuned) per token, general text", "", _num(f["kl"]["kl"], 5),
                         f"{f['kl']['tokens']} tokens"])
    h = (report.get("heldout") or {}).get("kl")
    if h:
        rows.append(["KL(base ‖ tuned) per token, held-out prompts", "", _num(h["kl_prompt"], 5),
                     f"{h['prompt_tokens']} tokens"])
        rows.append(["KL(base ‖ tuned) per token, held-out responses", "", _num(h["kl_response"], 5),
                     f"{h['response_tokens']} tokens"])
    return rows


def lm_eval_rows(report: dict) -> list[list]:
    results = report.get("lm_eval")
    if not results:
        return []
    rows = []
    for task, metrics in results["tuned"]["tasks"].items():
        base = (results.get("base") or {}).get("tasks", {}).get(task, {})
        for metric, value in metrics.items():
            b = base.get(metric)
            rows.append([task, metric, _num(b), _num(value), _num(value - b) if b is not None else "–"])
    return rows


# -- HTML ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem} h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.35rem .6rem;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.pre,.pre{white-space:pre-wrap;font-family:ui-monospace,monospace;font-size:.82rem}
.flag{color:#b00020;font-weight:bold} .ok{color:#1b7f3b} .muted{color:#777;font-size:.85rem}
table.sbs td{width:33%} img{max-width:100%}
"""


def _sbs_table(pairs: list[dict]) -> str:
    rows = []
    for p in pairs:
        prompt = p["instruction"] + (f"\n\n[input]\n{p['input']}" if p.get("input") else "")
        if p.get("reference"):
            prompt += f"\n\n[reference]\n{p['reference']}"
        rows.append(f'<tr><td class="pre">{_e(prompt)}</td><td class="pre">{_e(p.get("base"))}</td>'
                    f'<td class="pre">{_e(p.get("tuned"))}</td></tr>')
    return ('<table class="sbs"><thead><tr><th>prompt</th><th>base</th><th>tuned</th></tr></thead><tbody>'
            + "".join(rows) + "</tbody></table>")


def _if_samples(report: dict, n: int = 12) -> str:
    f = report.get("instruction_following")
    if not f:
        return ""
    rows = []
    for r in f["responses"][:n]:
        def verdict(side: dict) -> str:
            return ", ".join(f"{i.split(':')[-1]}: {'✓' if s else '✗'}{'' if s == lo else ' (loose ✓)'}"
                             for i, s, lo in zip(r["instruction_ids"], side["strict"], side["loose"]))

        rows.append(f'<tr><td class="pre">{_e(r["prompt"])}</td>'
                    f'<td class="pre">{_e(r["base"]["response"])}<div class="muted">{_e(verdict(r["base"]))}</div></td>'
                    f'<td class="pre">{_e(r["tuned"]["response"])}'
                    f'<div class="muted">{_e(verdict(r["tuned"]))}</div></td></tr>')
    return ('<details><summary>first responses with their checks</summary><table class="sbs"><thead><tr><th>prompt</th>'
            '<th>base</th><th>tuned</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table></details>")


def render_html(report: dict) -> str:
    training = report.get("training") or {}
    png = plot_curves(training.get("metrics") or [], (training.get("train_summary") or {}).get("val_loss_before"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>sftlab eval: {_e(report['run_dir'])}</title>"
             f"<style>{CSS}</style></head><body>",
             f"<h1>sftlab eval — {_e(report['run_dir'])}</h1>",
             f"<p class='muted'>tuned: {_e(report['tuned']['path'])} ({_e(report['tuned'].get('method'))}) · "
             f"base: {_e(report['base']['name'])} · template: {_e(report['tuned']['template'])} · "
             f"device: {_e(report.get('device'))} · {_e(report['created'])}</p>"]
    parts.append("<h2>Training curves</h2>")
    if png:
        parts.append(f'<img alt="training curves" src="data:image/png;base64,{png}">')
        parts.append(f"<p class='muted'>{training['steps']} steps; train loss {_num(training.get('first_loss'))} → "
                     f"{_num(training.get('last_loss'))}; last val_loss {_num(training.get('last_val_loss'))}</p>")
    else:
        parts.append("<p class='muted'>no metrics.jsonl in the run directory</p>")

    h = report.get("heldout") or {}
    parts.append("<h2>Held-out response loss</h2>")
    parts.append(f"<p class='muted'>{_e(h.get('rows', 0))} rows from {_e(h.get('source'))}; masked as in training "
                 "(response tokens + EOS only)</p>")
    rows = heldout_rows(report)
    parts.append(_table(["", "base", "tuned", "change"], rows) if rows else "<p>no held-out data</p>")

    f = report.get("instruction_following")
    parts.append("<h2>Instruction following (verifiable)</h2>")
    if f:
        parts.append(f"<p class='muted'>{f['prompts']} prompts from {_e(f['suite'])}; strict = the response as is, "
                     "loose = also with its first/last line or markdown * removed (IFEval)</p>")
        parts.append(_table(["", "base", "tuned", "change"], if_rows(report)))
        parts.append("<h3>Per instruction type</h3>")
        parts.append(_table(["instruction", "n", "base strict", "tuned strict", "base loose", "tuned loose"],
                            if_type_rows(report)))
        parts.append(_if_samples(report))
    else:
        parts.append("<p>skipped (--limit 0)</p>")

    g = report.get("forgetting") or {}
    parts.append("<h2>Forgetting</h2>")
    rows = forgetting_rows(report)
    if rows:
        source = ("text sampled from the base model (temperature 1, no truncation), stored below"
                  if g.get("source") == "base_samples" else g.get("source"))
        parts.append(f"<p class='muted'>general text: {_e(source)}; {_e(g.get('chunks'))} chunks</p>")
        if g.get("flagged"):
            parts.append(f"<p class='flag'>Perplexity on general text rose by {_change(g['relative_change'])}, "
                         f"above the threshold of {_change(g['threshold'])}.</p>")
        parts.append(_table(["", "base", "tuned", "change / note"], rows))
        if g.get("texts"):
            parts.append("<details><summary>the sampled texts</summary>"
                         + "".join(f"<p class='pre'>{_e(t)}</p>" for t in g["texts"]) + "</details>")
    else:
        parts.append("<p>skipped</p>")

    t = report.get("tool_calls")
    if t:
        parts.append("<h2>Tool calling</h2>")
        parts.append(f"<p class='muted'>{t['tuned']['rows']} held-out rows from {_e(t['file'])} "
                     f"({t['tuned']['call_rows']} expect a call, {t['tuned']['no_call_rows']} none); each scored on its "
                     f"last assistant turn given the conversation before it; calls read as {_e(t['parser'])}</p>")
        parts.append(_table(["", "base", "tuned", "change"], tool_rows(report)))
        samples = []
        for b, u in list(zip(t["base"]["responses"], t["tuned"]["responses"]))[:12]:
            samples.append(f"<tr><td class='pre'>{_e(u['source'])}<div class='muted'>expected: "
                           f"{_e(json.dumps(u['expected'], ensure_ascii=False))}</div></td>"
                           f"<td class='pre'>{_e(b['reply'])}<div class='muted'>{'✓' if b['correct'] else '✗'}</div></td>"
                           f"<td class='pre'>{_e(u['reply'])}<div class='muted'>{'✓' if u['correct'] else '✗'}</div></td></tr>")
        parts.append("<details><summary>first replies</summary><table class='sbs'><thead><tr><th>row</th><th>base</th>"
                     "<th>tuned</th></tr></thead><tbody>" + "".join(samples) + "</tbody></table></details>")

    if report.get("lm_eval"):
        parts.append("<h2>lm-evaluation-harness</h2>")
        parts.append(_table(["task", "metric", "base", "tuned", "change"], lm_eval_rows(report)))

    parts.append("<h2>Side by side (greedy)</h2>")
    parts.append(_sbs_table(report["side_by_side"]) if report.get("side_by_side") else "<p>skipped</p>")
    timings = report.get("timings") or {}
    parts.append("<p class='muted'>time: " + ", ".join(f"{_e(k)} {v:.1f}s" for k, v in timings.items()) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir: str | Path, run_dir: Path | None = None) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, html_path = out_dir / "eval_report.json", out_dir / "eval_report.html"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    html_path.write_text(render_html(report), encoding="utf-8")
    return json_path, html_path


# -- terminal ------------------------------------------------------------------------------------

def print_summary(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"sftlab eval: {report['run_dir']}")
    for column in ("", "base", "tuned", "change"):
        table.add_column(column, justify="left" if not column else "right")
    for row in heldout_rows(report)[:2]:
        table.add_row(f"held-out {row[0]}", *map(str, row[1:]))
    for row in if_rows(report):
        table.add_row(f"IF {row[0]}", *map(str, row[1:]))
    for row in tool_rows(report):
        table.add_row(f"tools: {row[0]}", *map(str, row[1:]))
    g = report.get("forgetting") or {}
    if "tuned" in g:
        table.add_row("general-text perplexity", _num(g["base"]["perplexity"], 3), _num(g["tuned"]["perplexity"], 3),
                      _change(g["relative_change"]))
        if g.get("kl"):
            table.add_row("KL(base‖tuned)/token, general text", "", _num(g["kl"]["kl"], 5), "")
    kl = (report.get("heldout") or {}).get("kl")
    if kl:
        table.add_row("KL(base‖tuned)/token, held-out", "", _num(kl["kl"], 5), "")
    for row in lm_eval_rows(report):
        table.add_row(f"lm-eval {row[0]} {row[1]}", row[2], row[3], row[4])
    console.print(table)
    if g.get("flagged"):
        console.print(f"[bold yellow]forgetting:[/] general-text perplexity {_change(g['relative_change'])} exceeds the "
                      f"threshold {_change(g['threshold'])}", highlight=False, soft_wrap=True)
    elif "tuned" in g:
        console.print(f"[green]forgetting:[/] general-text perplexity {_change(g['relative_change'])}, within "
                      f"{_change(g['threshold'])}", highlight=False, soft_wrap=True)
    files = report.get("files") or {}
    if files:
        console.print(f"report: {files.get('html')}  ({files.get('json')})", highlight=False, soft_wrap=True)
