// oneDNN 3.x convolution and max-pool kernels for VehicleNet inference on x86-64 CPUs,
// called by MindSpore as AOT custom operators (see vehiclenet/cpu_kernels.py).
//
// Why: MindSpore 2.8.0's CPU Conv2D hands its bundled oneDNN 2.2 plain NCHW tensors, which
// selects the im2col + GEMM path. oneDNN 3.x's brgemm convolutions on channels-last (NHWC)
// tensors run the same convolutions about 1.5x faster on AVX-512 machines. Activations stay
// NHWC between these kernels, so the only layout changes are the input and the pooled output.
//
// Every entry point has MindSpore's AOT signature; a non-zero return makes MindSpore raise.
// Padding follows MindSpore's pad_mode="same": out = ceil(in / stride), and the odd pixel of
// padding goes after the image (bottom/right), as the published network was trained.
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

using dnnl::memory;
using tag = memory::format_tag;
using dt = memory::data_type;

dnnl::engine &cpu_engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One lock for all kernels: plans share reordered-weight buffers and oneDNN's OpenMP team
// already uses every core, so two kernels running at once would only contend.
std::mutex &kernel_mutex() {
  static std::mutex mutex;
  return mutex;
}

int fail(const char *what) {
  std::fprintf(stderr, "vehiclenet cpu kernel: %s\n", what);
  return 1;
}

void same_padding(int64_t in, int64_t kernel, int64_t stride, int64_t out, int64_t *before, int64_t *after) {
  int64_t total = std::max<int64_t>((out - 1) * stride + kernel - in, 0);
  *before = total / 2;
  *after = total - *before;
}

bool is_f32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }

struct ConvPlan {
  dnnl::convolution_forward conv;
  memory::desc src, user_weights, weights, scales, bias, dst, residual;
  dnnl::reorder weights_reorder;
  std::unique_ptr<memory> weights_buffer;
  memory::desc scratchpad;
  std::vector<uint8_t> scratch;
  std::string implementation;
};

struct PoolPlan {
  dnnl::pooling_forward pool;
  memory::desc src, dst, scratchpad;
  std::vector<uint8_t> scratch;
};

std::string key_of(const std::vector<int64_t> &values) {
  std::string key;
  for (int64_t v : values) key += std::to_string(v) + ",";
  return key;
}

// Plans are built once per shape (53 convolutions of a ResNet-50 have 24 distinct shapes).
ConvPlan &conv_plan(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                    int64_t oh, int64_t ow, bool relu, bool residual) {
  static std::unordered_map<std::string, std::unique_ptr<ConvPlan>> plans;
  std::string key = key_of({n, h, w, cin, cout, k, stride, oh, ow, relu, residual});
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;

  auto plan = std::make_unique<ConvPlan>();
  int64_t top, bottom, left, right;
  same_padding(h, k, stride, oh, &top, &bottom);
  same_padding(w, k, stride, ow, &left, &right);
  // Logical dims are always NCHW in oneDNN; the tag says how they sit in memory.
  plan->src = memory::desc({n, cin, h, w}, dt::f32, tag::nhwc);
  plan->dst = memory::desc({n, cout, oh, ow}, dt::f32, tag::nhwc);
  plan->user_weights = memory::desc({cout, cin, k, k}, dt::f32, tag::oihw);
  plan->bias = memory::desc({cout}, dt::f32, tag::x);
  plan->scales = plan->bias;
  plan->residual = plan->dst;
  memory::desc any_weights({cout, cin, k, k}, dt::f32, tag::any);

  dnnl::post_ops post;
  if (residual) post.append_binary(dnnl::algorithm::binary_add, plan->residual);
  if (relu) post.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(post);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  dnnl::convolution_forward::primitive_desc pd(
      cpu_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, plan->src,
      any_weights, plan->bias, plan->dst, {stride, stride}, {top, left}, {bottom, right}, attr);
  plan->conv = dnnl::convolution_forward(pd);
  plan->implementation = pd.impl_info_str();
  plan->weights = pd.weights_desc();
  plan->scratchpad = pd.scratchpad_desc();
  plan->scratch.resize(plan->scratchpad.get_size());
  // The reorder into the convolution's weight layout also multiplies each output channel by
  // its BatchNorm scale, so folding BatchNorm costs no extra pass over the weights.
  dnnl::primitive_attr scaling;
  scaling.set_scales_mask(DNNL_ARG_SRC, 1 << 0);
  plan->weights_buffer = std::make_unique<memory>(plan->weights, cpu_engine());
  plan->weights_reorder = dnnl::reorder(
      dnnl::reorder::primitive_desc(cpu_engine(), plan->user_weights, cpu_engine(), plan->weights, scaling));
  return *plans.emplace(key, std::move(plan)).first->second;
}

// Shared body of the convolution entry points. Inputs: x (N, H, W, Cin) NHWC, weights
// (Cout, Cin, K, K), scale (Cout), bias (Cout), [residual (N, OH, OW, Cout) NHWC]; output
// (N, OH, OW, Cout) NHWC. Computes relu?(conv(x, weights * scale) + bias [+ residual]).
// Stride and ReLU are part of the entry point's name: MindSpore's PyNative mode caches output
// shapes per operator name, so two strides must not share one.
int run_conv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int64_t stride, bool relu,
             bool residual) {
  const int inputs = residual ? 5 : 4;
  if (nparam != inputs + 1) return fail("convolution: wrong number of inputs");
  const int out = inputs;
  for (int i = 0; i < inputs; i++) {
    if (!is_f32(dtypes[i])) return fail("convolution: tensors must be float32");
  }
  if (!is_f32(dtypes[out])) return fail("convolution: output must be float32");
  if (ndims[0] != 4 || ndims[1] != 4 || ndims[2] != 1 || ndims[3] != 1 || ndims[out] != 4 || (residual && ndims[4] != 4))
    return fail("convolution: unexpected tensor ranks");
  const int64_t *x = shapes[0], *wt = shapes[1], *y = shapes[out];
  if (wt[1] != x[3] || wt[2] != wt[3] || shapes[2][0] != wt[0] || shapes[3][0] != wt[0] || y[3] != wt[0] || y[0] != x[0] || stride < 1 ||
      y[1] != (x[1] + stride - 1) / stride || y[2] != (x[2] + stride - 1) / stride)
  {
    char message[256];
    std::snprintf(message, sizeof(message),
                  "convolution: shapes do not match: x %ldx%ldx%ldx%ld, weights %ldx%ldx%ldx%ld, stride %ld, "
                  "output %ldx%ldx%ldx%ld", (long)x[0], (long)x[1], (long)x[2], (long)x[3], (long)wt[0], (long)wt[1],
                  (long)wt[2], (long)wt[3], (long)stride, (long)y[0], (long)y[1], (long)y[2], (long)y[3]);
    return fail(message);
  }
  if (residual) {
    for (int d = 0; d < 4; d++)
      if (shapes[4][d] != y[d]) return fail("convolution: residual shape differs from the output");
  }
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    ConvPlan &plan = conv_plan(x[0], x[1], x[2], x[3], wt[0], wt[2], stride, y[1], y[2], relu, residual);
    auto &engine = cpu_engine();
    dnnl::stream stream(engine);
    // Weights are reordered on every call rather than cached: a cache keyed on the
    // buffer could not see load_checkpoint() writing new values into the same memory.
    plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, memory(plan.user_weights, engine, params[1])},
                                          {DNNL_ARG_TO, *plan.weights_buffer},
                                          {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, memory(plan.scales, engine, params[2])}});
    std::unordered_map<int, memory> args{
        {DNNL_ARG_SRC, memory(plan.src, engine, params[0])},
        {DNNL_ARG_WEIGHTS, *plan.weights_buffer},
        {DNNL_ARG_BIAS, memory(plan.bias, engine, params[3])},
        {DNNL_ARG_DST, memory(plan.dst, engine, params[out])},
        {DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad, engine, plan.scratch.data())},
    };
    if (residual) args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = memory(plan.residual, engine, params[4]);
    plan.conv.execute(stream, args);
    stream.wait();
  } catch (const dnnl::error &e) {
    return fail(e.what());
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

}  // namespace

extern "C" {

#define VN_CONV(name, stride, relu, residual)                                                                 \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {         \
    return run_conv(nparam, params, ndims, shapes, dtypes, stride, relu, residual);                               \
  }
VN_CONV(VnConvS1, 1, false, false)
VN_CONV(VnConvS1Relu, 1, true, false)
VN_CONV(VnConvS2, 2, false, false)
VN_CONV(VnConvS2Relu, 2, true, false)
VN_CONV(VnConvAddS1Relu, 1, true, true)

// Max-pool 3x3, stride 2, NHWC in and out: x (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C).
// Padding is ignored by the maximum, as in MindSpore's MaxPool with pad_mode="same".
int VnMaxPool3x3S2(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  if (nparam != 2) return fail("max-pool: wrong number of inputs");
  if (!is_f32(dtypes[0]) || !is_f32(dtypes[1]) || ndims[0] != 4 || ndims[1] != 4)
    return fail("max-pool: unexpected tensor types or ranks");
  const int64_t *x = shapes[0], *y = shapes[1];
  const int64_t kernel = 3, stride = 2;
  if (y[0] != x[0] || y[3] != x[3] || y[1] != (x[1] + stride - 1) / stride ||
      y[2] != (x[2] + stride - 1) / stride)
    return fail("max-pool: shapes do not match");
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    static std::unordered_map<std::string, std::unique_ptr<PoolPlan>> plans;
    std::string key = key_of({x[0], x[1], x[2], x[3], kernel, stride});
    auto found = plans.find(key);
    if (found == plans.end()) {
      auto plan = std::make_unique<PoolPlan>();
      int64_t top, bottom, left, right;
      same_padding(x[1], kernel, stride, y[1], &top, &bottom);
      same_padding(x[2], kernel, stride, y[2], &left, &right);
      plan->src = memory::desc({x[0], x[3], x[1], x[2]}, dt::f32, tag::nhwc);
      plan->dst = memory::desc({y[0], y[3], y[1], y[2]}, dt::f32, tag::nhwc);
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      dnnl::pooling_forward::primitive_desc pd(
          cpu_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::pooling_max, plan->src, plan->dst,
          {stride, stride}, {kernel, kernel}, {0, 0}, {top, left}, {bottom, right}, attr);
      plan->pool = dnnl::pooling_forward(pd);
      plan->scratchpad = pd.scratchpad_desc();
      plan->scratch.resize(plan->scratchpad.get_size());
      found = plans.emplace(key, std::move(plan)).first;
    }
    PoolPlan &plan = *found->second;
    auto &engine = cpu_engine();
    dnnl::stream stream(engine);
    plan.pool.execute(stream, {{DNNL_ARG_SRC, memory(plan.src, engine, params[0])},
                               {DNNL_ARG_DST, memory(plan.dst, engine, params[1])},
                               {DNNL_ARG_SCRATCHPAD, memory(plan.scratchpad, engine, plan.scratch.data())}});
    stream.wait();
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// Which oneDNN implementation serves a convolution of this shape (e.g. "brgconv:avx512_core"),
// for benchmarks and tests. Returns 0 and fills `out`, or 1 with the error in `out`.
int VnConvImplementation(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                         char *out, int size) {
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    int64_t oh = (h + stride - 1) / stride, ow = (w + stride - 1) / stride;
    ConvPlan &plan = conv_plan(n, h, w, cin, cout, k, stride, oh, ow, true, false);
    std::snprintf(out, size, "%s", plan.implementation.c_str());
  } catch (const std::exception &e) {
    std::snprintf(out, size, "%s", e.what());
    return 1;
  }
  return 0;
}

}  // extern "C"
