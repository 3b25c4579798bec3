#!/usr/bin/env python3
"""Golden fixtures of the demo model (models/kjv-moe, trained by scripts/train_demo_model.py):
transformers' logits, hidden states and chosen experts on held-out KJV text, and greedy
continuations, written to tests/golden/data/reference/kjv-moe in the layout of
scripts/make_golden.py (the golden and equivalence tests read both alike). The reference is
fp32 compute on the checkpoint's bf16 weights, as for tiny-moe-bf16.

Prompts are held-out verses (every 50th, never trained on), tokenized with the model's own
tokenizer; a candidate is kept only where the reference's margins leave room for our error
(top-1 margins of greedy steps, router margins between the k-th and (k+1)-th expert).

  .venv-golden/bin/python scripts/make_demo_golden.py      (after scripts/train_demo_model.sh)
"""
import os
import sys

import numpy as np
import torch
from tokenizers import Tokenizer
from transformers import Gemma4ForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_golden as mg  # noqa: E402
from train_demo_model import HOLD_OUT_EVERY  # noqa: E402
from train_tokenizer import kjv_text  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_DIR = os.path.join(REPO, "models", "kjv-moe")
REF_DIR = os.path.join(REPO, "tests", "golden", "data", "reference", "kjv-moe")
# Forward prompts (tokens, <bos> included): <bos> alone, a verse, one past the sliding window
# of 64, and several windows through the global layer.
FORWARD_LENGTHS = [1, 12, 65, 160]
GREEDY_LENGTHS = [8, 24, 70]
GREEDY_NEW_TOKENS = 24
# The trained router's 4th and 5th choices are often close (sixteen experts, top four): 2e-4 is
# still a hundred times the difference between our router logits and transformers' (~1e-6).
MIN_EXPERT_MARGIN = 2e-4


def load():
    model = Gemma4ForConditionalGeneration.from_pretrained(
        MODEL_DIR, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
    model.eval()
    model.generation_config.eos_token_id = None
    return model


def held_out_stream(tok):
    verses = [v for v in kjv_text().splitlines() if v.strip()]
    held = [v for i, v in enumerate(verses) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    ids = []
    for enc in tok.encode_batch([v + "\n" for v in held], add_special_tokens=False):
        ids.extend(enc.ids)
    return ids


def candidates(stream, length, count=400):
    """Prompts of `length` tokens (<bos> first) starting at successive offsets of the stream."""
    for start in range(0, min(len(stream) - length, count * 37), 37):
        yield [mg.BOS] + stream[start:start + length - 1]


def main():
    torch.manual_seed(0)
    mg.check_versions()
    tok = Tokenizer.from_file(os.path.join(MODEL_DIR, "tokenizer.json"))
    model = load()
    stream = held_out_stream(tok)
    k = model.config.get_text_config().top_k_experts

    prompts, results = [], []
    for length in FORWARD_LENGTHS:
        for prompt in candidates(stream, length):
            r = mg.forward_full(model, prompt, True)
            if r["expert_margin"] >= MIN_EXPERT_MARGIN:
                prompts.append(prompt)
                results.append(r)
                break
        else:
            sys.exit(f"no forward prompt of {length} tokens with expert margin >= "
                     f"{MIN_EXPERT_MARGIN}")

    cases = []
    for ci, length in enumerate(GREEDY_LENGTHS):
        for prompt in candidates(stream, length):
            new, logits = mg.greedy(model, prompt, GREEDY_NEW_TOKENS)
            margin = float(mg.top1_margins(logits).min())
            max_abs = float(np.abs(logits).max())
            if margin < mg.GREEDY_MARGIN_FACTOR * mg.LOGIT_TOLERANCE_REL * max_abs:
                continue
            full = mg.forward_full(model, prompt + new, True, want_hidden=False)
            T = len(prompt)
            if not np.array_equal(np.argmax(full["logits"][T - 1:T - 1 + GREEDY_NEW_TOKENS], -1),
                                  np.array(new)):
                continue
            if full["expert_margin"] < MIN_EXPERT_MARGIN:
                continue
            cases.append({"prompt": prompt, "max_new_tokens": GREEDY_NEW_TOKENS, "output": new,
                          "min_top1_margin": margin})
            print(f"greedy {ci}: {tok.decode(prompt[1:])!r} -> {tok.decode(new)!r}")
            break
        else:
            sys.exit(f"no greedy case of {length} tokens with safe margins")

    manifest = mg.write_reference(REF_DIR, "kjv-moe", 0, prompts, results, cases, True,
                                  extra={"weights": "bf16 checkpoint, fp32 compute",
                                         "min_expert_margin_required": MIN_EXPERT_MARGIN})
    for p in manifest["prompts"]:
        print(f"{p['name']}: {len(p['tokens'])} tokens, min top-1 margin "
              f"{p['min_top1_margin']:.4g}, min expert margin {p['min_expert_margin']:.4g}")
    print(f"wrote {REF_DIR}")


if __name__ == "__main__":
    main()
