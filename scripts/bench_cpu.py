#!/usr/bin/env python3
"""The transformers side of scripts/bench_cpu.sh.

  bench_cpu.py make-model DIR
      Writes a random Gemma 4-shaped MoE checkpoint (fp32 safetensors, seeded) to DIR.
  bench_cpu.py torch DIR [--prompt-len 128 --decode-tokens 64 --runs 5 --threads N]
      Measures prefill and greedy decode tokens/s of Hugging Face transformers (eager
      attention, eager experts, float32, CPU) on DIR, the same way gemma-bench measures the
      C++ engine, and prints one JSON line with the median, min and max over the runs.

Run through scripts/bench_cpu.sh, which pins the Python environment.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import transformers
from transformers import Gemma4Config, Gemma4ForConditionalGeneration

MODEL_SEED = 1234
BOS = 2
FIRST_RANDOM_TOKEN = 5

# hidden 1024, 8 layers (the 5 sliding + 1 full pattern cut to 8, last layer full), 32 experts.
LAYER_TYPES = [
    "sliding_attention",
    "sliding_attention",
    "sliding_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "full_attention",
]


def text_config() -> dict:
    return dict(
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=1024,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        num_global_key_value_heads=2,
        global_head_dim=256,
        attention_k_eq_v=True,
        sliding_window=128,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        },
        enable_moe_block=True,
        num_experts=32,
        top_k_experts=4,
        moe_intermediate_size=256,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        max_position_embeddings=8192,
        attention_bias=False,
        attention_dropout=0.0,
        use_bidirectional_attention=None,
        pad_token_id=0,
        eos_token_id=[1, 106],
        bos_token_id=2,
    )


@torch.no_grad()
def make_model(folder: str) -> None:
    torch.manual_seed(MODEL_SEED)
    cfg = Gemma4Config(text_config=text_config(), vision_config=None, audio_config=None)
    model = Gemma4ForConditionalGeneration(cfg).to(torch.float32)
    # Parameters that initialise to one (norms, layer scalars, router scales) get values around
    # one, so that no multiplication is trivially skipped by either engine.
    gen = torch.Generator().manual_seed(MODEL_SEED)
    tensors = dict(model.named_parameters())
    tensors.update({n: b for n, b in model.named_buffers() if n.endswith("layer_scalar")})
    for name in sorted(tensors):
        if name.endswith(("norm.weight", "router.scale", "router.per_expert_scale", "layer_scalar")):
            t = tensors[name]
            t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
    model.eval()
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {folder}: {n_params / 1e6:.1f}M parameters (fp32), "
          f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)


def summarize(values):
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def bench_torch(args) -> None:
    torch.set_num_threads(args.threads)
    # Eager both ways: eager attention, and the experts as a Python loop over experts rather
    # than transformers' default "grouped_mm" kernel.
    model = Gemma4ForConditionalGeneration.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="eager",
        experts_implementation="eager",
    )
    model.eval()
    vocab = model.config.get_text_config().vocab_size
    rng = np.random.default_rng(args.seed)
    prompt = [BOS] + rng.integers(FIRST_RANDOM_TOKEN, vocab, size=args.prompt_len - 1).tolist()
    ids = torch.tensor([prompt], dtype=torch.long)

    def run_once():
        # Prefill: one forward over the prompt, logits of the last position only.
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.past_key_values
        t1 = time.perf_counter()
        # Decode: one token per forward, each fed the previous greedy choice.
        for _ in range(args.decode_tokens):
            out = model(input_ids=nxt, past_key_values=past, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            past = out.past_key_values
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    prefill, decode = [], []
    with torch.inference_mode():
        run_once()  # warm-up
        for _ in range(args.runs):
            p, d = run_once()
            prefill.append(args.prompt_len / p)
            decode.append(args.decode_tokens / d)
    result = {
        "engine": "transformers",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "attn_implementation": model.config.get_text_config()._attn_implementation,
        "experts_implementation": getattr(
            model.config.get_text_config(), "_experts_implementation", None),
        "threads": torch.get_num_threads(),
        "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens,
        "runs": args.runs,
        "prefill_tok_s": summarize(prefill),
        "decode_tok_s": summarize(decode),
    }
    print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    mk = sub.add_parser("make-model", help="write the random benchmark checkpoint")
    mk.add_argument("dir")
    tb = sub.add_parser("torch", help="measure transformers on a checkpoint")
    tb.add_argument("model")
    tb.add_argument("--prompt-len", type=int, default=128)
    tb.add_argument("--decode-tokens", type=int, default=64)
    tb.add_argument("--runs", type=int, default=5)
    tb.add_argument("--threads", type=int, default=os.cpu_count())
    tb.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "make-model":
        make_model(args.dir)
    else:
        if args.prompt_len < 1 or args.decode_tokens < 1 or args.runs < 1 or args.threads < 1:
            sys.exit("--prompt-len, --decode-tokens, --runs and --threads must be >= 1")
        bench_torch(args)


if __name__ == "__main__":
    main()
