// The C++ tests' checks: each counts a pass or prints what failed; `report()` prints the counts and
// gives main's exit code (0 when nothing failed).
#pragma once

#include <ATen/ATen.h>

#include <cstdio>

namespace marn_fast_test {

inline int failures = 0;
inline int passes = 0;

inline void expect(bool ok, const char* what) {
  if (ok) {
    ++passes;
  } else {
    ++failures;
    std::printf("FAIL %s\n", what);
  }
}

// Same shape and max |got − want| ≤ tol.
inline void expect_close(const at::Tensor& got, const at::Tensor& want, double tol, const char* what) {
  const bool same_shape = got.sizes() == want.sizes();
  const double err = same_shape ? (got - want).abs().max().item<double>() : -1.0;
  if (!(same_shape && err <= tol)) std::printf("  (%s: max abs error %g > %g, or shapes differ)\n", what, err, tol);
  expect(same_shape && err <= tol, what);
}

// f() throws a c10::Error (a TORCH_CHECK refused its input).
template <typename F>
void expect_throws(const F& f, const char* what) {
  bool raised = false;
  try {
    f();
  } catch (const c10::Error&) {
    raised = true;
  }
  if (!raised) std::printf("  (%s: accepted)\n", what);
  expect(raised, what);
}

inline int report() {
  std::printf("%d passed, %d failed\n", passes, failures);
  return failures == 0 ? 0 : 1;
}

}  // namespace marn_fast_test
