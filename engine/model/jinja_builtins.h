// The builtins of megaserve's Jinja subset, shared by the evaluator: Python-level operations
// on Values (attribute and item access, slicing, arithmetic, comparison) and the filters,
// tests, methods and global functions. Each throws EvalError as Python would raise.
#pragma once

#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "engine/model/jinja_value.h"

namespace megaserve::engine::jinja {

[[noreturn]] void raise(std::string message);
[[noreturn]] void raise_undefined(const Value& v);  // jinja2's UndefinedError

// Positional-or-keyword arguments of a filter, test, method or global.
struct Args {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;

  Value get(size_t index, std::string_view name, Value fallback = Value::none()) const;
  // Refuses more than max_positional positional arguments or an unknown keyword.
  void check(const std::string& what, size_t max_positional,
             std::initializer_list<std::string_view> names) const;
};

List iterate(const Value& v);  // what `for` walks: list items, dict keys, characters
Value get_attr(const Value& obj, const std::string& name);  // obj.name
Value get_item(const Value& obj, const Value& key);         // obj[key]
Value slice(const Value& obj, const Value& start, const Value& stop, const Value& step);
Value arithmetic(const std::string& op, const Value& a, const Value& b);  // + - * / // % **
bool compare(const std::string& op, const Value& a, const Value& b);  // == != < <= > >= in notin
bool apply_test(const std::string& name, const Value& v, const Args& args);
Value apply_filter(const std::string& name, const Value& v, const Args& args);
Value call_function(const Value& callee, const Args& args);  // a global or a bound method

}  // namespace megaserve::engine::jinja
