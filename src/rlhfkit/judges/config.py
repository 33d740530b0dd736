"""The judge config: one YAML file per AI judge (``configs/judge_*.yaml``), and its one parser.

:func:`load_judge_config` is the only reader of this format; :func:`rlhfkit.judges.spec.from_spec`
builds the judge, so a judge measured by ``rlhfkit judge-eval`` is exactly the judge that labels
and evaluates.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from rlhfkit.config import load_config
from rlhfkit.paths import ConfigPath


class JudgeKind(enum.StrEnum):
    LLM = "llm"
    """a local transformers causal LM (directory, .gguf file or package:NAME/FILE.gguf)"""
    HTTP = "http"
    """an OpenAI-compatible chat-completions endpoint"""
    ORACLE = "oracle"
    """the embedded task's oracle (needs each record's ``meta``)"""


@dataclass(frozen=True)
class JudgeConfig:
    """An AI judge: which model, which prompt, and how its verdicts are read."""

    kind: JudgeKind = JudgeKind.LLM
    """llm, http or oracle"""
    model: str = ""
    """llm: a model directory, a .gguf file, or package:NAME[/FILE.gguf]; http: the model name sent to the endpoint
    (a name, so not a path of the path rule: a relative llm directory is taken from the working directory)"""
    gguf_file: str | None = None
    """llm: the .gguf file inside ``model``'s directory, when it holds several"""
    rubric_file: ConfigPath | None = None
    """a text file with the judging criteria (default: a built-in instruction-following rubric)"""
    constitution_file: ConfigPath | None = None
    """a text file of principles, one per line (instead of rubric_file)"""
    labels: tuple[str, str] = ("A", "B")
    """the two answer labels the judge answers with: [A, B] or ["1", "2"]"""
    average_orders: bool = True
    """ask both orders and average, removing position bias from the reported probability"""
    cot: bool = False
    """generate a chain-of-thought rationale before the answer and keep it with the label"""
    max_new_tokens: int = 128
    """longest rationale, in tokens (cot only)"""
    batch_size: int = 4
    """llm: prompts per forward pass"""
    base_url: str | None = None
    """http: the endpoint's base URL, up to and including /v1 (else env RLHFKIT_JUDGE_BASE_URL)"""
    api_key: str | None = None
    """http: the API key (better: leave empty and set the variable named by api_key_env)"""
    api_key_env: str = "OPENAI_API_KEY"
    """http: the environment variable holding the API key, read when api_key is empty"""
    timeout_s: float = 60.0
    """http: seconds to wait for one response"""
    max_retries: int = 4
    """http: retries after a timeout, a connection error, 429 or 5xx (then the error is raised)"""
    backoff_s: float = 0.5
    """http: the first retry's delay; each later retry waits twice as long"""
    concurrency: int = 4
    """http: requests in flight at once"""
    cache: ConfigPath | None = None
    """http: an SQLite file caching responses by hash of model + messages + parameters"""
    use_logprobs: bool = True
    """http: ask for logprobs and read the probability from them (else, or if absent, from the answer letter)"""
    beta: float = 10.0
    """oracle: sharpness of P(a > b) = sigmoid(beta * (score_a - score_b))"""

    def __post_init__(self):
        # Only checks of single fields here: the loader validates each override on its own.
        for key in ("max_new_tokens", "batch_size", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1")
        if self.max_retries < 0 or self.timeout_s <= 0 or self.backoff_s < 0:
            raise ValueError("need max_retries >= 0, timeout_s > 0, backoff_s >= 0")


def load_judge_config(path: str | Path, overrides: Sequence[str] = ()) -> JudgeConfig:
    """The :class:`JudgeConfig` a judge YAML file holds, with ``key=value`` overrides applied (they win).

    Errors are :class:`~rlhfkit.config.ConfigError` naming the file, or the override, and the key.
    """
    return load_config(JudgeConfig, path, overrides)
