"""Bad input gets a clear error naming the file and line (or record), before training starts."""
from __future__ import annotations

import gzip
import json

import pytest

from rlhfkit.data.collate import tokenize_demonstrations
from rlhfkit.data.loading import DataError, load_demonstrations, load_prompts, load_texts


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_malformed_json_line_is_reported_with_file_and_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "response": "b"}', '{"prompt": "a", "response": ', '{}'])
    with pytest.raises(DataError, match=rf"{f}:2: malformed JSON"):
        load_demonstrations(f)


def test_missing_field_is_reported_with_line(tmp_path):
    f = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "response": "b"}', "", '{"prompt": "a"}'])
    with pytest.raises(DataError, match=rf"{f}:3: missing field 'response'"):
        load_demonstrations(f)


def test_empty_response_is_reported(tmp_path):
    f = _write(tmp_path / "d.jsonl", ['{"prompt": "a", "response": "   "}'])
    with pytest.raises(DataError, match=rf"{f}:1: field 'response' is empty"):
        load_demonstrations(f)


def test_wrong_type_and_non_object(tmp_path):
    f = _write(tmp_path / "d.jsonl", ['{"prompt": 3, "response": "b"}'])
    with pytest.raises(DataError, match=rf"{f}:1: field 'prompt' must be str"):
        load_demonstrations(f)
    g = _write(tmp_path / "e.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=rf"{g}:1: expected a JSON object"):
        load_prompts(g)


def test_prompt_longer_than_context_names_the_record(tmp_path, tiny_tokenizer):
    f = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "Tom has 3 apples. " * 2, "response": "3 + 4 = 7"}),
                                      json.dumps({"prompt": "Tom has 3 apples. " * 40, "response": "3 + 4 = 7"})])
    demos = load_demonstrations(f)
    with pytest.raises(DataError, match=rf"{f}:2: prompt is \d+ tokens, longer than the model's context \(64\)"):
        tokenize_demonstrations(tiny_tokenizer, demos, max_len=64)


def test_gzip_and_datasets_directory_load(tmp_path):
    recs = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    assert [d.response for d in load_demonstrations(gz)] == ["r0", "r1", "r2"]
    import datasets

    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "ds"))
    got = load_demonstrations(tmp_path / "ds")
    assert [d.prompt for d in got] == ["p0", "p1", "p2"] and got[1].where.endswith("ds:record 1")


def test_missing_file_and_unknown_format(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_texts(tmp_path / "nope.jsonl")
    (tmp_path / "x.tsv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown data format"):
        load_prompts(tmp_path / "x.tsv")
