// C++ test of the build identity (csrc/build_identity.h) through the dispatcher: the library built by
// CMakeLists.txt carries the source fingerprint it computed and the torch version it compiled against.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/version.h>

#include <cctype>
#include <cstdio>
#include <string>

#include "expect.h"

int main() {
  using namespace marn_fast_test;
  const std::string identity =
      c10::Dispatcher::singleton().findSchemaOrThrow("marn_fast::build_identity", "").typed<std::string()>().call();
  std::printf("build identity: %s\n", identity.c_str());
  const std::string suffix = std::string("+torch-") + TORCH_VERSION;
  expect(identity.rfind("src-", 0) == 0, "starts with src-");
  expect(identity.size() == 4 + 16 + suffix.size(), "src- + 16 hex digits + the torch suffix");
  bool hex = identity.size() >= 20;
  for (size_t i = 4; hex && i < 20; ++i) hex = std::isxdigit(static_cast<unsigned char>(identity[i])) != 0;
  expect(hex, "a fingerprint of 16 hex digits (not src-unknown)");
  expect(identity.size() >= suffix.size() && identity.compare(identity.size() - suffix.size(), suffix.size(), suffix) == 0,
         "ends with the torch version it was built against");
  return report();
}
