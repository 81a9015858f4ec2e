// Lexer and parser of megaserve's Jinja subset. The lexer follows jinja2's (3.x) with
// trim_blocks=True and lstrip_blocks=True, as transformers configures it: newlines normalized
// to \n and one trailing newline dropped; `{%-`/`-%}` strip whitespace; a block or comment
// tag alone on its line loses its indentation (unless `{%+`) and its newline (unless `+%}`).
// The parser follows jinja2's precedence (parse_condexpr ... parse_unary, filters and tests
// binding tighter than arithmetic) and refuses, by name, every construct the evaluator does
// not implement.
#include <algorithm>
#include <set>
#include <string>

#include "absl/strings/str_cat.h"
#include "engine/model/jinja_ast.h"

namespace megaserve::engine::jinja {
namespace {

struct ParseError {
  int line;
  std::string message;
};

struct Token {
  enum class Type { kName, kString, kInt, kFloat, kOp };
  Type type;
  std::string text;  // the name, operator, or the string's decoded value
  Value value;       // numbers
  int line = 0;
};

struct Piece {
  enum class Kind { kText, kVariable, kBlock };
  Kind kind;
  std::string text;
  std::vector<Token> tokens;
  int line = 0;
};

const std::set<std::string, std::less<>> kFilters = {
    "abs",    "capitalize", "count",      "d",       "default", "first",  "float",
    "int",    "items",      "join",       "last",    "length",  "list",   "lower",
    "map",    "reject",     "rejectattr", "replace", "safe",    "select", "selectattr",
    "string", "title",      "tojson",     "trim",    "upper"};
const std::set<std::string, std::less<>> kTests = {
    "defined", "undefined", "none",  "string",      "mapping", "iterable", "sequence",
    "number",  "integer",   "float", "boolean",     "true",    "false",    "eq",
    "equalto", "==",        "ne",    "!=",          "lt",      "<",        "le",
    "<=",      "gt",        ">",     "ge",          ">=",      "lessthan", "greaterthan",
    "in",      "odd",       "even",  "divisibleby", "lower",   "upper",    "sameas"};
const std::set<std::string, std::less<>> kGlobalFunctions = {"raise_exception", "namespace",
                                                             "strftime_now", "range"};
const std::set<std::string, std::less<>> kMethods = {
    "startswith", "endswith", "strip",   "lstrip", "rstrip", "split",
    "upper",      "lower",    "replace", "title",  "find",   "count",
    "capitalize", "items",    "keys",    "values", "get"};
const std::set<std::string, std::less<>> kLoopAttributes = {
    "index",  "index0",   "revindex", "revindex0", "first", "last",
    "length", "previtem", "nextitem", "depth",     "depth0"};
// Statements jinja2 has and this subset refuses (anything else is not Jinja at all).
const std::set<std::string, std::less<>> kUnsupportedStatements = {
    "macro", "call", "filter", "include",    "import", "from",  "extends",
    "block", "raw",  "with",   "autoescape", "do",     "trans", "pluralize"};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

std::string py_lstrip(const std::string& s) {
  const auto cps = utf8_decode(s);
  size_t i = 0;
  while (i < cps.size() && py_isspace(cps[i])) ++i;
  return utf8_encode(std::vector<char32_t>(cps.begin() + i, cps.end()));
}

std::string py_rstrip(const std::string& s) {
  auto cps = utf8_decode(s);
  while (!cps.empty() && py_isspace(cps.back())) cps.pop_back();
  return utf8_encode(cps);
}

// Python's unicode_escape, as jinja2 decodes string literals.
std::string unescape(std::string_view raw, int line) {
  std::string out;
  for (size_t i = 0; i < raw.size(); ++i) {
    if (raw[i] != '\\' || i + 1 == raw.size()) {
      out += raw[i];
      continue;
    }
    const char c = raw[++i];
    auto hex = [&](int digits) -> char32_t {
      if (i + digits >= raw.size()) {
        throw ParseError{line, "truncated \\x, \\u or \\U escape in a string literal"};
      }
      char32_t v = 0;
      for (int k = 1; k <= digits; ++k) {
        const char h = raw[i + k];
        int d = h >= '0' && h <= '9'   ? h - '0'
                : h >= 'a' && h <= 'f' ? h - 'a' + 10
                : h >= 'A' && h <= 'F' ? h - 'A' + 10
                                       : -1;
        if (d < 0) throw ParseError{line, "bad \\x, \\u or \\U escape in a string literal"};
        v = v * 16 + d;
      }
      i += digits;
      return v;
    };
    switch (c) {
      case '\n':
        break;  // a backslash-newline continues the line
      case '\\':
      case '\'':
      case '"':
        out += c;
        break;
      case 'a':
        out += '\a';
        break;
      case 'b':
        out += '\b';
        break;
      case 'f':
        out += '\f';
        break;
      case 'n':
        out += '\n';
        break;
      case 'r':
        out += '\r';
        break;
      case 't':
        out += '\t';
        break;
      case 'v':
        out += '\v';
        break;
      case 'x':
        utf8_append(out, hex(2));
        break;
      case 'u':
        utf8_append(out, hex(4));
        break;
      case 'U':
        utf8_append(out, hex(8));
        break;
      case 'N':
        throw ParseError{line, "unsupported \\N{...} escape in a string literal"};
      default:
        if (c >= '0' && c <= '7') {
          char32_t v = 0;
          int k = 0;
          while (k < 3 && i < raw.size() && raw[i] >= '0' && raw[i] <= '7') {
            v = v * 8 + (raw[i++] - '0');
            ++k;
          }
          --i;
          utf8_append(out, v);
        } else {  // unknown escapes stay as written
          out += '\\';
          out += c;
        }
    }
  }
  return out;
}

class Lexer {
 public:
  explicit Lexer(std::string_view source) {
    // jinja2 splits on \r\n, \r and \n, joins with \n and drops one trailing newline.
    for (size_t i = 0; i < source.size(); ++i) {
      if (source[i] == '\r') {
        src_ += '\n';
        if (i + 1 < source.size() && source[i + 1] == '\n') ++i;
      } else {
        src_ += source[i];
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  std::vector<Piece> run() {
    std::vector<Piece> pieces;
    size_t pos = 0;
    bool strip_next = false;    // the previous tag ended with '-'
    bool line_starting = true;  // the previous tag's match ended with a newline
    while (pos <= src_.size()) {
      size_t tag = std::string::npos;
      for (const char* open : {"{{", "{%", "{#"}) tag = std::min(tag, src_.find(open, pos));
      std::string text = src_.substr(pos, tag == std::string::npos ? std::string::npos : tag - pos);
      const int text_line = line_at(pos);
      if (strip_next) text = py_lstrip(text);
      if (tag == std::string::npos) {
        if (!text.empty()) pieces.push_back({Piece::Kind::kText, text, {}, text_line});
        break;
      }
      const char kind = src_[tag + 1];
      size_t p = tag + 2;
      const char modifier = p < src_.size() ? src_[p] : '\0';
      if (modifier == '-' || modifier == '+') ++p;
      if (modifier == '-') {
        text = py_rstrip(text);
      } else if (kind != '{' && modifier != '+') {  // lstrip_blocks
        const size_t l = text.rfind('\n') == std::string::npos ? 0 : text.rfind('\n') + 1;
        if ((l > 0 || line_starting) && text.find_first_not_of(" \t", l) == std::string::npos) {
          text.erase(l);
        }
      }
      if (!text.empty()) pieces.push_back({Piece::Kind::kText, text, {}, text_line});
      const int tag_line = line_at(tag);
      char end_modifier = '\0';
      if (kind == '#') {
        const size_t end = src_.find("#}", p);
        if (end == std::string::npos) throw ParseError{tag_line, "unclosed comment '{#'"};
        if (end > p && src_[end - 1] == '-') end_modifier = '-';
        if (end > p && src_[end - 1] == '+') end_modifier = '+';
        pos = end + 2;
      } else {
        Piece piece{kind == '{' ? Piece::Kind::kVariable : Piece::Kind::kBlock, "", {}, tag_line};
        pos = lex_tag(p, kind == '{', piece.tokens, end_modifier);
        pieces.push_back(std::move(piece));
      }
      strip_next = end_modifier == '-';
      line_starting = false;
      if (strip_next) {
        const size_t ws_end = pos;
        const std::string rest = py_lstrip(src_.substr(pos));
        pos = src_.size() - rest.size();
        line_starting = pos > ws_end && src_[pos - 1] == '\n';
        strip_next = false;
      } else if (kind != '{' && end_modifier != '+' && pos < src_.size() && src_[pos] == '\n') {
        ++pos;  // trim_blocks
        line_starting = true;
      }
    }
    return pieces;
  }

 private:
  int line_at(size_t pos) {
    while (counted_ < pos && counted_ < src_.size()) {
      if (src_[counted_++] == '\n') ++line_;
    }
    return line_;
  }

  // Tokens of one {{ }} or {% %} tag starting at p; returns the position after its end.
  size_t lex_tag(size_t p, bool variable, std::vector<Token>& tokens, char& end_modifier) {
    int depth = 0;
    const int start_line = line_at(p);
    while (true) {
      while (p < src_.size() && is_space(src_[p])) ++p;
      if (p >= src_.size()) {
        throw ParseError{start_line, variable ? "unclosed '{{'" : "unclosed '{%'"};
      }
      const int line = line_at(p);
      const std::string_view rest = std::string_view(src_).substr(p);
      if (depth == 0) {
        const std::string_view close = variable ? "}}" : "%}";
        if (rest.substr(0, 2) == close) return p + 2;
        if ((rest[0] == '-' || (rest[0] == '+' && !variable)) && rest.substr(1, 2) == close) {
          end_modifier = rest[0];
          return p + 3;
        }
      }
      const char c = rest[0];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t n = 1;
        while (n < rest.size() &&
               (std::isalnum(static_cast<unsigned char>(rest[n])) || rest[n] == '_'))
          ++n;
        tokens.push_back({Token::Type::kName, std::string(rest.substr(0, n)), {}, line});
        p += n;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t n = 0;
        bool is_float = false;
        auto digits = [&] {
          while (n < rest.size() &&
                 (std::isdigit(static_cast<unsigned char>(rest[n])) || rest[n] == '_'))
            ++n;
        };
        digits();
        if (n + 1 < rest.size() && rest[n] == '.' &&
            std::isdigit(static_cast<unsigned char>(rest[n + 1]))) {
          is_float = true;
          ++n;
          digits();
        }
        if (n < rest.size() && (rest[n] == 'e' || rest[n] == 'E')) {
          size_t m = n + 1;
          if (m < rest.size() && (rest[m] == '+' || rest[m] == '-')) ++m;
          if (m < rest.size() && std::isdigit(static_cast<unsigned char>(rest[m]))) {
            is_float = true;
            n = m;
            digits();
          }
        }
        std::string number(rest.substr(0, n));
        number.erase(std::remove(number.begin(), number.end(), '_'), number.end());
        Token token{is_float ? Token::Type::kFloat : Token::Type::kInt, number, {}, line};
        try {
          token.value =
              is_float ? Value::floating(std::stod(number)) : Value::integer(std::stoll(number));
        } catch (...) {
          throw ParseError{line, "number literal out of range: " + number};
        }
        tokens.push_back(std::move(token));
        p += n;
      } else if (c == '\'' || c == '"') {
        size_t n = 1;
        while (n < rest.size() && rest[n] != c) n += rest[n] == '\\' ? 2 : 1;
        if (n >= rest.size()) throw ParseError{line, "unterminated string literal"};
        tokens.push_back({Token::Type::kString, unescape(rest.substr(1, n - 1), line), {}, line});
        p += n + 1;
      } else {
        static const char* const kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                           "/",  "%",  "~",  "<",  ">",  "=",  ".", ",", ":",
                                           "|",  "(",  ")",  "[",  "]",  "{",  "}"};
        const char* found = nullptr;
        for (const char* op : kOps) {
          if (rest.substr(0, std::char_traits<char>::length(op)) == op) {
            found = op;
            break;
          }
        }
        if (found == nullptr) {
          throw ParseError{
              line, absl::StrCat("unexpected character '", std::string(rest.substr(0, 1)), "'")};
        }
        const std::string op = found;
        if (op == "(" || op == "[" || op == "{") ++depth;
        if (op == ")" || op == "]" || op == "}") --depth;
        tokens.push_back({Token::Type::kOp, op, {}, line});
        p += op.size();
      }
    }
  }

  std::string src_;
  size_t counted_ = 0;
  int line_ = 1;
};

class Parser {
 public:
  explicit Parser(std::vector<Piece> pieces) : pieces_(std::move(pieces)) {}

  Body parse_all() {
    std::string end;
    Body body = parse_body({}, &end);
    return body;
  }

 private:
  // --- token cursor within the current tag ---
  bool at_end() const { return tp_ >= toks_->size(); }
  const Token* peek(size_t ahead = 0) const {
    return tp_ + ahead < toks_->size() ? &(*toks_)[tp_ + ahead] : nullptr;
  }
  int line() const { return at_end() ? piece_line_ : (*toks_)[tp_].line; }
  bool is_op(std::string_view op, size_t ahead = 0) const {
    const Token* t = peek(ahead);
    return t && t->type == Token::Type::kOp && t->text == op;
  }
  bool is_name(std::string_view name, size_t ahead = 0) const {
    const Token* t = peek(ahead);
    return t && t->type == Token::Type::kName && t->text == name;
  }
  bool skip_op(std::string_view op) {
    if (!is_op(op)) return false;
    ++tp_;
    return true;
  }
  bool skip_name(std::string_view name) {
    if (!is_name(name)) return false;
    ++tp_;
    return true;
  }
  [[noreturn]] void fail(const std::string& message) const { throw ParseError{line(), message}; }
  std::string describe_next() const {
    if (at_end()) return "the end of the tag";
    return "'" + peek()->text + "'";
  }
  void expect_op(std::string_view op) {
    if (!skip_op(op))
      fail(absl::StrCat("expected '", std::string(op), "', found ", describe_next()));
  }
  std::string expect_name() {
    if (at_end() || peek()->type != Token::Type::kName) {
      fail("expected a name, found " + describe_next());
    }
    return (*toks_)[tp_++].text;
  }
  void expect_tag_end() {
    if (!at_end()) fail("unexpected " + describe_next());
  }

  ExprPtr make(Expr::Kind kind, int at) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = at;
    return e;
  }

  // --- expressions (jinja2's Parser, same precedence) ---
  ExprPtr parse_tuple() {  // a bare tuple is allowed where jinja2 calls parse_tuple()
    const int at = line();
    ExprPtr first = parse_expression();
    if (!is_op(",")) return first;
    auto tuple = make(Expr::Kind::kList, at);
    tuple->tuple = true;
    tuple->children.push_back(std::move(first));
    while (skip_op(",")) {
      if (at_end() || is_op(")")) break;
      tuple->children.push_back(parse_expression());
    }
    return tuple;
  }

  ExprPtr parse_expression() {
    ExprPtr expr = parse_or();
    while (is_name("if")) {
      const int at = line();
      ++tp_;
      auto cond = make(Expr::Kind::kCondExpr, at);
      cond->children.push_back(parse_or());
      cond->children.push_back(std::move(expr));
      cond->children.push_back(skip_name("else") ? parse_expression() : nullptr);
      expr = std::move(cond);
    }
    return expr;
  }

  ExprPtr parse_or() {
    ExprPtr left = parse_and();
    while (is_name("or")) {
      auto node = make(Expr::Kind::kOr, line());
      ++tp_;
      node->children.push_back(std::move(left));
      node->children.push_back(parse_and());
      left = std::move(node);
    }
    return left;
  }

  ExprPtr parse_and() {
    ExprPtr left = parse_not();
    while (is_name("and")) {
      auto node = make(Expr::Kind::kAnd, line());
      ++tp_;
      node->children.push_back(std::move(left));
      node->children.push_back(parse_not());
      left = std::move(node);
    }
    return left;
  }

  ExprPtr parse_not() {
    if (is_name("not")) {
      auto node = make(Expr::Kind::kNot, line());
      ++tp_;
      node->children.push_back(parse_not());
      return node;
    }
    return parse_compare();
  }

  ExprPtr parse_compare() {
    const int at = line();
    ExprPtr first = parse_math1();
    std::unique_ptr<Expr> cmp;
    while (true) {
      std::string op;
      if (const Token* t = peek(); t && t->type == Token::Type::kOp &&
                                   (t->text == "==" || t->text == "!=" || t->text == "<" ||
                                    t->text == "<=" || t->text == ">" || t->text == ">=")) {
        op = t->text;
        ++tp_;
      } else if (is_name("in")) {
        op = "in";
        ++tp_;
      } else if (is_name("not") && is_name("in", 1)) {
        op = "notin";
        tp_ += 2;
      } else {
        break;
      }
      if (!cmp) {
        cmp = make(Expr::Kind::kCompare, at);
        cmp->children.push_back(std::move(first));
      }
      cmp->ops.push_back(op);
      cmp->children.push_back(parse_math1());
    }
    return cmp ? std::move(cmp) : std::move(first);
  }

  ExprPtr binary(std::string op, ExprPtr left, ExprPtr right, int at) {
    auto node = make(Expr::Kind::kBinary, at);
    node->name = std::move(op);
    node->children.push_back(std::move(left));
    node->children.push_back(std::move(right));
    return node;
  }

  ExprPtr parse_math1() {
    ExprPtr left = parse_concat();
    while (is_op("+") || is_op("-")) {
      const int at = line();
      std::string op = (*toks_)[tp_++].text;
      left = binary(op, std::move(left), parse_concat(), at);
    }
    return left;
  }

  ExprPtr parse_concat() {
    ExprPtr left = parse_math2();
    while (is_op("~")) {
      const int at = line();
      ++tp_;
      left = binary("~", std::move(left), parse_math2(), at);
    }
    return left;
  }

  ExprPtr parse_math2() {
    ExprPtr left = parse_pow();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const int at = line();
      std::string op = (*toks_)[tp_++].text;
      left = binary(op, std::move(left), parse_pow(), at);
    }
    return left;
  }

  ExprPtr parse_pow() {
    ExprPtr left = parse_unary(true);
    while (is_op("**")) {
      const int at = line();
      ++tp_;
      left = binary("**", std::move(left), parse_unary(true), at);
    }
    return left;
  }

  ExprPtr parse_unary(bool with_filter) {
    const int at = line();
    ExprPtr node;
    if (skip_op("-")) {
      node = make(Expr::Kind::kNeg, at);
      node->children.push_back(parse_unary(false));
    } else if (skip_op("+")) {
      node = make(Expr::Kind::kPos, at);
      node->children.push_back(parse_unary(false));
    } else {
      node = parse_primary();
    }
    node = parse_postfix(std::move(node));
    if (with_filter) node = parse_filter_expr(std::move(node));
    return node;
  }

  ExprPtr parse_primary() {
    const int at = line();
    if (at_end()) fail("expected an expression, found the end of the tag");
    const Token& t = (*toks_)[tp_];
    if (t.type == Token::Type::kName) {
      ++tp_;
      auto node = make(Expr::Kind::kLiteral, at);
      if (t.text == "true" || t.text == "True") {
        node->value = Value::boolean(true);
      } else if (t.text == "false" || t.text == "False") {
        node->value = Value::boolean(false);
      } else if (t.text == "none" || t.text == "None") {
        node->value = Value::none();
      } else {
        node->kind = Expr::Kind::kName;
        node->name = t.text;
      }
      return node;
    }
    if (t.type == Token::Type::kString) {
      std::string s;
      while (!at_end() && peek()->type == Token::Type::kString) s += (*toks_)[tp_++].text;
      auto node = make(Expr::Kind::kLiteral, at);
      node->value = Value::string(std::move(s));
      return node;
    }
    if (t.type == Token::Type::kInt || t.type == Token::Type::kFloat) {
      ++tp_;
      auto node = make(Expr::Kind::kLiteral, at);
      node->value = t.value;
      return node;
    }
    if (skip_op("(")) {
      if (skip_op(")")) {
        auto empty = make(Expr::Kind::kList, at);
        empty->tuple = true;
        return empty;
      }
      ExprPtr inner = parse_tuple();
      expect_op(")");
      return inner;
    }
    if (skip_op("[")) {
      auto list = make(Expr::Kind::kList, at);
      while (!is_op("]")) {
        if (!list->children.empty()) expect_op(",");
        if (is_op("]")) break;
        list->children.push_back(parse_expression());
      }
      expect_op("]");
      return list;
    }
    if (skip_op("{")) {
      auto dict = make(Expr::Kind::kDict, at);
      while (!is_op("}")) {
        if (!dict->children.empty()) expect_op(",");
        if (is_op("}")) break;
        dict->children.push_back(parse_expression());
        expect_op(":");
        dict->children.push_back(parse_expression());
      }
      expect_op("}");
      return dict;
    }
    fail("unexpected " + describe_next());
  }

  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (is_op("*") || is_op("**")) fail("unsupported *args or **kwargs in a call");
      if (peek() && peek()->type == Token::Type::kName && is_op("=", 1)) {
        std::string key = expect_name();
        ++tp_;
        call.kwargs.emplace_back(std::move(key), parse_expression());
      } else {
        if (!call.kwargs.empty()) fail("a positional argument follows a keyword argument");
        call.children.push_back(parse_expression());
      }
      if (!skip_op(",")) break;
    }
    expect_op(")");
  }

  ExprPtr parse_postfix(ExprPtr node) {
    while (true) {
      const int at = line();
      if (skip_op(".")) {
        if (at_end() || peek()->type != Token::Type::kName) {
          fail("unsupported attribute " + describe_next() + " after '.'");
        }
        auto get = make(Expr::Kind::kGetAttr, at);
        get->name = expect_name();
        if (node->kind == Expr::Kind::kName && node->name == "loop" &&
            !kLoopAttributes.count(get->name)) {
          fail("unsupported loop attribute 'loop." + get->name + "'");
        }
        get->children.push_back(std::move(node));
        node = std::move(get);
      } else if (skip_op("[")) {
        ExprPtr parts[3];
        bool slice = false;
        for (int i = 0; i < 3; ++i) {
          if (!is_op(":") && !is_op("]")) parts[i] = parse_expression();
          if (i < 2 && skip_op(":")) {
            slice = true;
          } else {
            break;
          }
        }
        expect_op("]");
        auto get = make(slice ? Expr::Kind::kSlice : Expr::Kind::kGetItem, at);
        get->children.push_back(std::move(node));
        if (!slice && !parts[0]) fail("empty subscript '[]'");
        get->children.push_back(std::move(parts[0]));
        if (slice) {
          get->children.push_back(std::move(parts[1]));
          get->children.push_back(std::move(parts[2]));
        }
        node = std::move(get);
      } else if (is_op("(")) {
        node = parse_call(std::move(node), at);
      } else {
        return node;
      }
    }
  }

  ExprPtr parse_call(ExprPtr callee, int at) {
    if (callee->kind == Expr::Kind::kName) {
      if (!kGlobalFunctions.count(callee->name)) {
        fail("unsupported function call '" + callee->name + "()'");
      }
    } else if (callee->kind == Expr::Kind::kGetAttr) {
      if (!kMethods.count(callee->name)) fail("unsupported method call '." + callee->name + "()'");
    } else {
      fail("unsupported call of an expression");
    }
    auto call = make(Expr::Kind::kCall, at);
    call->children.push_back(std::move(callee));
    parse_call_args(*call);
    return call;
  }

  ExprPtr parse_filter_expr(ExprPtr node) {
    while (true) {
      const int at = line();
      if (skip_op("|")) {
        auto filter = make(Expr::Kind::kFilter, at);
        filter->name = expect_name();
        if (is_op(".")) fail("unsupported dotted filter name '" + filter->name + ".'");
        if (!kFilters.count(filter->name)) fail("unsupported filter '" + filter->name + "'");
        filter->children.push_back(std::move(node));
        if (is_op("(")) parse_call_args(*filter);
        node = std::move(filter);
      } else if (is_name("is")) {
        ++tp_;
        auto test = make(Expr::Kind::kTest, at);
        test->negated = skip_name("not");
        test->name = expect_name();
        if (!kTests.count(test->name)) fail("unsupported test '" + test->name + "'");
        test->children.push_back(std::move(node));
        const Token* t = peek();
        if (is_op("(")) {
          parse_call_args(*test);
        } else if (t && (t->type != Token::Type::kOp || t->text == "[" || t->text == "{") &&
                   !is_name("else") && !is_name("or") && !is_name("and") && !is_name("if")) {
          if (is_name("is")) fail("cannot chain tests with 'is'");
          test->children.push_back(parse_postfix(parse_primary()));
        }
        node = std::move(test);
      } else if (is_op("(")) {
        node = parse_call(std::move(node), at);
      } else {
        return node;
      }
    }
  }

  // --- statements ---
  std::vector<std::string> parse_targets() {
    std::vector<std::string> targets{expect_name()};
    while (skip_op(",")) targets.push_back(expect_name());
    return targets;
  }

  // Parses pieces until one of `ends` opens a block tag; leaves the cursor after that keyword.
  Body parse_body(std::set<std::string> ends, std::string* end) {
    Body body;
    while (idx_ < pieces_.size()) {
      const Piece& piece = pieces_[idx_++];
      if (piece.kind == Piece::Kind::kText) {
        Node node{Node::Kind::kText, piece.line};
        node.text = piece.text;
        body.push_back(std::move(node));
        continue;
      }
      toks_ = &piece.tokens;
      tp_ = 0;
      piece_line_ = piece.line;
      if (piece.kind == Piece::Kind::kVariable) {
        Node node{Node::Kind::kOutput, piece.line};
        node.expr = parse_tuple();
        expect_tag_end();
        body.push_back(std::move(node));
        continue;
      }
      if (at_end()) fail("empty block tag '{% %}'");
      const std::string keyword = expect_name();
      if (ends.count(keyword)) {
        *end = keyword;
        return body;
      }
      body.push_back(parse_statement(keyword, piece.line));
    }
    if (!ends.empty()) {
      throw ParseError{piece_line_, "missing '{% " + *ends.rbegin() + " %}' at the end"};
    }
    return body;
  }

  Node parse_statement(const std::string& keyword, int at) {
    if (keyword == "if") {
      Node node{Node::Kind::kIf, at};
      ExprPtr cond = parse_tuple();
      expect_tag_end();
      while (true) {
        std::string end;
        Body body = parse_body({"elif", "else", "endif"}, &end);
        node.branches.emplace_back(std::move(cond), std::move(body));
        if (end == "elif") {
          cond = parse_tuple();
          expect_tag_end();
          continue;
        }
        if (end == "else") {
          expect_tag_end();
          node.else_body = parse_body({"endif"}, &end);
        }
        expect_tag_end();
        return node;
      }
    }
    if (keyword == "for") {
      Node node{Node::Kind::kFor, at};
      node.targets = parse_targets();
      if (!skip_name("in")) fail("expected 'in' in a for loop, found " + describe_next());
      node.expr = parse_or();  // jinja2: parse_tuple(with_condexpr=False)
      if (skip_name("if")) node.filter = parse_expression();
      if (is_name("recursive")) fail("unsupported recursive for loop");
      expect_tag_end();
      ++loop_depth_;
      std::string end;
      node.body = parse_body({"else", "endfor"}, &end);
      --loop_depth_;
      if (end == "else") {
        expect_tag_end();
        node.else_body = parse_body({"endfor"}, &end);
      }
      expect_tag_end();
      return node;
    }
    if (keyword == "set") {
      Node node{Node::Kind::kSet, at};
      if (peek() && peek()->type == Token::Type::kName && is_op(".", 1)) {
        node.targets.push_back(expect_name());
        ++tp_;
        node.attribute = expect_name();
      } else {
        node.targets = parse_targets();
      }
      if (skip_op("=")) {
        node.expr = parse_tuple();
        expect_tag_end();
        return node;
      }
      if (is_op("|")) fail("unsupported filter on a block set");
      expect_tag_end();
      if (!node.attribute.empty() || node.targets.size() != 1) {
        fail("a block set assigns one plain name");
      }
      node.kind = Node::Kind::kSetBlock;
      std::string end;
      node.body = parse_body({"endset"}, &end);
      expect_tag_end();
      return node;
    }
    if (keyword == "break" || keyword == "continue") {
      if (loop_depth_ == 0) fail("'" + keyword + "' outside a for loop");
      expect_tag_end();
      return Node{keyword == "break" ? Node::Kind::kBreak : Node::Kind::kContinue, at};
    }
    if (keyword == "generation") {  // transformers' AssistantTracker: renders its body as is
      expect_tag_end();
      Node node{Node::Kind::kBlock, at};
      std::string end;
      node.body = parse_body({"endgeneration"}, &end);
      expect_tag_end();
      return node;
    }
    if (kUnsupportedStatements.count(keyword)) fail("unsupported statement '" + keyword + "'");
    fail("unexpected statement '" + keyword + "'");
  }

  std::vector<Piece> pieces_;
  size_t idx_ = 0;
  const std::vector<Token>* toks_ = nullptr;
  size_t tp_ = 0;
  int piece_line_ = 1;
  int loop_depth_ = 0;
};

}  // namespace

absl::StatusOr<std::shared_ptr<const Program>> parse_template(std::string_view source,
                                                              std::string_view name) {
  try {
    auto program = std::make_shared<Program>();
    program->name = std::string(name);
    program->body = Parser(Lexer(source).run()).parse_all();
    return program;
  } catch (const ParseError& error) {
    return absl::InvalidArgumentError(absl::StrCat("chat template '", std::string(name), "' line ",
                                                   error.line, ": ", error.message));
  }
}

}  // namespace megaserve::engine::jinja
