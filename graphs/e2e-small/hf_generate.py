"""The small E2E GPT-2 (hf/, tokenizer.json) in PyTorch, and HF's `generate` on one prompt: shared by the reference
scripts beside it (make_stop_references.py, make_length_references.py)."""
import os

import torch
from transformers import GPT2LMHeadModel, PreTrainedTokenizerFast

HERE = os.path.dirname(os.path.abspath(__file__))


def load():
    """The model (eval mode), its tokenizer and its end-of-sequence id."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(os.path.join(HERE, "hf")).eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(HERE, "tokenizer.json"))
    return model, tok, model.config.eos_token_id


def prompt_ids(tok, source, eos):
    """pfx's GPT-2 framing of a source, ' ' + source + ' <|endoftext|>', as the tokenizer gives it."""
    ids = tok(" " + source + " <|endoftext|>")["input_ids"]
    assert ids[-1] == eos, ids
    return ids


def generate(model, tok, ids, eos, **settings):
    """HF's new token ids for one prompt (greedy unless the settings say otherwise; the end-of-sequence id and what
    follows left out) and their text as pfxrun writes it (special tokens skipped, trimmed, newlines as spaces)."""
    with torch.no_grad():
        seq = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             do_sample=False, eos_token_id=eos, pad_token_id=eos, **settings)[0, len(ids):].tolist()
    if eos in seq:
        seq = seq[:seq.index(eos)]
    return seq, tok.decode(seq, skip_special_tokens=True).strip().replace("\n", " ")
