"""Prompts as plain text or as conversations, and the one function that renders them for a model.

A prompt is either a string (one user turn) or a conversation: a tuple of ``Message`` (role,
content), hashable so it can key a dict like a string does. :func:`render_prompt` is the only
place a prompt becomes model text, and training (SFT, reward models, DPO, DNO), labelling, RL
rollouts, evaluation and ``rlhfkit serve`` all call it, so a model is trained and served in one
format:

- the tokenizer has a chat template: ``apply_chat_template(messages, add_generation_prompt=True)``
  (a system message in the conversation is passed through; the template adds its own default
  when it has one);
- it has none: a single user turn renders as its text, unchanged (the plain format the embedded
  task trains on); a longer conversation as ``role: content`` lines cued by ``assistant:``.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Sequence, Union

ROLES = ("system", "user", "assistant")


class Message(NamedTuple):
    role: str
    content: str


Conversation = tuple[Message, ...]
Prompt = Union[str, Conversation]


class ChatFormatError(ValueError):
    """A value that is not a list of {role, content} messages; the message says which part."""


def parse_messages(value: Any, field: str = "messages") -> Conversation:
    """A JSON list of ``{"role", "content"}`` objects as a :data:`Conversation` (ChatFormatError otherwise)."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ChatFormatError(f"field '{field}' must be a non-empty list of {{role, content}} messages")
    out = []
    for i, m in enumerate(value):
        if isinstance(m, Message):
            m = m._asdict()
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatFormatError(f"field '{field}[{i}]' must be {{'role': system|user|assistant, 'content': string}}")
        out.append(Message(m["role"], m["content"]))
    return tuple(out)


def as_messages(prompt: Prompt) -> list[dict]:
    """The prompt as chat messages (a string is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m.role, "content": m.content} for m in prompt]


def prompt_to_json(prompt: Prompt) -> str | list[dict]:
    """What a written record holds: the string, or the list of message objects."""
    return prompt if isinstance(prompt, str) else as_messages(prompt)


def prompt_as_text(prompt: Prompt) -> str:
    """Readable text of a prompt for a judge's or a person's eyes (never model input: see render_prompt)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].role == "user":
        return prompt[0].content
    return "\n".join(f"{m.role}: {m.content}" for m in prompt)


def render_prompt(tokenizer, prompt: Prompt) -> str:
    """The text the model sees before its response (see the module docstring for the two formats)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(as_messages(prompt), add_generation_prompt=True, tokenize=False)
    text = prompt_as_text(prompt)
    single_turn = isinstance(prompt, str) or (len(prompt) == 1 and prompt[0].role == "user")
    return text if single_turn else text + "\nassistant:"


def split_conversation(messages: Sequence[Message], where: str, field: str = "messages") -> tuple[Prompt, str]:
    """(prompt, response) of a conversation ending with an assistant turn: the last turn is the response.

    Raises ChatFormatError when the conversation does not end with an assistant message or has
    nothing before it.
    """
    if not messages or messages[-1].role != "assistant":
        raise ChatFormatError(f"{where}: field '{field}' must end with an assistant message (the response to learn)")
    if len(messages) < 2:
        raise ChatFormatError(f"{where}: field '{field}' has no prompt before its assistant message")
    return tuple(messages[:-1]), messages[-1].content


def completion_text(value: Any, where: str, field: str) -> str:
    """A response given as a string or as a list of messages ending with the assistant's (TRL's format)."""
    if isinstance(value, str):
        return value
    msgs = parse_messages(value, field)
    if msgs[-1].role != "assistant":
        raise ChatFormatError(f"{where}: field '{field}' must end with an assistant message")
    return msgs[-1].content
