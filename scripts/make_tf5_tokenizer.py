#!/usr/bin/env python3
"""Re-makes the test tokenizer the way transformers 5 saves every Gemma tokenizer, and records
what HF `tokenizers` makes of the golden corpus with it.

Input:  tests/golden/data/tokenizer/gemma4_test_tokenizer.json (from train_tokenizer.py)
Output: tests/golden/data/tokenizer/gemma4_tf5_tokenizer.json
          built by transformers' GemmaTokenizer from that file's vocabulary and merges, with its
          added tokens (flags kept) added back, then saved: the Split(" ", MergedWithPrevious)
          pre-tokenizer, a TemplateProcessing without <bos> and an empty special_tokens map.
        tests/golden/data/tokenizer/expected_encode_tf5.json
          per corpus file (tests/golden/data/tokenizer/corpus/*.txt, read as make_tokenizer_golden.py
          reads them): ids without and with the post-processor.
        tests/golden/data/tokenizer/gemma4_262k_tokenizer.json.gz
          the same, grown to Gemma 4's 262,144 entries (a real-scale vocabulary and merge table):
          merges of two existing tokens whose concatenation is new, taken in a seeded order,
          appended until the vocabulary is full, then made through GemmaTokenizer likewise.
        tests/golden/data/tokenizer/expected_encode_262k.json
          its ids for the corpus files but the 1 MB document.
Run by scripts/tokenizer_fixtures.sh after make_tokenizer_golden.py.
"""

import gzip
import json
import os
import random
import shutil
import tempfile

from tokenizers import AddedToken, Tokenizer
from transformers import GemmaTokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "golden", "data", "tokenizer")


GEMMA_VOCAB = 262144


def grow(vocab, merges, added_ids, size):
    """Appends merges of two existing tokens (seeded order) until the ids reach `size`."""
    vocab = dict(vocab)
    merges = list(merges)
    rng = random.Random(262144)
    tokens = [t for t in vocab if not t.startswith("<")]
    next_id = max(max(vocab.values()), max(added_ids)) + 1
    while next_id < size:
        a, b = rng.choice(tokens), rng.choice(tokens)
        if a + b in vocab or len(a + b) > 24:
            continue
        vocab[a + b] = next_id
        merges.append((a, b))
        tokens.append(a + b)
        next_id += 1
    return vocab, merges


def make(vocab, merges, added_tokens, target):
    hf = GemmaTokenizer(vocab=vocab, merges=merges)
    backend = hf.backend_tokenizer
    backend.add_tokens([
        AddedToken(t["content"], single_word=t["single_word"], lstrip=t["lstrip"],
                   rstrip=t["rstrip"], normalized=t["normalized"], special=t["special"])
        for t in added_tokens])
    out_dir = tempfile.mkdtemp()
    try:
        hf.save_pretrained(out_dir)
        saved = os.path.join(out_dir, "tokenizer.json")
        doc = json.load(open(saved, encoding="utf-8"))
        assert doc["pre_tokenizer"]["type"] == "Split", doc["pre_tokenizer"]
        assert doc["post_processor"]["special_tokens"] == {}, doc["post_processor"]
        if target.endswith(".gz"):
            with open(saved, "rb") as f, gzip.GzipFile(target, "wb", mtime=0) as out:
                shutil.copyfileobj(f, out)
        else:
            shutil.copyfile(saved, target)
        return Tokenizer.from_file(saved)
    finally:
        shutil.rmtree(out_dir)


def expected_ids(tok, skip=()):
    expected = {}
    corpus = os.path.join(DATA, "corpus")
    for name in sorted(os.listdir(corpus)):
        if not name.endswith(".txt") or name[:-4] in skip:
            continue
        with open(os.path.join(corpus, name), "rb") as f:
            text = f.read().decode("utf-8", errors="replace")
        expected[name[:-4]] = {
            "ids": tok.encode(text, add_special_tokens=False).ids,
            "ids_with_special_tokens": tok.encode(text, add_special_tokens=True).ids,
        }
    return expected


def main():
    src = json.load(open(os.path.join(DATA, "gemma4_test_tokenizer.json"), encoding="utf-8"))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in src["model"]["merges"]]
    vocab = src["model"]["vocab"]
    added = src["added_tokens"]
    tok = make(vocab, merges, added, os.path.join(DATA, "gemma4_tf5_tokenizer.json"))
    with open(os.path.join(DATA, "expected_encode_tf5.json"), "w", encoding="utf-8") as f:
        json.dump(expected_ids(tok), f, ensure_ascii=False, indent=0, sort_keys=True)

    big_vocab, big_merges = grow(vocab, merges, [t["id"] for t in added], GEMMA_VOCAB)
    big = make(big_vocab, big_merges, added, os.path.join(DATA, "gemma4_262k_tokenizer.json.gz"))
    assert big.get_vocab_size() == GEMMA_VOCAB, big.get_vocab_size()
    with open(os.path.join(DATA, "expected_encode_262k.json"), "w", encoding="utf-8") as f:
        json.dump(expected_ids(big, skip=("doc_1mb",)), f, ensure_ascii=False, indent=0,
                  sort_keys=True)


if __name__ == "__main__":
    main()
