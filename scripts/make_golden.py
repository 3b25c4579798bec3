#!/usr/bin/env python3
"""Generate the golden fixtures under tests/golden/data/.

Builds three tiny random Gemma 4 text decoders with Hugging Face transformers,
saves them as safetensors checkpoints in the real checkpoint layout
(prefix `model.language_model.`), and records reference outputs (logits,
per-layer hidden states, chosen experts, greedy generations) from the HF eager
fp32 implementation. See docs/golden.md for the format and the rationale.

Run through scripts/make_golden.sh, which pins the Python environment.
The output is deterministic: every random draw comes from a fixed seed, and the
seed search below is a deterministic scan.
"""

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

import safetensors
import transformers
from packaging.version import Version
from transformers import Gemma4Config, Gemma4ForConditionalGeneration, GenerationConfig

MIN_TRANSFORMERS = "5.5.0"
# The versions the committed fixtures were generated with (make_golden.sh installs these).
PINNED = {"torch": "2.15.0", "transformers": "5.23.0", "safetensors": "0.8.0", "numpy": "2.4.6"}

# ----------------------------------------------------------------------------
# Fixed choices
# ----------------------------------------------------------------------------

MODEL_SEEDS = list(range(1, 50))  # scanned in order; the first that passes wins
LOGIT_TOLERANCE_REL = 1e-4
GREEDY_MARGIN_FACTOR = 100.0  # greedy top1 margin >= 100 * tol * max|logit|
MIN_EXPERT_MARGIN = 1e-3  # router-logit gap between k-th and (k+1)-th expert
MAX_PROMPT_SEED_TRIES = 200
MAX_GREEDY_SEED_TRIES = 4000

# Initialisation scales. The embedding is kept small (h0 = sqrt(64) * E has rms ~1, like
# one layer's contribution) so the prediction depends on context rather than echoing the
# input token; the final norm weight is drawn larger so the logits still spread over
# several units (max |logit| ~ 15-20, which also exercises the softcap). The router
# projection is large so router logits spread over several units.
EMBED_STD = 0.125
LINEAR_STD = 0.15
ROUTER_PROJ_STD = 3.0
ONE_LIKE_RANGE = (0.5, 1.5)  # norms, layer_scalar, router.scale, per_expert_scale
FINAL_NORM_RANGE = (2.0, 6.0)  # model.language_model.norm.weight
MIN_DISTINCT_GREEDY = 8  # a greedy output must contain at least this many distinct ids

# tiny-moe-bf16 is its own model (same architecture as tiny-moe, other scales and seeds), stored
# in bf16. Its reference is HF fp32 compute on the bf16 weights; it also records the HF bf16
# compute run, and the argmaxes of the two must agree at >= BF16_MIN_TOP1_AGREEMENT of all
# forward-prompt positions. bf16 compute perturbs every logit by ~1% of max|logit|, so the
# top-1 choice survives only where the logits are peaked. For a random decoder that means a
# strong echo of the input token: a larger embedding (h0 = 8 * E has rms ~1.4), and softer
# attention (q_norm / k_norm weights smaller, score std ~1) so that bf16 rounding is not
# amplified through sharp softmaxes. The price is that greedy continuations lock onto one
# token after a few steps, so this model asks for fewer distinct greedy ids (see
# docs/golden.md).
BF16_SCALES = {
    "embed_std": 0.18,
    "qk_norm_range": (0.3, 0.6),
}
BF16_MIN_TOP1_AGREEMENT = 0.995
BF16_MIN_DISTINCT_GREEDY = 3
BF16_PROMPT_SEED_OFFSET = 50  # forward prompt seeds start at 100 * model_seed + 50
BF16_MAX_PROMPT_SEED_TRIES = 40

VOCAB = 512
BOS = 2
FIRST_RANDOM_TOKEN = 5

# Forward prompts: total lengths including BOS.
#   1: BOS only; 5: short; 8: exactly the sliding window; 9: one past the window;
#   30: several windows; 40: more than three windows (plus full-attention layers).
PROMPT_LENGTHS = [1, 5, 8, 9, 30, 40]
# tiny-moe-bf16: more positions for the bf16 top-1 agreement (203 in all, so one disagreement
# still leaves 99.5%); 24..64 are 3..8 windows.
BF16_PROMPT_LENGTHS = [1, 5, 8, 9, 24, 40, 52, 64]
# Greedy cases: prompt lengths (including BOS); 30 > 3 windows of 8.
GREEDY_PROMPT_LENGTHS = [5, 12, 30]
GREEDY_NEW_TOKENS = 32

LAYER_TYPES = [
    "sliding_attention",
    "sliding_attention",
    "full_attention",
    "sliding_attention",
    "sliding_attention",
    "full_attention",
]


def text_config(moe: bool) -> dict:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_global_key_value_heads=1,
        global_head_dim=32,  # 32 * 0.25 / 2 = 4 rotated pairs on full layers
        attention_k_eq_v=True,
        sliding_window=8,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
            },
        },
        enable_moe_block=moe,
        num_experts=16 if moe else None,
        top_k_experts=4 if moe else None,
        moe_intermediate_size=32 if moe else None,
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        use_double_wide_mlp=False,
        final_logit_softcapping=30.0,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        attention_bias=False,
        attention_dropout=0.0,
        use_bidirectional_attention=None,
        pad_token_id=0,
        eos_token_id=[1, 106],
        bos_token_id=2,
    )
    return cfg


# ----------------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------------


def setup_torch():
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass  # already set


def check_versions():
    tv = Version(transformers.__version__)
    if tv < Version(MIN_TRANSFORMERS):
        sys.exit(f"transformers >= {MIN_TRANSFORMERS} required, found {transformers.__version__}")
    found = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
             "safetensors": safetensors.__version__, "numpy": np.__version__}
    for name, want in PINNED.items():
        if found[name] != want:
            print(f"warning: {name} {found[name]} is not the pinned {want}; the fixtures may "
                  f"not come out byte-identical", file=sys.stderr, flush=True)
    print(
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, numpy {np.__version__}, "
        f"safetensors {safetensors.__version__}",
        flush=True,
    )


# ----------------------------------------------------------------------------
# Model construction and checkpoint writing
# ----------------------------------------------------------------------------

ONE_LIKE_SUFFIXES = ("norm.weight", "router.scale", "router.per_expert_scale", "layer_scalar")


@torch.no_grad()
def build_model(moe: bool, model_seed: int, scales=None) -> Gemma4ForConditionalGeneration:
    """Random model; `scales` overrides "embed_std" / "qk_norm_range" (tiny-moe-bf16)."""
    scales = scales or {}
    embed_std = scales.get("embed_std", EMBED_STD)
    qk_lo, qk_hi = scales.get("qk_norm_range", ONE_LIKE_RANGE)
    torch.manual_seed(model_seed)
    cfg = Gemma4Config(text_config=text_config(moe), vision_config=None, audio_config=None)
    model = Gemma4ForConditionalGeneration(cfg).to(torch.float32)
    gen = torch.Generator().manual_seed(model_seed)
    lo, hi = ONE_LIKE_RANGE
    tensors = dict(model.named_parameters())
    tensors.update(
        {n: b for n, b in model.named_buffers() if n.endswith("layer_scalar")}
    )
    for name in sorted(tensors):
        t = tensors[name]
        if name == "model.language_model.norm.weight":
            t.copy_(torch.rand(t.shape, generator=gen) * (FINAL_NORM_RANGE[1] - FINAL_NORM_RANGE[0]) + FINAL_NORM_RANGE[0])
        elif name.endswith(("q_norm.weight", "k_norm.weight")):
            t.copy_(torch.rand(t.shape, generator=gen) * (qk_hi - qk_lo) + qk_lo)
        elif name.endswith(ONE_LIKE_SUFFIXES):
            t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
        elif name.endswith("embed_tokens.weight"):
            t.copy_(torch.randn(t.shape, generator=gen) * embed_std)
        elif name.endswith("router.proj.weight"):
            t.copy_(torch.randn(t.shape, generator=gen) * ROUTER_PROJ_STD)
        elif name == "lm_head.weight":
            continue  # tied to embed_tokens
        else:
            t.copy_(torch.randn(t.shape, generator=gen) * LINEAR_STD)
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.eval()
    return model


def write_real_style_config(folder: str, text_cfg: dict):
    """Rewrite config.json's text_config into the layout of the released checkpoints.

    transformers 5.23 serialises the full-attention geometry as
    `per_layer_config: {"<layer>": {"head_dim", "num_key_value_heads"}}` and drops
    `global_head_dim` / `num_global_key_value_heads`. The released Gemma 4 checkpoints
    (written by 5.5.0) carry the two scalar keys instead. We store the released form so
    the C++ loader is tested against what real checkpoints contain; transformers 5.23
    re-derives per_layer_config from these keys on load (checked by the reload below).
    """
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    tc = cfg["text_config"]
    plc = tc.pop("per_layer_config", None)
    if plc is not None:
        full = [int(k) for k in plc]
        expect = [i for i, t in enumerate(tc["layer_types"]) if t == "full_attention"]
        assert sorted(full) == expect, (plc, expect)
        for v in plc.values():
            assert v == {
                "head_dim": text_cfg["global_head_dim"],
                "num_key_value_heads": text_cfg["num_global_key_value_heads"],
            }, v
    tc["global_head_dim"] = text_cfg["global_head_dim"]
    tc["num_global_key_value_heads"] = text_cfg["num_global_key_value_heads"]
    cfg["text_config"] = dict(sorted(tc.items()))
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")


def save_checkpoint(model, folder: str, text_cfg: dict, dtype: torch.dtype, sharded: bool):
    if os.path.isdir(folder):
        shutil.rmtree(folder)
    m = model.to(dtype)
    # Total fp32 size of tiny-moe is ~3.5 MB; 1MB shards give 4 files.
    shard = "1MB" if sharded else "1GB"
    m.save_pretrained(folder, max_shard_size=shard)
    model.to(torch.float32)
    write_real_style_config(folder, text_cfg)
    files = sorted(os.listdir(folder))
    if sharded:
        assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) >= 2, files
    else:
        assert "model.safetensors" in files, files
    return files


def load_model(folder: str, dtype: torch.dtype):
    model = Gemma4ForConditionalGeneration.from_pretrained(
        folder, dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    tc = model.config.get_text_config()
    for i, t in enumerate(tc.layer_types):
        attn = model.model.language_model.layers[i].self_attn
        if t == "full_attention":
            assert attn.head_dim == 32 and attn.v_proj is None and attn.k_proj.out_features == 32, i
        else:
            assert attn.head_dim == 16 and attn.k_proj.out_features == 32, i
    model.generation_config.eos_token_id = None
    return model


# ----------------------------------------------------------------------------
# Running the reference
# ----------------------------------------------------------------------------


class Capture:
    """Forward hooks: embedding output, each decoder layer's output, router logits / choices."""

    def __init__(self, model):
        lm = model.model.language_model
        self.handles = []
        self.embed = None
        self.layers = {}
        self.router_logits = {}
        self.experts = {}
        self.handles.append(lm.embed_tokens.register_forward_hook(self._embed_hook))
        for i, layer in enumerate(lm.layers):
            self.handles.append(layer.register_forward_hook(self._layer_hook(i)))
            if getattr(layer, "enable_moe_block", False):
                self.handles.append(layer.router.proj.register_forward_hook(self._router_proj_hook(i)))
                self.handles.append(layer.router.register_forward_hook(self._router_hook(i)))

    def _embed_hook(self, mod, inp, out):
        self.embed = out.detach().float().clone()

    def _layer_hook(self, i):
        def f(mod, inp, out):
            o = out[0] if isinstance(out, tuple) else out
            self.layers[i] = o.detach().float().clone()

        return f

    def _router_proj_hook(self, i):
        def f(mod, inp, out):
            self.router_logits[i] = out.detach().float().clone()

        return f

    def _router_hook(self, i):
        def f(mod, inp, out):
            self.experts[i] = out[2].detach().clone()

        return f

    def remove(self):
        for h in self.handles:
            h.remove()


def top1_margins(logits: np.ndarray) -> np.ndarray:
    s = np.sort(logits.astype(np.float64), axis=-1)
    return s[..., -1] - s[..., -2]


def expert_margins(router_logits: np.ndarray, k: int) -> np.ndarray:
    s = -np.sort(-router_logits.astype(np.float64), axis=-1)
    return s[..., k - 1] - s[..., k]


@torch.no_grad()
def forward_full(model, tokens, moe: bool, want_hidden=True):
    cap = Capture(model)
    try:
        ids = torch.tensor([tokens], dtype=torch.long)
        out = model(input_ids=ids, use_cache=False)
    finally:
        cap.remove()
    res = {"logits": out.logits[0].float().numpy().astype(np.float32)}
    n_layers = len(model.model.language_model.layers)
    if want_hidden:
        hs = [cap.embed[0]] + [cap.layers[i][0] for i in range(n_layers)]
        res["hidden"] = torch.stack(hs).numpy().astype(np.float32)
    if moe:
        k = model.config.get_text_config().top_k_experts
        rl = np.stack([cap.router_logits[i].numpy() for i in range(n_layers)])  # [L, T, E]
        ex = np.stack([cap.experts[i].numpy() for i in range(n_layers)])  # [L, T, k]
        ex = np.sort(ex, axis=-1).astype(np.int32)
        if model.dtype == torch.float32:
            # The chosen experts must be exactly the top-k router logits. (Not checked for
            # bf16 compute, where rounded router logits can tie.)
            ref = np.sort(np.argsort(-rl, axis=-1, kind="stable")[..., :k], axis=-1)
            assert np.array_equal(ex, ref), "router choice differs from top-k of router logits"
        res["experts"] = ex
        res["router_logits"] = rl
        res["expert_margin"] = float(expert_margins(rl, k).min())
    return res


@torch.no_grad()
def greedy(model, prompt, n_new: int):
    gc = GenerationConfig(
        max_new_tokens=n_new,
        do_sample=False,
        use_cache=True,
        eos_token_id=None,  # no stopping: always exactly n_new tokens
        pad_token_id=0,
        bos_token_id=BOS,
        output_logits=True,
        return_dict_in_generate=True,
    )
    ids = torch.tensor([prompt], dtype=torch.long)
    out = model.generate(input_ids=ids, generation_config=gc)
    seq = out.sequences[0].tolist()
    assert seq[: len(prompt)] == prompt
    new = seq[len(prompt):]
    assert len(new) == n_new, (len(new), n_new)
    logits = torch.stack([l[0] for l in out.logits]).float().numpy()  # [n_new, V]
    assert np.array_equal(np.argmax(logits, axis=-1), np.array(new)), "generate picked a non-argmax token"
    return new, logits


def random_prompt(rng: np.random.Generator, length: int):
    return [BOS] + [int(x) for x in rng.integers(FIRST_RANDOM_TOKEN, VOCAB, size=length - 1)]


# ----------------------------------------------------------------------------
# Per-model fixture generation
# ----------------------------------------------------------------------------


def top1_agreement(a_logits, b_logits):
    """(positions where the argmaxes agree, positions)."""
    return int(np.sum(np.argmax(a_logits, -1) == np.argmax(b_logits, -1))), int(a_logits.shape[0])


def choose_prompts(model, moe: bool, base_seed: int, log: dict, lengths=PROMPT_LENGTHS,
                   max_tries=MAX_PROMPT_SEED_TRIES, bf16_model=None):
    """Forward prompts: scan prompt seeds until the MoE expert margins are safe.

    With `bf16_model` (tiny-moe-bf16), the prompts must also have a top-1 agreement of at least
    BF16_MIN_TOP1_AGREEMENT between `model` (fp32 compute) and `bf16_model` (bf16 compute) over
    all positions; the bf16 results are then returned as well.
    """
    tried = []
    for j in range(max_tries):
        seed = base_seed + j
        rng = np.random.default_rng(seed)
        prompts = [random_prompt(rng, L) for L in lengths]
        results = [forward_full(model, p, moe) for p in prompts]
        tried.append(seed)
        if moe and not all(r["expert_margin"] >= MIN_EXPERT_MARGIN for r in results):
            continue
        bf_results = None
        if bf16_model is not None:
            bf_results = [forward_full(bf16_model, p, moe, want_hidden=False) for p in prompts]
            agree = [top1_agreement(r["logits"], b["logits"]) for r, b in zip(results, bf_results)]
            n_agree, n_pos = sum(a for a, _ in agree), sum(n for _, n in agree)
            if n_agree < BF16_MIN_TOP1_AGREEMENT * n_pos:
                continue
            log["bf16_top1_agreement"] = (n_agree, n_pos)
        log["prompt_seed"] = seed
        log["prompt_seeds_tried"] = len(tried)
        if bf16_model is not None:
            return prompts, results, bf_results
        return prompts, results
    return (None, None, None) if bf16_model is not None else (None, None)


def choose_greedy(model, moe: bool, case_idx: int, length: int, base_seed: int, log: dict,
                  min_distinct=MIN_DISTINCT_GREEDY):
    """One greedy case: scan prompt seeds until the margins are safe."""
    k = model.config.get_text_config().top_k_experts if moe else None
    for j in range(MAX_GREEDY_SEED_TRIES):
        seed = base_seed + 1000 * (case_idx + 1) + j
        rng = np.random.default_rng(seed)
        prompt = random_prompt(rng, length)
        new, logits = greedy(model, prompt, GREEDY_NEW_TOKENS)
        if len(set(new)) < min_distinct:
            continue
        margin = float(top1_margins(logits).min())
        max_abs = float(np.abs(logits).max())
        if margin < GREEDY_MARGIN_FACTOR * LOGIT_TOLERANCE_REL * max_abs:
            continue
        # Cross-check against a cache-free forward over prompt + output, and (MoE)
        # require safe expert margins along the whole sequence, generated tokens included.
        full = forward_full(model, prompt + new, moe, want_hidden=False)
        T = len(prompt)
        fl = full["logits"][T - 1 : T - 1 + GREEDY_NEW_TOKENS]
        if not np.array_equal(np.argmax(fl, axis=-1), np.array(new)):
            continue
        if moe and full["expert_margin"] < MIN_EXPERT_MARGIN:
            continue
        log.setdefault("greedy", []).append(
            {
                "case": case_idx,
                "prompt_len": length,
                "seed": seed,
                "tried": j + 1,
                "distinct": len(set(new)),
                "min_top1_margin": margin,
                "max_abs_logit": max_abs,
                "ratio": margin / max_abs,
                "seq_expert_margin": full.get("expert_margin"),
                "cache_vs_nocache_max_abs_diff": float(np.abs(fl - logits).max()),
            }
        )
        return {"prompt": prompt, "max_new_tokens": GREEDY_NEW_TOKENS, "output": new, "min_top1_margin": margin}
    return None


def write_reference(
    ref_dir, model_name, model_seed, prompts, results, greedy_cases, moe, extra_prompt_fields=None, extra=None
):
    if os.path.isdir(ref_dir):
        shutil.rmtree(ref_dir)
    os.makedirs(ref_dir)
    plist = []
    for i, (p, r) in enumerate(zip(prompts, results)):
        name = f"p{i}"
        entry = {"name": name, "tokens": p}
        entry["logits"] = f"{name}.logits.npy"
        np.save(os.path.join(ref_dir, entry["logits"]), np.ascontiguousarray(r["logits"], dtype="<f4"))
        entry["hidden_states"] = f"{name}.hidden.npy"
        np.save(os.path.join(ref_dir, entry["hidden_states"]), np.ascontiguousarray(r["hidden"], dtype="<f4"))
        if moe:
            entry["experts"] = f"{name}.experts.npy"
            np.save(os.path.join(ref_dir, entry["experts"]), np.ascontiguousarray(r["experts"], dtype="<i4"))
        entry["min_top1_margin"] = float(top1_margins(r["logits"]).min())
        if moe:
            entry["min_expert_margin"] = r["expert_margin"]
        if extra_prompt_fields:
            entry.update(extra_prompt_fields(i, name, ref_dir))
        plist.append(entry)
    manifest = {
        "model": model_name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": model_seed,
        "logit_tolerance_rel": LOGIT_TOLERANCE_REL,
    }
    if extra:
        manifest.update(extra)
    manifest["prompts"] = plist
    manifest["greedy"] = greedy_cases
    with open(os.path.join(ref_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest


def generate_for_model(model, moe, base_seed, log):
    prompts, results = choose_prompts(model, moe, base_seed, log)
    if prompts is None:
        return None
    cases = []
    for ci, L in enumerate(GREEDY_PROMPT_LENGTHS):
        c = choose_greedy(model, moe, ci, L, base_seed, log)
        if c is None:
            return None
        cases.append(c)
    return prompts, results, cases


def generate_for_bf16_model(model, model_bf, base_seed, log):
    """tiny-moe-bf16: `model` is fp32 compute on the bf16 weights, `model_bf` bf16 compute."""
    prompts, results, bf_results = choose_prompts(
        model, True, base_seed, log, lengths=BF16_PROMPT_LENGTHS,
        max_tries=BF16_MAX_PROMPT_SEED_TRIES, bf16_model=model_bf,
    )
    if prompts is None:
        return None
    cases = []
    for ci, L in enumerate(GREEDY_PROMPT_LENGTHS):
        c = choose_greedy(model, True, ci, L, base_seed, log, min_distinct=BF16_MIN_DISTINCT_GREEDY)
        if c is None:
            return None
        cases.append(c)
    return prompts, results, bf_results, cases


def summarise(name, log, manifest):
    print(f"\n== {name} ==")
    print(f"  model seed {manifest['seed']}, forward prompt seed {log['prompt_seed']} "
          f"(seeds tried: {log['prompt_seeds_tried']})")
    for p in manifest["prompts"]:
        extra = f", min_expert_margin {p['min_expert_margin']:.4g}" if "min_expert_margin" in p else ""
        bf = f", bf16 top1 agreement {p['bf16_top1_agreement_with_fp32']:.3f}" if "bf16_top1_agreement_with_fp32" in p else ""
        print(f"  {p['name']}: T={len(p['tokens'])}, min_top1_margin {p['min_top1_margin']:.4g}, "
              f"max|logit| {p['_max_abs']:.4g}{extra}{bf}")
    for g in log["greedy"]:
        sem = g["seq_expert_margin"]
        sem_s = f", seq min_expert_margin {sem:.4g}" if sem is not None else ""
        print(f"  greedy case {g['case']}: prompt len {g['prompt_len']}, seed {g['seed']} (tried {g['tried']}), "
              f"min_top1_margin {g['min_top1_margin']:.4g}, max|logit| {g['max_abs_logit']:.4g}, "
              f"ratio {g['ratio']:.4f}, distinct {g['distinct']}{sem_s}, cache-vs-nocache max diff {g['cache_vs_nocache_max_abs_diff']:.2e}")


def strip_private(manifest, ref_dir):
    for p in manifest["prompts"]:
        p.pop("_max_abs", None)
    with open(os.path.join(ref_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "golden", "data"),
        help="fixture root (default: tests/golden/data)",
    )
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    setup_torch()
    check_versions()
    os.makedirs(out, exist_ok=True)

    # ---- tiny-dense -------------------------------------------------------------
    for model_seed in MODEL_SEEDS:
        print(f"tiny-dense: trying model seed {model_seed}", flush=True)
        tc = text_config(False)
        src = build_model(False, model_seed)
        save_checkpoint(src, os.path.join(out, "tiny-dense"), tc, torch.float32, sharded=False)
        model = load_model(os.path.join(out, "tiny-dense"), torch.float32)
        log = {}
        got = generate_for_model(model, False, 100 * model_seed, log)
        if got is None:
            continue
        prompts, results, cases = got
        ref_dir = os.path.join(out, "reference", "tiny-dense")
        man = write_reference(ref_dir, "tiny-dense", model_seed, prompts, results, cases, False)
        for p, r in zip(man["prompts"], results):
            p["_max_abs"] = float(np.abs(r["logits"]).max())
        summarise("tiny-dense", log, man)
        strip_private(man, ref_dir)
        break
    else:
        sys.exit("tiny-dense: no model seed passed")

    # ---- tiny-moe -----------------------------------------------------------------
    for model_seed in MODEL_SEEDS:
        print(f"tiny-moe: trying model seed {model_seed}", flush=True)
        tc = text_config(True)
        src = build_model(True, model_seed)
        moe_dir = os.path.join(out, "tiny-moe")
        save_checkpoint(src, moe_dir, tc, torch.float32, sharded=True)
        model = load_model(moe_dir, torch.float32)
        log_moe = {}
        got_moe = generate_for_model(model, True, 100 * model_seed, log_moe)
        if got_moe is not None:
            break
    else:
        sys.exit("tiny-moe: no model seed passed")

    prompts, results, cases = got_moe
    ref_dir = os.path.join(out, "reference", "tiny-moe")
    man = write_reference(ref_dir, "tiny-moe", model_seed, prompts, results, cases, True)
    for p, r in zip(man["prompts"], results):
        p["_max_abs"] = float(np.abs(r["logits"]).max())
    summarise("tiny-moe", log_moe, man)
    strip_private(man, ref_dir)

    # ---- tiny-moe-bf16: its own model (BF16_SCALES), weights stored in bf16 ----------
    # Reference: fp32 compute on the bf16-rounded weights. Also recorded: the bf16 compute run,
    # whose argmaxes must agree with the reference at >= BF16_MIN_TOP1_AGREEMENT of positions.
    for model_seed in MODEL_SEEDS:
        print(f"tiny-moe-bf16: trying model seed {model_seed}", flush=True)
        tc = text_config(True)
        src = build_model(True, model_seed, scales=BF16_SCALES)
        bf_dir = os.path.join(out, "tiny-moe-bf16")
        save_checkpoint(src, bf_dir, tc, torch.bfloat16, sharded=False)
        model_bw = load_model(bf_dir, torch.float32)  # bf16-rounded weights, fp32 compute
        model_bf = load_model(bf_dir, torch.bfloat16)  # bf16 compute
        log_bf = {}
        got_bf = generate_for_bf16_model(model_bw, model_bf, 100 * model_seed + BF16_PROMPT_SEED_OFFSET, log_bf)
        if got_bf is not None:
            break
    else:
        sys.exit(f"tiny-moe-bf16: no model seed reached bf16 top-1 agreement >= {BF16_MIN_TOP1_AGREEMENT} "
                 f"with safe expert and greedy margins")

    prompts, results, bf_results, cases = got_bf
    n_agree, n_pos = log_bf["bf16_top1_agreement"]
    agreement = n_agree / n_pos
    if not agreement >= BF16_MIN_TOP1_AGREEMENT:
        sys.exit(f"tiny-moe-bf16: bf16 top-1 agreement {agreement:.4f} < {BF16_MIN_TOP1_AGREEMENT}")

    def bf_fields(i, name, d):
        bl = bf_results[i]["logits"].astype(np.float32)
        fn = f"{name}.bf16_logits.npy"
        np.save(os.path.join(d, fn), np.ascontiguousarray(bl, dtype="<f4"))
        a, n = top1_agreement(results[i]["logits"], bl)
        return {"bf16_logits": fn, "bf16_top1_agreement_with_fp32": a / n}

    ref_dir = os.path.join(out, "reference", "tiny-moe-bf16")
    man = write_reference(
        ref_dir, "tiny-moe-bf16", model_seed, prompts, results, cases, True,
        extra_prompt_fields=bf_fields,
        extra={
            "weights_dtype": "bfloat16",
            "bf16_top1_agreement_with_fp32": agreement,
            "bf16_top1_agreement_positions": n_pos,
        },
    )
    for p, r in zip(man["prompts"], results):
        p["_max_abs"] = float(np.abs(r["logits"]).max())
    summarise("tiny-moe-bf16", log_bf, man)
    strip_private(man, ref_dir)
    print(f"  bf16 top-1 agreement with fp32: {n_agree}/{n_pos} = {agreement:.4f}")
    # Informational: how far bf16 compute is from fp32 compute on the same weights.
    for i, (r, b) in enumerate(zip(results, bf_results)):
        d = np.abs(r["logits"] - b["logits"]).max() / np.abs(r["logits"]).max()
        print(f"  p{i}: bf16-vs-fp32 max rel logit diff {d:.3e}")

    for sub in ("tiny-dense", "tiny-moe", "tiny-moe-bf16", "reference"):
        for dirpath, _, files in os.walk(os.path.join(out, sub)):
            for f in files:
                os.chmod(os.path.join(dirpath, f), 0o644)
    print("\ndone:", out)


if __name__ == "__main__":
    main()
