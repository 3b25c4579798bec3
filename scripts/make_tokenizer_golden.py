#!/usr/bin/env python3
"""Generates the tokenizer golden outputs with the Hugging Face libraries.

Reads the fixtures written by train_tokenizer.py and writes, under
tests/golden/data/tokenizer/:
  corpus/*.txt        the encode corpus (raw bytes; some deliberately invalid UTF-8)
  corpus/doc_1mb.txt  a 1 MB document (also the benchmark input)
  expected_encode.json  per corpus file: ids with and without the <bos> template, ids with
                        special tokens treated as text, and the decoded text
  doc_1mb.ids         ids of the 1 MB document, little-endian uint32
  expected_decode.json  decodes of arbitrary id sequences (byte runs, specials, unknown ids)
  expected_flags.json   encodes with flags_tokenizer.json (lstrip/rstrip/normalized/special)
  expected_chat.json    prompts rendered by transformers' apply_chat_template with
                        chat_template.jinja, and their ids

Invalid UTF-8 is given to the library as Python's bytes.decode("utf-8", "replace") of it,
which is the repair our C++ encoder applies.
"""

import json
import os
import random
import struct
import sys

from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "golden", "data", "tokenizer")
CORPUS = os.path.join(DATA, "corpus")

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|tool>", "<tool|>",
            "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>',
            "<|think|>", "<|channel>", "<channel|>", "<|turn>", "<turn|>", "<|image>",
            "<|audio>", "<|image|>", "<|audio|>", "<image|>", "<audio|>", "<|video|>",
            "<unused7>", "<unused99>"]


def corpus_cases(multilingual):
    cases = {
        "empty": b"",
        "single_space": b" ",
        "ascii": b"Hello, world! This is a simple sentence.",
        "multilingual": multilingual.encode(),
        "emoji": "😀 👍🏽 👨‍👩‍👧‍👦 🇯🇵🇫🇷 🏳️‍🌈 🫠🪿 ❤️‍🔥".encode(),
        "whitespace_runs": b"a  b   c    d     e" + b" " * 40 + b"f\n\n\n\ng\r\n\r\nh",
        "tabs_newlines": b"\tindent\n\t\tdeeper\n \t mixed \t\n\n\nend\t",
        "leading_trailing": b"   leading and trailing   ",
        "control_chars": bytes(range(0, 32)) + b"\x7f middle \x1b[31mred\x1b[0m \x00end",
        "all_specials": "".join(SPECIALS).encode(),
        "specials_in_text": ("<bos><|turn>user\nHello there<turn|>\n<|turn>model\n"
                             "<|channel>thought\nthinking<channel|>Answer.<turn|>"
                             " <eos> <pad>x<mask>y").encode(),
        "special_lookalikes": ("<bos <turn|  <|turn <|Turn> < |turn> <<bos>> <|think|"
                               " <|\"> <unused> <unused1000> <0x41> <0x4> &lt;bos&gt; <BOS>"
                               " <｜turn> ＜bos＞").encode(),
        "byte_tokens_as_text": b"<0x00><0xFF><0xE2><0x82><0xAC>",
        "invalid_utf8": (b"ok \xff\xfe bad \xc3( trunc \xe2\x82 end \xed\xa0\x80 surrogate "
                         b"\xf0\x9f\x98 overlong \xc0\xaf \x80\x80 tail \xf4\x90\x80\x80 \xe2"),
        "rare_scripts": "ᚠᚢᚦᚨᚱᚲ 𐌰𐌱𐌲 ꦲꦤꦕꦫꦏ ⠓⠑⠇⠇⠕ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ Z͑ͫ̓ͪ̂ͫ̽͏̴̙̤̞͉͚̯̞̠͍".encode(),
        "numbers_punct": b"1234567890 3.14159 -42 1e-9 0x1F (a) [b] {c} \"q\" 'q' ... --- ===",
        "code": (b"int main(int argc, char** argv) {\n  for (int i = 0; i < argc; ++i) {\n"
                 b"    printf(\"%s\\n\", argv[i]);\n  }\n  return 0;\n}\n"),
        "kjv_verse": (b"In the beginning God created the heaven and the earth. And the earth "
                      b"was without form, and void; and darkness was upon the face of the "
                      b"deep."),
        "replacement_char": "already \ufffd replaced".encode(),
        "nbsp_and_unicode_spaces": "a\u00a0b\u2003c\u3000d\u2028e\u200bf".encode(),
        "lower_one_eighth_block": "pre\u2581existing\u2581\u2581marks".encode(),
    }
    return cases


def make_doc_1mb(kjv_source, multilingual, size=1 << 20):
    """Deterministic mix of prose, other languages, code, whitespace and special tokens."""
    rng = random.Random(20240601)
    lines = kjv_source.splitlines()
    extra = multilingual.splitlines()
    parts = []
    total = 0
    while total < size:
        r = rng.random()
        if r < 0.80:
            start = rng.randrange(len(lines))
            chunk = " ".join(lines[start:start + rng.randint(1, 6)]) + "\n"
        elif r < 0.90:
            chunk = rng.choice(extra) + "\n"
        elif r < 0.95:
            chunk = " " * rng.randint(2, 12) + "\t" * rng.randint(0, 2) + "indented line\n"
        else:
            chunk = rng.choice(SPECIALS[:17]) + "\n"
        parts.append(chunk)
        total += len(chunk.encode())
    data = "".join(parts).encode()
    # Cut at a character boundary no later than `size` bytes.
    cut = size
    while cut > 0 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return data[:cut]


def encode_record(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    with_bos = tok.encode(text, add_special_tokens=True).ids
    tok.encode_special_tokens = True
    split = tok.encode(text, add_special_tokens=False).ids
    tok.encode_special_tokens = False
    return {
        "ids": ids,
        "ids_with_special_tokens": with_bos,
        "ids_split_special_tokens": split,
        "decoded": tok.decode(ids, skip_special_tokens=False),
        "decoded_skip_special": tok.decode(ids, skip_special_tokens=True),
    }


def decode_cases(tok):
    b = lambda x: tok.token_to_id(f"<0x{x:02X}>")
    euro = [b(0xE2), b(0x82), b(0xAC)]
    hello = tok.encode("Hello world", add_special_tokens=False).ids
    cases = {
        "byte_run_valid": euro,
        "byte_run_split_by_text": [b(0xE2), b(0x82)] + hello + [b(0xAC)],
        "byte_run_invalid_tail": euro + [b(0xFF)],
        "byte_run_truncated": [b(0xF0), b(0x9F), b(0x98)],
        "byte_run_then_special": euro + [tok.token_to_id("<turn|>")] + euro,
        "specials_mixed": [2, 105] + hello + [106, 1, 0],
        "unknown_ids": hello + [10**6, tok.get_vocab_size(True) + 5] + hello,
        "spaces_marker": [tok.token_to_id("\u2581")] * 3 + hello,
    }
    rng = random.Random(7)
    vocab_size = tok.get_vocab_size(True)
    for n in range(6):
        cases[f"random_{n}"] = [rng.randrange(vocab_size) for _ in range(rng.randint(5, 60))]
    byte_ids = [b(x) for x in range(256)]
    for n in range(4):
        cases[f"random_bytes_{n}"] = [rng.choice(byte_ids) if rng.random() < 0.7
                                      else rng.randrange(vocab_size) for _ in range(40)]
    return {name: {"ids": ids,
                   "decoded": tok.decode(ids, skip_special_tokens=False),
                   "decoded_skip_special": tok.decode(ids, skip_special_tokens=True)}
            for name, ids in cases.items()}


FLAG_TEXTS = [
    "a <plain> b", "a<plain>b", "x   <lstrip>  y", "x\t\n<lstrip>y", "<lstrip>", "<rstrip>   z",
    "<rstrip>\n\tz", "  <both>  ", "a <both> b <both>c", "say hello world now",
    "hello  world", "sayhello worldnow", "a spaced b", "a  spaced b", "spaced",
    "<norm>x <norm> y", "<norm>  y", "then the other", "there", "<|turn>user\nthe<turn|>",
    "<plain><lstrip><rstrip><both>", "  <lstrip>  <rstrip>  ",
]


def flag_cases(tok):
    return [dict(text=t, **encode_record(tok, t)) for t in FLAG_TEXTS]


CHATS = {
    "single_user": [{"role": "user", "content": "Hi"}],
    "user_with_whitespace": [{"role": "user", "content": "  \n Hello there!\t\n"}],
    "system_and_user": [{"role": "system", "content": " You are terse. "},
                        {"role": "user", "content": "What is 2+2?"}],
    "developer_and_user": [{"role": "developer", "content": "Answer in French."},
                           {"role": "user", "content": "Good morning"}],
    "multi_turn": [{"role": "user", "content": "Name a colour."},
                   {"role": "assistant", "content": "Blue."},
                   {"role": "user", "content": "Another?"}],
    "multi_turn_with_thoughts": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant",
         "content": "<|channel>thought\nThe user greets me.<channel|>Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "model", "content": "<|channel>thought\nA pun.<channel|>  Puns are fun. "},
        {"role": "user", "content": "Another one, with unicode: ☃ 日本"}],
    "ends_with_model": [{"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}],
}


def chat_cases(tokenizer_path, template_path, tok):
    from transformers import PreTrainedTokenizerFast
    with open(template_path, encoding="utf-8") as f:
        template = f.read()
    hf = PreTrainedTokenizerFast(tokenizer_file=tokenizer_path, bos_token="<bos>",
                                 eos_token="<eos>", unk_token="<unk>", pad_token="<pad>")
    hf.chat_template = template
    out = []
    for name, messages in CHATS.items():
        for thinking in (False, True):
            for gen in (True, False):
                prompt = hf.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=gen,
                                                enable_thinking=thinking)
                ids = tok.encode(prompt, add_special_tokens=False).ids
                templ_ids = hf.apply_chat_template(messages, tokenize=True,
                                                   add_generation_prompt=gen,
                                                   enable_thinking=thinking)
                if hasattr(templ_ids, "keys"):
                    templ_ids = templ_ids["input_ids"]
                assert list(templ_ids) == ids, name
                assert ids.count(2) == 1 and ids[0] == 2, name
                out.append({"name": f"{name}/thinking={thinking}/gen={gen}",
                            "messages": messages, "enable_thinking": thinking,
                            "add_generation_prompt": gen, "prompt": prompt, "ids": ids})
    return out


def main():
    tok_path = os.path.join(DATA, "gemma4_test_tokenizer.json")
    tok = Tokenizer.from_file(tok_path)
    with open(os.path.join(CORPUS, "multilingual.txt"), encoding="utf-8") as f:
        multilingual = f.read()

    expected = {}
    for name, data in corpus_cases(multilingual).items():
        if name != "multilingual":
            with open(os.path.join(CORPUS, name + ".txt"), "wb") as f:
                f.write(data)
        text = data.decode("utf-8", errors="replace")
        expected[name] = encode_record(tok, text)
        # Every corpus file must round-trip through the library except the repaired ones.
        if name not in ("invalid_utf8", "lower_one_eighth_block"):
            assert expected[name]["decoded"] == text, name
    with open(os.path.join(DATA, "expected_encode.json"), "w", encoding="utf-8") as f:
        json.dump(expected, f, ensure_ascii=False, indent=0, sort_keys=True)

    kjv_path = os.environ.get("KJV_TEXT")
    if kjv_path:
        with open(kjv_path, encoding="utf-8") as f:
            doc = make_doc_1mb(f.read(), multilingual)
        with open(os.path.join(CORPUS, "doc_1mb.txt"), "wb") as f:
            f.write(doc)
    with open(os.path.join(CORPUS, "doc_1mb.txt"), "rb") as f:
        doc = f.read()
    doc_text = doc.decode("utf-8")
    doc_ids = tok.encode(doc_text, add_special_tokens=False).ids
    assert tok.decode(doc_ids, skip_special_tokens=False) == doc_text
    with open(os.path.join(DATA, "doc_1mb.ids"), "wb") as f:
        f.write(struct.pack(f"<{len(doc_ids)}I", *doc_ids))
    print(f"doc_1mb: {len(doc)} bytes, {len(doc_ids)} ids")

    with open(os.path.join(DATA, "expected_decode.json"), "w", encoding="utf-8") as f:
        json.dump(decode_cases(tok), f, ensure_ascii=False, indent=0, sort_keys=True)

    flags = Tokenizer.from_file(os.path.join(DATA, "flags_tokenizer.json"))
    with open(os.path.join(DATA, "expected_flags.json"), "w", encoding="utf-8") as f:
        json.dump(flag_cases(flags), f, ensure_ascii=False, indent=0)

    chats = chat_cases(tok_path, os.path.join(DATA, "chat_template.jinja"), tok)
    with open(os.path.join(DATA, "expected_chat.json"), "w", encoding="utf-8") as f:
        json.dump(chats, f, ensure_ascii=False, indent=1)
    print(f"{len(expected)} encode cases, {len(chats)} chat cases")


if __name__ == "__main__":
    sys.exit(main())
