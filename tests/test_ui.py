"""`sftlab ui`'s API on a tiny run made here: runs and their states, metrics and live events, the
data page (report, histograms, trained-token colouring, dropped rows), eval, chat through sftlab
serve's routes, the New run form, starting/stopping/resuming training, the token, clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from sftlab.config import load_config
from sftlab.data.prepare import prepare_data
from sftlab.data.tokenize import IGNORE_INDEX
from sftlab.infer.server import create_app
from sftlab.train.status import RunStatus, run_state
from sftlab.ui.app import create_ui_app
from ui_helpers import BAD_LINE, make_runs, ui_client

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> Path:
    return make_runs(tmp_path_factory.mktemp("ui"), tiny_model_dir)


@pytest.fixture(scope="module")
def client(runs):
    with ui_client(create_ui_app(runs)) as c:
        yield c


def _ok(response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


def _error(response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]
    return body["error"]


def test_runs_lists_the_run_with_its_state_and_numbers(client, runs):
    listed = _ok(client.get("/api/runs"))
    assert listed["root"] == str(runs.resolve())
    (row,) = listed["runs"]
    summary = json.loads((runs / "tiny" / "train_summary.json").read_text())
    assert row["id"] == "tiny" and row["state"] == "finished" and not row["resumable"]
    assert row["step"] == row["total_steps"] == 3 and row["method"] == "full"
    assert row["best_val_loss"] == pytest.approx(summary["best_val_loss"])
    assert row["data"] == ["train.jsonl"] and row["has_eval"] and row["has_final"]
    status = json.loads((runs / "tiny" / "status.json").read_text())
    assert status["state"] == "finished" and status["total_steps"] == 3 and status["pid"] == os.getpid()


def test_run_detail_has_config_summary_and_status(client):
    detail = _ok(client.get("/api/run", params={"run": "tiny"}))
    assert detail["config_path"].endswith("tiny/config.yaml") and "max_steps: 3" in detail["config_text"]
    assert detail["summary"]["steps"] == 3 and detail["status"]["state"] == "finished"


def test_metrics_read_from_an_offset_and_skip_a_half_written_line(client, runs, tmp_path):
    first = _ok(client.get("/api/metrics", params={"run": "tiny"}))
    assert [r["step"] for r in first["records"]] == [1, 2, 3]
    assert first["records"][-1]["val_loss"] == pytest.approx(
        json.loads((runs / "tiny" / "train_summary.json").read_text())["val_loss_after"])
    assert _ok(client.get("/api/metrics", params={"run": "tiny", "after": first["next"]}))["records"] == []
    # a run folder being written: the last line has no newline yet
    folder = runs / "partial"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    try:
        part = _ok(client.get("/api/metrics", params={"run": "partial"}))
        assert [r["step"] for r in part["records"]] == [1]
        with open(folder / "metrics.jsonl", "a") as handle:
            handle.write('ss": 1.5}\n')
        more = _ok(client.get("/api/metrics", params={"run": "partial", "after": part["next"]}))
        assert more["records"] == [{"step": 2, "loss": 1.5}]
    finally:
        for p in folder.iterdir():
            p.unlink()
        folder.rmdir()


def test_events_send_the_backlog_then_end_for_a_finished_run(client):
    with client.stream("GET", "/api/events", params={"run": "tiny"}) as response:
        text = "".join(response.iter_text())
    blocks = [b for b in text.split("\n\n") if b]
    first = json.loads(blocks[0].removeprefix("data: "))
    assert first["run"] == "tiny" and first["state"] == "finished" and len(first["records"]) == 3
    assert blocks[-1].startswith("event: end")


def test_runs_table_reads_a_metrics_file_again_only_when_it_changes(tmp_path):
    from sftlab.ui.runs import metrics_summary

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0, "val_loss": 1.5}\n{"step": 2, "loss": 1.8}\n')
    assert metrics_summary(tmp_path) == ({"step": 2, "loss": 1.8}, 1.5)
    st = path.stat()
    with open(path, "r+") as f:  # same size, same inode, mtime put back: the kept summary is served
        f.write('{"step": 7')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert metrics_summary(tmp_path) == ({"step": 2, "loss": 1.8}, 1.5)
    with open(path, "a") as f:  # a new line: read again (the broken first line is skipped)
        f.write('{"step": 3, "loss": 1.6, "val_loss": 1.4}\n')
    assert metrics_summary(tmp_path) == ({"step": 3, "loss": 1.6, "val_loss": 1.4}, 1.4)
    assert metrics_summary(tmp_path / "none") == ({}, None)


def test_data_page_reports_counts_histograms_and_the_drop_reason(client, runs):
    info = _ok(client.get("/api/data", params={"run": "tiny"}))
    saved = json.loads((runs / "tiny" / "data_report.json").read_text())
    assert info["report"]["total"]["rows_kept"] == saved["total"]["rows_kept"]
    assert info["dropped_reasons"] == {"empty_response": 1}
    assert sum(info["histograms"]["length"]["counts"]) == info["train_rows"] == saved["split"]["train_rows"]
    assert len(info["histograms"]["length"]["edges"]) == len(info["histograms"]["length"]["counts"]) + 1
    assert info["template"] == "alpaca" and info["train_on"] == "assistant"


def test_examples_colour_exactly_the_trained_tokens(client, runs, tokenizer):
    data = prepare_data(load_config(runs / "tiny" / "config.yaml"), progress=False)
    got = _ok(client.get("/api/examples", params={"run": "tiny", "row": 0}))["examples"][0]
    example = data.train[0]
    assert [t for _, t in got["tokens"]] == [label != IGNORE_INDEX for label in example.labels]
    assert [p for p, _ in got["tokens"]] == [tokenizer.decode([i]) for i in example.input_ids]
    assert got["trained"] == example.trained_token_count and got["source"] == example.source
    # the response is trained, the instruction is not
    trained_text = "".join(p for p, t in got["tokens"] if t)
    assert trained_text.strip().startswith(json.loads(json.dumps(_first_output(runs))))
    long = _ok(client.get("/api/examples", params={"run": "tiny", "min_len": 40, "limit": 50}))
    assert long["total"] == int((data.train.lengths >= 40).sum()) and all(e["length"] >= 40 for e in long["examples"])
    by_source = _ok(client.get("/api/examples", params={"run": "tiny", "source": str(runs.parent / "data")}))
    assert by_source["examples"] and all("train.jsonl" in e["source"] for e in by_source["examples"])
    assert _error(client.get("/api/examples", params={"run": "tiny", "row": 999}), 404).startswith("row 999")


def _first_output(runs: Path) -> str:
    first_row = json.loads((runs.parent / "data" / "train.jsonl").read_text().splitlines()[0])
    return first_row["output"]


def test_dropped_rows_come_with_file_and_line(client, runs):
    dropped = _ok(client.get("/api/dropped", params={"run": "tiny", "reason": "empty_response"}))
    (row,) = dropped["rows"]
    assert row["source"] == f"{runs.parent / 'data' / 'train.jsonl'}:{BAD_LINE}"
    assert row["reason"] == "empty_response" and dropped["total"] == 1
    assert _ok(client.get("/api/dropped", params={"run": "tiny", "reason": "duplicate"}))["rows"] == []


def test_eval_report_and_clear_errors_for_missing_things(client, runs):
    report = _ok(client.get("/api/eval", params={"run": "tiny"}))
    saved = json.loads((runs / "tiny" / "eval" / "eval_report.json").read_text())
    assert report["heldout"]["tuned"]["loss"] == saved["heldout"]["tuned"]["loss"]
    assert report["instruction_following"]["prompts"] == 2 and len(report["side_by_side"]) == 2
    assert "no run 'nope'" in _error(client.get("/api/eval", params={"run": "nope"}), 404)
    assert "outside the runs folder" in _error(client.get("/api/run", params={"run": "../.."}), 404)
    assert "no such page" in _error(client.get("/api/nothing"), 404)
    assert "no run given" in _error(client.get("/api/metrics", params={"run": ""}), 400)


def test_eval_page_says_how_to_make_a_missing_report(client, runs, tmp_path):
    folder = runs / "noeval"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("")
    try:
        assert "sftlab eval" in _error(client.get("/api/eval", params={"run": "noeval"}), 404)
        assert "no final model yet" in _error(client.post("/api/serve/v1/chat/completions?run=noeval", json={}), 404)
    finally:
        (folder / "metrics.jsonl").unlink()
        folder.rmdir()


def test_chat_streams_the_same_answer_as_sftlab_serve(client, runs):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8,
            "temperature": 0}
    with ui_client(create_app(str(runs / "tiny"))) as serve:
        expected = _ok(serve.post("/v1/chat/completions", json={**body, "model": str(runs / "tiny")}))
        prompt = _ok(serve.post("/sftlab/render", json=body))["prompt"]
    plain = _ok(client.post("/api/serve/v1/chat/completions?run=tiny", json=body))
    assert plain["choices"][0]["message"]["content"] == expected["choices"][0]["message"]["content"]
    with client.stream("POST", "/api/serve/v1/chat/completions?run=tiny", json={**body, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines)
    assert streamed == expected["choices"][0]["message"]["content"]
    rendered = _ok(client.post("/api/serve/sftlab/render?run=tiny", json=body))
    assert rendered["prompt"] == prompt and rendered["template"] == "alpaca"


def test_new_run_form_writes_yaml_that_loads_and_errors_name_the_key(client, runs):
    draft = _ok(client.post("/api/config/draft", json={
        "name": "from-form", "model": "some-model", "data": "examples/data/alpaca_demo.json",
        "learning_rate": 1e-4, "num_epochs": 2, "method": "lora", "max_steps": ""}))
    config = yaml.safe_load(draft["yaml"])
    assert config["output_dir"] == str(runs.resolve() / "from-form") and config["method"] == "lora"
    assert config["learning_rate"] == 1e-4 and "max_steps" not in config
    assert Path(config["data"]).is_absolute() and draft["path"] == str(runs.resolve() / "from-form.yaml")
    assert not Path(draft["path"]).exists()  # only a start saves it
    bad = _error(client.post("/api/config/check", json={"yaml": draft["yaml"] + "learning_rat: 3\n"}), 400)
    assert "learning_rat" in bad and "learning_rate" in bad  # the unknown key and the closest real one
    typed = _error(client.post("/api/config/check", json={"yaml": draft["yaml"].replace("num_epochs: 2", "num_epochs: lots")}), 400)
    assert "num_epochs" in typed
    outside = _error(client.post("/api/config/check", json={"yaml": draft["yaml"].replace(
        str(runs.resolve() / "from-form"), "/tmp/elsewhere")}), 400)
    assert "not a folder inside the runs folder" in outside
    missing = _error(client.post("/api/config/check", json={"yaml": draft["yaml"].replace("alpaca_demo.json", "nope.json")}), 400)
    assert missing.startswith("data:") and "nope.json not found" in missing
    assert "run name" in _error(client.post("/api/config/draft", json={"name": "../up"}), 400)
    assert "not valid YAML" in _error(client.post("/api/config/check", json={"yaml": "a: [1"}), 400)


@pytest.mark.slow
def test_start_stop_resume_a_run_from_the_page(client, runs, tiny_model_dir):
    """POST /api/train starts `sftlab train` as a child; /api/stop (SIGTERM) leaves a resumable
    checkpoint; /api/resume continues it to the end from the YAML saved beside the run."""
    text = yaml.safe_dump({"model": str(tiny_model_dir), "data": str(ROOT / "tests/fixtures/tiny_train.json"),
                           "max_steps": 100, "max_length": 64, "batch_size": 2, "learning_rate": 1e-4,
                           "logging_steps": 1, "output_dir": str(runs / "child"), "seed": 0})
    started = _ok(client.post("/api/train", json={"name": "child", "yaml": text}))
    assert (runs / "child.yaml").read_text() == text and started["output_dir"] == str(runs.resolve() / "child")
    assert "already training" in _error(client.post("/api/train", json={"name": "child", "yaml": text}), 400)
    _wait(lambda: _ok(client.get("/api/metrics", params={"run": "child"}))["records"], "the first step", started)
    assert run_state(runs / "child")["state"] == "running"
    events: list[dict] = []
    watcher = threading.Thread(target=_collect_events, args=(client, "child", events))
    watcher.start()  # the live stream the Runs page listens to, open while the run trains
    _wait(lambda: events, "the first live event", started)
    assert _ok(client.post("/api/stop", params={"run": "child"}, json={}))["signal"] == "SIGTERM"
    _wait(lambda: run_state(runs / "child")["state"] != "running", "the stop", started)
    watcher.join(60)
    assert not watcher.is_alive() and events[0]["state"] == "running" and events[-1] == {"end": True}
    assert events[-2]["state"] == "interrupted"  # the stream ends once the run stops
    streamed = [r["step"] for e in events[:-1] for r in e["records"]]
    assert streamed == [r["step"] for r in _ok(client.get("/api/metrics", params={"run": "child"}))["records"]]
    state = run_state(runs / "child")
    assert state["state"] == "interrupted" and state["resumable"] and state["interrupted_by"] == "SIGTERM"
    row = next(r for r in _ok(client.get("/api/runs"))["runs"] if r["id"] == "child")
    assert row["state"] == "interrupted" and row["resumable"] and row["step"] == state["checkpoints"][-1]
    stopped_at = state["checkpoints"][-1]
    _ok(client.post("/api/resume", params={"run": "child"}, json={}))
    _wait(lambda: run_state(runs / "child")["state"] == "finished", "the resumed run to finish", started, 240)
    final = json.loads((runs / "child" / "status.json").read_text())
    assert final["resumed"] is True and final["start_step"] == stopped_at and final["step"] == 100
    assert "resumed from" in (runs / "child" / "train.log").read_text()
    steps = [r["step"] for r in _ok(client.get("/api/metrics", params={"run": "child"}))["records"]]
    assert steps == list(range(1, 101))
    assert "not training" in _error(client.post("/api/stop", params={"run": "child"}, json={}), 400)
    assert "no checkpoint to resume" in _error(client.post("/api/resume", params={"run": "tiny"}, json={}), 400)


def _collect_events(client, run: str, events: list) -> None:
    with client.stream("GET", "/api/events", params={"run": run}) as response:
        for block in _sse_blocks(response):
            events.append({"end": True} if block.startswith("event: end") else json.loads(block.removeprefix("data: ")))


def _sse_blocks(response):
    buffer = ""
    for text in response.iter_text():
        buffer += text
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            yield block


def _wait(condition, what: str, started: dict, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what} (pid {started['pid']})")


def test_a_killed_run_is_interrupted_with_a_checkpoint_and_failed_without(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    folder = tmp_path / "killed"
    status = RunStatus(folder)
    status.running(resume=False)
    status.write("running", pid=pid)
    state = run_state(folder)
    assert state["state"] == "failed" and "without saying why" in state["detail"] and not state["resumable"]
    (folder / "checkpoint-5").mkdir()
    assert run_state(folder)["state"] == "failed"  # a checkpoint without its manifest did not finish saving
    (folder / "checkpoint-5" / "manifest.json").write_text("{}")
    state = run_state(folder)
    assert state["state"] == "interrupted" and state["resumable"] and state["checkpoints"] == [5]
    status.write("running", pid=os.getpid())  # this process is alive
    assert run_state(folder)["state"] == "running"


def test_a_token_guards_every_request_when_set(runs):
    with ui_client(create_ui_app(runs, token="s3cret")) as c:
        assert "token" in _error(c.get("/api/runs"), 401)
        assert "token" in _error(c.get("/"), 401)
        assert c.get("/", params={"token": "wrong"}).status_code == 401
        page = c.get("/", params={"token": "s3cret"})
        assert page.status_code == 200 and "sftlab" in page.text
        assert _ok(c.get("/api/runs"))["runs"]  # the cookie the first page set
        c.cookies.clear()
        assert _ok(c.get("/api/runs", headers={"Authorization": "Bearer s3cret"}))["runs"]


def test_the_page_and_its_assets_are_served_from_the_package(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script type="module" src="/static/app.js">' in page.text
    for asset in ("/static/app.js", "/static/style.css", "/static/vendor/uPlot.iife.min.js", "/static/vendor/uPlot.min.css"):
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 500, asset
    assert "http://" not in page.text and "https://" not in page.text  # no CDN
    assert "MIT" in client.get("/static/vendor/uPlot.LICENSE").text


def test_cli_ui_refuses_a_missing_runs_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sftlab", "ui", "--runs", str(tmp_path / "none")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "no such folder" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


# -- security: what a hostile page in the user's browser could send (docs/ui.md#security) ----------

BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)])


def _evil_train(client, runs, tiny_model_dir, **request) -> int:
    text = yaml.safe_dump({"model": str(tiny_model_dir), "data": str(ROOT / "tests/fixtures/tiny_train.json"),
                           "max_steps": 1, "output_dir": str(runs / "evil")})
    response = client.post("/api/train", **{"json": {"name": "evil", "yaml": text}, **request})
    assert not (runs / "evil").exists() and not (runs / "evil.yaml").exists()  # nothing started, nothing written
    assert (runs / "evil").resolve() not in client.app.state.ui.jobs.children  # no process started
    return response


@pytest.mark.parametrize("headers, why", [
    ({"Origin": "http://attacker.example"}, "another origin"),
    ({"Origin": "null"}, "another origin"),
    ({"Referer": "http://attacker.example/page.html"}, "another origin"),
    ({"Origin": "http://127.0.0.1:7860.attacker.example"}, "another origin"),
])
def test_a_page_of_another_origin_cannot_start_a_run(client, runs, tiny_model_dir, headers, why):
    response = _evil_train(client, runs, tiny_model_dir, headers=headers)
    assert why in _error(response, 403)


def test_a_simple_text_plain_request_is_refused(client, runs, tiny_model_dir):
    text = json.dumps({"name": "evil", "yaml": "model: x"})
    response = _evil_train(client, runs, tiny_model_dir, json=None, content=text,
                           headers={"Content-Type": "text/plain", "Origin": "http://127.0.0.1:7860"})
    assert "application/json" in _error(response, 403)


def test_every_change_needs_the_pages_csrf_token(client, runs, tiny_model_dir):
    response = _evil_train(client, runs, tiny_model_dir, headers={"X-CSRF-Token": "guessed"})
    assert "CSRF" in _error(response, 403)
    for path in ("/api/stop?run=tiny", "/api/resume?run=tiny", "/api/config/check",
                 "/api/serve/v1/chat/completions?run=tiny"):
        assert "CSRF" in _error(client.post(path, json={}, headers={"X-CSRF-Token": ""}), 403), path
    page = client.get("/").text
    assert f'<meta name="csrf-token" content="{client.app.state.csrf_token}">' in page


def test_dns_rebinding_cannot_read_or_change_anything(client, runs):
    rebound = {"Host": "rebind.attacker.example:7860"}
    for path in ("/", "/api/runs", "/api/examples?run=tiny", "/api/data?run=tiny", "/static/app.js"):
        assert "is not a name this server answers to" in _error(client.get(path, headers=rebound), 403), path
    assert "not a name" in _error(client.post("/api/stop?run=tiny", json={}, headers=rebound), 403)
    assert _ok(client.get("/api/runs", headers={"Host": "localhost:7860"}))["runs"]  # the loopback names work


def test_bound_elsewhere_only_the_host_and_allowed_names_are_answered(runs):
    app = create_ui_app(runs, token="t0k", host="10.1.2.3", port=7860, allowed_hosts=["box.lan"])
    with ui_client(app) as c:
        auth = {"Authorization": "Bearer t0k"}
        assert _ok(c.get("/api/runs", headers={**auth, "Host": "box.lan:7860"}))["runs"]
        assert _ok(c.get("/api/runs", headers={**auth, "Host": "10.1.2.3:7860"}))["runs"]
        assert "not a name" in _error(c.get("/api/runs", headers={**auth, "Host": "127.0.0.1:7860"}), 403)
        assert "not a name" in _error(c.get("/api/runs", headers={**auth, "Host": "box.lan:9999"}), 403)
        assert "token" in _error(c.get("/api/runs", headers={"Host": "box.lan:7860"}), 401)  # the token stays required


def test_a_yaml_alias_bomb_is_refused_at_once(client):
    started = time.perf_counter()
    message = _error(client.post("/api/config/check", json={"yaml": BOMB}), 400)
    assert "aliases expand to more than" in message and len(message) < 400
    assert time.perf_counter() - started < 2
    assert _ok(client.get("/api/runs"))["runs"]  # the server answers meanwhile and after


def test_the_runs_folder_itself_is_not_a_run(client, runs, tiny_model_dir):
    text = yaml.safe_dump({"model": str(tiny_model_dir), "data": str(ROOT / "tests/fixtures/tiny_train.json"),
                           "output_dir": str(runs)})
    assert "not a folder inside the runs folder" in _error(client.post("/api/config/check", json={"yaml": text}), 400)


@pytest.mark.parametrize("query", ["run=tiny%00", "run=tiny&after=-1", "run=tiny&after=99999999999999999999999",
                                   "run=tiny&after=abc"])
def test_nul_bytes_and_numbers_out_of_range_are_400s(client, query):
    path = "/api/metrics?" + query
    assert _error(client.get(path), 400)


def test_an_oversize_or_too_deep_body_is_refused(client):
    assert "over this server's limit" in _error(client.post("/api/config/check", content=b'{"yaml": "' + b"x" * (9 << 20)
                                                            + b'"}', headers={"Content-Type": "application/json"}), 413)
    deep = "[" * 100 + "]" * 100
    assert "nests deeper" in _error(client.post("/api/config/check", content=f'{{"yaml": {deep}}}',
                                                headers={"Content-Type": "application/json"}), 400)
