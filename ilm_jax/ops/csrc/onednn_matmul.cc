// XLA FFI custom call: a dense matmul through oneDNN's matmul primitive.
//
//   y[M, N] = x[M, K] @ w[K, N]        (transpose_w = false)
//   y[M, N] = x[M, K] @ w[N, K]^T      (transpose_w = true: the backward
//                                       dx = dy @ W^T of a frozen W[K, N])
//
// x and w: both bf16 or both f32; y: f32 or bf16, from the result buffer's
// type. With bf16 operands oneDNN picks its AMX kernels (brg:avx512_core_amx)
// or AVX512-BF16 ones (brg:avx512_core_bf16) where the CPU has them;
// ONEDNN_VERBOSE=1 prints which. Both operands are read in place (the
// transpose is a stride), nothing is copied. Primitives are created once per
// (shape, transpose, types) and cached; executing a primitive is thread-safe.
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "onednn_c_api.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, bool, int, int>;

struct Cached {
  dnnl_primitive_t primitive = nullptr;
  dnnl_memory_desc_t src = nullptr, wei = nullptr, dst = nullptr;
};

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    if (dnnl_engine_create(&e, dnnl_cpu, 0) != dnnl_success) e = nullptr;
    return e;
  }();
  return engine;
}

bool ToDnnl(ffi::DataType t, dnnl_data_type_t* out) {
  switch (t) {
    case ffi::DataType::BF16:
      *out = dnnl_bf16;
      return true;
    case ffi::DataType::F32:
      *out = dnnl_f32;
      return true;
    default:
      return false;
  }
}

// Returns nullptr (and a reason) when oneDNN rejects the problem.
const Cached* GetPrimitive(int64_t m, int64_t k, int64_t n, bool transpose_w,
                           dnnl_data_type_t in_dt, dnnl_data_type_t out_dt,
                           std::string* error) {
  static std::mutex mu;
  static auto* cache = new std::map<Key, Cached>();
  const Key key{m, k, n, transpose_w, in_dt, out_dt};
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache->find(key);
  if (it != cache->end()) return &it->second;
  Cached c;
  dnnl_dims_t src_dims = {m, k}, src_strides = {k, 1};
  // w is [K, N] row-major, or [N, K] row-major read as its transpose.
  dnnl_dims_t wei_dims = {k, n};
  dnnl_dims_t wei_strides = {transpose_w ? 1 : n, transpose_w ? k : 1};
  dnnl_dims_t dst_dims = {m, n}, dst_strides = {n, 1};
  if (dnnl_memory_desc_create_with_strides(&c.src, 2, src_dims, in_dt,
                                           src_strides) != dnnl_success ||
      dnnl_memory_desc_create_with_strides(&c.wei, 2, wei_dims, in_dt,
                                           wei_strides) != dnnl_success ||
      dnnl_memory_desc_create_with_strides(&c.dst, 2, dst_dims, out_dt,
                                           dst_strides) != dnnl_success) {
    *error = "memory descriptor";
    return nullptr;
  }
  dnnl_primitive_desc_t pd = nullptr;
  if (dnnl_matmul_primitive_desc_create(&pd, Engine(), c.src, c.wei, nullptr,
                                        c.dst, nullptr) != dnnl_success) {
    *error = "no matmul implementation for these types on this CPU";
    return nullptr;
  }
  const bool ok = dnnl_primitive_create(&c.primitive, pd) == dnnl_success;
  dnnl_primitive_desc_destroy(pd);
  if (!ok) {
    *error = "primitive creation";
    return nullptr;
  }
  return &cache->emplace(key, c).first->second;
}

struct Stream {
  dnnl_stream_t stream = nullptr;
  Stream() { dnnl_stream_create(&stream, Engine(), dnnl_stream_default_flags); }
};

ffi::Error MatmulImpl(ffi::AnyBuffer x, ffi::AnyBuffer w,
                      ffi::Result<ffi::AnyBuffer> y, bool transpose_w) {
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  auto yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 2 || yd.size() != 2) {
    return ffi::Error::InvalidArgument("onednn_matmul: operands must be 2-D");
  }
  const int64_t m = xd[0], k = xd[1];
  const int64_t n = transpose_w ? wd[0] : wd[1];
  const int64_t wk = transpose_w ? wd[1] : wd[0];
  if (wk != k || yd[0] != m || yd[1] != n) {
    return ffi::Error::InvalidArgument("onednn_matmul: shape mismatch");
  }
  dnnl_data_type_t in_dt, w_dt, out_dt;
  if (!ToDnnl(x.element_type(), &in_dt) || !ToDnnl(w.element_type(), &w_dt) ||
      !ToDnnl(y->element_type(), &out_dt) || in_dt != w_dt) {
    return ffi::Error::InvalidArgument(
        "onednn_matmul: x and w must both be bf16 or both f32; y f32 or bf16");
  }
  if (m == 0 || n == 0) return ffi::Error::Success();
  if (Engine() == nullptr) {
    return ffi::Error::Internal("onednn_matmul: no oneDNN CPU engine");
  }
  std::string error;
  const Cached* c = GetPrimitive(m, k, n, transpose_w, in_dt, out_dt, &error);
  if (c == nullptr) return ffi::Error::Internal("onednn_matmul: " + error);
  thread_local Stream stream;
  dnnl_memory_t src = nullptr, wei = nullptr, dst = nullptr;
  bool ok =
      dnnl_memory_create(&src, c->src, Engine(), x.untyped_data()) ==
          dnnl_success &&
      dnnl_memory_create(&wei, c->wei, Engine(), w.untyped_data()) ==
          dnnl_success &&
      dnnl_memory_create(&dst, c->dst, Engine(), y->untyped_data()) ==
          dnnl_success;
  if (ok) {
    const dnnl_exec_arg_t args[] = {
        {DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
    ok = dnnl_primitive_execute(c->primitive, stream.stream, 3, args) ==
             dnnl_success &&
         dnnl_stream_wait(stream.stream) == dnnl_success;
  }
  for (dnnl_memory_t mem : {src, wei, dst}) {
    if (mem != nullptr) dnnl_memory_destroy(mem);
  }
  if (!ok) return ffi::Error::Internal("onednn_matmul: execution failed");
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(IlmOnednnMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<bool>("transpose_w"));

// The oneDNN version actually loaded, major * 10000 + minor * 100 + patch.
extern "C" int IlmOnednnVersion() {
  const dnnl_version_t* v = dnnl_version();
  return v->major * 10000 + v->minor * 100 + v->patch;
}
