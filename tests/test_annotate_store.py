"""The annotation store and export: validation with locations, assignment, one ranking per item, agreement."""
from __future__ import annotations

import json
import sqlite3

import pytest

from rlhfkit.annotate.export import agreement_path, export, inter_annotator_agreement
from rlhfkit.annotate.store import Store, StoreError
from rlhfkit.data.loading import DataError


def write_items(path, n=4, k=3):
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "responses": [f"r{i}.{j}\nline two" for j in range(k)]}) + "\n"
                            for i in range(n)))
    return path


def test_items_are_validated_with_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok", "responses": ["a", "b"]}) + "\n"
                   + json.dumps({"prompt": "x", "responses": ["only one"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: 'responses' must hold at least 2"):
        Store(tmp_path / "db.sqlite").import_items(bad)
    bad.write_text(json.dumps({"prompt": "x", "responses": ["a", 3]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: responses\[1\] must be a string"):
        Store(tmp_path / "db.sqlite").import_items(bad)
    bad.write_text(json.dumps({"responses": ["a", "b"]}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'prompt'"):
        Store(tmp_path / "db.sqlite").import_items(bad)


def test_wal_hashed_tokens_idempotent_import_and_balanced_assignment(tmp_path):
    db = tmp_path / "db.sqlite"
    store = Store(db)
    data = write_items(tmp_path / "items.jsonl", n=4)
    assert store.import_items(data) == (4, 0)
    assert store.import_items(data) == (0, 4)  # same items are not added twice
    with store.connect() as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    t1 = store.add_annotator("ann1", 2)
    t2 = store.add_annotator("ann2", 2)
    t3 = store.add_annotator("ann3")  # every item
    raw = db.read_bytes() + (tmp_path / "db.sqlite-wal").read_bytes() if (tmp_path / "db.sqlite-wal").exists() else db.read_bytes()
    for t in (t1, t2, t3):
        assert t.encode() not in raw  # only the hash is stored
    a1, a2, a3 = (store.annotator_for_token(t)[0] for t in (t1, t2, t3))
    q1, q2 = [q["item_id"] for q in store.queue(a1)], [q["item_id"] for q in store.queue(a2)]
    assert len(q1) == 2 and len(q2) == 2 and not set(q1) & set(q2)  # least-assigned first
    assert len(store.queue(a3)) == 4
    assert store.annotator_for_token("nope") is None
    with pytest.raises(StoreError) as e:
        store.add_annotator("ann1")
    assert e.value.status == 409
    with pytest.raises(StoreError, match="between 1 and 4"):
        store.add_annotator("ann4", 5)


def test_submit_validates_refuses_others_and_duplicates(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.import_items(write_items(tmp_path / "items.jsonl", n=2))
    a = store.annotator_for_token(store.add_annotator("a", 1))[0]
    b = store.annotator_for_token(store.add_annotator("b", 1))[0]
    mine = store.queue(a)[0]["item_id"]
    theirs = store.queue(b)[0]["item_id"]
    for bad, msg in [([0, 1], "exactly once"), ([0, 0, 1], "exactly once"), ([0, 1, True], "exactly once"),
                     ("012", "exactly once")]:
        with pytest.raises(StoreError, match=msg) as e:
            store.submit(a, mine, bad)
        assert e.value.status == 400
    with pytest.raises(StoreError, match="unsafe"):
        store.submit(a, mine, [0, 1, 2], unsafe=[3])
    with pytest.raises(StoreError, match="lines 0..1"):
        store.submit(a, mine, [0, 1, 2], wrong_steps=[[0, 2]])
    with pytest.raises(StoreError) as e:
        store.submit(a, theirs, [0, 1, 2])
    assert e.value.status == 403
    with pytest.raises(StoreError) as e:
        store.submit(a, 999, [0, 1, 2])
    assert e.value.status == 404
    assert store.rankings() == []  # nothing stored by refused submissions
    store.submit(a, mine, [2, 0, 1], unsafe=[1, 1], wrong_steps=[[0, 1]])
    with pytest.raises(StoreError) as e:
        store.submit(a, mine, [0, 1, 2])
    assert e.value.status == 409
    recs = store.rankings()
    assert len(recs) == 1
    r = recs[0]
    assert (r["ranking"], r["unsafe"], r["wrong_steps"], r["annotator"]) == ([2, 0, 1], [1], [[0, 1]], "a")
    # The UNIQUE constraint itself (not only the check in submit) forbids a second row.
    with pytest.raises(sqlite3.IntegrityError), store.connect() as c:
        c.execute("INSERT INTO rankings (annotator_id, item_id, ranking, time) VALUES (?,?,?,0)", (a, mine, "[0,1,2]"))


def test_export_and_inter_annotator_agreement(tmp_path):
    store = Store(tmp_path / "db.sqlite")
    store.import_items(write_items(tmp_path / "items.jsonl", n=2))
    ids = {n: store.annotator_for_token(store.add_annotator(n))[0] for n in ("x", "y", "z")}
    item1, item2 = [q["item_id"] for q in store.queue(ids["x"])]
    store.submit(ids["x"], item1, [0, 1, 2])
    store.submit(ids["y"], item1, [0, 2, 1])  # vs x: pairs (0,1) (0,2) agree, (1,2) not -> 2/3
    store.submit(ids["z"], item1, [2, 1, 0])  # vs x: 0/3; vs y: (1,2) agrees only -> 1/3
    store.submit(ids["x"], item2, [1, 0, 2])  # item 2 ranked once: no comparison
    out = tmp_path / "export" / "rankings.jsonl"
    records, agr = export(store, out)
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines == records and len(lines) == 4
    assert set(lines[0]) >= {"prompt", "responses", "ranking", "annotator", "unsafe", "time"}
    assert [(l["annotator"], l["ranking"]) for l in lines] == [("x", [0, 1, 2]), ("y", [0, 2, 1]), ("z", [2, 1, 0]),
                                                              ("x", [1, 0, 2])]
    assert agr["comparisons"] == 3 and agr["items_overlapping"] == 1
    assert agr["pairwise_agreement"] == pytest.approx((2 / 3 + 0 + 1 / 3) / 3)
    assert agr["kendall_tau"] == pytest.approx(2 * (1 / 3) - 1)
    assert json.loads(agreement_path(out).read_text()) == agr
    assert agreement_path(out).name == "rankings.agreement.json"
    assert inter_annotator_agreement(records[3:])["pairwise_agreement"] is None
