"""Parquet / Arrow inputs (files, brace patterns, folders, save_to_disk, hf://) and text-only
records: passed through by default, counted, dropped with --drop-text-only."""

from __future__ import annotations

import hashlib
import io
import json
import os

import pytest
from PIL import Image

from conftest import invoke, read_samples, sample_meta

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

AUGMENT = ("--model", "tiny-random", "--device", "cpu", "-q")


def _encode(arr, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _turns(n_images: int, text: str = "What is it?") -> list[dict]:
    return [{"role": "user", "content": "<image>" * n_images + text}, {"role": "assistant", "content": "A thing."}]


@pytest.fixture
def table_rows(tmp_path, photos):
    """Rows in every image encoding: raw bytes, {"bytes", "path"} records, paths relative to the
    file; 1 and 2 images; a text-only row; a row whose image file is missing."""
    (tmp_path / "media").mkdir()
    Image.fromarray(photos["coffee"]).save(tmp_path / "media" / "coffee.png")
    png = {k: _encode(v) for k, v in photos.items()}
    jpg = _encode(photos["chelsea"], "JPEG")
    rows = [
        {"id": "one", "messages": _turns(1), "images": [{"bytes": png["astronaut"], "path": "a.png"}]},
        {"id": "two", "messages": _turns(2), "images": [{"bytes": jpg, "path": None},
                                                        {"bytes": None, "path": "media/coffee.png"}]},
        {"id": "chat", "messages": [{"role": "user", "content": "Hello?"},
                                    {"role": "assistant", "content": "Hi."}], "images": []},
        {"id": "gone", "messages": _turns(1), "images": [{"bytes": None, "path": "media/missing.png"}]},
    ]
    expected = {"one": [png["astronaut"]], "two": [jpg, png["coffee"]], "chat": []}
    return rows, expected


def _by_id(out) -> dict[str, tuple[dict, dict]]:
    found = {}
    for key, members in read_samples(out).items():
        meta = sample_meta(members)
        found[key.rsplit("-", 1)[0]] = (meta, members)
    return found


def _check_sources(found, expected):
    """Every image arrived, in order: its source record carries the sha256 of the input bytes."""
    for name, blobs in expected.items():
        meta, members = found[name]
        assert [s["sha256"] for s in meta["source"]["images"]] == [hashlib.sha256(b).hexdigest() for b in blobs]
        assert len(meta["images"]) == len(blobs)
        for member in meta["images"]:
            Image.open(io.BytesIO(members[member[len(meta["key"]) + 1:]])).load()


def test_parquet_rows_text_only_and_resume(tmp_path, table_rows):
    rows, expected = table_rows
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet", row_group_size=2)
    out = tmp_path / "out"
    result = invoke("augment", tmp_path / "train.parquet", "-o", out, "--shard-size", 3, *AUGMENT)
    assert "done 3" in result.output and "failed 1" in result.output and "text-only 1" in result.output
    found = _by_id(out)
    assert set(found) == {"one", "two", "chat"}
    _check_sources(found, expected)
    meta, members = found["chat"]
    assert set(members) == {"json"} and meta["tags"]["task"] == "text-only" and meta["images"] == []
    assert meta["messages"] == rows[2]["messages"]
    ledger = [json.loads(x) for x in open(out / "failures.jsonl")]
    assert len(ledger) == 1 and "missing.png" in ledger[0]["reason"] and ledger[0]["source"].endswith("#3")
    totals = json.load(open(out / "run.json"))["totals"]
    assert totals == {"samples": 3, "text_only": 1, "failed": 1}
    assert json.load(open(out / "manifest.json"))["text_only"] == 1
    invoke("inspect", out, "--verify")
    sheet = invoke("inspect", out, "--preview", tmp_path / "sheet.png")  # sources read back from the parquet
    assert "3 rows" in sheet.output
    no_image = invoke("inspect", out, "--show", meta["key"], "--save-image", tmp_path / "x.png", expect_ok=False)
    assert no_image.exit_code == 1 and "text-only" in no_image.output

    # A rerun skips everything; once the missing file exists, --retry-failures brings it in.
    again = invoke("augment", tmp_path / "train.parquet", "-o", out, "--shard-size", 3, *AUGMENT)
    assert "skipped 4" in again.output
    Image.open(io.BytesIO(rows[0]["images"][0]["bytes"])).save(tmp_path / "media" / "missing.png")
    retry = invoke("augment", tmp_path / "train.parquet", "-o", out, "--shard-size", 3, "--retry-failures", *AUGMENT)
    assert "done 1" in retry.output and "failed 0" in retry.output
    assert set(_by_id(out)) == {"one", "two", "chat", "gone"}
    assert open(out / "failures.jsonl").read() == ""


def test_drop_text_only(tmp_path, table_rows):
    rows, expected = table_rows
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "train.parquet")
    out = tmp_path / "out"
    result = invoke("augment", tmp_path / "train.parquet", "-o", out, "--drop-text-only", *AUGMENT)
    assert "done 2" in result.output and "text-only dropped 1" in result.output
    assert set(_by_id(out)) == {"one", "two"} and open(out / "failures.jsonl").read() == ""
    run = json.load(open(out / "run.json"))
    assert run["totals"] == {"samples": 2, "text_only": 0, "failed": 0, "text_only_dropped": 1}
    assert run["config"]["drop_text_only"] is True
    # the flag changes what is written, so a rerun without it into the same folder is refused
    clash = invoke("augment", tmp_path / "train.parquet", "-o", out, *AUGMENT, expect_ok=False)
    assert clash.exit_code == 1 and "drop_text_only" in clash.output


def test_brace_patterns_folders_and_save_to_disk_give_the_same_samples(tmp_path, table_rows):
    datasets = pytest.importorskip("datasets")
    rows, expected = table_rows
    rows = rows[:3]
    folder = tmp_path / "data"
    folder.mkdir()
    for i, row in enumerate(rows):  # one row per file, relative paths still resolve per file
        pq.write_table(pa.Table.from_pylist([row]), folder / f"part-{i}.parquet")
    (folder / "media").symlink_to(tmp_path / "media")
    brace = invoke("augment", str(folder / "part-{0..2}.parquet"), "-o", tmp_path / "brace", *AUGMENT)
    whole = invoke("augment", folder, "-o", tmp_path / "folder", *AUGMENT)
    assert "done 3" in brace.output and "done 3" in whole.output
    assert set(read_samples(tmp_path / "brace")) == set(read_samples(tmp_path / "folder"))
    _check_sources(_by_id(tmp_path / "folder"), expected)

    # datasets' own save_to_disk: an Image list column (bytes + path records) in .arrow files
    features = datasets.Features({"id": datasets.Value("string"),
                                  "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
                                  "images": datasets.Sequence(datasets.Image())})
    ds = datasets.Dataset.from_list(
        [{**r, "images": [{"bytes": i["bytes"], "path": None} if i["bytes"] else
                          {"bytes": open(tmp_path / i["path"], "rb").read(), "path": None} for i in r["images"]]}
         for r in rows], features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = invoke("augment", tmp_path / "saved", "-o", tmp_path / "saved-out", *AUGMENT)
    assert "done 3" in saved.output and "text-only 1" in saved.output
    _check_sources(_by_id(tmp_path / "saved-out"), expected)


def test_hub_dataset_path_through_datasets(tmp_path, table_rows, monkeypatch):
    """hf://NAME goes through datasets.load_dataset (here on a local folder: no network)."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    rows, expected = table_rows
    (tmp_path / "hub").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "hub" / "train.parquet")
    out = tmp_path / "out"
    result = invoke("augment", f"hf://{tmp_path / 'hub'}", "-o", out, "--media-dir", tmp_path, *AUGMENT)
    assert "done 3" in result.output
    found = _by_id(out)
    _check_sources(found, expected)
    assert found["one"][0]["source"]["uri"] == f"hf://{tmp_path / 'hub'}:train#0"
    (tmp_path / "empty").mkdir()
    bad = invoke("augment", f"hf://{tmp_path / 'empty'}", "-o", tmp_path / "x", *AUGMENT, expect_ok=False)
    assert bad.exit_code == 1 and "datasets cannot load it" in bad.output and "Traceback" not in bad.output
