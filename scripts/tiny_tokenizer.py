#!/usr/bin/env python3
"""Trains the 512-entry tokenizer of the tiny checkpoints with the Hugging Face `tokenizers`
library and writes it as tests/golden/data/{tiny-moe,tiny-dense}/tokenizer.json (one file,
twice), so that text and chat requests on the tiny models give ids below their vocab_size 512.

Same pipeline as the test tokenizer (scripts/train_tokenizer.py): BPE with byte fallback and
fuse_unk, the " " -> "\u2581" normalizer, no pre-tokenizer, a <bos> template, the
Replace/ByteFallback/Fuse decoder. Same id layout as Gemma 4 and the tiny config.json:
<pad> 0, <eos> 1, <bos> 2, <unk> 3, <mask> 4, the tool tokens 46-52, <|think|> 98,
<|channel> 100, <channel|> 101, <|turn> 105, <turn|> 106 (an eos id of the config, so the
engine ends a model turn there), "\n" 107, the 256 byte tokens 108-363, then 148 pieces
trained on the King James Version (the `bible` program of the Debian package bible-kjv).
The multimodal tokens are left out: their config ids (255999 and up) do not fit.

  scripts/tiny_tokenizer.py [--check BUILD/bin/gemma-tokenize]

--check compares our C++ tokenizer with `tokenizers` on a few texts and a chat rendered by
transformers with tests/golden/data/tokenizer/chat_template.jinja.
Run by scripts/tokenizer_fixtures.sh; scripts/make_golden.sh rewrites the tiny model folders,
so run this again after it.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from tokenizers import Tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tokenizer import (FIXED_SPECIALS, NEWLINE_ID, assemble, kjv_text,  # noqa: E402
                             train_bpe, write_tokenizer)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "golden", "data")
MODELS = ["tiny-moe", "tiny-dense"]
VOCAB_SIZE = 512
# Reserved specials and "\n" (0..107), then the byte tokens.
NUM_TRAINED = VOCAB_SIZE - (NEWLINE_ID + 1) - 256

CHECK_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the LORD said unto Moses, Go in unto Pharaoh.",
    "Hello, world! 123 caf\u00e9 \u65e5\u672c\u8a9e \U0001F600",
    "  leading and trailing spaces  \n\nand a blank line",
    "<|turn>user\nhi<turn|>\n<|turn>model\n",
]
CHECK_CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Who made the heaven and the earth?"},
    {"role": "model", "content": "God created the heaven and the earth."},
    {"role": "user", "content": "And then?"},
]


def check_config(vocab):
    """The ids the tiny configs name (bos, pad, every eos) are the right tokens."""
    for model in MODELS:
        with open(os.path.join(DATA, model, "config.json")) as f:
            cfg = json.load(f)
        tc = cfg.get("text_config", cfg)
        assert tc["vocab_size"] == VOCAB_SIZE, (model, tc["vocab_size"])
        eos = cfg.get("eos_token_id", tc.get("eos_token_id"))
        eos = eos if isinstance(eos, list) else [eos]
        by_id = {i: t for t, i in vocab.items()}
        assert by_id[tc["bos_token_id"]] == "<bos>", model
        assert by_id[tc["pad_token_id"]] == "<pad>", model
        assert sorted(by_id[i] for i in eos) == ["<eos>", "<turn|>"], (model, eos)


def check_against_cpp(path, gemma_tokenize):
    tok = Tokenizer.from_file(path)
    failures = 0
    for text in CHECK_TEXTS:
        for special in (False, True):
            expected = tok.encode(text, add_special_tokens=special).ids
            args = [gemma_tokenize, "--tokenizer", path, "--encode"]
            if special:
                args.append("--add_special_tokens")
            out = subprocess.run(args, input=text, capture_output=True, text=True, check=True)
            got = [int(x) for x in out.stdout.split()]
            assert max(expected) < VOCAB_SIZE, text
            if got != expected:
                failures += 1
                print(f"MISMATCH encode {text!r}: ours {got} hf {expected}")
            decoded = subprocess.run([gemma_tokenize, "--tokenizer", path, "--decode"],
                                     input=" ".join(map(str, expected)), capture_output=True,
                                     text=True, check=True).stdout
            if decoded != tok.decode(expected, skip_special_tokens=False):
                failures += 1
                print(f"MISMATCH decode {expected}: ours {decoded!r}")
    # The chat: transformers renders it with the Gemma 4 template, `tokenizers` encodes it.
    from transformers import PreTrainedTokenizerFast
    with open(os.path.join(DATA, "tokenizer", "chat_template.jinja"), encoding="utf-8") as f:
        template = f.read()
    hf = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<bos>", eos_token="<eos>",
                                 pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = template
    prompt = hf.apply_chat_template(CHECK_CHAT, tokenize=False, add_generation_prompt=True)
    expected = tok.encode(prompt, add_special_tokens=False).ids
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"messages": CHECK_CHAT, "add_generation_prompt": True}, f)
        chat_path = f.name
    try:
        out = subprocess.run([gemma_tokenize, "--tokenizer", path, "--chat", chat_path],
                             capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(chat_path)
    ours = json.loads(out)
    if ours["prompt"] != prompt or ours["ids"] != expected:
        failures += 1
        print(f"MISMATCH chat:\n ours {ours}\n hf   {prompt!r} {expected}")
    for control in ("<bos>", "<|turn>", "<turn|>", "<|channel>", "<channel|>"):
        assert tok.token_to_id(control) in expected, control
    print(f"chat prompt {prompt!r}\n  ids {expected}")
    if failures:
        sys.exit(f"{failures} mismatches between gemma-tokenize and tokenizers")
    print(f"gemma-tokenize equals tokenizers on {len(CHECK_TEXTS) * 2} encodes, "
          f"{len(CHECK_TEXTS) * 2} decodes and the chat")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", metavar="GEMMA_TOKENIZE",
                        help="compare this gemma-tokenize binary with tokenizers")
    args = parser.parse_args()
    # KJV only: its 62 characters leave 86 merges in the 148 trained entries.
    lines = kjv_text().splitlines()
    trained, merges = train_bpe(lines, NUM_TRAINED, 16)
    vocab, merges, added = assemble(trained, merges, NEWLINE_ID, FIXED_SPECIALS, [], [])
    assert len(vocab) == VOCAB_SIZE and max(vocab.values()) == VOCAB_SIZE - 1, len(vocab)
    check_config(vocab)
    paths = [os.path.join(DATA, model, "tokenizer.json") for model in MODELS]
    for path in paths:
        write_tokenizer(path, vocab, merges, added)
    if args.check:
        check_against_cpp(paths[0], args.check)


if __name__ == "__main__":
    sys.exit(main())
