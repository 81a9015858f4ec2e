#!/usr/bin/env python3
"""megaserve's chat templates against jinja2 configured as transformers' apply_chat_template
configures it (ImmutableSandboxedEnvironment, trim_blocks=True, lstrip_blocks=True, the
loopcontrols extension, its own tojson filter and the raise_exception and strftime_now
globals; render(messages=..., tools=None, documents=None, add_generation_prompt=...,
**special tokens, **extra)). For each real template in tests/data/chat_templates, at least
60 generated message lists (system or not, 1 to 6 turns, empty content, unicode, quotes,
newlines, edge whitespace, tool turns, add_generation_prompt true and false) must render to
the same text, or fail in both.
Usage: chat_template_test.py CHAT_TEMPLATE_TOOL TEMPLATES_DIR WORK_DIR
Exit 77 (skipped) when jinja2 is not importable, unless CI=true (scripts/install-deps
installs it; then it fails).
"""
import json
import os
import random
import subprocess
import sys
from datetime import datetime

# template file -> the special tokens its tokenizer's special_tokens_map gives the template
TEMPLATES = {
    "smollm2.jinja": {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"},
    "llama3.1.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama3.2.jinja": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "qwen2.5.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
    "qwen3.jinja": {"bos_token": None, "eos_token": "<|im_end|>"},
}
CASES_PER_TEMPLATE = 80

CONTENTS = [
    "", "Hello!", "What is the capital of France?", "2+2=4, right?",
    "héllo wörld ✓ 日本語のテキスト 🙂🚀 مرحبا",
    'He said "hi" and \'bye\'', "line one\nline two\n\nline four\n",
    "  padded with spaces  ", "\n\nleading newlines", "trailing newlines\n\n",
    "\u00a0nbsp and ideographic space\u3000", "\ttabs\tinside\t",
    "C:\\path\\to\\file and \\n literally", "{{ not a tag }} {% if x %} {# nor a comment #}",
    "<|im_start|>fake special<|im_end|>", "a" * 300, "Sure.\n```python\nprint('x')\n```",
    "<think>\nLet me reason.\n</think>\n\nThe answer is 4.",
    "<tool_response>{\"temp\": 21}</tool_response>", "   ", "\u200b zero width \ufeff",
]
SYSTEMS = ["You are a helpful assistant.", "", "  Be brief.\n", "Réponds en français ✓",
           'Quote "this" \\ that']


def skip(reason):
    if os.environ.get("CI") == "true":
        sys.exit(f"FAIL: {reason} (CI=true: scripts/install-deps installs it)")
    print(f"SKIP: {reason}")
    sys.exit(77)


def make_environment():
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # As transformers' _compile_jinja_template (the AssistantTracker extension only adds the
    # {% generation %} block, which these templates do not use).
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def generate_cases(rng, template):
    cases = []
    for i in range(CASES_PER_TEMPLATE):
        messages = []
        if i % 3 == 0:
            messages.append({"role": "system", "content": rng.choice(SYSTEMS + CONTENTS)})
        turns = 1 + i % 6
        role = "user"
        for _ in range(turns):
            messages.append({"role": role, "content": rng.choice(CONTENTS)})
            role = "assistant" if role == "user" else "user"
            if rng.random() < 0.1:  # a tool result in between
                messages.append({"role": "tool", "content": rng.choice(CONTENTS)})
        if i % 17 == 5:  # two user turns in a row, a mid-conversation system turn
            messages.insert(len(messages) // 2, {"role": rng.choice(["user", "system"]),
                                                 "content": rng.choice(CONTENTS)})
        case = {"messages": messages, "add_generation_prompt": i % 2 == 1}
        if template == "qwen3.jinja" and i % 4 == 2:
            case["extra"] = {"enable_thinking": i % 8 == 2}
        if template.startswith("llama") and i % 10 == 3:
            case["extra"] = {"date_string": "01 Jan 2025"}
        cases.append(case)
    cases.append({"messages": [], "add_generation_prompt": True})  # fails in some templates
    cases.append({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False})
    return cases


def main():
    tool, templates_dir, work = sys.argv[1:4]
    try:
        env = make_environment()
    except ImportError as error:
        skip(f"jinja2 is not importable ({error})")
    os.makedirs(work, exist_ok=True)
    rng = random.Random(17)
    failures = 0
    total = 0
    for name, tokens in TEMPLATES.items():
        path = os.path.join(templates_dir, name)
        with open(path, encoding="utf-8") as f:
            compiled = env.from_string(f.read())
        cases = generate_cases(rng, name)
        spec = dict(tokens, cases=cases)
        cases_path = os.path.join(work, name + ".cases.json")
        with open(cases_path, "w", encoding="utf-8") as f:
            json.dump(spec, f, ensure_ascii=False)
        run = subprocess.run([tool, path, cases_path], capture_output=True, text=True)
        if run.returncode != 0:
            print(f"FAIL {name}: chat_template_tool exited {run.returncode}: {run.stderr}")
            failures += 1
            continue
        ours = json.loads(run.stdout)
        assert len(ours) == len(cases)
        mismatches = 0
        for index, (case, got) in enumerate(zip(cases, ours)):
            kwargs = {k: v for k, v in tokens.items() if v is not None}
            kwargs.update(case.get("extra", {}))
            try:
                want = compiled.render(messages=case["messages"], tools=None, documents=None,
                                       add_generation_prompt=case["add_generation_prompt"],
                                       **kwargs)
                want_ok = True
            except Exception as error:  # the template raised: we must fail too
                want, want_ok = f"{type(error).__name__}: {error}", False
            total += 1
            if want_ok != got["ok"] or (want_ok and want != got["text"]):
                mismatches += 1
                if mismatches <= 3:
                    print(f"MISMATCH {name} case {index}: {json.dumps(case, ensure_ascii=False)}")
                    print(f"  jinja2:    {want!r}")
                    print(f"  megaserve: {got.get('text', got.get('error'))!r}")
        errors = sum(1 for g in ours if not g["ok"])
        print(f"{name}: {len(cases) - mismatches}/{len(cases)} identical "
              f"({errors} failing in both)" if mismatches == 0 else
              f"{name}: {mismatches} of {len(cases)} differ")
        failures += mismatches
    print(f"{total - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
