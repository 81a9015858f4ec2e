// The parsed form of a template in megaserve's Jinja subset: expression and statement trees,
// built once by parse_template() and only read by render_template(). Every construct here is
// one the evaluator implements; the parser refuses anything else, naming it.
#pragma once

#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/jinja_value.h"

namespace megaserve::engine::jinja {

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  enum class Kind {
    kLiteral,  // value
    kName,     // name
    kList,     // children (tuple: value.as_bool() of a kBool literal is not used; see tuple)
    kDict,     // children: key, value, key, value, ...
    kGetAttr,  // children[0].name
    kGetItem,  // children[0][children[1]]
    kSlice,    // children[0][children[1]:children[2]:children[3]] (null parts omitted)
    kCall,     // children[0](children[1..], kwargs)
    kFilter,   // children[0] | name(children[1..], kwargs)
    kTest,     // children[0] is [not] name(children[1..]); negated
    kNeg,      // -children[0]
    kPos,      // +children[0]
    kNot,      // not children[0]
    kBinary,   // children[0] op children[1]: + - * / // % ** ~
    kAnd,
    kOr,
    kCompare,   // children[0] ops[0] children[1] ops[1] children[2] ...: == != < <= > >= in notin
    kCondExpr,  // children[1] if children[0] else children[2] (children[2] may be null)
  };
  Kind kind;
  int line = 0;
  Value value;           // kLiteral
  std::string name;      // kName, kGetAttr, kFilter, kTest, kBinary's operator
  bool negated = false;  // kTest
  bool tuple = false;    // kList written as a tuple
  std::vector<ExprPtr> children;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;  // kCall, kFilter
  std::vector<std::string> ops;                         // kCompare
};

struct Node;
using Body = std::vector<Node>;

struct Node {
  enum class Kind {
    kText,      // text
    kOutput,    // {{ expr }}
    kIf,        // branches: (condition, body); else_body
    kFor,       // {% for targets in expr [if filter] %} body {% else %} else_body
    kSet,       // {% set targets = expr %} or {% set targets[0].attribute = expr %}
    kSetBlock,  // {% set targets[0] %} body {% endset %}
    kBreak,
    kContinue,
    kBlock,  // a body rendered as is: transformers' {% generation %} ... {% endgeneration %}
  };
  Kind kind;
  int line = 0;
  std::string text;
  ExprPtr expr;    // kOutput value, kFor iterable, kSet value
  ExprPtr filter;  // kFor's inline `if`
  std::vector<std::string> targets;
  std::string attribute;  // kSet on a namespace: {% set ns.attribute = ... %}
  std::vector<std::pair<ExprPtr, Body>> branches;
  Body body;
  Body else_body;
};

struct Program {
  std::string name;  // the source's name, for errors
  Body body;
};

// Parses a template with jinja2's settings as transformers uses them (trim_blocks,
// lstrip_blocks, no trailing newline kept). Errors: InvalidArgument naming `name`, the line
// and the construct ("chat template 'x' line 3: unsupported statement 'macro'").
absl::StatusOr<std::shared_ptr<const Program>> parse_template(std::string_view source,
                                                              std::string_view name);

// Renders with the given top-level variables. A Python-level error (raise_exception, a type
// error, an undefined value used) is InvalidArgument naming the template and the line.
absl::StatusOr<std::string> render_template(const Program& program, const Dict& variables);

}  // namespace megaserve::engine::jinja
