// The built-in demo model that the server serves when no --model is given: a small Llama
// configuration (configs/demo/config.json, dummy weights) and a sentencepiece tokenizer
// trained at build time from the project's own documentation (docs/).
#pragma once

#include <filesystem>

namespace megaserve::engine {

// The folder holding the demo's config.json and tokenizer.model. Looked for, in order, in
//   1. $MEGASERVE_DEMO_DIR, when set and non-empty (taken as given, even if incomplete,
//      so that a wrong setting shows up as a load error rather than being ignored);
//   2. <folder of the running binary>/../share/megaserve/demo (an installed tree);
//   3. the build tree's demo folder (running from the build directory).
// Candidates 2 and 3 are taken only if they contain both files. Returns an empty path when
// none does.
std::filesystem::path demo_model_dir();

}  // namespace megaserve::engine
