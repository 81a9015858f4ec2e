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


# Small templates of the subset's pieces, rendered with SNIPPET_VARIABLES by both.
SNIPPET_VARIABLES = {
    "s": "abcdef", "u": "héllo 日本 🙂", "ws": "\u00a0\t x y \u3000\n", "items": ["x", "y", "z"],
    "nums": [3, 1, 2], "n": 7, "f": 2.5, "d": {"b": 2, "a": 1, "nested": {"k": [1, "2", None]}},
    "nothing": None, "yes": True, "empty": "", "msgs": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>r</think>ok"}],
}
SNIPPETS = [
    "{{ s[1:] }}|{{ s[:-1] }}|{{ s[::-1] }}|{{ s[::2] }}|{{ s[-2:] }}|{{ s[4:2] }}|{{ s[10:] }}",
    "{{ u[1] }}|{{ u[::-1] }}|{{ u | length }}|{{ u[-1] }}|{{ u[2:7] }}",
    "{{ items[1:] }}{{ items[:-1] | length }}{{ items[::-1] }}{{ nums[-1] }}{{ items[7] }}",
    "{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 % -3 }} {{ 7 / 2 }} {{ 1 / 3 }} {{ 2 ** 10 }}",
    "{{ f * 2 }} {{ f + 1 }} {{ f // 1 }} {{ f % 1 }} {{ 1e20 }} {{ 1e-7 }} {{ 123456789.0 * "
    "1e8 }}",
    "{{ 0.1 + 0.2 }} {{ 1.0 }} {{ -0.0 }} {{ 1e16 }} {{ 1.5e-4 }} {{ 2 ** -1 }} {{ 10 ** 15 * "
    "1.0 }}",
    "{{ 'a' ~ 1 ~ none ~ yes ~ nope }} {{ 'ab' * 3 }} {{ [1] + [2, 3] }} {{ -n + +n }}",
    "{{ [1, 'a', none, true, 1.5, {'k': 'v'}, (1,), (1, 2), []] }}",
    "{{ \"it's\" }} {{ ['it\\'s', 'say \"x\"', 'both \\' \"', 'tab\\t', '\\n'] }}",
    "{{ d }} {{ d.nested }} {{ u | list }} {{ ws | list }}",
    "{{ 1 < 2 < 3 }} {{ 3 > 2 > 2 }} {{ 'b' >= 'a' }} {{ 1 == 1.0 }} {{ 1 == true }} {{ [1] == "
    "[1] }}",
    "{{ 'y' in items }} {{ 'cd' in s }} {{ 'a' in d }} {{ 'q' not in s }} {{ 2 in nums }} {{ "
    "'k' in nope }}",
    "{{ nope or 'fb' }} {{ s and 'last' }} {{ '' or 0 }} {{ not nope }} {{ none or empty or 'z' }}",
    "{{ 'yes' if n > 5 else 'no' }}|{{ 'x' if false }}|{{ 'a' if 0 else 'b' if 1 else 'c' }}",
    "{{ d.a }}{{ d['b'] }}{{ d.zz }}{{ msgs[0].role }}{{ msgs[1]['content'] }}{{ d.nested.k[1] }}",
    "{{ ws | trim }}|{{ ws.strip() }}|{{ ws.lstrip() }}|{{ ws.rstrip() }}|{{ '--a--' | "
    "trim('-') }}",
    "{{ 'xxaxx'.lstrip('x') }}|{{ 'xxaxx'.rstrip('x') }}|{{ 'xyaxy'.strip('yx') }}",
    "{{ ' a  b\\n c '.split() }} {{ 'a,b,,c'.split(',') }} {{ 'a,b,c'.split(',', 1) }}",
    "{{ msgs[1].content.split('</think>')[-1].lstrip('\\n') }}|{{ "
    "msgs[1].content.split('</think>')[0] }}",
    "{{ s.startswith('ab') }} {{ s.startswith(('x', 'a')) }} {{ s.endswith('ef') }} {{ "
    "s.endswith('e') }}",
    "{{ s.upper() }} {{ 'AbC'.lower() }} {{ 'hello world'.title() }} {{ 'hELLO'.capitalize() }}",
    "{{ s.replace('c', 'CC') }} {{ 'aaa'.replace('a', 'b', 2) }} {{ s.find('d') }} {{ "
    "u.find('日') }} {{ 'aXaXa'.count('a') }}",
    "{{ d.get('a') }} {{ d.get('zz') }} {{ d.get('zz', 'dflt') }} {{ d.keys() | list }} {{ "
    "d.values() | list }} {{ d.items() | list }}",
    "{{ items | length }} {{ d | length }} {{ s | count }} {{ nope | length }} {{ empty | "
    "length }}",
    "{{ s | upper }} {{ 'ABC' | lower }} {{ 'ab cd' | title }} {{ 'aBC' | capitalize }} {{ n | "
    "string }}",
    "{{ items | join }} {{ items | join(', ') }} {{ nums | join('-') }} {{ msgs | join(',', "
    "attribute='role') }}",
    "{{ nope | default('dv') }} {{ empty | default('dv') }} {{ empty | default('dv', true) }} "
    "{{ nothing | d('x') }}",
    "{{ items | first }} {{ items | last }} {{ s | first }} {{ s | last }} {{ [] | first }}|",
    "{{ s | replace('b', 'B') }} {{ 'aaa' | replace('a', 'b', 1) }} {{ n | replace('7', "
    "'seven') }}",
    "{% for k, v in d | items %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}",
    "{{ items | reject('equalto', 'y') | list }} {{ items | select('in', 'xz') | list }} {{ "
    "nums | select('odd') | list }}",
    "{{ msgs | selectattr('role', 'equalto', 'user') | list | length }} {{ msgs | "
    "rejectattr('role', 'eq', 'user') | map(attribute='role') | list }}",
    "{{ nums | select('gt', 1) | list }} {{ [0, 1, '', 'a', none] | select | list }} {{ [0, 1, "
    "''] | reject | list }}",
    "{{ '42' | int }} {{ '4.7' | int }} {{ 'x' | int }} {{ 4.7 | int }} {{ '2.5' | float }} {{ "
    "-3 | abs }}",
    "{{ d | tojson }} {{ d | tojson(indent=2) }} {{ u | tojson }} {{ u | "
    "tojson(ensure_ascii=true) }}",
    "{{ d | tojson(sort_keys=true) }} {{ items | tojson(separators=(',', ':')) }} {{ [] | "
    "tojson(indent=4) }} {{ {} | tojson }}",
    "{{ [1.0, 2.5e20, none, true, 'a\\tb\\u0001\\\\'] | tojson }} {{ d.nested | "
    "tojson(indent=0) }}",
    "{{ nope is defined }} {{ s is string }} {{ d is mapping }} {{ n is number }} {{ nothing is "
    "none }}",
    "{{ false is false }} {{ 0 is false }} {{ yes is true }} {{ items is iterable }} {{ n is "
    "not string }}",
    "{{ 'x' is sequence }} {{ d is sequence }} {{ n is sequence }} {{ yes is boolean }} {{ yes "
    "is number }}",
    "{{ n is integer }} {{ f is float }} {{ n is odd }} {{ n is even }} {{ 9 is divisibleby 3 "
    "}} {{ 9 is divisibleby(2) }}",
    "{{ 'abc' is lower }} {{ 'ABC' is upper }} {{ n is eq 7 }} {{ n is ne 7 }} {{ n is lt 9 }} "
    "{{ 'y' is in items }}",
    "{{ nope is undefined }} {{ nothing is sameas none }} {{ yes is sameas true }} {{ d.zz is "
    "defined }}",
    "{% for x in items %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}{{ loop.last }}{{ "
    "loop.length }}{{ loop.revindex }}{{ loop.revindex0 }}{{ loop.previtem }}{{ loop.nextitem "
    "}};{% endfor %}",
    "{% for x in items if x != 'y' %}{{ x }}{{ loop.index }}/{{ loop.length }}{% else %}E{% "
    "endfor %}{% for x in [] %}{% else %}empty{% endfor %}",
    "{% for x in items %}{% if x == 'y' %}{% continue %}{% endif %}{{ x }}{% if x == 'z' %}{% "
    "break %}{% endif %}{% endfor %}",
    "{% for a in [1, 2] %}{% for b in 'xy' %}{{ a }}{{ b }}{{ loop.index }}{% endfor %}{{ "
    "loop.index }}{% endfor %}",
    "{% for c in u %}[{{ c }}]{% endfor %}{% for k, v in [[1, 2], (3, 4)] %}{{ k + v }}{% "
    "endfor %}",
    "{% if n < 5 %}a{% elif n < 10 %}b{% else %}c{% endif %}{% if nope %}x{% elif empty %}y{% "
    "endif %}",
    "{% set x = 0 %}{% set ns = namespace(t=0, found=false) %}{% for i in [1, 2] %}{{ x }}{% "
    "set x = x + i %}{{ x }}{% set ns.t = ns.t + i %}{% endfor %}{{ x }}{{ ns.t }}{{ ns.found "
    "}}",
    "{% for i in [0, 1, 2] %}{% if i == 0 %}{% set y = 'a' %}{% endif %}[{{ y }}]{% endfor "
    "%}[{{ y }}]",
    "{% set a, b = [1, 2] %}{{ b }}{{ a }}{% set c %}in {{ s }}{% endset %}[{{ c }}]{% set t = "
    "1, 2 %}{{ t }}",
    "{% set msgs2 = msgs[1:] %}{{ msgs2 | length }}{% set s = s ~ '!' %}{{ s }}",
    "  {% if 1 %}\n  a\n  {% endif %}\nb {{ 'x' }}  {% if 1 %}c{% endif %}\n",
    "a  \n  {{- 'b' -}}  \n c {#- x #}\n d {# y -#}\n\n e",
    "{# comment #}\n  {#- c2 -#}  x{%+ if 1 %}y{% endif +%}\nz\n\n",
    "  {%+ if 1 %}a{% endif %}  \n  {%- if 1 %}b{% endif -%}  \n\t{% if 1 %}\n\tc\n\t{% endif %}\n",
    "x\r\ny\r\n{% if 1 %}\r\nz{% endif %}\r\n",
    "{{ 'line\\nnext' }}|{{ '\\x41\\u00e9\\U0001F642\\101\\q' }}|{{ 'a' 'b' \"c\" }}",
    "{%- for m in msgs -%}\n  {{- m.role }}: {{ m.content | trim }}\n{% endfor -%}\nend",
    "{{ range(3) | list }} {{ range(1, 7, 2) | list }} {{ range(5, 0, -2) | list }}",
    "{{ raise_exception('boom') }}",
    "{{ nope.attr }}",
    "{{ 'a' + 1 }}",
    "{{ nope + 'x' }}",
    "{{ 1 // 0 }}",
    "{{ nope | tojson }}",
    "{{ d.nested.zz.deeper }}",
    "{{ nums < 'a' }}",
    "{% set v = 1 %}{% set v.a = 2 %}",
    "{% for a, b in items %}{% endfor %}",
    "{{ n[0] }}|{{ nothing.x }}|{{ nothing['x'] }}|{{ d.nested.k[2] }}",
    "{{ 'abc'.split('') }}",
]


def compare_snippets(env, tool, work):
    spec = {"variables": SNIPPET_VARIABLES, "snippets": SNIPPETS}
    path = os.path.join(work, "snippets.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(spec, f, ensure_ascii=False)
    run = subprocess.run([tool, "--snippets", path], capture_output=True, text=True)
    if run.returncode != 0:
        print(f"FAIL snippets: chat_template_tool exited {run.returncode}: {run.stderr}")
        return len(SNIPPETS), 0
    ours = json.loads(run.stdout)
    failures = 0
    for snippet, got in zip(SNIPPETS, ours):
        try:
            want, want_ok = env.from_string(snippet).render(**SNIPPET_VARIABLES), True
        except Exception as error:
            want, want_ok = f"{type(error).__name__}: {error}", False
        if want_ok != got["ok"] or (want_ok and want != got["text"]):
            failures += 1
            print(f"MISMATCH snippet {snippet!r}\n  jinja2:    {want!r}\n"
                  f"  megaserve: {got.get('text', got.get('error'))!r}")
    print(f"snippets: {len(SNIPPETS) - failures}/{len(SNIPPETS)} identical")
    return failures, len(SNIPPETS)


def check_smollm2_gguf(templates_dir):
    """smollm2.jinja is the template inside SmolLM2's GGUF, where scripts/install-deps puts
    it; skipped here (not failed) without the file or the gguf package: the GGUF tests own
    that requirement. Returns the number of failures."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    models = os.environ.get("MEGASERVE_MODELS_DIR") or os.path.join(cache, "megaserve", "models")
    path = os.environ.get("MEGASERVE_SMOLLM2_GGUF") or os.path.join(
        models, "SmolLM2-135M-Instruct.Q4_1.gguf")
    try:
        from gguf import GGUFReader
    except ImportError:
        print("smollm2.jinja vs the GGUF: not checked (no gguf package)")
        return 0
    if not os.path.exists(path):
        print(f"smollm2.jinja vs the GGUF: not checked ({path} missing)")
        return 0
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    in_gguf = bytes(field.parts[field.data[0]]).decode("utf-8")
    with open(os.path.join(templates_dir, "smollm2.jinja"), encoding="utf-8") as f:
        ours = f.read()
    if in_gguf != ours:
        print(f"FAIL: smollm2.jinja differs from tokenizer.chat_template in {path}")
        return 1
    print("smollm2.jinja: identical to tokenizer.chat_template in the GGUF")
    return 0


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
    failures += check_smollm2_gguf(templates_dir)
    snippet_failures, snippet_total = compare_snippets(env, tool, work)
    failures += snippet_failures
    total += snippet_total
    print(f"{total - failures} passed, {failures} failed")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
