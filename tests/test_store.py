"""The token store: prepared data on disk, memory-mapped. It holds exactly what a plain in-memory
preparation gives (ids, labels, provenance, flags of every row, in every format), its report
statistics equal the per-row ones, the batch plan is numpy over the lengths, and preparing
keeps memory flat in the number of rows."""

import bisect
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import write_jsonl
from sftlab.config import load_config
from sftlab.data.batching import MEGABATCH, batch_order
from sftlab.data.formats import FORMATS as FORMAT_READERS
from sftlab.data.formats import detect_format
from sftlab.data.packing import pack_rows
from sftlab.data.prepare import Histogram, _format_options, prepare_data
from sftlab.data.readers import DataError, read_rows
from sftlab.data.templates import get_template
from sftlab.data.tokenize import Example, tokenize_rendered

FORMATS = Path(__file__).parent / "fixtures" / "formats"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLAB_HOME", str(tmp_path / "home"))


def _in_memory(config, tokenizer) -> tuple[list[Example], int]:
    """The plainest preparation there is: every row formatted, rendered and tokenized at once,
    in memory, in file order (no store, no chunks); and the number of rows dropped."""
    template = get_template(config.template, tokenizer)
    kept, dropped = [], 0
    for source in config.data:
        options = _format_options(config, source)
        fmt = None if source.format == "auto" else source.format
        conversations = []
        for row in read_rows(source.path, source.split):
            try:
                if row.error is not None:
                    raise row.error
                fmt = fmt or detect_format(row, options)
                conversations.append(FORMAT_READERS[fmt](row, options))
            except DataError:
                dropped += 1
        rendered = [template.render(c, config.train_on) for c in conversations]
        results = tokenize_rendered(tokenizer, rendered, [c.source for c in conversations], config.max_length)
        kept += [r for r in results if isinstance(r, Example)]
        dropped += sum(not isinstance(r, Example) for r in results)
    return kept, dropped


CASES = [
    (["dolly.jsonl"], []), (["openai.jsonl"], ["train_on=all"]), (["openorca.jsonl"], []),
    (["prompt_completion.csv"], []), (["sharegpt.json"], ["template=chatml"]), (["text.jsonl"], ["train_on=all"]),
    (["truncated.jsonl", "dolly.jsonl", "openorca.jsonl"], ["max_length=36"]), (["invalid_utf8.jsonl", "dolly.jsonl"], ["on_error=skip"]),
]


@pytest.mark.parametrize("files,extra", CASES, ids=[c[0][0] for c in CASES])
def test_the_store_holds_exactly_what_an_in_memory_preparation_gives(tokenizer, files, extra):
    config = load_config(overrides=[f"data={[str(FORMATS / f) for f in files]}".replace("'", '"'), "on_error=skip", *extra])
    expected, dropped = _in_memory(config, tokenizer)
    data = prepare_data(config, tokenizer)
    assert len(data.train) == len(expected)
    assert data.train.lengths.tolist() == [len(e) for e in expected]
    for got, want in zip(data.train, expected):
        assert got.input_ids.dtype == np.int32 and got.labels.dtype == np.int32
        assert np.array_equal(got.input_ids, want.input_ids) and np.array_equal(got.labels, want.labels)
        assert (got.source, got.truncated, got.boundary_merged, got.lost_end_token) == (
            want.source, want.truncated, want.boundary_merged, want.lost_end_token)
    total = data.report["total"]
    assert total["rows_read"] == total["rows_kept"] + total["rows_dropped"]
    assert total["rows_dropped"] == dropped == len(data.dropped)
    assert data.report["split"]["train_trained_tokens"] == sum(e.trained_token_count for e in expected)
    # a second prepare opens the same store (a cache hit), row for row
    again = prepare_data(config, tokenizer)
    assert again.report["cache"] == "hit" and again.store.folder == data.store.folder
    assert [e.source for e in again.train] == [e.source for e in expected]


def test_a_store_without_the_cache_is_temporary(tokenizer):
    config = load_config(overrides=[f"data={FORMATS / 'dolly.jsonl'}", "cache=false", "on_error=skip"])
    data = prepare_data(config, tokenizer)
    folder = data.store.folder
    assert data.report["cache"] == "off" and (folder / "meta.json").is_file()
    train = data.train
    del data
    assert train[0].source.endswith("dolly.jsonl:1")  # a view keeps its store
    del train
    import gc

    gc.collect()
    assert not folder.exists()


def _percentiles(values) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]
    return {"min": ordered[0], "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
def test_histogram_percentiles_equal_those_of_the_values(n):
    rng = np.random.default_rng(n)
    values = rng.integers(0, 3000, size=n)
    histogram = Histogram()
    for chunk in np.array_split(values, 5):
        histogram.add(chunk)
    assert histogram.percentiles() == _percentiles(values.tolist())


def _reference_bfd(lengths, capacity):
    """Best-fit decreasing as written first (a sorted list of (free, row) with insertion)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free, rows = [], []
    for i in order:
        need = min(lengths[i], capacity)
        at = bisect.bisect_left(free, (need, -1))
        if at < len(free):
            space, row = free.pop(at)
        else:
            space, row = capacity, len(rows)
            rows.append([])
        rows[row].append(i)
        if space - need > 0:
            bisect.insort(free, (space - need, row))
    return rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_places_every_example_as_best_fit_decreasing_does(seed):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 140, size=2000).tolist()
    packed = pack_rows(lengths, 128)
    assert [packed.row(r) for r in range(len(packed))] == _reference_bfd(lengths, 128)
    assert packed.lengths.tolist() == [sum(lengths[i] for i in packed.row(r)) for r in range(len(packed))]


def test_batch_order_covers_each_example_once_groups_by_length_and_is_fixed_by_seed_and_epoch():
    lengths = np.random.default_rng(0).integers(1, 512, size=5000)
    plan = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=True)
    seen = np.concatenate([plan[b] for b in range(len(plan))])
    assert sorted(seen.tolist()) == list(range(5000))
    assert all(len(plan[b]) == 8 for b in range(len(plan)))  # 5000 = 625 x 8
    for b in range(len(plan)):  # a batch is a run of one window, longest first
        batch = lengths[plan[b]]
        assert (np.diff(batch) <= 0).all()
    same = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=True)
    assert all(plan[b] == same[b] for b in range(len(plan)))
    other = batch_order(lengths, 8, seed=3, epoch=1, group_by_length=True)
    assert any(plan[b] != other[b] for b in range(len(plan)))
    padded = sum(len(plan[b]) * lengths[plan[b]].max() for b in range(len(plan)))
    random = batch_order(lengths, 8, seed=3, epoch=0, group_by_length=False)
    padded_random = sum(len(random[b]) * lengths[random[b]].max() for b in range(len(random)))
    assert padded < 0.8 * padded_random  # grouping within windows of MEGABATCH batches saves padding
    assert MEGABATCH > 1


MEMORY_SCRIPT = r"""
import json, sys
from sftlab.config import load_config
from sftlab.data.prepare import prepare_data
from sftlab.models.loading import load_tokenizer

data = prepare_data(load_config(overrides=[f"data={sys.argv[1]}", "cache=false"]), load_tokenizer(sys.argv[2]),
                    progress=False)
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))
print(len(data.train), int(hwm.split()[1]) // 1024)
"""


@pytest.mark.slow
def test_preparing_keeps_memory_flat_in_the_number_of_rows(tiny_model_dir, tmp_path):
    """5k and 50k rows: the peak RSS differs by far less than the ~2.5 KB a row that keeping
    every example in memory cost."""
    peaks = {}
    for n in (5_000, 50_000):
        path = write_jsonl(tmp_path / f"rows-{n}.jsonl", [
            {"instruction": f"Give the number after {i}.", "input": "", "output": f"It is {i + 1}."} for i in range(n)])
        out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(path), str(tiny_model_dir)],
                             capture_output=True, text=True, check=True).stdout
        rows, peak = map(int, out.split())
        assert rows == n
        peaks[n] = peak
    assert peaks[50_000] - peaks[5_000] < 40, peaks  # keeping the rows as objects: > 100 MB more


PREPARE_SCRIPT = r"""
import os, signal, sys
import sftlab.data.prepare as prepare
from sftlab.config import load_config
from sftlab.models.loading import load_tokenizer

data_files, tokenizer_dir, mode = sys.argv[1], sys.argv[2], sys.argv[3]
overrides = [f"data={data_files}", "on_error=skip", "val_fraction=0.1"]
if mode.startswith("kill-after-chunks="):  # checkpoint after every chunk, SIGKILL in the middle of chunk N
    prepare.CHECKPOINT_SECONDS = 0.0
    chunks, flush = int(mode.split("=")[1]), prepare._Preparation._flush
    def _flush(self, drain=False):
        flush(self, drain)
        if self.chunk == [] and not drain and self.total_rows >= chunks * prepare.TOKENIZE_BATCH:
            os.kill(os.getpid(), signal.SIGKILL)
    prepare._Preparation._flush = _flush
if mode.startswith("num_proc="):  # worker processes from the first row; more overrides after ';'
    prepare.POOL_AFTER_ROWS = 0
    overrides += mode.split(";")
data = prepare.prepare_data(load_config(overrides=overrides), load_tokenizer(tokenizer_dir), progress=False)
print(data.store.folder, data.report.get("resumed"))
"""

STORE_FILES = ("ids.bin", "trained.bin", "offsets.bin", "trained_counts.bin", "flags.bin", "sources.txt",
               "source_offsets.bin", "train.bin", "val.bin", "dropped.jsonl")


def _messy_sources(folder: Path) -> str:
    """Two files of generated rows with a few malformed rows and duplicates among them."""
    paths = []
    for name, n in (("a", 1500), ("b", 1200)):
        rows = [{"instruction": f"Write the word number {i} of list {name}.", "input": "",
                 "output": f"Word {i} " * (1 + i % 7)} for i in range(n)]
        for i in range(0, n, 97):
            rows[i] = {"instruction": "a row without an output"}
        for i in range(5, n, 211):
            rows[i] = dict(rows[i - 1])
        paths.append(str(write_jsonl(folder / f"{name}.jsonl", rows)))
    return "[" + ",".join(f'"{p}"' for p in paths) + "]"


def _prepare(home: Path, data: str, tokenizer_dir: Path, mode: str = "plain") -> subprocess.CompletedProcess:
    import os

    return subprocess.run([sys.executable, "-c", PREPARE_SCRIPT, data, str(tokenizer_dir), mode], capture_output=True,
                          text=True, env={**os.environ, "SFTLAB_HOME": str(home)})


def _same_store(a: Path, b: Path) -> None:
    for name in STORE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    report_a, report_b = (json.loads((f / "meta.json").read_text())["report"] for f in (a, b))
    assert report_a == report_b


@pytest.mark.slow
def test_a_killed_prepare_resumes_and_ends_with_the_same_store(tiny_model_dir, tmp_path):
    data = _messy_sources(tmp_path)
    straight = _prepare(tmp_path / "straight", data, tiny_model_dir)
    assert straight.returncode == 0, straight.stderr[-2000:]
    straight_store = Path(straight.stdout.split()[0])
    # killed in the second file, after a checkpoint and some work past it
    killed = _prepare(tmp_path / "killed", data, tiny_model_dir, "kill-after-chunks=8")
    assert killed.returncode == -9
    partial = next((tmp_path / "killed" / "cache" / "data").glob(".*.partial"))
    assert (partial / "progress.pkl").is_file() and not (partial / "meta.json").exists()
    resumed = _prepare(tmp_path / "killed", data, tiny_model_dir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    folder, was_resumed = resumed.stdout.split()
    assert was_resumed == "True" and not partial.exists()
    _same_store(straight_store, Path(folder))


@pytest.mark.slow
def test_num_proc_1_and_2_give_identical_stores(tiny_model_dir, tmp_path):
    data = _messy_sources(tmp_path)
    one = _prepare(tmp_path / "one", data, tiny_model_dir, "num_proc=1")
    two = _prepare(tmp_path / "two", data, tiny_model_dir, "num_proc=2")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    _same_store(Path(one.stdout.split()[0]), Path(two.stdout.split()[0]))


@pytest.mark.slow
def test_num_proc_2_gives_the_same_store_with_the_tokenizers_own_template(tiny_model_dir, tmp_path):
    """Workers get only the Rust tokenizer for the built-in templates, the whole tokenizer for
    a Jinja template: both give the store of one process."""
    data = _messy_sources(tmp_path)
    one = _prepare(tmp_path / "one", data, tiny_model_dir, "num_proc=1;template=tokenizer")
    two = _prepare(tmp_path / "two", data, tiny_model_dir, "num_proc=2;template=tokenizer")
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-2000:] + two.stderr[-2000:]
    _same_store(Path(one.stdout.split()[0]), Path(two.stdout.split()[0]))


HIT_SCRIPT = r"""
import json, sys
from sftlab.config import load_config
from sftlab.data.prepare import prepare_data
data = prepare_data(load_config(overrides=[f"data={sys.argv[1]}", f"model={sys.argv[2]}"]), progress=False)
print(json.dumps({"cache": data.report["cache"], "rows": len(data.train), "key": data.report["cache_key"],
                  "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
"""


@pytest.mark.slow
def test_a_second_prepare_is_a_cache_hit_that_loads_no_tokenizer_and_an_edit_is_a_miss(tiny_model_dir, tmp_path):
    import os

    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i + 1)))} for i in range(40)])
    env = {**os.environ, "SFTLAB_HOME": str(tmp_path / "home")}
    run = lambda: json.loads(subprocess.run([sys.executable, "-c", HIT_SCRIPT, str(path), str(tiny_model_dir)],
                                            capture_output=True, text=True, check=True, env=env).stdout)
    first, second = run(), run()
    assert first["cache"] == "miss" and first["torch"]  # the tokenizer was loaded to write the store
    assert second == {**first, "cache": "hit", "torch": False, "transformers": False}
    with path.open("a") as handle:  # the file changes: its signature and digest change, the store is rebuilt
        handle.write(json.dumps({"instruction": "One more.", "input": "", "output": "Done."}) + "\n")
    third = run()
    assert third["cache"] == "miss" and third["rows"] == 41 and third["key"] != first["key"]


def test_file_info_counts_rows_and_is_read_once_per_file_version(tmp_path, monkeypatch):
    from sftlab.data import prepare

    files = {"a.jsonl": "{}\n{}\n{}", "b.jsonl": "{}\n{}\n", "c.csv": "x,y\n1,2\n3,4\n", "d.json": "[{}, {}]"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    rows = {name: prepare._file_info(str(tmp_path / name))["rows"] for name in files}
    assert rows == {"a.jsonl": 3, "b.jsonl": 2, "c.csv": 2, "d.json": None}
    digest = prepare._file_info(str(tmp_path / "a.jsonl"))["digest"]
    monkeypatch.setattr(prepare, "_read_file_info", lambda path: pytest.fail(f"{path} read again"))
    assert prepare._file_info(str(tmp_path / "a.jsonl"))["digest"] == digest  # remembered
    monkeypatch.undo()
    (tmp_path / "a.jsonl").write_text("{}\n{}\n{}\n{}\n")
    again = prepare._file_info(str(tmp_path / "a.jsonl"))
    assert again["rows"] == 4 and again["digest"] != digest


def test_digest_set_answers_like_a_python_set_across_merges(monkeypatch):
    from sftlab.data.prepare import DigestSet

    monkeypatch.setattr(DigestSet, "MERGE_EVERY", 50)
    rng = np.random.default_rng(0)
    digests = [int(d) for d in rng.integers(0, 2**64, size=400, dtype=np.uint64)]
    stream = digests + [digests[i] for i in rng.integers(0, 400, size=300)] + [0, 2**64 - 1, 0]
    ours, plain = DigestSet(), set()
    for d in stream:
        assert (d in ours) == (d in plain), d
        ours.add(d)
        plain.add(d)
    assert len(ours) == len(plain) and len(ours.sorted) >= 350  # most of them were merged into the array


def test_sampling_caps_and_weights_rows_without_repeats_inside_a_sample():
    from sftlab.data.prepare import _sample

    rows = np.arange(100, 200, dtype=np.int64)
    capped = _sample(rows, 1.0, 30, np.random.default_rng(1))
    assert len(capped) == 30 and len(set(capped)) == 30 and set(capped) <= set(rows) and list(capped) == sorted(capped)
    weighted = _sample(rows, 2.5, None, np.random.default_rng(1))
    counts = np.bincount(weighted - 100, minlength=100)
    assert len(weighted) == 250 and set(counts) == {2, 3} and (counts == 3).sum() == 50
    half = _sample(rows, 0.5, None, np.random.default_rng(1))
    assert len(half) == 50 and len(set(half)) == 50
    assert list(_sample(rows, 0.5, None, np.random.default_rng(1))) == list(half)  # fixed by the seed
