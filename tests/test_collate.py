"""SFT label masking and pretraining packing boundaries."""
from __future__ import annotations

from rlhfkit.data.collate import IGNORE, collate_sft, pack_documents, tokenize_demonstrations
from rlhfkit.data.loading import Demonstration


def test_sft_prompt_tokens_get_no_loss(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, response = "Question: Tom has 3 apples. He buys 4 more apples.\n", "3 + 4 = 7\nAnswer: 7"
    (ex,), n_cut = tokenize_demonstrations(tok, [Demonstration(prompt, response)], max_len=128)
    assert n_cut == 0
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    assert ex.input_ids == p_ids + r_ids + [tok.eos_token_id]
    # Every prompt position is masked; every response token and the EOS carry a loss.
    assert ex.labels == [IGNORE] * len(p_ids) + r_ids + [tok.eos_token_id]
    assert ex.n_loss_tokens == len(r_ids) + 1
    batch = collate_sft([ex, ex], tok.pad_token_id)
    # The loss positions decode back to exactly the response (+EOS).
    kept = [t for t in batch["labels"][0].tolist() if t != IGNORE]
    assert tok.decode(kept, skip_special_tokens=True) == response


def test_sft_padding_is_masked(tiny_tokenizer):
    tok = tiny_tokenizer
    exs, _ = tokenize_demonstrations(tok, [Demonstration("Question: a\n", "Answer: 1"),
                                           Demonstration("Question: a much longer question here\n", "Answer: 22")], 128)
    b = collate_sft(exs, tok.pad_token_id)
    short = len(exs[0].input_ids)
    assert b["attention_mask"][0, short:].sum() == 0
    assert (b["labels"][0, short:] == IGNORE).all()
    assert b["input_ids"].shape == b["labels"].shape == b["attention_mask"].shape


def test_packing_boundaries(tiny_tokenizer):
    tok = tiny_tokenizer
    docs = ["Tom has 3 apples.", "1 + 2 = 3", "Ana has 12 pens. She buys 4 more pens.", "5 * 3 = 15"]
    doc_ids = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs]
    block = max(len(d) for d in doc_ids) + 3
    blocks = pack_documents(tok, docs, block)
    # Every token of every document appears once, in order, and no block exceeds block_size.
    assert [t for b in blocks for t in b.input_ids] == [t for d in doc_ids for t in d]
    assert all(len(b.input_ids) <= block for b in blocks)
    # No document straddles two blocks (none is longer than a block here).
    starts = 0
    for b in blocks:
        consumed = 0
        while consumed < len(b.input_ids):
            d = doc_ids[starts]
            assert b.input_ids[consumed:consumed + len(d)] == d
            # positions restart at each document; its first token is never a target.
            assert b.position_ids[consumed:consumed + len(d)] == list(range(len(d)))
            assert b.labels[consumed] == IGNORE
            assert b.labels[consumed + 1:consumed + len(d)] == d[1:]
            consumed += len(d)
            starts += 1
    assert starts == len(docs)


def test_packing_splits_a_document_longer_than_a_block(tiny_tokenizer):
    tok = tiny_tokenizer
    doc = "Tom has 3 apples. He buys 4 more apples. He gives away 2 apples."
    ids = tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    blocks = pack_documents(tok, [doc], 8)
    assert [t for b in blocks for t in b.input_ids] == ids
    assert [p for b in blocks for p in b.position_ids] == list(range(len(ids)))
    assert blocks[0].labels[0] == IGNORE and blocks[1].labels[0] == ids[8]
