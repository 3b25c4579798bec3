#!/usr/bin/env python3
"""Trains the test tokenizer fixtures with the Hugging Face `tokenizers` library.

Output (tests/golden/data/tokenizer/):
  gemma4_test_tokenizer.json  A BPE tokenizer in Gemma 4's pipeline: byte fallback, fuse_unk,
                              the " " -> "\u2581" normalizer, no pre-tokenizer, a <bos>
                              template, the Replace/ByteFallback/Fuse decoder, and Gemma 4's
                              special and control tokens at their published ids.
  flags_tokenizer.json        A small tokenizer in the same pipeline whose added tokens cover
                              every combination of the special/lstrip/rstrip/normalized flags.

Training text: the King James Version of the Bible (1611, public domain), as shipped by the
Debian package `bible-kjv-text` and printed by the `bible` program of the package `bible-kjv`
(`apt-get install bible-kjv`), plus the multilingual sample written for this project
(tests/golden/data/tokenizer/corpus/multilingual.txt).
"""

import argparse
import json
import os
import re
import subprocess
import sys

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "golden", "data", "tokenizer")

# Gemma 4 control tokens at their ids (gemma4-architecture.md section 4).
FIXED_SPECIALS = {
    0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 4: "<mask>",
    46: "<|tool>", 47: "<tool|>", 48: "<|tool_call>", 49: "<tool_call|>",
    50: "<|tool_response>", 51: "<tool_response|>", 52: '<|"|>',
    98: "<|think|>", 100: "<|channel>", 101: "<channel|>",
    105: "<|turn>", 106: "<turn|>",
}
NEWLINE_ID = 107
# Multimodal tokens sit at the top of the (smaller) test vocabulary, in Gemma 4's order.
MULTIMODAL = ["<|image>", "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>",
              "<|video|>"]
FIRST_BYTE_ID = 108
NUM_TRAINED = 36000


def kjv_text():
    out = subprocess.run(["bible", "-f", "-l", "100000", "gen1:1-rev22:21"], check=True,
                         capture_output=True, text=True).stdout
    # Drop the "Ge1:1 " verse references: keep the prose.
    return "\n".join(re.sub(r"^\S+\d+:\d+ ", "", line) for line in out.splitlines())


def train_bpe(lines, vocab_size, max_token_length):
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    # Training only: stretches between punctuation and line breaks, so that pieces may span
    # several words. The final tokenizer has no pre-tokenizer, as Gemma files before transformers
    # 5 had none (make_tf5_tokenizer.py re-makes it the way transformers 5 saves Gemma files).
    tok.pre_tokenizer = pre_tokenizers.Split(
        pattern=Regex(r"[^\s.,;:!?()]+|[.,;:!?()]|\s"), behavior="isolated")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  max_token_length=max_token_length, min_frequency=2)
    tok.train_from_iterator(lines, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], model["merges"]


def special(content, token_id, **flags):
    entry = {"id": token_id, "content": content, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
    entry.update(flags)
    return entry


def assemble(trained_vocab, trained_merges, num_reserved, fixed, top_tokens, added_extra):
    """Lays out ids: reserved specials, "\n", 256 byte tokens, trained pieces, top tokens."""
    vocab = {}
    added = []
    for i in range(num_reserved):
        name = fixed.get(i, f"<unused{i}>")
        vocab[name] = i
        added.append(special(name, i))
    vocab["\n"] = NEWLINE_ID if num_reserved == NEWLINE_ID else num_reserved
    next_id = len(vocab)
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = next_id
        next_id += 1
    for piece, _ in sorted(trained_vocab.items(), key=lambda kv: kv[1]):
        if piece in vocab:
            continue
        vocab[piece] = next_id
        next_id += 1
    for name in top_tokens:
        vocab[name] = next_id
        added.append(special(name, next_id))
        next_id += 1
    for content, flags in added_extra:
        if content not in vocab:
            vocab[content] = next_id
            next_id += 1
        added.append(special(content, vocab[content], **flags))
    merges = [m if isinstance(m, list) else m.split(" ") for m in trained_merges]
    for a, b in merges:
        assert a in vocab and b in vocab and a + b in vocab, (a, b)
    return vocab, merges, added


def write_tokenizer(path, vocab, merges, added):
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": sorted(added, key=lambda t: t["id"]),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": "<bos>", "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>",
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    # Round-trip through the library: it must load the file and keep every added token.
    tok = Tokenizer.from_str(text)
    assert tok.get_vocab_size(with_added_tokens=True) == len(vocab), "ids not dense"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"{path}: {len(vocab)} tokens, {len(merges)} merges, {len(text)} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=DATA)
    args = parser.parse_args()
    with open(os.path.join(DATA, "corpus", "multilingual.txt"), encoding="utf-8") as f:
        multilingual = f.read()
    lines = kjv_text().splitlines() + multilingual.splitlines() * 20

    vocab, merges = train_bpe(lines, NUM_TRAINED, 16)
    vocab, merges, added = assemble(vocab, merges, NEWLINE_ID, FIXED_SPECIALS, MULTIMODAL, [])
    write_tokenizer(os.path.join(args.out, "gemma4_test_tokenizer.json"), vocab, merges, added)

    small_vocab, small_merges = train_bpe(lines[:3000], 600, 8)
    flagged = [
        ("<plain>", {"special": False}),
        ("<lstrip>", {"special": False, "lstrip": True}),
        ("<rstrip>", {"special": True, "rstrip": True}),
        ("<both>", {"special": True, "lstrip": True, "rstrip": True}),
        ("hello world", {"special": False, "normalized": True}),
        (" spaced", {"special": False, "normalized": True, "lstrip": True}),
        ("<norm>", {"special": True, "normalized": True, "rstrip": True}),
        ("<norm>x", {"special": False}),
        ("the", {"special": False}),
    ]
    vocab, merges, added = assemble(small_vocab, small_merges, 8,
                                    {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>"},
                                    ["<|turn>", "<turn|>"], flagged)
    write_tokenizer(os.path.join(args.out, "flags_tokenizer.json"), vocab, merges, added)


if __name__ == "__main__":
    sys.exit(main())
