"""Configs: typed, frozen, documented; errors name the key and the file."""
from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from rlhfkit.config import ConfigError, field_docs, load_config, parse_override, save_config
from rlhfkit.pipeline import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, f)
    assert str(f) in str(e.value) and "'sft.lrr'" in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("pretrain:\n  batch_size: many\n")
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, f)
    assert str(f) in str(e.value) and "'pretrain.batch_size'" in str(e.value) and "int" in str(e.value)


def test_bool_is_not_an_int(tmp_path):
    with pytest.raises(ConfigError, match="pretrain.max_steps"):
        load_config(PipelineConfig, None, ["pretrain.max_steps=true"])


def test_bad_override_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_config(PipelineConfig, None, ["sft.nope=3"])
    assert "sft.nope=3" in str(e.value) and "unknown key 'sft.nope'" in str(e.value)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(PipelineConfig, None, ["sft.lr"])


def test_value_check_in_post_init_is_reported():
    with pytest.raises(ConfigError, match="grad_accum_steps"):
        load_config(PipelineConfig, None, ["sft.batch_size=10", "sft.grad_accum_steps=3"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(PipelineConfig, None, ["stages=[data, fly]"])


def test_cross_field_checks_apply_to_the_merged_config():
    # grad_accum_steps=3 alone would not divide the default batch of 32; with batch_size=12 it does.
    cfg = load_config(PipelineConfig, None, ["sft.grad_accum_steps=3", "sft.batch_size=12"])
    assert (cfg.sft.batch_size, cfg.sft.grad_accum_steps) == (12, 3)


def test_overrides_win_and_types_are_coerced(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  lr: 1.0e-3\n  batch_size: 16\n")
    cfg = load_config(PipelineConfig, f, ["sft.lr=5e-4", "out=x", "eval.policies={a: b}"])
    assert cfg.sft.lr == 5e-4 and isinstance(cfg.sft.lr, float)
    assert cfg.sft.batch_size == 16 and cfg.out == "x" and cfg.eval.policies == {"a": "b"}
    # A mapping-valued field is replaced whole by an override, not merged key by key.
    g = tmp_path / "d.yaml"
    g.write_text("eval:\n  policies: {base: stage:pretrain/model, sft: stage:sft/model, ppo: stage:ppo/model}\n")
    assert load_config(PipelineConfig, g, ["eval.policies={sft: stage:sft/model}"]).eval.policies == {"sft": "stage:sft/model"}
    assert parse_override("a.b.c=[1, 2]") == {"a": {"b": {"c": [1, 2]}}}


def test_yaml_bool_spellings_reach_enum_members(tmp_path):
    # YAML 1.1 reads unquoted no/off/false as False and yes/on/true as True: an enum field takes its member
    # spelled that way (mixed_precision: no), or "true"/"false" (kl_in_loss), on the command line and in files.
    cfg = load_config(PipelineConfig, None, ["sft.mixed_precision=no", "ppo.kl_in_loss=false"])
    assert cfg.sft.mixed_precision == "no" and cfg.ppo.kl_in_loss == "false"
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  mixed_precision: no\nppo:\n  kl_in_loss: yes\n")
    cfg = load_config(PipelineConfig, f)
    assert cfg.sft.mixed_precision == "no" and cfg.ppo.kl_in_loss == "true"
    with pytest.raises(ConfigError, match="mixed_precision.*'true' is not one of auto, no, bf16, fp16"):
        load_config(PipelineConfig, None, ["sft.mixed_precision=yes"])


def test_configs_are_frozen():
    cfg = PipelineConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.out = "y"  # type: ignore[misc]


def test_save_then_load_round_trips(tmp_path):
    cfg = load_config(PipelineConfig, None, ["sft.lr=0.01", "pretrain.arch.num_layers=3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(PipelineConfig, tmp_path / "c.yaml") == cfg


def _all_dataclasses(cls, seen=None):
    seen = seen if seen is not None else []
    if cls in seen:
        return seen
    seen.append(cls)
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            _all_dataclasses(tp, seen)
    return seen


def test_every_config_field_has_a_docstring():
    missing = []
    for cls in _all_dataclasses(PipelineConfig):
        docs = field_docs(cls)
        missing += [f"{cls.__name__}.{f.name}" for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"fields without a docstring: {missing}"


def test_config_doc_gives_a_nested_section_its_parents_defaults():
    from rlhfkit.config import describe

    lines = {line.split(" (")[0]: line for line in describe(PipelineConfig)}
    # eval samples greedily (its default_factory), though a bare SamplingConfig samples at 1.0
    assert "default 0.0)" in lines["eval.sampling.temperature"], lines["eval.sampling.temperature"]
    assert "default 1.0)" in lines["ppo.sampling.temperature"], lines["ppo.sampling.temperature"]
    assert "default 0.7)" in lines["eval.sampled.temperature"]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "src/rlhfkit/configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_every_yaml_config_loads(path):
    from rlhfkit.commands.configs import config_class_for

    load_config(config_class_for(path), path)
