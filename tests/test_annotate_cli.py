"""`rlhfkit annotate` commands and `rlhfkit serve` as real processes' entry points."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from rlhfkit.annotate.store import Store
from rlhfkit.cli import main


def test_annotate_commands(tmp_path, capsys):
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": ["a", "b", "c"]}) + "\n" for i in range(3)))
    db = tmp_path / "ann.sqlite"
    assert main(["annotate", "add-annotator", "--db", str(db), "--name", "x"]) == 2
    assert "no such annotation database" in capsys.readouterr().err
    assert main(["annotate", "import", "--db", str(db), "--data", str(data)]) == 0
    assert "imported 3 items" in capsys.readouterr().err
    fresh = tmp_path / "fresh.sqlite"  # add-annotator --data creates the store and imports first
    assert main(["annotate", "add-annotator", "--db", str(fresh), "--name", "z", "--data", str(data)]) == 0
    assert len(capsys.readouterr().out.strip()) >= 30
    assert main(["annotate", "add-annotator", "--db", str(db), "--name", "ann", "--items", "2"]) == 0
    token = capsys.readouterr().out.strip()
    assert main(["annotate", "add-annotator", "--db", str(db), "--name", "bob", "--overlap"]) == 0
    token_b = capsys.readouterr().out.strip()
    assert main(["annotate", "add-annotator", "--db", str(db), "--name", "cy", "--items", "9"]) == 2
    assert "between 1 and 3" in capsys.readouterr().err
    assert main(["annotate", "add-annotator", "--db", str(db), "--name", "ann"]) == 2
    assert "already exists" in capsys.readouterr().err
    store = Store(db)
    a, b = store.annotator_for_token(token)[0], store.annotator_for_token(token_b)[0]
    assert len(store.queue(a)) == 2 and len(store.queue(b)) == 3
    shared = store.queue(a)[0]["item_id"]
    store.submit(a, shared, [0, 1, 2])
    store.submit(b, shared, [1, 0, 2])
    out = tmp_path / "rankings.jsonl"
    assert main(["annotate", "export", "--db", str(db), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 rankings" in printed and "pairwise agreement 0.667" in printed and "Kendall tau 0.333" in printed
    assert len(out.read_text().splitlines()) == 2
    assert (tmp_path / "rankings.agreement.json").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "responses": "abc"}\n')
    assert main(["annotate", "import", "--db", str(db), "--data", str(bad)]) == 2
    assert "bad.jsonl:1: field 'responses' must be list" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_command_as_a_process(tiny_lm_dir):
    """`rlhfkit serve` in its own process: loads the model, binds, answers, stops on SIGTERM."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", "serve", "--model", str(tiny_lm_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()  # "serving NAME at http://HOST:PORT/v1 ..."
        assert line.startswith("serving model at http://127.0.0.1:"), line + proc.stderr.read()[-2000:]
        base = line.split()[3]
        with urllib.request.urlopen(base + "/models", timeout=30) as r:
            assert json.loads(r.read())["data"][0]["id"] == "model"
        req = urllib.request.Request(base + "/chat/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 3, "temperature": 0}).encode())
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
