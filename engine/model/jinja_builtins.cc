// The builtins of megaserve's Jinja subset with Python's semantics as jinja2 applies them:
// attribute and item access (methods first, then keys, as jinja2's getattr), slicing by code
// point, arithmetic, comparisons, and the filters, tests, methods and globals that
// jinja_parser.cc lets through.
#include "engine/model/jinja_builtins.h"

#include <algorithm>
#include <cmath>
#include <ctime>
#include <optional>

#include "absl/strings/str_cat.h"

namespace megaserve::engine::jinja {

void raise(std::string message) { throw EvalError{std::move(message)}; }

void raise_undefined(const Value& v) {
  raise(v.undefined_hint().empty() ? "value is undefined" : v.undefined_hint());
}

Value Args::get(size_t index, std::string_view name, Value fallback) const {
  if (index < positional.size()) return positional[index];
  for (const auto& [k, v] : keyword) {
    if (k == name) return v;
  }
  return fallback;
}

void Args::check(const std::string& what, size_t max_positional,
                 std::initializer_list<std::string_view> names) const {
  if (positional.size() > max_positional) {
    raise(absl::StrCat(what, "() takes at most ", max_positional, " positional arguments"));
  }
  for (const auto& [k, v] : keyword) {
    if (std::find(names.begin(), names.end(), k) == names.end()) {
      raise(absl::StrCat(what, "() got an unexpected keyword argument '", k, "'"));
    }
  }
}

namespace {

bool is_dict_method(std::string_view name) {
  return name == "items" || name == "keys" || name == "values" || name == "get";
}

bool is_string_method(std::string_view name) {
  return name == "startswith" || name == "endswith" || name == "strip" || name == "lstrip" ||
         name == "rstrip" || name == "split" || name == "upper" || name == "lower" ||
         name == "replace" || name == "title" || name == "capitalize" || name == "find" ||
         name == "count";
}

std::vector<char32_t> cps(const Value& v) { return utf8_decode(v.as_string()); }

std::string require_ascii(const std::string& s, const std::string& what) {
  for (char c : s) {
    if (static_cast<unsigned char>(c) >= 0x80) {
      raise(absl::StrCat(what, " of non-ASCII text is not supported"));
    }
  }
  return s;
}

std::string ascii_upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}
std::string ascii_lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
std::string ascii_title(std::string s) {  // str.title(): a letter after a non-letter is upper
  bool previous_cased = false;
  for (char& c : s) {
    const bool alpha = std::isalpha(static_cast<unsigned char>(c));
    c = static_cast<char>(alpha && !previous_cased ? std::toupper(static_cast<unsigned char>(c))
                                                   : std::tolower(static_cast<unsigned char>(c)));
    previous_cased = alpha;
  }
  return s;
}
std::string ascii_capitalize(std::string s) {
  s = ascii_lower(std::move(s));
  if (!s.empty()) s[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(s[0])));
  return s;
}

// str.strip/lstrip/rstrip with chars (None: whitespace).
std::string py_strip(const std::string& s, const Value& chars, bool left, bool right) {
  const auto text = utf8_decode(s);
  std::vector<char32_t> set;
  const bool whitespace = chars.is_none() || chars.is_undefined();
  if (!whitespace) {
    if (!chars.is_string()) raise("strip arg must be None or str");
    set = utf8_decode(chars.as_string());
  }
  auto strip = [&](char32_t cp) {
    return whitespace ? py_isspace(cp) : std::find(set.begin(), set.end(), cp) != set.end();
  };
  size_t begin = 0, end = text.size();
  if (left) {
    while (begin < end && strip(text[begin])) ++begin;
  }
  if (right) {
    while (end > begin && strip(text[end - 1])) --end;
  }
  return utf8_encode(std::vector<char32_t>(text.begin() + begin, text.begin() + end));
}

Value py_split(const std::string& s, const Value& sep, int64_t maxsplit) {
  List parts;
  if (sep.is_none() || sep.is_undefined()) {  // runs of whitespace, no empty strings
    const auto text = utf8_decode(s);
    size_t i = 0;
    while (i < text.size()) {
      while (i < text.size() && py_isspace(text[i])) ++i;
      if (i == text.size()) break;
      if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
        size_t end = text.size();
        while (end > i && py_isspace(text[end - 1])) --end;
        parts.push_back(Value::string(
            utf8_encode(std::vector<char32_t>(text.begin() + i, text.begin() + end))));
        break;
      }
      size_t j = i;
      while (j < text.size() && !py_isspace(text[j])) ++j;
      parts.push_back(
          Value::string(utf8_encode(std::vector<char32_t>(text.begin() + i, text.begin() + j))));
      i = j;
    }
    return Value::list(std::move(parts));
  }
  if (!sep.is_string()) raise("must be str or None");
  const std::string& d = sep.as_string();
  if (d.empty()) raise("empty separator");
  size_t start = 0;
  while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
    const size_t at = s.find(d, start);
    if (at == std::string::npos) break;
    parts.push_back(Value::string(s.substr(start, at - start)));
    start = at + d.size();
  }
  parts.push_back(Value::string(s.substr(start)));
  return Value::list(std::move(parts));
}

std::string py_replace(const std::string& s, const std::string& old, const std::string& repl,
                       int64_t count) {
  std::string out;
  if (old.empty()) {  // inserts repl before every code point and at the end
    const auto text = utf8_decode(s);
    int64_t done = 0;
    for (char32_t cp : text) {
      if (count < 0 || done < count) {
        out += repl;
        ++done;
      }
      utf8_append(out, cp);
    }
    if (count < 0 || done < count) out += repl;
    return out;
  }
  size_t start = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t at = s.find(old, start);
    if (at == std::string::npos) break;
    out += s.substr(start, at - start) + repl;
    start = at + old.size();
    ++done;
  }
  return out + s.substr(start);
}

// Python's slice.indices() walk.
std::vector<int64_t> slice_indices(int64_t length, const Value& start_v, const Value& stop_v,
                                   const Value& step_v) {
  auto as_index = [](const Value& v) -> std::optional<int64_t> {
    if (v.is_none() || v.is_undefined()) return std::nullopt;
    if (v.kind() != Value::Kind::kInt && v.kind() != Value::Kind::kBool) {
      raise("slice indices must be integers or None");
    }
    return v.as_int();
  };
  const int64_t step = as_index(step_v).value_or(1);
  if (step == 0) raise("slice step cannot be zero");
  const int64_t lower = step < 0 ? -1 : 0;
  const int64_t upper = step < 0 ? length - 1 : length;
  auto clamp = [&](std::optional<int64_t> v, int64_t fallback) {
    if (!v) return fallback;
    int64_t i = *v < 0 ? *v + length : *v;
    return std::clamp(i, lower, upper);
  };
  const int64_t start = clamp(as_index(start_v), step < 0 ? upper : lower);
  const int64_t stop = clamp(as_index(stop_v), step < 0 ? lower : upper);
  std::vector<int64_t> out;
  for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) out.push_back(i);
  return out;
}

Value select_items(const std::string& name, const Value& seq, const Args& args);

int64_t length_of(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
      return 0;
    case Value::Kind::kString:
      return static_cast<int64_t>(cps(v).size());
    case Value::Kind::kList:
      return static_cast<int64_t>(v.as_list().size());
    case Value::Kind::kDict:
      return static_cast<int64_t>(v.as_dict().entries.size());
    default:
      raise(absl::StrCat("object of type '", v.type_name(), "' has no len()"));
  }
}

bool contains(const Value& container, const Value& item) {
  switch (container.kind()) {
    case Value::Kind::kUndefined:
      return false;
    case Value::Kind::kString:
      if (!item.is_string()) {
        raise(
            absl::StrCat("'in <string>' requires string as left operand, not ", item.type_name()));
      }
      return container.as_string().find(item.as_string()) != std::string::npos;
    case Value::Kind::kList:
      for (const Value& v : container.as_list()) {
        if (equals(v, item)) return true;
      }
      return false;
    case Value::Kind::kDict:
      return item.is_string() && container.as_dict().find(item.as_string()) != nullptr;
    default:
      raise(absl::StrCat("argument of type '", container.type_name(), "' is not iterable"));
  }
}

}  // namespace

// The items a for loop, join, select or list() walks.
List iterate(const Value& v) {
  switch (v.kind()) {
    case Value::Kind::kUndefined:
      return {};
    case Value::Kind::kList:
      return v.as_list();
    case Value::Kind::kDict: {
      List keys;
      for (const auto& [k, unused] : v.as_dict().entries) keys.push_back(Value::string(k));
      return keys;
    }
    case Value::Kind::kString: {
      List chars;
      for (char32_t cp : cps(v)) {
        std::string s;
        utf8_append(s, cp);
        chars.push_back(Value::string(std::move(s)));
      }
      return chars;
    }
    default:
      raise(absl::StrCat("'", v.type_name(), "' object is not iterable"));
  }
}

Value get_attr(const Value& obj, const std::string& name) {
  switch (obj.kind()) {
    case Value::Kind::kUndefined:
      raise_undefined(obj);
    case Value::Kind::kString:
      if (is_string_method(name)) return Value::callable(name, obj);
      [[fallthrough]];
    case Value::Kind::kList:
    case Value::Kind::kInt:
    case Value::Kind::kFloat:
    case Value::Kind::kBool:
      // Python objects have attributes this subset does not model (int.real, list.index):
      // refused rather than read as undefined.
      raise(absl::StrCat("unsupported attribute '", name, "' of a ", obj.type_name(), " value"));
    case Value::Kind::kDict:
      if (is_dict_method(name)) return Value::callable(name, obj);
      [[fallthrough]];
    case Value::Kind::kNamespace:
      if (const Value* v = obj.as_dict().find(name)) return *v;
      break;
    default:
      break;
  }
  return Value::undefined(
      absl::StrCat("'", obj.type_name(), " object' has no attribute '", name, "'"));
}

Value get_item(const Value& obj, const Value& key) {
  if (obj.is_undefined()) raise_undefined(obj);
  if (key.is_string() && (obj.kind() == Value::Kind::kDict ||
                          obj.kind() == Value::Kind::kNamespace || obj.is_string())) {
    if (obj.kind() != Value::Kind::kString) {
      if (const Value* v = obj.as_dict().find(key.as_string())) return *v;
    }
    return get_attr(obj, key.as_string());  // jinja2 falls back to the attribute
  }
  if ((obj.kind() == Value::Kind::kList || obj.is_string()) &&
      (key.kind() == Value::Kind::kInt || key.kind() == Value::Kind::kBool)) {
    int64_t i = key.as_int();
    if (obj.is_string()) {
      const auto text = cps(obj);
      const int64_t n = static_cast<int64_t>(text.size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) {
        std::string s;
        utf8_append(s, text[i]);
        return Value::string(std::move(s));
      }
    } else {
      const int64_t n = static_cast<int64_t>(obj.as_list().size());
      if (i < 0) i += n;
      if (i >= 0 && i < n) return obj.as_list()[i];
    }
  }
  if (key.kind() == Value::Kind::kInt) {
    return Value::undefined(
        absl::StrCat("'", obj.type_name(), " object' has no element ", key.as_int()));
  }
  return Value::undefined(
      absl::StrCat("'", obj.type_name(), " object' has no attribute '", to_str(key), "'"));
}

// Arithmetic with Python's rules; bools count as ints.
Value arithmetic(const std::string& op, const Value& a, const Value& b) {
  if (a.is_undefined()) raise_undefined(a);
  if (b.is_undefined()) raise_undefined(b);
  auto type_error = [&]() -> Value {
    raise(absl::StrCat("unsupported operand type(s) for ", op, ": '", a.type_name(), "' and '",
                       b.type_name(), "'"));
  };
  if (op == "+") {
    if (a.is_string() && b.is_string()) return Value::string(a.as_string() + b.as_string());
    if (a.kind() == Value::Kind::kList && b.kind() == Value::Kind::kList &&
        a.is_tuple() == b.is_tuple()) {
      List items = a.as_list();
      items.insert(items.end(), b.as_list().begin(), b.as_list().end());
      return Value::list(std::move(items), a.is_tuple());
    }
  }
  if (op == "*" && (a.is_string() || a.kind() == Value::Kind::kList) &&
      (b.kind() == Value::Kind::kInt || b.kind() == Value::Kind::kBool)) {
    const int64_t n = std::max<int64_t>(0, b.as_int());
    if (n * std::max<int64_t>(1, a.is_string() ? a.as_string().size() : a.as_list().size()) >
        (int64_t{1} << 24)) {
      raise("repetition result too large");
    }
    if (a.is_string()) {
      std::string out;
      for (int64_t i = 0; i < n; ++i) out += a.as_string();
      return Value::string(std::move(out));
    }
    List items;
    for (int64_t i = 0; i < n; ++i)
      items.insert(items.end(), a.as_list().begin(), a.as_list().end());
    return Value::list(std::move(items), a.is_tuple());
  }
  if (op == "%" && a.is_string()) raise("string formatting with '%' is not supported");
  if (!a.is_number() || !b.is_number()) return type_error();
  const bool floats = a.kind() == Value::Kind::kFloat || b.kind() == Value::Kind::kFloat;
  if (op == "/") {
    if (b.as_float() == 0) raise("division by zero");
    return Value::floating(a.as_float() / b.as_float());
  }
  if (op == "**") {
    if (!floats && b.as_int() >= 0) {
      int64_t r = 1;
      for (int64_t i = 0; i < b.as_int(); ++i) {
        if (__builtin_mul_overflow(r, a.as_int(), &r)) raise("integer overflow");
      }
      return Value::integer(r);
    }
    return Value::floating(std::pow(a.as_float(), b.as_float()));
  }
  if (floats) {
    const double x = a.as_float(), y = b.as_float();
    if (op == "+") return Value::floating(x + y);
    if (op == "-") return Value::floating(x - y);
    if (op == "*") return Value::floating(x * y);
    if (y == 0) raise("float division by zero");
    if (op == "//") return Value::floating(std::floor(x / y));
    double m = std::fmod(x, y);
    if (m != 0 && ((m < 0) != (y < 0))) m += y;
    return Value::floating(m);
  }
  const int64_t x = a.as_int(), y = b.as_int();
  int64_t r = 0;
  if (op == "+" && !__builtin_add_overflow(x, y, &r)) return Value::integer(r);
  if (op == "-" && !__builtin_sub_overflow(x, y, &r)) return Value::integer(r);
  if (op == "*" && !__builtin_mul_overflow(x, y, &r)) return Value::integer(r);
  if (op == "+" || op == "-" || op == "*") raise("integer overflow");
  if (y == 0) raise("integer division or modulo by zero");
  int64_t q = x / y, m = x % y;
  if (m != 0 && ((m < 0) != (y < 0))) {
    --q;
    m += y;
  }
  return Value::integer(op == "//" ? q : m);
}
Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  if (obj.is_undefined()) raise_undefined(obj);
  if (obj.is_string()) {
    const auto text = cps(obj);
    std::vector<char32_t> picked;
    for (int64_t i : slice_indices(text.size(), start, stop, step)) picked.push_back(text[i]);
    return Value::string(utf8_encode(picked));
  }
  if (obj.kind() == Value::Kind::kList) {
    List picked;
    for (int64_t i : slice_indices(obj.as_list().size(), start, stop, step)) {
      picked.push_back(obj.as_list()[i]);
    }
    return Value::list(std::move(picked), obj.is_tuple());
  }
  return Value::undefined(absl::StrCat("'", obj.type_name(), "' object is not subscriptable"));
}

bool compare(const std::string& op, const Value& a, const Value& b) {
  if (op == "==") return equals(a, b);
  if (op == "!=") return !equals(a, b);
  if (op == "in") return contains(b, a);
  if (op == "notin") return !contains(b, a);
  if (a.is_undefined()) raise_undefined(a);
  if (b.is_undefined()) raise_undefined(b);
  if (op == "<") return less_than(a, b);
  if (op == ">") return less_than(b, a);
  if (op == "<=") return !less_than(b, a);
  return !less_than(a, b);  // >=
}

bool apply_test(const std::string& name, const Value& v, const Args& args) {
  using K = Value::Kind;
  if (name == "defined") return !v.is_undefined();
  if (name == "undefined") return v.is_undefined();
  if (name == "none") return v.is_none();
  if (name == "string") return v.is_string();
  if (name == "mapping") return v.kind() == K::kDict;
  if (name == "iterable") {
    return v.kind() == K::kList || v.kind() == K::kDict || v.is_string() || v.is_undefined();
  }
  if (name == "sequence") {
    return v.kind() == K::kList || v.kind() == K::kDict || v.is_string() || v.is_undefined();
  }
  if (name == "number") return v.is_number();
  if (name == "integer") return v.kind() == K::kInt;
  if (name == "float") return v.kind() == K::kFloat;
  if (name == "boolean") return v.kind() == K::kBool;
  if (name == "true") return v.kind() == K::kBool && v.as_bool();
  if (name == "false") return v.kind() == K::kBool && !v.as_bool();
  if (name == "odd" || name == "even" || name == "divisibleby") {
    if (v.kind() != K::kInt && v.kind() != K::kBool) raise("the test '" + name + "' needs an int");
    if (name == "divisibleby") {
      const Value d = args.get(0, "num");
      if (d.kind() != K::kInt || d.as_int() == 0) raise("divisibleby needs a non-zero int");
      return v.as_int() % d.as_int() == 0;
    }
    return (v.as_int() % 2 != 0) == (name == "odd");
  }
  if (name == "lower" || name == "upper") {
    const std::string s = require_ascii(to_str(v), "the test '" + name + "'");
    bool cased = false;
    for (char c : s) {
      if (std::isalpha(static_cast<unsigned char>(c))) {
        cased = true;
        if ((name == "lower") != (std::islower(static_cast<unsigned char>(c)) != 0)) return false;
      }
    }
    return cased;
  }
  if (args.positional.empty()) raise("the test '" + name + "' needs an argument");
  const Value& other = args.positional[0];
  if (name == "sameas") {
    if (v.kind() != other.kind()) return false;
    return v.is_none() || v.is_undefined() ||
           (v.kind() == K::kBool ? v.as_bool() == other.as_bool() : equals(v, other));
  }
  if (name == "in") return contains(other, v);
  if (name == "eq" || name == "equalto" || name == "==") return compare("==", v, other);
  if (name == "ne" || name == "!=") return compare("!=", v, other);
  if (name == "lt" || name == "<" || name == "lessthan") return compare("<", v, other);
  if (name == "le" || name == "<=") return compare("<=", v, other);
  if (name == "gt" || name == ">" || name == "greaterthan") return compare(">", v, other);
  if (name == "ge" || name == ">=") return compare(">=", v, other);
  raise("unknown test '" + name + "'");
}

namespace {

// select/reject/selectattr/rejectattr.
Value select_items(const std::string& name, const Value& seq, const Args& args) {
  const bool by_attribute = name == "selectattr" || name == "rejectattr";
  const bool keep_if = name == "select" || name == "selectattr";
  size_t next = 0;
  std::string attribute;
  if (by_attribute) {
    const Value a = args.get(next++, "attribute");
    if (!a.is_string()) raise(name + " needs an attribute name");
    attribute = a.as_string();
  }
  std::string test_name;
  Args test_args;
  if (next < args.positional.size()) {
    if (!args.positional[next].is_string()) raise(name + " needs a test name");
    test_name = args.positional[next].as_string();
    test_args.positional.assign(args.positional.begin() + next + 1, args.positional.end());
    static const std::vector<std::string> kSelectable = {
        "defined", "undefined",   "none",  "string",  "mapping",     "iterable", "sequence",
        "number",  "integer",     "float", "boolean", "true",        "false",    "odd",
        "even",    "divisibleby", "lower", "upper",   "sameas",      "in",       "eq",
        "equalto", "==",          "ne",    "!=",      "lt",          "<",        "lessthan",
        "le",      "<=",          "gt",    ">",       "greaterthan", "ge",       ">="};
    if (std::find(kSelectable.begin(), kSelectable.end(), test_name) == kSelectable.end()) {
      raise("no test named '" + test_name + "'");
    }
  }
  List kept;
  for (const Value& item : iterate(seq)) {
    const Value subject = by_attribute ? get_attr(item, attribute) : item;
    const bool passed =
        test_name.empty() ? subject.truthy() : apply_test(test_name, subject, test_args);
    if (passed == keep_if) kept.push_back(item);
  }
  return Value::list(std::move(kept));
}

}  // namespace

Value apply_filter(const std::string& name, const Value& v, const Args& args) {
  using K = Value::Kind;
  if (name == "trim") {
    args.check(name, 1, {"chars"});
    return Value::string(py_strip(to_str(v), args.get(0, "chars"), true, true));
  }
  if (name == "tojson") {
    args.check(name, 4, {"ensure_ascii", "indent", "separators", "sort_keys"});
    JsonOptions options;
    options.ensure_ascii = args.get(0, "ensure_ascii", Value::boolean(false)).truthy();
    const Value indent = args.get(1, "indent");
    if (indent.kind() == K::kInt) {
      options.indent = static_cast<int>(std::max<int64_t>(0, indent.as_int()));
    } else if (!indent.is_none()) {
      raise("tojson: indent must be an int or None");
    }
    const Value separators = args.get(2, "separators");
    if (!separators.is_none()) {
      if (separators.kind() != K::kList || separators.as_list().size() != 2 ||
          !separators.as_list()[0].is_string() || !separators.as_list()[1].is_string()) {
        raise("tojson: separators must be a pair of strings");
      }
      options.item_separator = separators.as_list()[0].as_string();
      options.key_separator = separators.as_list()[1].as_string();
    }
    options.sort_keys = args.get(3, "sort_keys", Value::boolean(false)).truthy();
    return Value::string(to_json(v, options));
  }
  if (name == "length" || name == "count") return Value::integer(length_of(v));
  if (name == "upper") return Value::string(ascii_upper(require_ascii(to_str(v), name)));
  if (name == "lower") return Value::string(ascii_lower(require_ascii(to_str(v), name)));
  if (name == "title") return Value::string(ascii_title(require_ascii(to_str(v), name)));
  if (name == "capitalize") {
    return Value::string(ascii_capitalize(require_ascii(to_str(v), name)));
  }
  if (name == "string" || name == "safe") return Value::string(to_str(v));
  if (name == "list") return Value::list(iterate(v));
  if (name == "join") {
    args.check(name, 2, {"d", "attribute"});
    const Value sep = args.get(0, "d", Value::string(""));
    const Value attribute = args.get(1, "attribute");
    std::string out;
    bool first = true;
    for (const Value& item : iterate(v)) {
      if (!first) out += to_str(sep);
      first = false;
      out += to_str(attribute.is_none() ? item : get_attr(item, to_str(attribute)));
    }
    return Value::string(std::move(out));
  }
  if (name == "default" || name == "d") {
    args.check(name, 2, {"default_value", "boolean"});
    const bool boolean = args.get(1, "boolean", Value::boolean(false)).truthy();
    if (v.is_undefined() || (boolean && !v.truthy())) {
      return args.get(0, "default_value", Value::string(""));
    }
    return v;
  }
  if (name == "replace") {
    args.check(name, 3, {"old", "new", "count"});
    const Value old = args.get(0, "old"), repl = args.get(1, "new");
    const Value count = args.get(2, "count");
    return Value::string(
        py_replace(to_str(v), to_str(old), to_str(repl), count.is_none() ? -1 : count.as_int()));
  }
  if (name == "first" || name == "last") {
    if (v.is_undefined()) return v;
    List items = iterate(v);
    if (items.empty()) return Value::undefined("No " + name + " item, sequence was empty.");
    return name == "first" ? items.front() : items.back();
  }
  if (name == "items") {
    if (v.is_undefined()) return Value::list({});
    if (v.kind() != K::kDict) raise("Can only get item pairs from a mapping.");
    List pairs;
    for (const auto& [k, val] : v.as_dict().entries) {
      pairs.push_back(Value::list({Value::string(k), val}, true));
    }
    return Value::list(std::move(pairs));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    return select_items(name, v, args);
  }
  if (name == "map") {
    const Value attribute = args.get(99, "attribute");
    if (attribute.is_none()) raise("map is supported with attribute= only");
    const Value fallback = args.get(99, "default", Value());
    List mapped;
    for (const Value& item : iterate(v)) {
      Value got = get_attr(item, to_str(attribute));
      mapped.push_back(got.is_undefined() && !fallback.is_undefined() ? fallback : got);
    }
    return Value::list(std::move(mapped));
  }
  if (name == "int" || name == "float") {
    const Value fallback =
        args.get(0, "default", name == "int" ? Value::integer(0) : Value::floating(0));
    double parsed = 0;
    if (v.is_number()) {
      parsed = v.as_float();
      if (name == "int" && v.kind() != K::kFloat) return Value::integer(v.as_int());
    } else if (v.is_string()) {
      try {
        size_t used = 0;
        const std::string s = py_strip(v.as_string(), Value::none(), true, true);
        parsed = std::stod(s, &used);
        if (used != s.size()) return fallback;
      } catch (...) {
        return fallback;
      }
    } else {
      return fallback;
    }
    return name == "int" ? Value::integer(static_cast<int64_t>(std::trunc(parsed)))
                         : Value::floating(parsed);
  }
  if (name == "abs") {
    if (!v.is_number()) raise(absl::StrCat("bad operand type for abs(): '", v.type_name(), "'"));
    return v.kind() == K::kFloat ? Value::floating(std::fabs(v.as_float()))
                                 : Value::integer(std::llabs(v.as_int()));
  }
  raise("unknown filter '" + name + "'");
}

Value call_function(const Value& callee, const Args& args) {
  const std::string& name = callee.as_string();
  const Value& self = callee.receiver();
  if (self.is_undefined()) {  // a global
    if (name == "raise_exception") {
      raise("raise_exception: " + to_str(args.get(0, "message", Value::string(""))));
    }
    if (name == "namespace") {
      Dict d;
      if (!args.positional.empty()) {
        if (args.positional.size() > 1 || args.positional[0].kind() != Value::Kind::kDict) {
          raise("namespace() takes keyword arguments or one dict");
        }
        d = args.positional[0].as_dict();
      }
      for (const auto& [k, v] : args.keyword) d.set(k, v);
      return Value::name_space(std::move(d));
    }
    if (name == "strftime_now") {
      const std::string format = to_str(args.get(0, "format", Value::string("")));
      const std::time_t now = std::time(nullptr);
      std::tm local{};
      localtime_r(&now, &local);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof(buf), format.c_str(), &local);
      return Value::string(std::string(buf, n));
    }
    if (name == "range") {
      std::vector<int64_t> bounds;
      for (const Value& a : args.positional) {
        if (a.kind() != Value::Kind::kInt && a.kind() != Value::Kind::kBool) {
          raise("range() takes integers");
        }
        bounds.push_back(a.as_int());
      }
      if (bounds.empty() || bounds.size() > 3) raise("range() takes 1 to 3 arguments");
      const int64_t start = bounds.size() > 1 ? bounds[0] : 0;
      const int64_t stop = bounds.size() > 1 ? bounds[1] : bounds[0];
      const int64_t step = bounds.size() > 2 ? bounds[2] : 1;
      if (step == 0) raise("range() arg 3 must not be zero");
      List items;
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (items.size() >= 100000)
          raise("Range too big. The sandbox blocks ranges larger than 100000.");
        items.push_back(Value::integer(i));
      }
      return Value::list(std::move(items));
    }
    raise("unknown function '" + name + "'");
  }
  if (self.kind() == Value::Kind::kDict) {
    const Dict& d = self.as_dict();
    if (name == "get") {
      const Value key = args.get(0, "key");
      const Value* found = key.is_string() ? d.find(key.as_string()) : nullptr;
      return found ? *found : args.get(1, "default");
    }
    List out;
    for (const auto& [k, v] : d.entries) {
      out.push_back(name == "keys"     ? Value::string(k)
                    : name == "values" ? v
                                       : Value::list({Value::string(k), v}, true));
    }
    return Value::list(std::move(out));
  }
  const std::string& s = self.as_string();
  if (name == "startswith" || name == "endswith") {
    if (args.positional.size() != 1) raise(name + "() with start or end is not supported");
    const Value& arg = args.positional[0];
    List candidates = arg.kind() == Value::Kind::kList ? arg.as_list() : List{arg};
    for (const Value& c : candidates) {
      if (!c.is_string()) raise(name + " first arg must be str or a tuple of str");
      const std::string& p = c.as_string();
      if (p.size() <= s.size() &&
          (name == "startswith" ? s.compare(0, p.size(), p) == 0
                                : s.compare(s.size() - p.size(), p.size(), p) == 0)) {
        return Value::boolean(true);
      }
    }
    return Value::boolean(false);
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    return Value::string(py_strip(s, args.get(0, "chars"), name != "rstrip", name != "lstrip"));
  }
  if (name == "split") {
    const Value maxsplit = args.get(1, "maxsplit", Value::integer(-1));
    return py_split(s, args.get(0, "sep"), maxsplit.as_int());
  }
  if (name == "upper") return Value::string(ascii_upper(require_ascii(s, name)));
  if (name == "lower") return Value::string(ascii_lower(require_ascii(s, name)));
  if (name == "title") return Value::string(ascii_title(require_ascii(s, name)));
  if (name == "capitalize") return Value::string(ascii_capitalize(require_ascii(s, name)));
  if (name == "replace") {
    const Value old = args.get(0, "old"), repl = args.get(1, "new");
    if (!old.is_string() || !repl.is_string()) raise("replace() arguments must be str");
    return Value::string(py_replace(s, old.as_string(), repl.as_string(),
                                    args.get(2, "count", Value::integer(-1)).as_int()));
  }
  if (name == "find" || name == "count") {
    const Value sub = args.get(0, "sub");
    if (!sub.is_string()) raise(name + "() argument must be str");
    const std::string& t = sub.as_string();
    if (name == "find") {
      const size_t at = s.find(t);
      if (at == std::string::npos) return Value::integer(-1);
      return Value::integer(static_cast<int64_t>(utf8_decode(s.substr(0, at)).size()));
    }
    if (t.empty()) return Value::integer(static_cast<int64_t>(utf8_decode(s).size()) + 1);
    int64_t n = 0;
    for (size_t at = s.find(t); at != std::string::npos; at = s.find(t, at + t.size())) ++n;
    return Value::integer(n);
  }
  raise("unknown method '" + name + "'");
}

}  // namespace megaserve::engine::jinja
