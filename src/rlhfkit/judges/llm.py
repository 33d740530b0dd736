"""An LLM judge on any local ``transformers`` causal LM (RLAIF: Bai et al. 2022, Lee et al. 2023).

P(a ≻ b) is read from the logits, not from sampled text: after the judging prompt, the next
token's probabilities of the two answer labels are renormalised over the two,
``p = P(L1) / (P(L1) + P(L2))``. A label may be tokenized with or without a leading space
depending on what precedes it (``"assistant\\n"`` vs ``"Answer:"``), so the probability of each
variant's first token is summed.

Both orders are asked and averaged when ``average_orders`` is on: the pair ``(a, b)`` is shown
as (A=a, B=b) and as (A=b, B=a), and P(a ≻ b) is the mean of P(A) in the first and P(B) in the
second. With chain of thought, a rationale is generated greedily first and kept; the answer is
then read after the rationale and an ``Answer:`` cue.
"""
from __future__ import annotations

from typing import Sequence

import torch

from rlhfkit.judges.prompt import JudgePrompt, Judgment, combine
from rlhfkit.models.local import load_for_inference


class LLMJudge:
    """A PreferenceFunction backed by a local causal LM. ``judge`` returns full Judgments."""

    def __init__(self, model, tokenizer, prompt: JudgePrompt | None = None, average_orders: bool = True,
                 cot: bool = False, max_new_tokens: int = 128, batch_size: int = 4, name: str = "llm"):
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.model = model.eval()
        self.tok = tokenizer
        self.prompt = prompt or JudgePrompt()
        self.average_orders = average_orders
        self.cot = cot
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.name = name

    @classmethod
    def from_pretrained(cls, ref: str, gguf_file: str | None = None, **kwargs) -> "LLMJudge":
        model, tok = load_for_inference(ref, gguf_file)
        return cls(model, tok, name=kwargs.pop("name", f"llm:{ref}"), **kwargs)

    # -- the PreferenceFunction interface -------------------------------------------------------
    def prob(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        return [j.prob for j in self.judge(items)]

    def judge(self, items: Sequence[tuple[str, str, str]], both_orders: bool | None = None) -> list[Judgment]:
        """Judgments for (prompt, a, b) triples. ``both_orders`` defaults to ``average_orders``;
        evaluation asks both orders even for a non-averaging judge, to measure position bias."""
        both = self.average_orders if both_orders is None else both_orders
        for i, it in enumerate(items):
            if len(it) != 3 or not isinstance(it[0], (str, tuple)) or not all(isinstance(s, str) for s in it[1:]):
                raise ValueError(f"item {i}: expected a (prompt, a, b) triple: a prompt (text or messages) and two strings")
        queries = [(p, a, b) for p, a, b in items]
        if both:
            queries += [(p, b, a) for p, a, b in items]
        contexts, rationales = self._contexts(queries)
        p_first_slot = self._label_probs(contexts)
        n = len(items)
        out = []
        for i in range(n):
            p1 = p_first_slot[i]
            # In the swapped query a sits in the second slot: P(a ≻ b) = 1 - P(first slot wins).
            p2 = 1.0 - p_first_slot[n + i] if both else None
            rats = (rationales[i], rationales[n + i]) if (both and self.cot) else ((rationales[i],) if self.cot else ())
            out.append(Judgment(prob=combine(p1, p2, self.average_orders), prob_a_first=p1, prob_a_second=p2,
                                rationales=rats))
        return out

    # -- internals ------------------------------------------------------------------------------
    def _render(self, messages: list[dict]) -> str:
        if getattr(self.tok, "chat_template", None):
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # No chat template: join the turns plainly and cue the answer.
        return "\n\n".join(m["content"] for m in messages) + "\n\nAnswer:"

    def _contexts(self, queries) -> tuple[list[str], list[str]]:
        contexts, rationales = [], []
        for p, first, second in queries:
            ctx = self._render(self.prompt.messages(p, first, second, cot=self.cot))
            rationale = ""
            if self.cot:
                rationale = self._generate(ctx)
                ctx = ctx + rationale + self.prompt.answer_prefix()
            contexts.append(ctx)
            rationales.append(rationale)
        return contexts, rationales

    @torch.no_grad()
    def _generate(self, ctx: str) -> str:
        enc = self.tok(ctx, return_tensors="pt", add_special_tokens=False)
        out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tok.pad_token_id)
        return self.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    def _label_ids(self, ctx_ids: list[int], ctx: str) -> list[list[int]]:
        """For each label, the token ids of its one-token spellings right after ``ctx``.

        A spelling that takes several tokens there (" A" as "Ġ" + "A" in a small vocabulary) is
        skipped: its first token would be shared with the other label's."""
        ids = []
        for label in self.prompt.labels:
            cand = set()
            for variant in (label, " " + label):
                full = self.tok(ctx + variant, add_special_tokens=False)["input_ids"]
                if full[: len(ctx_ids)] == ctx_ids and len(full) == len(ctx_ids) + 1:
                    cand.add(full[-1])
            if not cand:  # the label merges with the context's last token: use it alone
                alone = self.tok(label, add_special_tokens=False)["input_ids"]
                if len(alone) != 1:
                    raise ValueError(f"answer label {label!r} is not a single token in this tokenizer; choose other labels")
                cand.add(alone[0])
            ids.append(sorted(cand))
        if set(ids[0]) & set(ids[1]):
            raise ValueError(f"answer labels {self.prompt.labels} share a token in this tokenizer; choose other labels")
        return ids

    def _last_logits(self, input_ids, mask, position_ids):
        """(B, V) logits at the last position. ``logits_to_keep=1`` skips the LM head elsewhere
        (a 49k-token vocabulary makes that head a fifth of a small model's compute)."""
        kw = dict(input_ids=input_ids, attention_mask=mask, position_ids=position_ids)
        try:
            out = self.model(**kw, logits_to_keep=1)
        except TypeError:  # a model class without the argument
            out = self.model(**kw)
        return out.logits[:, -1, :].float()

    @torch.no_grad()
    def _label_probs(self, contexts: list[str]) -> list[float]:
        """P(first label) / (P(first) + P(second)) at the next token after each context."""
        encoded = [self.tok(c, add_special_tokens=False)["input_ids"] for c in contexts]
        label_ids = [self._label_ids(ids, c) for ids, c in zip(encoded, contexts)]
        device = next(self.model.parameters()).device
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        probs = [0.0] * len(contexts)
        order = sorted(range(len(contexts)), key=lambda i: len(encoded[i]))  # similar lengths pad less
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            # Left padding so the last column is every row's last real token; positions from the
            # mask so a padded row sees the same positions as it would alone.
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                L = len(encoded[i])
                input_ids[r, width - L:] = torch.tensor(encoded[i])
                mask[r, width - L:] = 1
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self._last_logits(input_ids.to(device), mask.to(device), position_ids.to(device))
            logp = torch.log_softmax(logits, dim=-1)  # (B, V)
            for r, i in enumerate(idx):
                l1 = torch.logsumexp(logp[r, label_ids[i][0]], dim=0)
                l2 = torch.logsumexp(logp[r, label_ids[i][1]], dim=0)
                probs[i] = torch.sigmoid(l1 - l2).item()  # = e^l1 / (e^l1 + e^l2)
        return probs
