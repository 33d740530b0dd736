"""Export rankings for the reward stage, and inter-annotator agreement where items overlap.

Each exported record: ``{"prompt", "responses", "ranking" (indices, best first), "annotator",
"unsafe" (response indices), "wrong_steps" ([response, line] pairs), "time" (UTC ISO 8601),
"item_id"}``. Agreement is measured on every pair of annotators who ranked the same item:
the fraction of response pairs they order alike, and Kendall's tau (= 2 × that − 1 for full
rankings), averaged over those (item, annotator pair) comparisons and per annotator pair.
"""
from __future__ import annotations

from collections import defaultdict
from itertools import combinations
from pathlib import Path

from rlhfkit.annotate.store import Store
from rlhfkit.io import atomic_write_json, atomic_write_jsonl
from rlhfkit.judges.agreement import kendall_tau, ranking_pair_agreement


def agreement_path(out: str | Path) -> Path:
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.stem
    return out.with_name(stem + ".agreement.json")


def inter_annotator_agreement(records: list[dict]) -> dict:
    by_item: dict[int, list[dict]] = defaultdict(list)
    for r in records:
        by_item[r["item_id"]].append(r)
    comparisons, per_pair = [], defaultdict(list)
    for item_id, rs in sorted(by_item.items()):
        for x, y in combinations(sorted(rs, key=lambda r: r["annotator"]), 2):
            pa = ranking_pair_agreement(x["ranking"], y["ranking"])
            comparisons.append(pa)
            per_pair[(x["annotator"], y["annotator"])].append(pa)
    n_overlap = sum(1 for rs in by_item.values() if len(rs) >= 2)
    if not comparisons:
        return {"items_ranked": len(by_item), "items_overlapping": 0, "comparisons": 0,
                "pairwise_agreement": None, "kendall_tau": None, "by_annotator_pair": []}
    mean = sum(comparisons) / len(comparisons)
    return {
        "items_ranked": len(by_item),
        "items_overlapping": n_overlap,
        "comparisons": len(comparisons),
        "pairwise_agreement": mean,
        "kendall_tau": 2 * mean - 1,
        "by_annotator_pair": [
            {"annotators": list(k), "items": len(v), "pairwise_agreement": sum(v) / len(v),
             "kendall_tau": 2 * sum(v) / len(v) - 1}
            for k, v in sorted(per_pair.items())],
    }


def export(store: Store, out: str | Path) -> tuple[list[dict], dict]:
    """Write the rankings to ``out`` (JSONL) and the agreement beside it; return both."""
    records = store.rankings()
    for r in records:  # recheck what the store holds before anything downstream trusts it
        kendall_tau(r["ranking"], r["ranking"])
    atomic_write_jsonl(Path(out), records)
    agreement = inter_annotator_agreement(records)
    atomic_write_json(agreement_path(out), agreement)
    return records, agreement


def format_agreement(a: dict) -> str:
    if not a["comparisons"]:
        return f"{a['items_ranked']} items ranked; no item ranked by two annotators, so no agreement to report"
    lines = [f"{a['items_ranked']} items ranked, {a['items_overlapping']} by two or more annotators "
             f"({a['comparisons']} comparisons)",
             f"pairwise agreement {a['pairwise_agreement']:.3f}   Kendall tau {a['kendall_tau']:.3f}"]
    for p in a["by_annotator_pair"]:
        lines.append(f"  {p['annotators'][0]} vs {p['annotators'][1]}: {p['items']} items, "
                     f"agreement {p['pairwise_agreement']:.3f}, tau {p['kendall_tau']:.3f}")
    return "\n".join(lines)
