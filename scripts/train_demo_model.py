#!/usr/bin/env python3
"""Trains the demo model: a small Gemma 4 MoE (Hugging Face transformers'
Gemma4ForConditionalGeneration, on the CPU) on the King James Version, with its own tokenizer,
and writes it in the real checkpoint layout (bf16 safetensors, config.json, tokenizer.json,
README.md) to models/kjv-moe.

The architecture keeps what makes Gemma 4 itself: sliding-window layers and a global layer
(the window shorter than the training context), K = V on the global layer with its own head
size and proportional RoPE, a dense MLP beside top-k routed experts in every layer, final logit
softcapping, a tied embedding. The text is the KJV printed by Debian's bible-kjv (public domain
in most of the world; see the README); every 50th verse is held out. The tokenizer is a BPE of
4096 entries trained on the training verses with Gemma 4's special and control ids
(scripts/train_tokenizer.py).

Seeded and reproducible (torch's CPU kernels with one thread layout, a fixed step count). It
prints the step, loss, tokens/s and ETA as it goes, then the held-out perplexity and the
routing skew over the held-out text (per layer: balancedness = mean / max tokens per expert,
and the busiest expert's share), which it also writes into the README.

  scripts/train_demo_model.sh [--steps N] [--out DIR]     (makes the pinned virtualenv)
"""

import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
from transformers import Gemma4Config, Gemma4ForConditionalGeneration

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tokenizer import (FIXED_SPECIALS, NEWLINE_ID, assemble, kjv_text,  # noqa: E402
                             train_bpe, write_tokenizer)
from tokenizers import Tokenizer  # noqa: E402
import make_golden  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB_SIZE = 4096
SEQ_LEN = 256
LAYER_TYPES = ["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]
HOLD_OUT_EVERY = 50
SEED = 20261205


def text_config():
    """The golden tiny MoE's config (scripts/make_golden.py) at the demo model's sizes."""
    cfg = make_golden.text_config(True)
    cfg.update(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        head_dim=64,
        global_head_dim=128,
        sliding_window=64,
        moe_intermediate_size=128,
    )
    return cfg


def split_verses():
    verses = [v for v in kjv_text().splitlines() if v.strip()]
    train = [v for i, v in enumerate(verses) if i % HOLD_OUT_EVERY != HOLD_OUT_EVERY - 1]
    held = [v for i, v in enumerate(verses) if i % HOLD_OUT_EVERY == HOLD_OUT_EVERY - 1]
    return train, held


def make_tokenizer(train_verses, path):
    num_trained = VOCAB_SIZE - (NEWLINE_ID + 1) - 256
    trained, merges = train_bpe(train_verses, num_trained, 16)
    vocab, merges, added = assemble(trained, merges, NEWLINE_ID, FIXED_SPECIALS, [], [])
    assert len(vocab) == VOCAB_SIZE and max(vocab.values()) == VOCAB_SIZE - 1, len(vocab)
    write_tokenizer(path, vocab, merges, added)
    return Tokenizer.from_file(path)


def encode_stream(tok, verses):
    """One long stream: each verse as its own line, <bos> at the start of every chunk."""
    ids = []
    for enc in tok.encode_batch([v + "\n" for v in verses], add_special_tokens=False):
        ids.extend(enc.ids)
    return np.array(ids, dtype=np.int64)


def batches(stream, batch, rng):
    """Random windows of SEQ_LEN - 1 tokens after a <bos>."""
    n = len(stream) - SEQ_LEN
    while True:
        starts = rng.integers(0, n, size=batch)
        x = np.stack([np.concatenate([[2], stream[s:s + SEQ_LEN - 1]]) for s in starts])
        yield torch.from_numpy(x)


def evaluate(model, stream, max_chunks=200):
    """Held-out perplexity over consecutive chunks, and the routing over them."""
    model.eval()
    tc = model.config.get_text_config()
    counts = np.zeros((tc.num_hidden_layers, tc.num_experts), dtype=np.int64)
    hooks = []
    for i, layer in enumerate(model.model.language_model.layers):
        def hook(mod, inp, out, i=i):
            ids = out[2] if isinstance(out, tuple) and len(out) > 2 else None
            if ids is None:
                return
            flat = ids.reshape(-1).cpu().numpy()
            np.add.at(counts[i], flat, 1)
        hooks.append(layer.router.register_forward_hook(hook))
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for c in range(min(max_chunks, (len(stream) - 1) // (SEQ_LEN - 1))):
            chunk = stream[c * (SEQ_LEN - 1):(c + 1) * (SEQ_LEN - 1) + 1]
            x = torch.from_numpy(np.concatenate([[2], chunk[:-1]]))[None]
            y = torch.from_numpy(chunk)[None]
            logits = model(input_ids=x).logits.float()
            nll = torch.nn.functional.cross_entropy(logits[0, :], y[0], reduction="sum")
            total_nll += nll.item()
            total_tokens += y.numel()
    for h in hooks:
        h.remove()
    model.train()
    return math.exp(total_nll / total_tokens), counts


def skew(counts):
    rows = []
    for l, row in enumerate(counts):
        total, mx = row.sum(), row.max()
        rows.append({"layer": l, "balancedness": float(row.mean() / mx) if mx else 1.0,
                     "hottest_expert": int(row.argmax()),
                     "hottest_share": float(mx / total) if total else 0.0})
    return rows


def sample(model, tok, prompt, n=40):
    ids = torch.tensor([[2] + tok.encode(prompt, add_special_tokens=False).ids])
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
            if nxt.item() in (1, 106):
                break
    return tok.decode(ids[0, 1:].tolist())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=os.path.join(REPO, "models", "kjv-moe"))
    args = ap.parse_args()

    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    train_verses, held_verses = split_verses()
    tok = make_tokenizer(train_verses, os.path.join(args.out, "tokenizer.json"))
    train_stream = encode_stream(tok, train_verses)
    held_stream = encode_stream(tok, held_verses)
    print(f"text: {len(train_verses)} training verses ({len(train_stream)} tokens), "
          f"{len(held_verses)} held out ({len(held_stream)} tokens)", flush=True)

    cfg = Gemma4Config(text_config=text_config(), vision_config=None, audio_config=None)
    model = Gemma4ForConditionalGeneration(cfg).to(torch.float32)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters", flush=True)

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95),
                            weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step):
        if step < warmup:
            return args.lr * (step + 1) / warmup
        p = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    rng = np.random.default_rng(SEED)
    data = batches(train_stream, args.batch, rng)
    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        x = next(data)
        logits = model(input_ids=x[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            tps = (step + 1) * args.batch * (SEQ_LEN - 1) / elapsed
            eta = elapsed / (step + 1) * (args.steps - step - 1)
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.3f}  lr {lr_at(step):.2e}  "
                  f"{tps:.0f} tokens/s  elapsed {elapsed / 60:.1f} min  ETA {eta / 60:.1f} min",
                  flush=True)

    minutes = (time.time() - start) / 60
    ppl, counts = evaluate(model, held_stream)
    rows = skew(counts)
    print(f"held-out perplexity {ppl:.2f} over {min(200, len(held_stream) // (SEQ_LEN - 1))} "
          f"chunks of {SEQ_LEN - 1} tokens", flush=True)
    for r in rows:
        print(f"layer {r['layer']}: balancedness {r['balancedness']:.3f}, busiest expert "
              f"#{r['hottest_expert']} with {100 * r['hottest_share']:.1f}% of the tokens")

    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    samples = {p: sample(model.to(torch.float32), tok, p) for p in
               ["In the beginning", "And the LORD said unto Moses,", "Blessed are the"]}
    for p, s in samples.items():
        print(f"greedy: {s!r}")
    summary = {"steps": args.steps, "batch": args.batch, "seq_len": SEQ_LEN, "lr": args.lr,
               "seed": SEED, "minutes": round(minutes, 1), "parameters": params,
               "train_tokens": int(len(train_stream)), "held_out_tokens": int(len(held_stream)),
               "held_out_perplexity": round(ppl, 3), "routing": rows, "greedy": samples,
               "torch": torch.__version__}
    with open(os.path.join(args.out, "training.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {args.out} ({minutes:.1f} min of training)")


if __name__ == "__main__":
    main()
