// Argument checks shared by the CPU and CUDA kernels (ATen only): TORCH_CHECK with the argument named.
#pragma once
#include <ATen/ATen.h>

namespace marn_fast {

inline void check_same_layout(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name,
                              const char* op) {
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", a_name, " and ", b_name, " must have the same shape, got ",
              a_name, " ", a.sizes(), " and ", b_name, " ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": ", a_name, " and ", b_name,
              " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(a.device() == b.device(), op, ": ", a_name, " and ", b_name, " must be on one device, got ",
              a.device(), " and ", b.device());
  TORCH_CHECK(at::isFloatingType(a.scalar_type()), op, ": ", a_name, " must be floating point, got ",
              a.scalar_type());
}

}  // namespace marn_fast
