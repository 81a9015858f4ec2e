#!/usr/bin/env python3
"""The OpenAI-compatible HTTP API through the official `openai` Python client (PyPI), against
the real `megaserve` binary on the CPU backend:
  - stories260K-hf: completions, whole and streamed, equal the gRPC Generate stream that
    megaserve-cli reads for the same greedy request (text, token counts, finish reason);
    token-id prompts, stop strings, echo, usage in the last chunk, logprobs (equal to gRPC's),
    the model list; errors
    raise the client's exception classes (BadRequestError, NotFoundError) and bad JSON gets
    a 400 without disturbing a stream running beside it; chat on a model without a chat
    template is a clear 400;
  - SmolLM2-135M-Instruct (GGUF, with a chat template): chat completions, whole and
    streamed, equal the gRPC Chat stream (logprobs too); a client that closes its stream, or
    gives up on a whole response, leaves no running request and no KV block in use (the
    server's metrics).
Usage: openai_client_test.py MEGASERVE MEGASERVE_CLI ASSETS_DIR WORK_DIR
Exit 77 (skipped) when the openai module, the stories260K-hf assets or the SmolLM2 file is
missing, unless CI=true (scripts/install-deps installs them; then it fails).
"""
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import time
import unittest

MEGASERVE, MEGASERVE_CLI, ASSETS_DIR, WORK_DIR = sys.argv[1:5]
# The client must reach 127.0.0.1 directly, whatever proxy the environment names.
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"


def skip(reason, required_in_ci=True):
    if required_in_ci and os.environ.get("CI") == "true":
        sys.exit(f"FAIL: {reason} (CI=true: scripts/install-deps installs it)")
    print(f"SKIP: {reason}")
    sys.exit(77)


try:
    import openai
except ImportError as error:
    skip(f"the PyPI package openai is not importable ({error})")

STORIES = os.path.join(ASSETS_DIR, "models", "stories260K-hf")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path():
    """As tests/server/server_gguf_test.cc finds it."""
    if os.environ.get("MEGASERVE_SMOLLM2_GGUF"):
        return os.environ["MEGASERVE_SMOLLM2_GGUF"]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    models = os.environ.get("MEGASERVE_MODELS_DIR") or os.path.join(cache, "megaserve", "models")
    return os.path.join(models, SMOLLM2_FILE)


class Server:
    """megaserve as a subprocess with gRPC, metrics and the HTTP API on free loopback ports."""

    def __init__(self, name, model, extra_flags=()):
        self.log_path = os.path.join(WORK_DIR, f"{name}.log")
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [MEGASERVE, f"--model={model}", "--grpc_address=127.0.0.1:0",
             "--metrics_address=127.0.0.1:0", "--http_address=127.0.0.1:0", "--backend=cpu",
             *extra_flags],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while True:
            with open(self.log_path) as log:
                text = log.read()
            grpc = re.search(r"serving gRPC on \S+ \(port (\d+)\).*metrics on \S+ \(port (\d+)\)",
                             text)
            http = re.search(r"OpenAI-compatible HTTP API on \S+ \(port (\d+)\)", text)
            if grpc and http:
                break
            if self.process.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"megaserve did not start:\n{text}")
            time.sleep(0.05)
        self.grpc_port, self.metrics_port = int(grpc.group(1)), int(grpc.group(2))
        self.http_port = int(http.group(1))
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{self.http_port}/v1",
                                    api_key="unused", max_retries=0, timeout=120)

    def stop(self):
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def grpc(self, *args):
        """megaserve-cli --json against this server's gRPC port: the streamed messages."""
        out = subprocess.run([MEGASERVE_CLI, f"--server=127.0.0.1:{self.grpc_port}", "--json",
                              *args], check=True, capture_output=True, text=True, timeout=120)
        messages = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
        return {"text": "".join(m.get("text", "") for m in messages),
                "token_ids": [i for m in messages for i in m.get("token_ids", [])],
                "logprobs": [lp for m in messages for lp in m.get("logprobs", [])],
                "last": messages[-1]}

    def raw(self, method, path, body=None):
        """One HTTP request as it is (no client library): (status, parsed JSON body)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=60)
        connection.request(method, path, body=body,
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        return response.status, json.loads(data)

    def metrics(self):
        connection = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        connection.request("GET", "/metrics")
        text = connection.getresponse().read().decode()
        connection.close()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values

    def wait_idle(self, timeout=10):
        """Waits until no request runs or waits and no KV block is in use; the last metrics."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            idle = (m["megaserve_requests_running"] == 0 and m["megaserve_requests_waiting"] == 0
                    and m["megaserve_kv_blocks_used"] == 0)
            if idle or time.time() > deadline:
                return m
            time.sleep(0.02)


FINISH = {"FINISH_REASON_STOP": "stop", "FINISH_REASON_LENGTH": "length"}


class StoriesTest(unittest.TestCase):
    """stories260K-hf: no chat template, a sentencepiece tokenizer with BOS."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("stories", STORIES, ["--cpu_threads=1", "--num_kv_blocks=512"])
        cls.client = cls.server.client
        cls.model = "stories260K-hf"

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    def test_models(self):
        self.assertEqual([m.id for m in self.client.models.list().data], [self.model])
        self.assertEqual(self.client.models.retrieve(self.model).id, self.model)
        with self.assertRaises(openai.NotFoundError):
            self.client.models.retrieve("gpt-4")

    def test_completion_equals_grpc_generate(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=60", "Once upon a time")
        self.assertEqual(len(reference["token_ids"]), 60)
        c = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                           max_tokens=60, temperature=0)
        self.assertEqual(c.object, "text_completion")
        self.assertEqual(c.model, self.model)
        self.assertTrue(c.id.startswith("cmpl-"))
        self.assertEqual(len(c.choices), 1)
        self.assertEqual(c.choices[0].text, reference["text"])
        self.assertEqual(c.choices[0].finish_reason, "length")
        self.assertEqual(c.usage.prompt_tokens, 5)  # BOS 403 407 261 378
        self.assertEqual(c.usage.completion_tokens, 60)
        self.assertEqual(c.usage.total_tokens, 65)
        # The oracle (llama2.c's greedy output) as well: text after the prompt, leading space.
        with open(os.path.join(ASSETS_DIR, "models/stories260K/oracle/onceupon_t0_n64.txt")) as f:
            oracle = f.read()
        self.assertEqual("Once upon a time" + c.choices[0].text + "\n", oracle)

    def test_streamed_completion_equals_grpc_generate(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=40", "Zoo")
        chunks = list(self.client.completions.create(
            model=self.model, prompt="Zoo", max_tokens=40, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        text_chunks = [c for c in chunks if c.choices]
        self.assertEqual("".join(c.choices[0].text for c in text_chunks), reference["text"])
        self.assertEqual(text_chunks[-1].choices[0].finish_reason, "length")
        self.assertTrue(all(c.choices[0].finish_reason is None for c in text_chunks[:-1]))
        self.assertTrue(all(c.id == chunks[0].id for c in chunks))
        usage = chunks[-1]
        self.assertEqual(usage.choices, [])
        self.assertEqual(usage.usage.prompt_tokens, reference["last"]["usage"]["prompt_tokens"])
        self.assertEqual(usage.usage.completion_tokens, len(reference["token_ids"]))
        self.assertEqual(usage.usage.total_tokens,
                         usage.usage.prompt_tokens + usage.usage.completion_tokens)
        # Without include_usage no chunk carries usage.
        plain = list(self.client.completions.create(model=self.model, prompt="Zoo",
                                                    max_tokens=40, temperature=0, stream=True))
        self.assertTrue(all(c.usage is None and c.choices for c in plain))
        self.assertEqual("".join(c.choices[0].text for c in plain), reference["text"])

    def test_completion_logprobs_equal_grpc_logprobs(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=30", "--logprobs=3",
                                     "Once upon a time")
        expected = reference["logprobs"]
        self.assertEqual(len(expected), 30)
        c = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                           max_tokens=30, temperature=0, logprobs=3)
        lp = c.choices[0].logprobs
        self.assertEqual("".join(lp.tokens), c.choices[0].text)
        self.assertEqual(lp.text_offset,
                         [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))])
        self.assertEqual(len(lp.token_logprobs), 30)
        for i, (got, want) in enumerate(zip(lp.token_logprobs, expected)):
            self.assertAlmostEqual(got, want["logprob"], places=5, msg=i)
            alternatives = [t["logprob"] for t in want["top"]]
            self.assertEqual(len(alternatives), 3)
            # Greedy: the chosen token is the best alternative.
            self.assertAlmostEqual(got, max(alternatives), places=5, msg=i)
            top = lp.top_logprobs[i]
            self.assertEqual(top[lp.tokens[i]], got)
            self.assertEqual(len(top), 3, top)  # the chosen token is among the 3
            for a, b in zip(sorted(top.values(), reverse=True), alternatives):
                self.assertAlmostEqual(a, b, places=5, msg=i)
        # Streamed: the same logprobs, spread over the chunks.
        chunks = list(self.client.completions.create(
            model=self.model, prompt="Once upon a time", max_tokens=30, temperature=0,
            logprobs=3, stream=True))
        streamed = [x for c in chunks if c.choices[0].logprobs
                    for x in c.choices[0].logprobs.token_logprobs]
        self.assertEqual(streamed, lp.token_logprobs)
        offsets = [x for c in chunks if c.choices[0].logprobs
                   for x in c.choices[0].logprobs.text_offset]
        self.assertEqual(offsets, lp.text_offset)

    def test_token_id_prompt_equals_the_text_prompt(self):
        by_text = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                                 max_tokens=30, temperature=0)
        by_ids = self.client.completions.create(model=self.model, prompt=[1, 403, 407, 261, 378],
                                                max_tokens=30, temperature=0)
        self.assertEqual(by_ids.choices[0].text, by_text.choices[0].text)
        self.assertEqual(by_ids.usage.prompt_tokens, 5)

    def test_stop_string_and_sampling_fields(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=60", "--stop=Lily",
                                     "Once upon a time")
        c = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                           max_tokens=60, temperature=0, stop=["Lily"])
        self.assertEqual(c.choices[0].text, reference["text"])
        self.assertFalse(c.choices[0].text.endswith("Lily"))
        self.assertEqual(c.choices[0].finish_reason, "stop")
        self.assertEqual(c.usage.completion_tokens, len(reference["token_ids"]))
        # Sampled with a seed: the same seed gives the same text (penalties accepted).
        a, b = (self.client.completions.create(
            model=self.model, prompt="Zoo", max_tokens=20, temperature=0.8, top_p=0.9, seed=42,
            presence_penalty=0.5, frequency_penalty=0.3).choices[0].text for _ in range(2))
        self.assertEqual(a, b)

    def test_echo(self):
        plain = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                               max_tokens=10, temperature=0)
        echoed = self.client.completions.create(model=self.model, prompt="Once upon a time",
                                                max_tokens=10, temperature=0, echo=True)
        self.assertEqual(echoed.choices[0].text, "Once upon a time" + plain.choices[0].text)

    def test_bad_requests_raise_bad_request_error(self):
        cases = [
            (dict(prompt="Zoo", n=2), "n"),
            (dict(prompt="Zoo", max_tokens=5000), "max_tokens"),
            (dict(prompt="Zoo", temperature=-1), "temperature"),
            (dict(prompt="Zoo", logprobs=6), "logprobs"),
            (dict(prompt="Zoo", logprobs=2, echo=True), "logprobs"),
            (dict(prompt=["a", "b"]), "prompt"),
            (dict(prompt=[1, 600]), "prompt"),
            (dict(prompt=""), "prompt"),
        ]
        for kwargs, param in cases:
            with self.subTest(**{k: str(v) for k, v in kwargs.items()}):
                with self.assertRaises(openai.BadRequestError) as raised:
                    self.client.completions.create(model=self.model, **kwargs)
                self.assertEqual(raised.exception.status_code, 400)
                self.assertEqual(raised.exception.body["param"], param)
                self.assertEqual(raised.exception.body["type"], "invalid_request_error")
                self.assertTrue(raised.exception.body["message"])

    def test_unknown_model_raises_not_found(self):
        with self.assertRaises(openai.NotFoundError) as raised:
            self.client.completions.create(model="gpt-4", prompt="Zoo", max_tokens=4)
        self.assertEqual(raised.exception.body["code"], "model_not_found")

    def test_chat_without_a_template_is_a_clear_400(self):
        with self.assertRaises(openai.BadRequestError) as raised:
            self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": "Hi"}])
        self.assertIn("no chat template", raised.exception.body["message"])

    def test_bad_json_and_unknown_routes(self):
        for body in [b"{", b"[1]", b"{\"prompt\": \"\xff\"}", b""]:
            status, error = self.server.raw("POST", "/v1/completions", body)
            self.assertEqual(status, 400, body)
            self.assertEqual(set(error["error"]), {"message", "type", "param", "code"})
        status, error = self.server.raw("GET", "/v1/nothing")
        self.assertEqual(status, 404)
        self.assertIn("no route", error["error"]["message"])

    def test_bad_json_does_not_disturb_a_running_stream(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=200", "--ignore_eos",
                                     "Once upon a time")
        stream = self.client.completions.create(
            model=self.model, prompt="Once upon a time", max_tokens=200, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        text = ""
        for i, chunk in enumerate(stream):
            text += chunk.choices[0].text
            if i == 0:
                self.assertEqual(self.server.raw("POST", "/v1/completions", b"{oops")[0], 400)
        self.assertEqual(text, reference["text"])

    def test_usage_counts_are_in_the_metrics(self):
        before = self.server.metrics()
        self.client.completions.create(model=self.model, prompt="Zoo", max_tokens=7,
                                       temperature=0, extra_body={"ignore_eos": True})
        after = self.server.wait_idle()
        self.assertEqual(after["megaserve_generation_tokens_total"]
                         - before["megaserve_generation_tokens_total"], 7)
        self.assertEqual(after['megaserve_requests_total{status="OK"}']
                         - before['megaserve_requests_total{status="OK"}'], 1)


@unittest.skipUnless(os.path.exists(smollm2_path()), f"{SMOLLM2_FILE} not present")
class SmolLM2Test(unittest.TestCase):
    """SmolLM2-135M-Instruct: a GGUF with its chat template; slow enough on the CPU
    (tens of ms a token) to disconnect in the middle of a request."""

    @classmethod
    def setUpClass(cls):
        cls.server = Server("smollm2", smollm2_path(),
                            ["--cpu_threads=2", "--num_kv_blocks=256", "--max_model_len=2048"])
        cls.client = cls.server.client
        cls.model = "SmolLM2-135M-Instruct.Q4_1"

    @classmethod
    def tearDownClass(cls):
        cls.server.stop()

    QUESTION = "What is the capital of France?"

    def test_chat_equals_grpc_chat(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=24", "--chat",
                                     self.QUESTION)
        c = self.client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": self.QUESTION}],
            max_tokens=24, temperature=0)
        self.assertEqual(c.object, "chat.completion")
        self.assertTrue(c.id.startswith("chatcmpl-"))
        self.assertEqual(c.choices[0].message.role, "assistant")
        self.assertEqual(c.choices[0].message.content, reference["text"])
        self.assertIn("Paris", c.choices[0].message.content)
        self.assertEqual(c.choices[0].finish_reason, FINISH[reference["last"]["finish_reason"]])
        self.assertEqual(c.usage.prompt_tokens, reference["last"]["usage"]["prompt_tokens"])
        self.assertEqual(c.usage.completion_tokens, len(reference["token_ids"]))

    def test_chat_logprobs_equal_grpc_logprobs(self):
        reference = self.server.grpc("--temperature=0", "--max_tokens=16", "--logprobs=5",
                                     "--chat", self.QUESTION)
        expected = reference["logprobs"]
        messages = [{"role": "user", "content": self.QUESTION}]
        c = self.client.chat.completions.create(model=self.model, messages=messages,
                                                max_tokens=16, temperature=0, logprobs=True,
                                                top_logprobs=5)
        content = c.choices[0].logprobs.content
        self.assertEqual(len(content), len(expected))
        self.assertEqual(len(content), c.usage.completion_tokens)
        # The tokens' bytes spell the text (then the token that stopped it, if one did).
        spelled = b"".join(bytes(t.bytes) for t in content)
        self.assertTrue(spelled.startswith(c.choices[0].message.content.encode()), spelled)
        for i, (got, want) in enumerate(zip(content, expected)):
            self.assertAlmostEqual(got.logprob, want["logprob"], places=5, msg=i)
            if all(b < 0x80 for b in got.bytes):
                self.assertEqual(got.token, bytes(got.bytes).decode())
            self.assertEqual(len(got.top_logprobs), 5)
            for a, b in zip(got.top_logprobs, want["top"]):
                self.assertAlmostEqual(a.logprob, b["logprob"], places=5, msg=i)
            self.assertAlmostEqual(got.logprob, got.top_logprobs[0].logprob, places=5, msg=i)
            self.assertEqual(got.token, got.top_logprobs[0].token)
        chunks = list(self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=16, temperature=0, logprobs=True,
            top_logprobs=5, stream=True))
        streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs
                    for t in ch.choices[0].logprobs.content]
        self.assertEqual([(t.token, t.logprob) for t in streamed],
                         [(t.token, t.logprob) for t in content])
        with self.assertRaises(openai.BadRequestError) as raised:
            self.client.chat.completions.create(model=self.model, messages=messages,
                                                max_tokens=4, top_logprobs=2)
        self.assertEqual(raised.exception.body["param"], "top_logprobs")

    def test_streamed_chat_with_a_system_message(self):
        messages = [{"role": "system", "content": "You answer in one word."},
                    {"role": "user", "content": self.QUESTION}]
        whole = self.client.chat.completions.create(model=self.model, messages=messages,
                                                    max_tokens=12, temperature=0)
        chunks = list(self.client.chat.completions.create(
            model=self.model, messages=messages, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        self.assertEqual(chunks[0].object, "chat.completion.chunk")
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, whole.choices[0].message.content)
        self.assertEqual(chunks[-2].choices[0].finish_reason, whole.choices[0].finish_reason)
        self.assertEqual(chunks[-1].usage.completion_tokens, whole.usage.completion_tokens)
        self.assertEqual(chunks[-1].usage.prompt_tokens, whole.usage.prompt_tokens)

    def assert_cancelled(self, before, max_tokens):
        after = self.server.wait_idle()
        self.assertEqual(after["megaserve_requests_running"], 0)
        self.assertEqual(after["megaserve_requests_waiting"], 0)
        self.assertEqual(after["megaserve_kv_blocks_used"], 0)
        cancelled = 'megaserve_requests_total{status="CANCELLED"}'
        self.assertEqual(after.get(cancelled, 0) - before.get(cancelled, 0), 1)
        generated = (after["megaserve_generation_tokens_total"]
                     - before["megaserve_generation_tokens_total"])
        self.assertLess(generated, max_tokens)

    def test_closing_a_stream_cancels_its_request(self):
        before = self.server.metrics()
        stream = self.client.completions.create(
            model=self.model, prompt="Once upon a time", max_tokens=400, temperature=0,
            stream=True, extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 2:
                break
        self.assertEqual(self.server.metrics()["megaserve_requests_running"], 1)
        stream.close()
        self.assert_cancelled(before, 400)

    def test_giving_up_on_a_whole_response_cancels_its_request(self):
        before = self.server.metrics()
        with self.assertRaises(openai.APITimeoutError):
            self.client.with_options(timeout=1.0).completions.create(
                model=self.model, prompt="Once upon a time", max_tokens=400, temperature=0,
                extra_body={"ignore_eos": True})
        self.assert_cancelled(before, 400)


if __name__ == "__main__":
    os.makedirs(WORK_DIR, exist_ok=True)
    if not os.path.exists(os.path.join(STORIES, "config.json")):
        skip(f"test assets {STORIES} missing")
    if not os.path.exists(smollm2_path()) and os.environ.get("CI") == "true":
        sys.exit(f"FAIL: {smollm2_path()} missing (CI=true: scripts/install-deps fetches it)")
    result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    print(f"{result.testsRun - len(result.failures) - len(result.errors) - len(result.skipped)} "
          f"passed, {len(result.failures) + len(result.errors)} failed, "
          f"{len(result.skipped)} skipped")
    sys.exit(0 if result.wasSuccessful() else 1)
