// The Jinja subset of chat templates piece by piece (expected strings are what jinja2 3.1
// renders with trim_blocks and lstrip_blocks, as transformers sets them), the refusals of
// constructs outside it (at parse time, naming the construct, the template and the line),
// render errors, and the real templates of tests/data/chat_templates parsing.
#include "engine/model/chat_template.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "engine/model/gguf.h"
#include "engine/model/jinja_ast.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tests/support/gguf_writer.h"

namespace megaserve::engine {
namespace {

using ::testing::HasSubstr;

// Renders `source` with a few variables: s = "abcdef", items = ["x", "y", "z"], n = 7,
// d = {"b": 2, "a": 1}, nothing = None, messages = [{"role": "user", "content": " hi "}].
std::string render(const std::string& source) {
  auto program = jinja::parse_template(source, "test");
  EXPECT_TRUE(program.ok()) << program.status();
  if (!program.ok()) return "<parse error>";
  using jinja::Value;
  jinja::Dict vars;
  vars.set("s", Value::string("abcdef"));
  vars.set("items", Value::list({Value::string("x"), Value::string("y"), Value::string("z")}));
  vars.set("n", Value::integer(7));
  jinja::Dict d;
  d.set("b", Value::integer(2));
  d.set("a", Value::integer(1));
  vars.set("d", Value::dict(d));
  vars.set("nothing", Value::none());
  jinja::Dict message;
  message.set("role", Value::string("user"));
  message.set("content", Value::string(" hi "));
  vars.set("messages", Value::list({Value::dict(message)}));
  auto out = jinja::render_template(**program, vars);
  EXPECT_TRUE(out.ok()) << out.status();
  return out.ok() ? *out : "<render error: " + std::string(out.status().message()) + ">";
}

std::string parse_error(const std::string& source) {
  auto program = jinja::parse_template(source, "bad.jinja");
  EXPECT_FALSE(program.ok()) << source;
  return program.ok() ? "" : std::string(program.status().message());
}

std::string render_error(const std::string& source) {
  auto program = jinja::parse_template(source, "bad.jinja");
  EXPECT_TRUE(program.ok()) << program.status();
  if (!program.ok()) return "";
  auto out = jinja::render_template(**program, {});
  EXPECT_FALSE(out.ok()) << source << " rendered " << *out;
  return out.ok() ? "" : std::string(out.status().message());
}

TEST(JinjaTest, Expressions) {
  EXPECT_EQ(render("{{ s[1:] }}|{{ s[:-1] }}|{{ s[::-1] }}|{{ s[4:2] }}|{{ items[-1] }}"),
            "bcdef|abcde|fedcba||z");
  EXPECT_EQ(render("{{ 7 // 2 }} {{ -7 // 2 }} {{ -7 % 3 }} {{ 7 / 2 }} {{ 6 / 2 }} {{ 2 ** 10 }}"),
            "3 -4 2 3.5 3.0 1024");
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none }} {{ 'ab' * 2 }} {{ [1] + [2] }} {{ 1 + 2 * 3 - -1 }}"),
            "a1None abab [1, 2] 8");
  EXPECT_EQ(render("{{ [1, 'a', none, true, 1.5, {'k': 'v'}] }} {{ (1, 2) }} {{ 0.1 + 0.2 }}"),
            "[1, 'a', None, True, 1.5, {'k': 'v'}] (1, 2) 0.30000000000000004");
  EXPECT_EQ(render("{{ 1 < 2 < 3 }} {{ 'b' > 'a' }} {{ 1 == 1.0 }} {{ 'y' in items }} "
                   "{{ 'cd' in s }} {{ 'a' in d }} {{ 'q' not in s }}"),
            "True True True True True True True");
  EXPECT_EQ(render("{{ nope or 'fb' }} {{ s and 'last' }} {{ '' or 0 }} {{ not nope }}"),
            "fb last 0 True");
  EXPECT_EQ(render("{{ 'yes' if n > 5 else 'no' }}|{{ 'x' if false }}|"), "yes||");
  EXPECT_EQ(render("{{ d.a }}{{ d['b'] }}{{ d.zz }}{{ messages[0].role }}{{ items[9] }}"),
            "12user");
  EXPECT_EQ(render("{{ 'a' 'b' }} {{ \"q\\\"\\n\" }}"), "ab q\"\n");
}

TEST(JinjaTest, FiltersTestsAndMethods) {
  EXPECT_EQ(render("{{ messages[0].content | trim }}|{{ items | length }}|{{ s | upper }}|"
                   "{{ items | join(', ') }}|{{ nope | default('dv') }}|{{ items | first }}"
                   "{{ items | last }}|{{ s | replace('b', 'B') }}|{{ n | string }}"),
            "hi|3|ABCDEF|x, y, z|dv|xz|aBcdef|7");
  EXPECT_EQ(render("{{ d | tojson }} {{ d | tojson(indent=2) }} {{ 'é\"\\n' | tojson }}"),
            "{\"b\": 2, \"a\": 1} {\n  \"b\": 2,\n  \"a\": 1\n} \"é\\\"\\n\"");
  EXPECT_EQ(render("{% for k, v in d | items %}{{ k }}={{ v }};{% endfor %}"
                   "{% for k, v in d.items() %}{{ k }}{{ v }}{% endfor %}"),
            "b=2;a=1;b2a1");
  EXPECT_EQ(render("{{ items | reject('equalto', 'y') | join }} {{ items | select('in', 'xz') "
                   "| list }}"),
            "xz ['x', 'z']");
  EXPECT_EQ(render("{{ nope is defined }} {{ s is string }} {{ d is mapping }} {{ n is number }} "
                   "{{ nothing is none }} {{ false is false }} {{ items is iterable }} "
                   "{{ n is not string }} {{ 'x' is sequence }} {{ true is boolean }}"),
            "False True True True True True True True True True");
  EXPECT_EQ(render("{{ s.startswith('ab') }} {{ s.endswith(('x', 'ef')) }} {{ '  a '.strip() }}"
                   "|{{ 'xxaxx'.lstrip('x') }}|{{ '\\n\\na\\n'.rstrip('\\n') }}|"
                   "{{ 'a</t>b</t>c'.split('</t>')[-1] }} {{ ' a  b '.split() }} "
                   "{{ d.get('a') }}{{ d.get('zz', 'no') }} {{ d.keys() | list }}"),
            "True True a|axx|\n\na|c ['a', 'b'] 1no ['b', 'a']");
}

TEST(JinjaTest, Statements) {
  EXPECT_EQ(render("{% for x in items %}{{ loop.index }}{{ loop.index0 }}{{ loop.first }}"
                   "{{ loop.last }}{{ loop.length }}{{ loop.previtem }};{% endfor %}"),
            "10TrueFalse3;21FalseFalse3x;32FalseTrue3y;");
  EXPECT_EQ(render("{% for x in items if x != 'y' %}{{ x }}{{ loop.length }}{% else %}E"
                   "{% endfor %}{% for x in [] %}{% else %}empty{% endfor %}"),
            "x2z2empty");
  EXPECT_EQ(render("{% for x in items %}{% if x == 'y' %}{% continue %}{% endif %}{{ x }}"
                   "{% if x == 'z' %}{% break %}{% endif %}{% endfor %}"),
            "xz");
  EXPECT_EQ(render("{% if n < 5 %}a{% elif n < 10 %}b{% else %}c{% endif %}"), "b");
  // A set inside a loop stays in the iteration; a namespace carries state out.
  EXPECT_EQ(render("{% set x = 0 %}{% set ns = namespace(t=0) %}{% for i in [1, 2] %}"
                   "{{ x }}{% set x = x + i %}{{ x }}{% set ns.t = ns.t + i %}{% endfor %}"
                   "{{ x }}{{ ns.t }}"),
            "010203");
  EXPECT_EQ(
      render("{% set a, b = [1, 2] %}{{ b }}{{ a }}{% set c %}in {{ s }}{% endset %}[{{ c }}]"),
      "21[in abcdef]");
}

TEST(JinjaTest, WhitespaceControl) {
  // trim_blocks eats a block's newline; lstrip_blocks its line's indentation.
  EXPECT_EQ(render("  {% if 1 %}\n  a\n  {% endif %}\nb {{ 'x' }}  {% if 1 %}c{% endif %}"),
            "  a\nb x  c");
  EXPECT_EQ(render("a  \n  {{- 'b' -}}  \n c"), "abc");
  EXPECT_EQ(render("{# comment #}\n  {#- c2 -#}  x{%+ if 1 %}y{% endif +%}\nz\n"), "xy\nz");
  EXPECT_EQ(render("  {%+ if 1 %}a{% endif %}"), "  a");
  EXPECT_EQ(render("x\r\ny\n"), "x\ny");  // newlines normalized, one trailing newline dropped
}

TEST(JinjaTest, RefusesUnsupportedConstructsAtParse) {
  EXPECT_THAT(parse_error("a\n{% macro m() %}x{% endmacro %}"),
              HasSubstr("chat template 'bad.jinja' line 2: unsupported statement 'macro'"));
  EXPECT_THAT(parse_error("{% include 'x' %}"), HasSubstr("unsupported statement 'include'"));
  EXPECT_THAT(parse_error("{% raw %}{% endraw %}"), HasSubstr("unsupported statement 'raw'"));
  EXPECT_THAT(parse_error("{{ x | wordcount }}"), HasSubstr("unsupported filter 'wordcount'"));
  EXPECT_THAT(parse_error("{{ x is callable }}"), HasSubstr("unsupported test 'callable'"));
  EXPECT_THAT(parse_error("{{ s.format(1) }}"), HasSubstr("unsupported method call '.format()'"));
  EXPECT_THAT(parse_error("{{ lipsum() }}"), HasSubstr("unsupported function call 'lipsum()'"));
  EXPECT_THAT(parse_error("{% for x in y %}{{ loop.cycle }}{% endfor %}"),
              HasSubstr("unsupported loop attribute 'loop.cycle'"));
  EXPECT_THAT(parse_error("{% for x in y recursive %}{% endfor %}"),
              HasSubstr("unsupported recursive for loop"));
  EXPECT_THAT(parse_error("{% break %}"), HasSubstr("'break' outside a for loop"));
  EXPECT_THAT(parse_error("{% if x %}"), HasSubstr("missing '{% endif %}'"));
  EXPECT_THAT(parse_error("{% endfor %}"), HasSubstr("unexpected statement 'endfor'"));
  EXPECT_THAT(parse_error("{{ x "), HasSubstr("unclosed '{{'"));
  EXPECT_THAT(parse_error("{# x "), HasSubstr("unclosed comment"));
  EXPECT_THAT(parse_error("{{ 'abc }}"), HasSubstr("unterminated string literal"));
  EXPECT_THAT(parse_error("{{ f(*args) }}"), HasSubstr("unsupported function call 'f()'"));
  EXPECT_THAT(parse_error("{{ x ? y }}"), HasSubstr("unexpected character '?'"));
  EXPECT_THAT(parse_error("{% set x | trim %}a{% endset %}"),
              HasSubstr("unsupported filter on a block set"));
}

TEST(JinjaTest, RenderErrorsNameTheTemplateAndLine) {
  EXPECT_EQ(render_error("a\n{{ raise_exception('Roles must alternate') }}"),
            "chat template 'bad.jinja' line 2: raise_exception: Roles must alternate");
  EXPECT_THAT(render_error("{{ x.y }}"), HasSubstr("'x' is undefined"));
  EXPECT_THAT(render_error("{{ 'a' + 1 }}"), HasSubstr("unsupported operand type(s) for +"));
  EXPECT_THAT(render_error("{{ x | tojson }}"), HasSubstr("not JSON serializable"));
  EXPECT_THAT(render_error("{{ 1 // 0 }}"), HasSubstr("division or modulo by zero"));
  EXPECT_THAT(render_error("{% set y = 1 %}{% set y.a = 2 %}"),
              HasSubstr("cannot assign attribute on non-namespace object"));
  EXPECT_THAT(render_error("{{ 'é' | upper }}"), HasSubstr("non-ASCII text is not supported"));
  EXPECT_THAT(render_error("{{ '%s' % 1 }}"), HasSubstr("string formatting"));
  EXPECT_THAT(render_error("{{ 1.real }}"), HasSubstr("unsupported attribute 'real' of a int"));
  EXPECT_THAT(render_error("{{ 'a'.zz }}"), HasSubstr("unsupported attribute 'zz' of a str"));
}

std::string read_template(const std::string& name) {
  std::ifstream file(std::string(MEGASERVE_SOURCE_DIR) + "/tests/data/chat_templates/" + name);
  std::stringstream text;
  text << file.rdbuf();
  return text.str();
}

TEST(ChatTemplateTest, RealTemplatesRender) {
  ChatTemplateInputs inputs;
  inputs.messages = {{"user", "Hi"}, {"assistant", "Hello!"}, {"user", "2+2?"}};
  inputs.add_generation_prompt = true;
  auto smollm2 = ChatTemplate::parse(read_template("smollm2.jinja"), "smollm2.jinja");
  ASSERT_TRUE(smollm2.ok()) << smollm2.status();
  EXPECT_EQ(*smollm2->render(inputs),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!"
            "<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n");
  inputs.default_system_prompt = "Be brief.";
  EXPECT_THAT(*smollm2->render(inputs), HasSubstr("<|im_start|>system\nBe brief.<|im_end|>"));

  auto llama = ChatTemplate::parse(read_template("llama3.1.jinja"), "llama3.1.jinja");
  ASSERT_TRUE(llama.ok()) << llama.status();
  inputs.default_system_prompt.reset();
  inputs.bos_token = "<|begin_of_text|>";
  inputs.messages = {{"user", " Hi "}};
  EXPECT_EQ(*llama->render(inputs),
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
            "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|><|start_header_id|>user"
            "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");

  auto qwen3 = ChatTemplate::parse(read_template("qwen3.jinja"), "qwen3.jinja");
  ASSERT_TRUE(qwen3.ok()) << qwen3.status();
  inputs.bos_token.reset();
  inputs.extra = {{"enable_thinking", false}};
  EXPECT_EQ(*qwen3->render(inputs),
            "<|im_start|>user\n Hi <|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
  for (const char* name : {"llama3.2.jinja", "qwen2.5.jinja"}) {
    auto parsed = ChatTemplate::parse(read_template(name), name);
    EXPECT_TRUE(parsed.ok()) << parsed.status();
  }
  // An empty conversation: Qwen2.5's template reads messages[0]['role'] and fails, in jinja2 too.
  auto qwen25 = ChatTemplate::parse(read_template("qwen2.5.jinja"), "qwen2.5.jinja");
  inputs.messages.clear();
  auto empty = qwen25->render(inputs);
  ASSERT_FALSE(empty.ok());
  EXPECT_THAT(empty.status().message(), HasSubstr("'list object' has no element 0"));
}

std::filesystem::path write_file(const std::string& name, const std::string& bytes) {
  const auto path = std::filesystem::path(::testing::TempDir()) / name;
  std::ofstream(path, std::ios::binary) << bytes;
  return path;
}

TEST(ChatTemplateTest, FromTokenizerConfig) {
  ChatTemplateInputs inputs;
  inputs.messages = {{"user", "Hi"}};
  auto plain = ChatTemplate::from_tokenizer_config(write_file(
      "plain.json", R"({"bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in )"
                    R"(messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"})"));
  ASSERT_TRUE(plain.ok()) << plain.status();
  inputs.bos_token = "<s>";
  EXPECT_EQ(*plain->render(inputs), "<s>[user]Hi");
  auto listed = ChatTemplate::from_tokenizer_config(
      write_file("list.json", R"({"chat_template": [{"name": "tool_use", "template": "T"},)"
                              R"( {"name": "default", "template": "D{{ messages | length }}"}]})"));
  ASSERT_TRUE(listed.ok()) << listed.status();
  EXPECT_EQ(*listed->render(inputs), "D1");

  auto none = ChatTemplate::from_tokenizer_config(write_file("none.json", R"({"x": 1})"));
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(none.status().message(), HasSubstr("none.json has no chat_template"));
  auto bad = ChatTemplate::from_tokenizer_config(write_file("bad.json", "{"));
  EXPECT_THAT(bad.status().message(), HasSubstr("bad.json is not a JSON object"));
  auto refused = ChatTemplate::from_tokenizer_config(
      write_file("macro.json", R"({"chat_template": "a\n{% macro m() %}{% endmacro %}"})"));
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("macro.json' line 2: unsupported statement "
                                                    "'macro'"));
}

TEST(ChatTemplateTest, FromGguf) {
  using namespace megaserve::testing;
  auto with = GgufFile::open(write_file(
      "with.gguf",
      gguf_bytes({kv_string("tokenizer.chat_template", read_template("smollm2.jinja"))}, {})));
  ASSERT_TRUE(with.ok()) << with.status();
  auto parsed = ChatTemplate::from_gguf(**with);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  ChatTemplateInputs inputs;
  inputs.messages = {{"system", "S"}, {"user", "U"}};
  EXPECT_EQ(*parsed->render(inputs),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");

  auto without = GgufFile::open(write_file("without.gguf", gguf_bytes({}, {})));
  ASSERT_TRUE(without.ok()) << without.status();
  EXPECT_EQ(ChatTemplate::from_gguf(**without).status().code(), absl::StatusCode::kNotFound);
  auto refused = GgufFile::open(
      write_file("refused.gguf",
                 gguf_bytes({kv_string("tokenizer.chat_template", "{{ x | wordcount }}")}, {})));
  ASSERT_TRUE(refused.ok()) << refused.status();
  EXPECT_THAT(ChatTemplate::from_gguf(**refused).status().message(),
              HasSubstr("refused.gguf:tokenizer.chat_template' line 1: unsupported filter "
                        "'wordcount'"));
}

}  // namespace
}  // namespace megaserve::engine
