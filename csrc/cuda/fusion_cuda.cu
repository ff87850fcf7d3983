// CUDA kernels of the RAM elementwise fusions (ATen headers only; fp32 math for half/bf16 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../tensor_checks.h"

#include <tuple>

namespace marn_fast {
namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void mul_tanh_kernel(const scalar_t* __restrict__ u, const scalar_t* __restrict__ h,
                                scalar_t* __restrict__ out, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    out[i] = static_cast<scalar_t>(tanh(static_cast<opmath_t>(u[i]) * static_cast<opmath_t>(h[i])));
  }
}

template <typename scalar_t>
__global__ void mul_tanh_backward_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ u,
                                         const scalar_t* __restrict__ h, scalar_t* __restrict__ du,
                                         scalar_t* __restrict__ dh, int64_t n) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const opmath_t uu = u[i], hh = h[i];
    const opmath_t t = tanh(uu * hh);
    const opmath_t dz = static_cast<opmath_t>(g[i]) * (opmath_t(1) - t * t);
    du[i] = static_cast<scalar_t>(dz * hh);
    dh[i] = static_cast<scalar_t>(dz * uu);
  }
}

int blocks_for(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(wanted, 1), 65535));
}

at::Tensor mul_tanh_cuda(const at::Tensor& u_in, const at::Tensor& h_in) {
  check_same_layout(u_in, "u", h_in, "h", "marn_fast::mul_tanh");
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor u = u_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  at::Tensor out = at::empty_like(u);
  const int64_t n = u.numel();
  if (n == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "mul_tanh_cuda", [&] {
    mul_tanh_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        u.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> mul_tanh_backward_cuda(const at::Tensor& grad_in, const at::Tensor& u_in,
                                                          const at::Tensor& h_in) {
  check_same_layout(u_in, "u", h_in, "h", "marn_fast::mul_tanh_backward");
  TORCH_CHECK(grad_in.sizes() == u_in.sizes(), "marn_fast::mul_tanh_backward: grad must have u's shape ",
              u_in.sizes(), ", got ", grad_in.sizes());
  TORCH_CHECK(grad_in.device() == u_in.device(), "marn_fast::mul_tanh_backward: grad must be on u's device ",
              u_in.device(), ", got ", grad_in.device());
  const c10::cuda::CUDAGuard guard(u_in.device());
  const at::Tensor g = grad_in.to(u_in.scalar_type()).contiguous();
  const at::Tensor u = u_in.contiguous();
  const at::Tensor h = h_in.contiguous();
  at::Tensor du = at::empty_like(u);
  at::Tensor dh = at::empty_like(h);
  const int64_t n = u.numel();
  if (n == 0) return {du, dh};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, u.scalar_type(), "mul_tanh_backward_cuda", [&] {
    mul_tanh_backward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), u.const_data_ptr<scalar_t>(), h.const_data_ptr<scalar_t>(),
        du.mutable_data_ptr<scalar_t>(), dh.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {du, dh};
}

}  // namespace

TORCH_LIBRARY_IMPL(marn_fast, CUDA, m) {
  m.impl("mul_tanh", &mul_tanh_cuda);
  m.impl("mul_tanh_backward", &mul_tanh_backward_cuda);
}

}  // namespace marn_fast
