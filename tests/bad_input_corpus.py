"""A corpus of bad inputs across every loader, model reference and stage, built by code.

``cases(root, tiny_lm_dir)`` writes the files each case needs under ``root`` and returns
``Case(id, argv, must_say, stage)``: the ``rlhfkit`` command line, the strings its error must contain
(the file with its line, or the config key), and the stage whose output must not look complete.
``python tests/bad_input_corpus.py`` prints every case and what rlhfkit answers (the before/after
counts of the issue come from that listing).
"""
from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]
    must_say: tuple[str, ...]
    stage: str


def _w(path: Path, lines) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(lines, bytes):
        path.write_bytes(lines)
    else:
        path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def cases(root: Path, model: Path) -> list[Case]:
    root = Path(root)
    out = str(root / "out")
    good_demo = {"prompt": "Question: 1 + 1?\n", "response": "Answer: 2"}
    good_pair = {"prompt": "Question: 1 + 1?\n", "chosen": "Answer: 2", "rejected": "Answer: 3"}
    good_prompt = {"prompt": "Question: 1 + 1?\n"}
    c: list[Case] = []

    def sft(name, rows, must, *extra):
        f = _w(root / f"{name}.jsonl", rows) if not isinstance(rows, Path) else rows
        c.append(Case(f"sft-{name}", ["sft", f"model={model}", f"data={f}", f"out={out}", "max_steps=1",
                                      "batch_size=1", *extra], tuple(str(x).replace("@", str(f)) for x in must), "sft"))

    def pairs(stage, name, rows, must, *extra):
        f = _w(root / f"{stage}-{name}.jsonl", rows)
        base = {"dpo": ["dpo", f"model={model}", f"data={f}", "max_steps=1", "batch_size=1"],
                "reward": ["reward", f"model={model}", f"data={f}", "train_prm=false", "train_orm=false",
                           "train_cost=false", "rerank.enabled=false", "max_steps=1", "batch_size=1"]}[stage]
        c.append(Case(f"{stage}-{name}", base + [f"out={out}", *extra], tuple(x.replace("@", str(f)) for x in must), stage))

    def steps(name, rows, must):
        f = _w(root / f"steps-{name}.jsonl", rows)
        c.append(Case(f"reward-steps-{name}", ["reward", f"model={model}", f"steps_data={f}", "train_rm=false",
                                                "rerank.enabled=false", "max_steps=1", "batch_size=1", f"out={out}"],
                      tuple(x.replace("@", str(f)) for x in must), "reward"))

    def prompts(stage, name, rows, must):
        f = _w(root / f"{stage}-{name}.jsonl", rows) if not isinstance(rows, Path) else rows
        base = {"ppo": ["ppo", "algorithm=grpo", f"policy={model}", f"data={f}", "reward_source=callable",
                        "reward_fn=builtins:len", "total_steps=1", "prompts_per_step=1", "group_size=2"],
                "eval": ["eval", f"data={f}", f"policies={{a: {model}}}", "reference=a", "judge=oracle"]}[stage]
        c.append(Case(f"{stage}-prompts-{name}", base + [f"out={out}"], tuple(x.replace("@", str(f)) for x in must), stage))

    # --- the record loaders (JSONL, gz, JSON, CSV, parquet, datasets) through SFT
    sft("malformed-json", [good_demo, '{"prompt": "a", "response": '], ["@:2: malformed JSON"])
    sft("not-an-object", [good_demo, "[1, 2]"], ["@:2: expected a JSON object"])
    sft("non-utf8", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n', ["@:2: not UTF-8"])
    sft("missing-response", [good_demo, {"prompt": "a"}], ["@:2: missing field 'response'"])
    sft("prompt-wrong-type", [{"prompt": 3, "response": "b"}], ["@:1: field 'prompt' must be str"])
    sft("empty-response", [{"prompt": "a", "response": "  "}], ["@:1: field 'response' is empty"])
    sft("empty-file", [], ["@: no records"])
    sft("no-known-fields", [{"question": "a", "answer": "b"}], ["@:1: an SFT record needs"])
    sft("messages-no-assistant", [{"messages": [{"role": "user", "content": "q"}]}],
        ["@:1: field 'messages' must end with an assistant message"])
    sft("messages-bad-role", [{"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]}],
        ["@:1:", "messages[0]"])
    sft("messages-not-list", [{"messages": "hello"}], ["@:1:", "'messages'"])
    sft("completion-bad-messages", [{"prompt": "q", "completion": [{"role": "user", "content": "a"}]}],
        ["@:1: field 'completion' must end with an assistant message"])
    sft("too-long", [good_demo, {"prompt": "Tom has 3 apples. " * 40, "response": "b"}], ["@:2: prompt is"], "max_len=32")
    sft("too-long-response", [{"prompt": "q\n", "response": "3 + 4 = 7\n" * 40}], ["@:1: prompt + response is"],
        "max_len=32")
    sft("missing-file", root / "nope.jsonl", [f"{root / 'nope.jsonl'}: file not found"])
    sft("unknown-format", _w(root / "demos.tsv", ["a\tb"]), ["demos.tsv: unknown data format"])
    sft("json-not-list", _w(root / "demos.json", ['{"prompt": "a"}']), ["demos.json: a .json data file must hold a list"])
    sft("json-malformed", _w(root / "bad.json", ['[{"prompt": "a",']), ["bad.json:"])
    sft("csv-missing-column", _w(root / "demos.csv", ["prompt,answer", "a,b"]), ["demos.csv:2: missing field 'response'"])
    sft("gz-corrupt", _w(root / "demos.jsonl.gz", b"this is not gzip"), ["demos.jsonl.gz"])
    sft("gz-non-utf8", _w(root / "demos2.jsonl.gz", gzip.compress(b'{"prompt": "\xff", "response": "b"}\n')),
        ["demos2.jsonl.gz:1: not UTF-8"])
    sft("json-non-utf8", _w(root / "demos8.json", b'[{"prompt": "a",\n "response": "\xff"}]'), ["demos8.json:2: not UTF-8"])
    sft("csv-non-utf8", _w(root / "demos8.csv", b'prompt,response\na,b\nc,\xff\n'), ["demos8.csv:3: not UTF-8"])
    sft("parquet-corrupt", _w(root / "demos.parquet", b"PAR1 garbage"), ["demos.parquet"])
    d = root / "notads"
    d.mkdir(parents=True, exist_ok=True)
    sft("dir-not-a-dataset", d, ["notads: a directory must be a dataset"])

    # --- model references
    def model_case(name, ref, must):
        f = _w(root / "ok-demos.jsonl", [good_demo] * 2)
        c.append(Case(f"sft-model-{name}", ["sft", f"model={ref}", f"data={f}", f"out={out}", "max_steps=1",
                                             "batch_size=1"], tuple(must), "sft"))

    model_case("missing-dir", str(root / "no" / "such" / "model"), [str(root / "no" / "such" / "model"), "does not exist"])
    nw = root / "no-weights"
    _w(nw / "config.json", ["{}"])
    model_case("no-weights", str(nw), [str(nw), "no weights"])
    gb = root / "garbage-weights"
    _w(gb / "config.json", [json.dumps({"model_type": "llama"})])
    _w(gb / "model.safetensors", b"\x00\x01garbage")
    model_case("garbage-safetensors", str(gb), [str(gb / "model.safetensors")])
    model_case("hub-offline", "nobody-org/no-such-model", ["nobody-org/no-such-model"])
    model_case("not-gguf-file", str(_w(root / "weights.bin", b"xx")), ["weights.bin", ".gguf"])
    model_case("package-missing", "package:no_such_pkg_xyz", ["no_such_pkg_xyz", "not installed"])

    # --- config values (names the key)
    def cfg_case(name, override, key, stage="sft"):
        f = _w(root / "ok-demos.jsonl", [good_demo] * 2)
        c.append(Case(f"config-{name}", [stage, f"{'policy' if stage == 'ppo' else 'model'}={model}", f"data={f}",
                                          f"out={out}", override], (key,), stage))

    cfg_case("lr-negative", "lr=-1", "lr must be")
    cfg_case("lr-nan", "lr=.nan", "lr must be")
    cfg_case("max-steps-negative", "max_steps=-5", "max_steps must be")
    cfg_case("epochs-negative", "epochs=-1", "epochs must be")
    cfg_case("batch-size-zero", "batch_size=0", "batch_size")
    cfg_case("unknown-key", "learning_rate=1e-3", "unknown key 'sft.learning_rate'")
    cfg_case("wrong-type", "max_len=long", "key 'sft.max_len' must be an int")
    cfg_case("truncation-bad", "truncation=middle", "key 'sft.truncation'")
    cfg_case("lora-r-negative", "lora.r=-1", "lora.r must be")
    cfg_case("lora-dropout", "lora.dropout=1.0", "lora.dropout must be")
    cfg_case("report-to-bad", "report_to=[foo]", "report_to")
    cfg_case("scheduler-bad", "scheduler=bogus", "scheduler must be")
    cfg_case("dpo-beta-zero", "beta=0", "beta must be", stage="dpo")
    cfg_case("dpo-label-smoothing", "label_smoothing=0.7", "label_smoothing must be", stage="dpo")
    cfg_case("reward-heldout-frac", "heldout_frac=2", "heldout_frac must be", stage="reward")
    cfg_case("ppo-total-steps-zero", "total_steps=0", "total_steps must be", stage="ppo")
    cfg_case("ppo-gamma", "gamma=1.5", "gamma must be", stage="ppo")
    cfg_case("ppo-top-p", "sampling.top_p=2", "top_p must be", stage="ppo")
    cfg_case("ppo-temperature-zero", "sampling.temperature=0", "temperature must be > 0", stage="ppo")
    cfg_case("ppo-lr-nan", "lr=.nan", "lr must be", stage="ppo")

    # --- preference data
    pairs("dpo", "chosen-is-list-of-user", [{"prompt": "q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"}],
          ["@:1: field 'chosen' must end with an assistant message"])
    pairs("dpo", "ranking-mixed-types", [{"prompt": "q", "responses": ["a", "b"], "ranking": [0, "1"]}],
          ["@:1: field 'ranking'"])
    pairs("dpo", "ranking-responses-mixed", [{"prompt": "q", "responses": ["a", 3], "ranking": [0, 1]}],
          ["@:1: field 'responses' must be a list of strings"])
    pairs("dpo", "not-a-preference", [{"text": "a"}], ["@:1: not a preference record"])
    pairs("dpo", "conversations-differ", [{"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                                            "rejected": [{"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]}],
          ["@:1: 'chosen' and 'rejected' conversations differ"])
    pairs("dpo", "all-identical", [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 3,
          ["@: no preference pairs", "chosen equals rejected"])
    pairs("dpo", "mostly-identical", [good_pair] + [{"prompt": "q", "chosen": "same", "rejected": "same"}] * 2,
          ["@: 2 of 3 records are unusable", "@:2: chosen equals rejected"])
    pairs("reward", "empty-chosen", [good_pair, {"prompt": "q", "chosen": " ", "rejected": "b"}], ["@:2: field 'chosen' is empty"])
    pairs("reward", "hh-not-transcript", [{"chosen": "no turns here", "rejected": "nor here"}],
          ["@:1: field 'chosen' is not an HH-RLHF transcript"])
    pairs("reward", "margin-string", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}],
          ["@:1: field 'margin' must be a number"])
    steps("prm800k-missing-instruction", [{"responses": ["a"], "next_response": "b", "rating": 1}], ["@:1:", "instruction"])
    steps("prm800k-string-rating", [{"instruction": "q", "responses": [], "next_response": "b", "rating": "good"}],
          ["@:1:", "rating"])
    steps("labels-length", [{"prompt": "q", "steps": ["a", "b"], "labels": [1]}], ["@:1:", "labels"])

    # --- prompts
    prompts("ppo", "missing-prompt", [good_prompt, {"question": "q"}], ["@:2: missing field 'prompt'"])
    prompts("ppo", "non-utf8", b'{"prompt": "\xff"}\n', ["@:1: not UTF-8"])
    prompts("eval", "oracle-without-meta", [good_prompt], ["@:1:", "meta"])
    prompts("eval", "meta-not-object", [{"prompt": "q", "meta": 3}], ["@:1: field 'meta' must be an object"])
    # --- the other stages' loaders: pretrain corpus, label / DNO prompts, eval-rm pairs
    txt = _w(root / "corpus.txt", b"doc one\n\ndoc \xff two\n")
    c.append(Case("pretrain-txt-non-utf8", ["pretrain", f"data={txt}", f"out={out}", "max_steps=1"],
                  (f"{txt}:3: not UTF-8",), "pretrain"))
    nt = _w(root / "corpus.jsonl", [{"text": "a"}, {"body": "b"}])
    c.append(Case("pretrain-missing-text", ["pretrain", f"data={nt}", f"out={out}", "max_steps=1"],
                  (f"{nt}:2: missing field 'text'",), "pretrain"))
    lp = _w(root / "label-prompts.jsonl", [good_prompt, {"prompt": ""}])
    c.append(Case("label-empty-prompt", ["label", f"policy={model}", f"data={lp}", f"out={out}"],
                  (f"{lp}:2: field 'prompt' is empty",), "label"))
    dp = _w(root / "dno-prompts.jsonl", [good_prompt, '{"prompt": '])
    c.append(Case("dno-malformed-prompts", ["dno", f"model={model}", f"prompts={dp}", f"out={out}", "judge=oracle"],
                  (f"{dp}:2: malformed JSON",), "dno"))
    ep = _w(root / "evalrm-pairs.jsonl", [good_pair, {"prompt": "q", "chosen": 1, "rejected": "b"}])
    c.append(Case("eval-rm-bad-pair", ["eval-rm", "--model", str(model), "--data", str(ep)],
                  (f"{ep}:2:", "'chosen'"), "eval-rm"))
    return c


if __name__ == "__main__":  # list the corpus and what rlhfkit answers today
    import contextlib
    import io
    import sys
    import tempfile

    from rlhfkit.cli import main

    root = Path(tempfile.mkdtemp())
    model = Path(sys.argv[1])
    counts = {"clear": 0, "traceback": 0, "accepted": 0, "unclear": 0}
    for case in cases(root, model):
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                code = main(case.argv)
        except BaseException as e:  # noqa: BLE001
            code, kind = None, f"traceback: {type(e).__name__}: {str(e)[:100]}"
        else:
            said = err.getvalue()
            ok = code == 2 and all(s in said for s in case.must_say)
            kind = "clear" if ok else ("accepted" if code == 0 else f"unclear (exit {code}): {said.strip()[-150:]}")
        counts[kind.split()[0].rstrip(":")] += 1
        print(f"{case.id:40s} {kind}")
        import shutil

        shutil.rmtree(root / "out", ignore_errors=True)
    print(json.dumps(counts))
