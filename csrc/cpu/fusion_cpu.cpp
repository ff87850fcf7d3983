// CPU kernels of the RAM elementwise fusions (ATen only; vectorised loops under at::parallel_for).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../tensor_checks.h"

#include <cmath>
#include <tuple>

namespace marn_fast {
namespace {

constexpr int64_t kGrain = 1 << 14;

at::Tensor mul_tanh_cpu(const at::Tensor& u_in, const at::Tensor& h_in) {
  check_same_layout(u_in, "u", h_in, "h", "marn_fast::mul_tanh");
  const at::Tensor u = u_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty_like(u);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "mul_tanh_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* ph = h.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, u.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        po[i] = static_cast<scalar_t>(std::tanh(static_cast<opmath_t>(pu[i]) * static_cast<opmath_t>(ph[i])));
      }
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mul_tanh_backward_cpu(const at::Tensor& grad_in, const at::Tensor& u_in,
                                                         const at::Tensor& h_in) {
  check_same_layout(u_in, "u", h_in, "h", "marn_fast::mul_tanh_backward");
  TORCH_CHECK(grad_in.sizes() == u_in.sizes(), "marn_fast::mul_tanh_backward: grad must have u's shape ",
              u_in.sizes(), ", got ", grad_in.sizes());
  const at::Tensor g = grad_in.to(u_in.scalar_type()).contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  at::Tensor du = at::empty_like(u);
  at::Tensor dh = at::empty_like(h);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "mul_tanh_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const scalar_t* pu = u.const_data_ptr<scalar_t>();
    const scalar_t* ph = h.const_data_ptr<scalar_t>();
    scalar_t* pdu = du.mutable_data_ptr<scalar_t>();
    scalar_t* pdh = dh.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, u.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const opmath_t uu = pu[i], hh = ph[i];
        const opmath_t t = std::tanh(uu * hh);
        const opmath_t dz = static_cast<opmath_t>(pg[i]) * (opmath_t(1) - t * t);
        pdu[i] = static_cast<scalar_t>(dz * hh);
        pdh[i] = static_cast<scalar_t>(dz * uu);
      }
    });
  });
  return {du, dh};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CPU, m) {
  m.impl("mul_tanh", &mul_tanh_cpu);
  m.impl("mul_tanh_backward", &mul_tanh_backward_cpu);
}

}  // namespace marn_fast
