// Each opcode's arguments as named fields, written once from the typed *Args views of isa.h:
// the step printer (describe_instruction) and the Chrome trace writer (engine/step_trace.cc)
// both format these, so an op's arguments read the same everywhere.
#pragma once

#include <string>
#include <vector>

#include "engine/isa/isa.h"

namespace megaserve::engine::isa {

struct ArgField {
  const char* name;
  int32_t begin;
  int32_t end;  // a half-open range [begin, end); for a single value, end == begin
  bool range;
};

std::vector<ArgField> arg_fields(const Instruction& inst);

// "rows [0,4) heads [0,2)"
std::string args_text(const Instruction& inst);
// "\"rows\":\"[0,4)\",\"heads\":\"[0,2)\"" (a JSON object's members, without braces)
std::string args_json(const Instruction& inst);

}  // namespace megaserve::engine::isa
