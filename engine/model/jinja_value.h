// The values of megaserve's small Jinja subset (chat_template.h), with Python's semantics as
// jinja2 gives them: None, bools, 64-bit ints, floats, str (UTF-8, indexed by code point),
// lists, insertion-ordered dicts with string keys, namespace() objects, jinja2's default
// Undefined, and callables (the few globals and the methods templates call).
// Conversions follow Python: str() for output, repr() inside containers, json.dumps as
// transformers' tojson filter calls it.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace megaserve::engine::jinja {

class Value;
using List = std::vector<Value>;
// Python dict with string keys, in insertion order (as json.dumps and repr() print it).
struct Dict {
  std::vector<std::pair<std::string, Value>> entries;
  const Value* find(std::string_view key) const;
  void set(const std::string& key, Value value);
};

// A Python-level error raised while evaluating (TypeError, ZeroDivisionError, jinja2's
// UndefinedError, raise_exception): the renderer turns it into a status naming the template.
struct EvalError {
  std::string message;
};

class Value {
 public:
  enum class Kind {
    kUndefined,
    kNone,
    kBool,
    kInt,
    kFloat,
    kString,
    kList,  // also Python tuples (tuple_ says which, for repr)
    kDict,
    kNamespace,  // jinja2's namespace(): a dict whose attributes `set` may assign
    kCallable,   // a global function or a method bound to receiver_
  };

  Value() = default;                         // Undefined
  static Value undefined(std::string hint);  // hint: jinja2's message, "'x' is undefined"
  static Value none();
  static Value boolean(bool b);
  static Value integer(int64_t i);
  static Value floating(double f);
  static Value string(std::string s);
  static Value list(List items, bool tuple = false);
  static Value dict(Dict d);
  static Value name_space(Dict d);
  static Value callable(std::string name);                  // a global function
  static Value callable(std::string name, Value receiver);  // a bound method

  Kind kind() const { return kind_; }
  bool is_undefined() const { return kind_ == Kind::kUndefined; }
  bool is_none() const { return kind_ == Kind::kNone; }
  bool is_string() const { return kind_ == Kind::kString; }
  bool is_number() const {
    return kind_ == Kind::kInt || kind_ == Kind::kFloat || kind_ == Kind::kBool;
  }
  bool is_tuple() const { return kind_ == Kind::kList && tuple_; }

  bool as_bool() const { return b_; }
  int64_t as_int() const { return kind_ == Kind::kBool ? (b_ ? 1 : 0) : i_; }
  double as_float() const { return kind_ == Kind::kFloat ? f_ : static_cast<double>(as_int()); }
  const std::string& as_string() const { return *s_; }  // also the callable's name
  const List& as_list() const { return *list_; }
  const Dict& as_dict() const { return *dict_; }
  Dict& mutable_namespace() const { return *dict_; }  // namespaces are shared, as in Python
  const Value& receiver() const { return *receiver_; }
  const std::string& undefined_hint() const { return *s_; }

  bool truthy() const;
  // Python type names for error messages: "str", "int", "list", "dict", "NoneType", ...
  const char* type_name() const;

 private:
  Kind kind_ = Kind::kUndefined;
  bool b_ = false;
  bool tuple_ = false;
  int64_t i_ = 0;
  double f_ = 0;
  std::shared_ptr<const std::string> s_;
  std::shared_ptr<const List> list_;
  std::shared_ptr<Dict> dict_;
  std::shared_ptr<const Value> receiver_;
};

// str(value) as jinja2 prints it ({{ x }}, ~, |string): Undefined prints "".
std::string to_str(const Value& value);
// repr(value): what str() of a list or dict shows of its elements.
std::string to_repr(const Value& value);
// Python float repr (shortest round trip; 1.0, 1e+16, 1e-05, inf, nan).
std::string float_repr(double f);

struct JsonOptions {
  int indent = -1;  // -1: None (one line)
  bool sort_keys = false;
  bool ensure_ascii = false;   // transformers' tojson default
  std::string item_separator;  // empty: json.dumps' default (", ", or "," with an indent)
  std::string key_separator;   // empty: ": "
};
// json.dumps(value, ...); throws EvalError for Undefined, namespaces and callables
// ("Object of type Undefined is not JSON serializable").
std::string to_json(const Value& value, const JsonOptions& options);

// Python ==, with 1 == 1.0 == True and deep comparison of lists and dicts.
bool equals(const Value& a, const Value& b);
// Python <: numbers, strings (code point order), lists; throws EvalError otherwise.
bool less_than(const Value& a, const Value& b);

// UTF-8 helpers: Python indexes str by code point. Invalid bytes decode one byte each.
std::vector<char32_t> utf8_decode(std::string_view s);
std::string utf8_encode(const std::vector<char32_t>& cps);
void utf8_append(std::string& out, char32_t cp);
// str.isspace() of one code point (Unicode White_Space plus \x1c-\x1f).
bool py_isspace(char32_t cp);

}  // namespace megaserve::engine::jinja
