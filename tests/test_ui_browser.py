"""`sftlab ui` in a real browser: headless Chromium (Debian's package, driven by Playwright) against
the app served on 127.0.0.1 over a tiny run made here. Each page is opened and what a user sees is
checked: a run row, a curve with its points, a token coloured as trained, an eval value, a streamed
chat reply, a config error that names the key. Screenshots go to the test's temporary folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftlab.infer.server import BackgroundServer
from sftlab.ui import CHROMIUM, CHROMIUM_ARGS
from sftlab.ui.app import create_ui_app
from ui_helpers import BAD_LINE, make_runs, ui_client

pytestmark = pytest.mark.browser
TRAINED_GREEN = "rgb(183, 240, 177)"  # style.css --trained, the colour `sftlab inspect --html` uses


@pytest.fixture(scope="module")
def site(tiny_model_dir, tmp_path_factory):
    runs = make_runs(tmp_path_factory.mktemp("ui-browser"), tiny_model_dir)
    with BackgroundServer(create_ui_app(runs)) as server:
        yield server.url, runs


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), (f"{CHROMIUM} not found: `make test` installs Debian's chromium "
                                      "(apt-get install chromium), or set SFTLAB_CHROMIUM to a Chromium binary")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser, tmp_path, request):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    yield tab
    tab.screenshot(path=str(tmp_path / f"{request.node.name}.png"), full_page=True)
    context.close()
    assert not errors, f"JavaScript errors in the page: {errors}"


def _api(site, path: str, **params) -> dict:
    url, runs = site
    with ui_client(create_ui_app(runs)) as client:
        response = client.get(path, params=params)
        assert response.status_code == 200, response.text
        return response.json()


def test_runs_page_shows_the_run_and_its_curves(site, page):
    url, runs = site
    page.goto(url + "/#/runs")
    row = page.locator('tr[data-run="tiny"]')
    row.wait_for()
    assert row.locator(".badge").inner_text() == "finished"
    assert "3 / 3" in row.inner_text()
    loss = page.locator('.chart[data-metric="loss"]')
    page.wait_for_function("document.querySelector('.chart[data-metric=\"loss\"]')?.dataset.points === '3'")
    assert loss.get_attribute("data-runs") == "1"
    assert loss.locator("canvas").count() == 1  # uPlot drew it
    for metric in ("learning_rate", "grad_norm", "tokens_per_second"):
        assert page.locator(f'.chart[data-metric="{metric}"]').get_attribute("data-points") == "3"
    page.locator("a.run-name", has_text="tiny").click()
    page.locator(".run-detail").wait_for()
    assert "max_steps: 3" in page.locator(".run-detail").inner_text()


def test_data_page_colours_the_trained_tokens_and_lists_dropped_rows(site, page):
    url, runs = site
    page.goto(url + "/#/data/tiny")
    page.locator(".example").first.wait_for()
    first = page.locator('.example[data-row="0"]')
    expected = _api(site, "/api/examples", run="tiny", row=0)["examples"][0]
    trained = [piece for piece, is_trained in expected["tokens"] if is_trained]
    spans = first.locator("span.t")
    assert spans.count() == len(trained) == expected["trained"]
    assert "".join(trained).startswith("The sky is blue.")  # the first row's response, and only it
    assert [spans.nth(i).text_content() for i in range(spans.count())] == trained
    assert spans.first.evaluate("e => getComputedStyle(e).backgroundColor") == TRAINED_GREEN
    masked = first.locator("span.p").first
    assert masked.evaluate("e => getComputedStyle(e).backgroundColor") == "rgba(0, 0, 0, 0)"
    assert page.locator(".stat", has_text="dropped").locator("b").inner_text() == "1"
    page.select_option("#ex-kind", "dropped:empty_response")
    dropped = page.locator(".example.dropped")
    dropped.wait_for()
    assert f"train.jsonl:{BAD_LINE}" in dropped.inner_text() and "empty_response" in dropped.inner_text()


def test_eval_page_shows_the_report_numbers(site, page):
    url, runs = site
    report = json.loads((runs / "tiny" / "eval" / "eval_report.json").read_text())
    page.goto(url + "/#/eval/tiny")
    heldout = page.locator('[data-stat="heldout"] b')
    heldout.wait_for()
    tuned = report["heldout"]["tuned"]["loss"]
    assert f"→ {float(f'{tuned:.4g}'):g}" in heldout.inner_text()
    strict = report["instruction_following"]["tuned"]["prompt_strict"]
    assert f"→ {100 * strict:.1f}%" in page.locator('[data-stat="if"] b').inner_text()
    table = page.locator(".if-table")
    kinds = set(report["instruction_following"]["tuned"]["per_instruction"])
    assert {table.locator("tbody tr").nth(i).locator("td").first.inner_text()
            for i in range(table.locator("tbody tr").count())} == kinds
    assert page.locator(".cols2 tbody tr").count() == len(report["side_by_side"]) == 2


def test_chat_page_streams_a_reply_and_shows_the_prompt(site, page):
    url, runs = site
    page.goto(url + "/#/chat/tiny")
    page.fill("#max-tokens", "8")
    page.fill("#temperature", "1")  # a random tiny model's greedy reply is blank lines; sample, seeded
    page.fill("#seed", "3")
    page.check("#show-prompt")
    page.fill("#message", "Name a colour.")
    page.click("#send")
    reply = page.locator(".msg.assistant.done .text")
    reply.wait_for(state="attached", timeout=60_000)
    with ui_client(create_ui_app(runs)) as client:
        expected = client.post("/api/serve/v1/chat/completions?run=tiny", json={
            "model": "tiny", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
            "temperature": 1, "seed": 3}).json()["choices"][0]["message"]["content"]
    assert expected.strip() and reply.text_content().strip() == expected.strip()
    prompt = page.locator("#prompt")
    page.wait_for_function("document.querySelector('#prompt').textContent.includes('### Instruction:')")
    assert "Name a colour." in prompt.inner_text() and "template alpaca" in prompt.inner_text()


def test_new_run_page_writes_yaml_and_names_a_bad_key(site, page, tiny_model_dir):
    url, runs = site
    page.goto(url + "/#/new")
    page.fill('input[name="name"]', "browser-run")
    page.fill('input[name="model"]', str(tiny_model_dir))
    page.click("#draft")
    page.wait_for_function("document.querySelector('#yaml').value.includes('output_dir')")
    assert f"output_dir: {runs.resolve() / 'browser-run'}" in page.input_value("#yaml")
    page.fill("#yaml", page.input_value("#yaml") + "lerning_rate: 1\n")
    page.click("#check")
    error = page.locator("#new-error .error")
    error.wait_for()
    assert "lerning_rate" in error.inner_text() and "learning_rate" in error.inner_text()
    assert not (runs / "browser-run.yaml").exists()


def test_a_missing_run_is_a_message_not_a_trace(site, page):
    url, runs = site
    page.goto(url + "/#/eval/no-such-run")
    error = page.locator(".error").first
    error.wait_for()
    assert "no run 'no-such-run'" in error.inner_text() and "Traceback" not in page.content()
