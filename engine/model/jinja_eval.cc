// Evaluator of megaserve's Jinja subset: walks a parsed Program with jinja2's semantics under
// transformers' ImmutableSandboxedEnvironment (default Undefined: printing or testing it is
// fine, using it otherwise raises; for-loop bodies get a fresh scope per iteration, so `set`
// inside a loop does not leak out; namespace() objects carry state across iterations).
// The builtins (filters, tests, methods, operators) are in jinja_builtins.cc.
#include "absl/strings/str_cat.h"
#include "engine/model/jinja_ast.h"
#include "engine/model/jinja_builtins.h"

namespace megaserve::engine::jinja {
namespace {

enum class Flow { kNormal, kBreak, kContinue };

class Renderer {
 public:
  Renderer(const Program& program, const Dict& variables) : program_(program) {
    Dict globals;
    for (const char* name : {"raise_exception", "namespace", "strftime_now", "range"}) {
      globals.set(name, Value::callable(name));
    }
    for (const auto& [k, v] : variables.entries) globals.set(k, v);
    scopes_.push_back(std::move(globals));
  }

  absl::StatusOr<std::string> run() {
    std::string out;
    try {
      exec(program_.body, out);
    } catch (const EvalError& error) {
      return absl::InvalidArgumentError(
          absl::StrCat("chat template '", program_.name, "' line ", line_, ": ", error.message));
    }
    return out;
  }

 private:
  Value lookup(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      if (const Value* v = it->find(name)) return *v;
    }
    return Value::undefined("'" + name + "' is undefined");
  }

  void bind(const std::vector<std::string>& targets, const Value& value) {
    if (targets.size() == 1) {
      scopes_.back().set(targets[0], value);
      return;
    }
    const List items = iterate(value);
    if (items.size() != targets.size()) {
      raise(absl::StrCat(items.size() < targets.size() ? "not enough" : "too many",
                         " values to unpack (expected ", targets.size(), ")"));
    }
    for (size_t i = 0; i < targets.size(); ++i) scopes_.back().set(targets[i], items[i]);
  }

  Flow exec(const Body& body, std::string& out) {
    for (const Node& node : body) {
      line_ = node.line;
      switch (node.kind) {
        case Node::Kind::kText:
          out += node.text;
          break;
        case Node::Kind::kOutput:
          out += to_str(eval(*node.expr));
          break;
        case Node::Kind::kIf: {
          const Body* chosen = &node.else_body;
          for (const auto& [cond, branch] : node.branches) {
            if (eval(*cond).truthy()) {
              chosen = &branch;
              break;
            }
          }
          if (Flow flow = exec(*chosen, out); flow != Flow::kNormal) return flow;
          break;
        }
        case Node::Kind::kFor:
          exec_for(node, out);
          break;
        case Node::Kind::kSet: {
          Value value = eval(*node.expr);
          if (node.attribute.empty()) {
            bind(node.targets, value);
          } else {
            const Value target = lookup(node.targets[0]);
            line_ = node.line;
            if (target.kind() != Value::Kind::kNamespace) {
              raise("cannot assign attribute on non-namespace object");
            }
            target.mutable_namespace().set(node.attribute, std::move(value));
          }
          break;
        }
        case Node::Kind::kSetBlock: {
          std::string captured;
          exec(node.body, captured);
          scopes_.back().set(node.targets[0], Value::string(std::move(captured)));
          break;
        }
        case Node::Kind::kBreak:
          return Flow::kBreak;
        case Node::Kind::kContinue:
          return Flow::kContinue;
        case Node::Kind::kBlock:
          if (Flow flow = exec(node.body, out); flow != Flow::kNormal) return flow;
          break;
      }
    }
    return Flow::kNormal;
  }

  void exec_for(const Node& node, std::string& out) {
    List items = iterate(eval(*node.expr));
    if (node.filter) {
      List kept;
      for (const Value& item : items) {
        scopes_.emplace_back();
        bind(node.targets, item);
        const bool keep = eval(*node.filter).truthy();
        scopes_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    const int64_t n = static_cast<int64_t>(items.size());
    for (int64_t i = 0; i < n; ++i) {
      Dict loop;
      loop.set("index", Value::integer(i + 1));
      loop.set("index0", Value::integer(i));
      loop.set("revindex", Value::integer(n - i));
      loop.set("revindex0", Value::integer(n - i - 1));
      loop.set("first", Value::boolean(i == 0));
      loop.set("last", Value::boolean(i == n - 1));
      loop.set("length", Value::integer(n));
      loop.set("depth", Value::integer(1));
      loop.set("depth0", Value::integer(0));
      if (i > 0) loop.set("previtem", items[i - 1]);
      if (i + 1 < n) loop.set("nextitem", items[i + 1]);
      scopes_.emplace_back();
      scopes_.back().set("loop", Value::dict(std::move(loop)));
      bind(node.targets, items[i]);
      const Flow flow = exec(node.body, out);
      scopes_.pop_back();
      if (flow == Flow::kBreak) break;
    }
    if (n == 0) exec(node.else_body, out);
  }

  Args eval_args(const Expr& e, size_t first) {
    Args args;
    for (size_t i = first; i < e.children.size(); ++i)
      args.positional.push_back(eval(*e.children[i]));
    for (const auto& [k, v] : e.kwargs) args.keyword.emplace_back(k, eval(*v));
    return args;
  }

  Value eval(const Expr& e) {
    line_ = e.line;
    switch (e.kind) {
      case Expr::Kind::kLiteral:
        return e.value;
      case Expr::Kind::kName:
        return lookup(e.name);
      case Expr::Kind::kList: {
        List items;
        for (const auto& child : e.children) items.push_back(eval(*child));
        return Value::list(std::move(items), e.tuple);
      }
      case Expr::Kind::kDict: {
        Dict d;
        for (size_t i = 0; i + 1 < e.children.size(); i += 2) {
          Value key = eval(*e.children[i]);
          if (!key.is_string()) raise("only string keys are supported in dict literals");
          d.set(key.as_string(), eval(*e.children[i + 1]));
        }
        return Value::dict(std::move(d));
      }
      case Expr::Kind::kGetAttr:
        return get_attr(eval(*e.children[0]), e.name);
      case Expr::Kind::kGetItem: {
        Value obj = eval(*e.children[0]);
        return get_item(obj, eval(*e.children[1]));
      }
      case Expr::Kind::kSlice: {
        Value obj = eval(*e.children[0]);
        Value parts[3];
        for (int i = 0; i < 3; ++i) {
          parts[i] = e.children[i + 1] ? eval(*e.children[i + 1]) : Value::none();
        }
        line_ = e.line;
        return slice(obj, parts[0], parts[1], parts[2]);
      }
      case Expr::Kind::kCall: {
        Value callee = eval(*e.children[0]);
        Args args = eval_args(e, 1);
        line_ = e.line;
        if (callee.is_undefined()) raise_undefined(callee);
        if (callee.kind() != Value::Kind::kCallable) {
          raise(absl::StrCat("'", callee.type_name(), "' object is not callable"));
        }
        return call_function(callee, args);
      }
      case Expr::Kind::kFilter: {
        Value subject = eval(*e.children[0]);
        Args args = eval_args(e, 1);
        line_ = e.line;
        return apply_filter(e.name, subject, args);
      }
      case Expr::Kind::kTest: {
        Value subject = eval(*e.children[0]);
        Args args = eval_args(e, 1);
        line_ = e.line;
        return Value::boolean(apply_test(e.name, subject, args) != e.negated);
      }
      case Expr::Kind::kNeg:
      case Expr::Kind::kPos: {
        Value v = eval(*e.children[0]);
        if (v.is_undefined()) raise_undefined(v);
        if (!v.is_number())
          raise(absl::StrCat("bad operand type for unary -: '", v.type_name(), "'"));
        if (e.kind == Expr::Kind::kPos)
          return v.kind() == Value::Kind::kBool ? Value::integer(v.as_int()) : v;
        return v.kind() == Value::Kind::kFloat ? Value::floating(-v.as_float())
                                               : Value::integer(-v.as_int());
      }
      case Expr::Kind::kNot:
        return Value::boolean(!eval(*e.children[0]).truthy());
      case Expr::Kind::kAnd: {
        Value left = eval(*e.children[0]);
        return left.truthy() ? eval(*e.children[1]) : left;
      }
      case Expr::Kind::kOr: {
        Value left = eval(*e.children[0]);
        return left.truthy() ? left : eval(*e.children[1]);
      }
      case Expr::Kind::kBinary: {
        Value a = eval(*e.children[0]);
        Value b = eval(*e.children[1]);
        line_ = e.line;
        if (e.name == "~") return Value::string(to_str(a) + to_str(b));
        return arithmetic(e.name, a, b);
      }
      case Expr::Kind::kCompare: {
        Value left = eval(*e.children[0]);
        for (size_t i = 0; i < e.ops.size(); ++i) {
          Value right = eval(*e.children[i + 1]);
          line_ = e.line;
          if (!compare(e.ops[i], left, right)) return Value::boolean(false);
          left = std::move(right);
        }
        return Value::boolean(true);
      }
      case Expr::Kind::kCondExpr:
        if (eval(*e.children[0]).truthy()) return eval(*e.children[1]);
        return e.children[2] ? eval(*e.children[2])
                             : Value::undefined(
                                   "the inline if-expression evaluated to false and "
                                   "no else section was defined.");
    }
    return Value();
  }

  const Program& program_;
  std::vector<Dict> scopes_;
  int line_ = 0;
};

}  // namespace

absl::StatusOr<std::string> render_template(const Program& program, const Dict& variables) {
  return Renderer(program, variables).run();
}

}  // namespace megaserve::engine::jinja
