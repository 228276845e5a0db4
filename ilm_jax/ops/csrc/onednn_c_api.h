// The few declarations of oneDNN's C API (v3.x, dnnl.h) that
// onednn_matmul.cc uses. oneDNN keeps its C API and ABI stable within a
// major version, so these match every libdnnl.so.3 (the pip wheels ship the
// library without headers, or with headers that pull in a SYCL runtime).
// Values checked against oneDNN 3.13's dnnl_common_types.h / dnnl_types.h.
#ifndef ILM_JAX_OPS_CSRC_ONEDNN_C_API_H_
#define ILM_JAX_OPS_CSRC_ONEDNN_C_API_H_

#include <cstddef>
#include <cstdint>

extern "C" {

typedef enum { dnnl_success = 0 } dnnl_status_t;
typedef enum { dnnl_f16 = 1, dnnl_bf16 = 2, dnnl_f32 = 3 } dnnl_data_type_t;
typedef enum { dnnl_any_engine = 0, dnnl_cpu = 1 } dnnl_engine_kind_t;
enum { dnnl_stream_default_flags = 0x1U };

#define DNNL_MAX_NDIMS 12
typedef int64_t dnnl_dim_t;
typedef dnnl_dim_t dnnl_dims_t[DNNL_MAX_NDIMS];

#define DNNL_ARG_SRC 1
#define DNNL_ARG_DST 17
#define DNNL_ARG_WEIGHTS 33

typedef struct dnnl_engine* dnnl_engine_t;
typedef struct dnnl_stream* dnnl_stream_t;
typedef struct dnnl_memory_desc* dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc* const_dnnl_memory_desc_t;
typedef struct dnnl_memory* dnnl_memory_t;
typedef struct dnnl_primitive_desc* dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc* const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive* dnnl_primitive_t;
typedef const struct dnnl_primitive* const_dnnl_primitive_t;
typedef const struct dnnl_primitive_attr* const_dnnl_primitive_attr_t;

typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;

typedef struct {
  int major;
  int minor;
  int patch;
  const char* hash;
  unsigned cpu_runtime;
  unsigned gpu_runtime;
} dnnl_version_t;

dnnl_status_t dnnl_engine_create(dnnl_engine_t* engine,
                                 dnnl_engine_kind_t kind, size_t index);
dnnl_status_t dnnl_stream_create(dnnl_stream_t* stream, dnnl_engine_t engine,
                                 unsigned flags);
dnnl_status_t dnnl_stream_wait(dnnl_stream_t stream);
dnnl_status_t dnnl_memory_desc_create_with_strides(
    dnnl_memory_desc_t* memory_desc, int ndims, const dnnl_dims_t dims,
    dnnl_data_type_t data_type, const dnnl_dims_t strides);
dnnl_status_t dnnl_memory_desc_destroy(dnnl_memory_desc_t memory_desc);
dnnl_status_t dnnl_memory_create(dnnl_memory_t* memory,
                                 const_dnnl_memory_desc_t memory_desc,
                                 dnnl_engine_t engine, void* handle);
dnnl_status_t dnnl_memory_destroy(dnnl_memory_t memory);
dnnl_status_t dnnl_matmul_primitive_desc_create(
    dnnl_primitive_desc_t* primitive_desc, dnnl_engine_t engine,
    const_dnnl_memory_desc_t src_desc, const_dnnl_memory_desc_t weights_desc,
    const_dnnl_memory_desc_t bias_desc, const_dnnl_memory_desc_t dst_desc,
    const_dnnl_primitive_attr_t attr);
dnnl_status_t dnnl_primitive_desc_destroy(dnnl_primitive_desc_t desc);
dnnl_status_t dnnl_primitive_create(dnnl_primitive_t* primitive,
                                    const_dnnl_primitive_desc_t desc);
dnnl_status_t dnnl_primitive_execute(const_dnnl_primitive_t primitive,
                                     dnnl_stream_t stream, int nargs,
                                     const dnnl_exec_arg_t* args);
const dnnl_version_t* dnnl_version(void);

}  // extern "C"

#endif  // ILM_JAX_OPS_CSRC_ONEDNN_C_API_H_
