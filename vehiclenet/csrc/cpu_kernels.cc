// oneDNN 3.x convolution, batch-norm and max-pool kernels for VehicleNet inference and
// training on x86-64 CPUs, called by MindSpore as AOT custom operators (see
// vehiclenet/model/cpu_kernels.py).
//
// Why: MindSpore 2.8.0's CPU Conv2D hands its bundled oneDNN 2.2 plain NCHW tensors, which
// selects the im2col + GEMM path. oneDNN 3.x's brgemm convolutions on channels-last (NHWC)
// tensors run the same convolutions about 1.5x faster on AVX-512 machines. Activations stay
// NHWC between these kernels, so the only layout changes are the input and the pooled output.
//
// Every entry point has MindSpore's AOT signature; a non-zero return makes MindSpore raise.
// Padding follows MindSpore's pad_mode="same": out = ceil(in / stride), and the odd pixel of
// padding goes after the image (bottom/right), as the published network was trained.
#include <immintrin.h>
#include <oneapi/dnnl/dnnl.hpp>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <list>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
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

// Logical dims are always NCHW in oneDNN; the tag says how they sit in memory.
memory::desc nhwc_desc(int64_t n, int64_t h, int64_t w, int64_t c, dt type = dt::f32, tag layout = tag::nhwc) {
  return memory::desc({n, c, h, w}, type, layout);
}

// Input and output (NHWC) and padding of a convolution or pooling window with "same" padding.
struct Window {
  memory::desc src, dst;
  memory::dims strides, pad_l, pad_r;
};

// `layout` is NHWC for tensors MindSpore sees; the whole-backbone op keeps its own blocked.
Window same_window(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                   dt src_type = dt::f32, dt dst_type = dt::f32, tag layout = tag::nhwc) {
  const int64_t oh = (h + stride - 1) / stride, ow = (w + stride - 1) / stride;
  int64_t top, bottom, left, right;
  same_padding(h, k, stride, oh, &top, &bottom);
  same_padding(w, k, stride, ow, &left, &right);
  return {nhwc_desc(n, h, w, cin, src_type, layout), nhwc_desc(n, oh, ow, cout, dst_type, layout), {stride, stride},
          {top, left}, {bottom, right}};
}

// A convolution's window, plus its weights as MindSpore holds them (OIHW) and with the layout
// left to the primitive (`any`).
struct ConvWindow : Window {
  memory::desc user_weights, any_weights;
};

// In bf16 the convolution computes on bf16 activations and weights (accumulating in f32);
// its output may be bf16 or f32.
ConvWindow conv_window(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                       dt src_type = dt::f32, dt dst_type = dt::f32, tag layout = tag::nhwc) {
  return {same_window(n, h, w, cin, cout, k, stride, src_type, dst_type, layout),
          memory::desc({cout, cin, k, k}, dt::f32, tag::oihw), memory::desc({cout, cin, k, k}, src_type, tag::any)};
}

bool is_f32(const char *dtype) { return std::strcmp(dtype, "float32") == 0; }
bool is_bf16(const char *dtype) { return std::strcmp(dtype, "bfloat16") == 0; }

// An activation's type: float32 or bfloat16; false for anything else.
bool activation_type(const char *dtype, dt *type) {
  if (is_f32(dtype)) return *type = dt::f32, true;
  if (is_bf16(dtype)) return *type = dt::bf16, true;
  return false;
}

// A 64-byte aligned buffer (what oneDNN's kernels prefer).
struct Buffer {
  void *data = nullptr;
  explicit Buffer(size_t bytes) : data(std::aligned_alloc(64, (bytes + 63) / 64 * 64)) {
    if (!data) throw std::bad_alloc();
  }
  ~Buffer() { std::free(data); }
  Buffer(const Buffer &) = delete;
  Buffer &operator=(const Buffer &) = delete;
};

// A user scratchpad big enough for every primitive of one plan.
struct Scratch {
  memory::desc desc;
  std::vector<uint8_t> bytes;
  void fit(const memory::desc &d) {
    if (d.get_size() > bytes.size()) {
      desc = d;
      bytes.resize(d.get_size());
    }
  }
  memory at(const memory::desc &d) { return memory(d, cpu_engine(), bytes.data()); }
};

// 64-bit fingerprints of buffers: every call reads all the network's weights through one (about
// 100 MB in fp32), so it must run at memory speed. `fingerprint` picks the AVX2 version where the
// CPU has it (one choice per process: fingerprints are compared only within it).
uint64_t mix(uint64_t a, uint64_t w) {
  a ^= w;
  a *= 0x9E3779B97F4A7C15ull;
  return a ^ (a >> 29);
}

// Four multiply-xor lanes: portable, about 6 GB/s on weights not in cache.
uint64_t fingerprint_scalar(const void *data, size_t bytes, uint64_t seed) {
  const auto *bytes_in = static_cast<const unsigned char *>(data);
  const size_t words = bytes / 8;
  uint64_t lane[4] = {seed ^ 0x243F6A8885A308D3ull, seed ^ 0x13198A2E03707344ull, seed ^ 0xA4093822299F31D0ull,
                      seed ^ 0x082EFA98EC4E6C89ull};
  size_t i = 0;
  for (; i + 4 <= words; i += 4) {
    uint64_t w[4];
    std::memcpy(w, bytes_in + i * 8, sizeof(w));
    for (int j = 0; j < 4; j++) lane[j] = mix(lane[j], w[j]);
  }
  for (; i < words; i++) {
    uint64_t w;
    std::memcpy(&w, bytes_in + i * 8, 8);
    lane[0] = mix(lane[0], w);
  }
  uint64_t tail = 0;
  std::memcpy(&tail, bytes_in + words * 8, bytes % 8);
  return mix(mix(mix(mix(mix(lane[0], lane[1]), lane[2]), lane[3]), tail), bytes);
}

// Per-stripe keys of the AVX2 fingerprint: 16 stripes of 64 bytes per 1 KiB block, plus the key
// of the scramble after each block (splitmix64 of a constant).
struct StripeKeys {
  alignas(32) uint64_t words[17 * 8];
  StripeKeys() {
    uint64_t x = 0x5851F42D4C957F2Dull;
    for (auto &w : words) {
      uint64_t z = (x += 0x9E3779B97F4A7C15ull);
      z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
      z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
      w = z ^ (z >> 31);
    }
  }
};

__attribute__((target("avx2"))) inline void accumulate_stripe(__m256i *acc, const unsigned char *p,
                                                              const uint64_t *key) {
  for (int h = 0; h < 2; h++) {
    const __m256i d = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p + 32 * h));
    const __m256i dk = _mm256_xor_si256(d, _mm256_load_si256(reinterpret_cast<const __m256i *>(key + 4 * h)));
    const __m256i product = _mm256_mul_epu32(dk, _mm256_srli_epi64(dk, 32));
    acc[h] = _mm256_add_epi64(acc[h], _mm256_add_epi64(product, _mm256_shuffle_epi32(d, 0x4E)));
  }
}

// Eight 64-bit lanes; per 8-byte word w with key k: lane += lo32(w ^ k) * hi32(w ^ k), and the
// neighbouring lane += w (so a change of any one word always changes a lane); after every 1 KiB
// the lanes are scrambled (xor-shift, key, odd multiply: bijective), so the order of blocks counts.
// About 30 GB/s from memory on one core, where the scalar version is compute-bound at 6.
__attribute__((target("avx2"))) uint64_t fingerprint_avx2(const void *data, size_t bytes, uint64_t seed) {
  static const StripeKeys keys;
  const auto *in = static_cast<const unsigned char *>(data);
  __m256i acc[2] = {_mm256_set1_epi64x(static_cast<long long>(seed ^ 0x243F6A8885A308D3ull)),
                    _mm256_set1_epi64x(static_cast<long long>(seed ^ 0x13198A2E03707344ull))};
  const __m256i prime = _mm256_set1_epi64x(0x9E3779B1);
  const size_t blocks = bytes / 1024;
  for (size_t b = 0; b < blocks; b++) {
    const unsigned char *block = in + b * 1024;
    for (int s = 0; s < 16; s++) accumulate_stripe(acc, block + 64 * s, keys.words + 8 * s);
    for (int h = 0; h < 2; h++) {
      __m256i a = _mm256_xor_si256(acc[h], _mm256_srli_epi64(acc[h], 47));
      a = _mm256_xor_si256(a, _mm256_load_si256(reinterpret_cast<const __m256i *>(keys.words + 128 + 4 * h)));
      const __m256i low = _mm256_mul_epu32(a, prime);
      const __m256i high = _mm256_slli_epi64(_mm256_mul_epu32(_mm256_srli_epi64(a, 32), prime), 32);
      acc[h] = _mm256_add_epi64(low, high);
    }
  }
  size_t done = blocks * 1024;
  for (int s = 0; done + 64 <= bytes; s++, done += 64) accumulate_stripe(acc, in + done, keys.words + 8 * s);
  alignas(32) uint64_t lanes[8];
  _mm256_store_si256(reinterpret_cast<__m256i *>(lanes), acc[0]);
  _mm256_store_si256(reinterpret_cast<__m256i *>(lanes + 4), acc[1]);
  uint64_t h = fingerprint_scalar(in + done, bytes - done, seed);
  for (uint64_t lane : lanes) h = mix(h, lane);
  return mix(h, bytes);
}

uint64_t fingerprint(const void *data, size_t bytes, uint64_t seed) {
  static const bool avx2 = __builtin_cpu_supports("avx2");
  return avx2 ? fingerprint_avx2(data, bytes, seed) : fingerprint_scalar(data, bytes, seed);
}

// Reordered (and BatchNorm-scaled) weights of one convolution, kept between calls. They are
// reused only while the fingerprint of the source weights and scales still matches: MindSpore
// writes new values into the same buffer (load_param_into_net, set_data, an optimizer step)
// without telling anyone, so the values themselves decide.
struct PreparedWeights {
  const void *source = nullptr;
  uint64_t fingerprint = 0;
  std::unique_ptr<memory> buffer;
};

// How many times weights were reordered (VnWeightReorders): tests see the cache work.
std::atomic<int64_t> &weight_reorders() {
  static std::atomic<int64_t> count{0};
  return count;
}

// ------------------------------------------------------------------ Winograd F(2x2, 3x3)
// 3x3 stride-1 convolutions as 16 matrix products instead of one direct convolution:
// each 2x2 output tile comes from a 4x4 input tile, transformed (V = B^T d B), multiplied per
// tile position by the transformed weights (U = G g G^T) summed over input channels (one
// oneDNN batched matmul of 16 x (tiles x Cin) @ (Cin x Cout)), transformed back
// (Y = A^T M A) with the bias and ReLU. 2.25x fewer multiplications than the direct
// convolution; on AMD Zen 4 (batch 8, 384x384; interleaved A/B runs against the direct kernel)
// one such convolution took 0.70-0.72x (128 channels), 0.66-0.70x (256) and 0.60x (512) of the
// direct time, the whole fp32 batch 0.89-0.93x. With 64 channels (layer1) the transforms'
// memory traffic left 0.86x (timed in another run) for twice the workspace: not used there. The transforms use only +, - and x0.5; in fp32 the
// results were as close to the exact convolution as the direct kernel's (~5e-7 relative).
// In bf16 (activations, V and U in bf16, the matmul accumulating in f32; only on AVX512-BF16
// without AMX, where it was measured) the whole batch ran 1.05-1.07x as fast (A/B),
// with 4.3e-3 relative error per convolution against the direct bf16 kernel's 2.3e-3.
constexpr int64_t kWinogradMinChannels = 128;

struct WinogradPlan {
  int64_t n, h, w, cin, cout, tiles_h, tiles_w, tiles;
  bool relu;
  bool bf16;  // bf16 activations in and out, V and U in bf16 (the matmul accumulates in f32)
  // Addressing of NHWC or nChw16c activations: a 16-channel block of image i at pixel p is at
  // i * image + block * cblock + p * pixel.
  int64_t in_image, in_block, in_pixel, out_image, out_block, out_pixel;
  dnnl::matmul product;
  memory::desc v, u_user, m;  // (16, tiles, Cin), (16, Cin, Cout) plain, (16, tiles, Cout)
  memory::desc u;             // the matmul's layout of U
  std::string implementation;
  Scratch scratch;
};

// V and M of the convolution running now: shared by all Winograd plans (every kernel call holds
// kernel_mutex), grown to the largest.
struct Workspace {
  float *data = nullptr;
  size_t floats = 0;
  float *fit(size_t want) {
    if (want > floats) {
      std::free(data);
      data = static_cast<float *>(std::aligned_alloc(64, (want * 4 + 63) / 64 * 64));
      if (!data) {
        floats = 0;
        throw std::bad_alloc();
      }
      floats = want;
    }
    return data;
  }
  ~Workspace() { std::free(data); }
};

Workspace &winograd_workspace() {
  static Workspace workspace;
  return workspace;
}

void address(tag layout, int64_t h, int64_t w, int64_t c, int64_t &image, int64_t &block, int64_t &pixel) {
  if (layout == tag::nhwc) image = h * w * c, block = 16, pixel = c;
  else image = c * h * w, block = h * w * 16, pixel = 16;
}

std::unique_ptr<WinogradPlan> winograd_plan(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, bool relu,
                                            tag layout, bool bf16) {
  auto plan = std::make_unique<WinogradPlan>();
  WinogradPlan &p = *plan;
  p.n = n, p.h = h, p.w = w, p.cin = cin, p.cout = cout, p.relu = relu, p.bf16 = bf16;
  const dt operands = bf16 ? dt::bf16 : dt::f32;
  p.tiles_h = (h + 1) / 2, p.tiles_w = (w + 1) / 2, p.tiles = n * p.tiles_h * p.tiles_w;
  address(layout, h, w, cin, p.in_image, p.in_block, p.in_pixel);
  address(layout, h, w, cout, p.out_image, p.out_block, p.out_pixel);
  p.v = memory::desc({16, p.tiles, cin}, operands, tag::abc);
  p.u_user = memory::desc({16, cin, cout}, dt::f32, tag::abc);
  p.m = memory::desc({16, p.tiles, cout}, dt::f32, tag::abc);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(cpu_engine(), p.v, memory::desc({16, cin, cout}, operands, tag::any), p.m, attr);
  p.product = dnnl::matmul(pd);
  p.u = pd.weights_desc();
  p.implementation = std::string("winograd_2x2_3x3+") + pd.impl_info_str();
  p.scratch.fit(pd.scratchpad_desc());
  return plan;
}

// U = G (g * scale) G^T per (output, input) channel pair, as (16, Cin, Cout).
void winograd_weights(const WinogradPlan &p, const float *weights, const float *scales, float *u) {
  const int64_t cin = p.cin, cout = p.cout;
#pragma omp parallel for schedule(static)
  for (int64_t o = 0; o < cout; o++) {
    for (int64_t i = 0; i < cin; i++) {
      const float *g = weights + (o * cin + i) * 9;
      float a[4][3], t[4][4];
      for (int c = 0; c < 3; c++) {
        const float g0 = g[c] * scales[o], g1 = g[3 + c] * scales[o], g2 = g[6 + c] * scales[o];
        a[0][c] = g0, a[1][c] = 0.5f * (g0 + g1 + g2), a[2][c] = 0.5f * (g0 - g1 + g2), a[3][c] = g2;
      }
      for (int r = 0; r < 4; r++) {
        t[r][0] = a[r][0], t[r][1] = 0.5f * (a[r][0] + a[r][1] + a[r][2]);
        t[r][2] = 0.5f * (a[r][0] - a[r][1] + a[r][2]), t[r][3] = a[r][2];
      }
      for (int xi = 0; xi < 16; xi++) u[(xi * cin + i) * cout + o] = t[xi / 4][xi % 4];
    }
  }
}

// 16 channels, one block of nChw16c: GCC/Clang vector arithmetic, compiled per instruction set
// below (target_clones: AVX-512, AVX2 or baseline, chosen once when the library loads).
typedef float Vec16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t Bits16 __attribute__((vector_size(64), aligned(4)));
typedef uint16_t Bf16x16 __attribute__((vector_size(32), aligned(2)));

// By reference: a vector of 64 bytes passed by value would have an ABI of its own per target.
// Always inlined, so each target_clones version below compiles them for its instruction set.
__attribute__((always_inline)) inline void load16(Vec16 &v, const float *p) { std::memcpy(&v, p, sizeof(v)); }
__attribute__((always_inline)) inline void store16(float *p, const Vec16 &v) { std::memcpy(p, &v, sizeof(v)); }
// bf16 is the upper half of a float32; stored rounded to nearest even, as oneDNN rounds.
__attribute__((always_inline)) inline void load16(Vec16 &v, const uint16_t *p) {
  Bf16x16 half;
  std::memcpy(&half, p, sizeof(half));
  const Bits16 bits = __builtin_convertvector(half, Bits16) << 16;
  std::memcpy(&v, &bits, sizeof(v));
}
__attribute__((always_inline)) inline void store16(uint16_t *p, const Vec16 &v) {
  Bits16 bits;
  std::memcpy(&bits, &v, sizeof(bits));
  bits = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  const Bf16x16 half = __builtin_convertvector(bits, Bf16x16);
  std::memcpy(p, &half, sizeof(half));
}

constexpr int64_t kTilesPerTask = 32;

// V = B^T d B for tiles [first, last) (zero outside the image: the "same" padding of 1).
template <class T>
__attribute__((always_inline)) inline void input_tiles(const WinogradPlan &p, const T *x, T *v, int64_t first, int64_t last) {
  const int64_t blocks = p.cin / 16, per_image = p.tiles_h * p.tiles_w, step = p.tiles * p.cin;
  const Vec16 zero = {};
  for (int64_t t = first; t < last; t++) {
    const int64_t image = t / per_image, y0 = (t % per_image) / p.tiles_w * 2 - 1, x0 = t % p.tiles_w * 2 - 1;
    const bool interior = y0 >= 0 && y0 + 4 <= p.h && x0 >= 0 && x0 + 4 <= p.w;
    for (int64_t b = 0; b < blocks; b++) {
      const T *in = x + image * p.in_image + b * p.in_block;
      Vec16 d[4][4];
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) {
          const int64_t yy = y0 + i, xx = x0 + j;
          if (interior || (yy >= 0 && yy < p.h && xx >= 0 && xx < p.w)) load16(d[i][j], in + (yy * p.w + xx) * p.in_pixel);
          else d[i][j] = zero;
        }
      T *out = v + t * p.cin + b * 16;
      for (int i = 0; i < 4; i++) {
        // row i of B^T d, then times B
        Vec16 r[4];
        for (int j = 0; j < 4; j++) {
          r[j] = i == 0 ? d[0][j] - d[2][j] : i == 1 ? d[1][j] + d[2][j] : i == 2 ? d[2][j] - d[1][j] : d[1][j] - d[3][j];
        }
        T *row = out + i * 4 * step;
        const Vec16 v0 = r[0] - r[2], v1 = r[1] + r[2], v2 = r[2] - r[1], v3 = r[1] - r[3];
        store16(row, v0), store16(row + step, v1), store16(row + 2 * step, v2), store16(row + 3 * step, v3);
      }
    }
  }
}

// Y = A^T M A + bias (then ReLU) for tiles [first, last), written where the output has pixels.
template <class T>
__attribute__((always_inline)) inline void output_tiles(const WinogradPlan &p, const float *m, const float *bias, T *y, int64_t first, int64_t last) {
  const int64_t blocks = p.cout / 16, per_image = p.tiles_h * p.tiles_w, step = p.tiles * p.cout;
  const Vec16 zero = {};
  for (int64_t t = first; t < last; t++) {
    const int64_t image = t / per_image, y0 = (t % per_image) / p.tiles_w * 2, x0 = t % p.tiles_w * 2;
    for (int64_t b = 0; b < blocks; b++) {
      const float *in = m + t * p.cout + b * 16;
      Vec16 r[2][4];
      for (int j = 0; j < 4; j++) {
        Vec16 m0, m1, m2, m3;
        load16(m0, in + j * step), load16(m1, in + (4 + j) * step), load16(m2, in + (8 + j) * step);
        load16(m3, in + (12 + j) * step);
        r[0][j] = m0 + m1 + m2;
        r[1][j] = m1 - m2 - m3;
      }
      T *out = y + image * p.out_image + b * p.out_block;
      Vec16 shift;
      load16(shift, bias + b * 16);
      for (int i = 0; i < 2 && y0 + i < p.h; i++) {
        for (int j = 0; j < 2 && x0 + j < p.w; j++) {
          Vec16 value = (j == 0 ? r[i][0] + r[i][1] + r[i][2] : r[i][1] - r[i][2] - r[i][3]) + shift;
          if (p.relu) value = value > zero ? value : zero;
          store16(out + ((y0 + i) * p.w + x0 + j) * p.out_pixel, value);
        }
      }
    }
  }
}

#define VN_TARGETS __attribute__((target_clones("avx512f", "avx2", "default")))
VN_TARGETS void input_tiles_f32(const WinogradPlan &p, const void *x, void *v, int64_t first, int64_t last) {
  input_tiles(p, static_cast<const float *>(x), static_cast<float *>(v), first, last);
}
VN_TARGETS void input_tiles_bf16(const WinogradPlan &p, const void *x, void *v, int64_t first, int64_t last) {
  input_tiles(p, static_cast<const uint16_t *>(x), static_cast<uint16_t *>(v), first, last);
}
VN_TARGETS void output_tiles_f32(const WinogradPlan &p, const float *m, const float *bias, void *y, int64_t first,
                                 int64_t last) {
  output_tiles(p, m, bias, static_cast<float *>(y), first, last);
}
VN_TARGETS void output_tiles_bf16(const WinogradPlan &p, const float *m, const float *bias, void *y, int64_t first,
                                  int64_t last) {
  output_tiles(p, m, bias, static_cast<uint16_t *>(y), first, last);
}
#undef VN_TARGETS

void winograd_execute(WinogradPlan &p, dnnl::stream &stream, const void *x, memory &u, const float *bias, void *y) {
  const size_t v_floats = 16 * p.tiles * p.cin / (p.bf16 ? 2 : 1), m_floats = 16 * p.tiles * p.cout;
  float *v = winograd_workspace().fit(v_floats + m_floats), *m = v + v_floats;
  const int64_t tasks = (p.tiles + kTilesPerTask - 1) / kTilesPerTask;
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; task++) {
    const int64_t first = task * kTilesPerTask, last = std::min(p.tiles, first + kTilesPerTask);
    if (p.bf16) input_tiles_bf16(p, x, v, first, last);
    else input_tiles_f32(p, x, v, first, last);
  }
  p.product.execute(stream, {{DNNL_ARG_SRC, memory(p.v, cpu_engine(), v)},
                             {DNNL_ARG_WEIGHTS, u},
                             {DNNL_ARG_DST, memory(p.m, cpu_engine(), m)},
                             {DNNL_ARG_SCRATCHPAD, p.scratch.at(p.scratch.desc)}});
  stream.wait();
#pragma omp parallel for schedule(static)
  for (int64_t task = 0; task < tasks; task++) {
    const int64_t first = task * kTilesPerTask, last = std::min(p.tiles, first + kTilesPerTask);
    if (p.bf16) output_tiles_bf16(p, m, bias, y, first, last);
    else output_tiles_f32(p, m, bias, y, first, last);
  }
}

struct ConvPlan {
  dnnl::convolution_forward conv;
  memory::desc src, user_src, user_weights, weights, scales, bias, dst, residual;
  dnnl::reorder weights_reorder;
  // Per source buffer, most recently used first. A network has at most 6 convolutions of one
  // shape; the bound keeps two networks' worth and lets nothing grow without limit.
  std::list<PreparedWeights> prepared;
  static constexpr size_t kMaxPrepared = 12;
  // A float32 input to a bf16 convolution is converted into this buffer first.
  dnnl::reorder src_convert;
  std::unique_ptr<memory> src_buffer;
  Scratch scratch;
  std::string implementation;
  std::unique_ptr<WinogradPlan> winograd;  // set: Winograd instead of plan.conv
};

std::string key_of(const std::vector<int64_t> &values) {
  std::string key;
  for (int64_t v : values) key += std::to_string(v) + ",";
  return key;
}

// Pool plans (primitives and scratch only: small) are built once per shape and kept for the process.
template <class Plan>
std::unordered_map<std::string, std::unique_ptr<Plan>> &plan_cache() {
  static std::unordered_map<std::string, std::unique_ptr<Plan>> plans;
  return plans;
}

template <class Plan>
Plan *cached_plan(const std::string &key) {
  auto found = plan_cache<Plan>().find(key);
  return found == plan_cache<Plan>().end() ? nullptr : found->second.get();
}

template <class Plan>
Plan &keep_plan(const std::string &key, std::unique_ptr<Plan> plan) {
  return *plan_cache<Plan>().emplace(key, std::move(plan)).first->second;
}

// Convolution and batch-norm plans hold their own reordered weights and scratch, per input
// shape (a ResNet-50 at one batch and image size: 24 inference convolution plans, ~100 MB
// and more at 384x384; training ~22 convolution and ~15 batch-norm plans), so a process that
// sees many batch sizes or image sizes (an embedding service, a test suite) would keep every
// shape's. Only the most recent are kept: room for a few shapes (or precisions) at once, never
// fewer than one network uses. A plan is used inside one call (under the kernel mutex); the
// whole-backbone plans hold their convolutions' plans themselves (shared), so dropping one
// from here never pulls it from under them.
constexpr size_t kRecentPlans = 96;

template <class Plan>
std::list<std::pair<std::string, std::shared_ptr<Plan>>> &recent_plans() {
  static std::list<std::pair<std::string, std::shared_ptr<Plan>>> plans;
  return plans;
}

template <class Plan>
std::shared_ptr<Plan> recent_plan(const std::string &key) {
  auto &plans = recent_plans<Plan>();
  for (auto it = plans.begin(); it != plans.end(); ++it) {
    if (it->first == key) {
      plans.splice(plans.begin(), plans, it);
      return plans.front().second;
    }
  }
  return nullptr;
}

template <class Plan>
std::shared_ptr<Plan> keep_recent_plan(const std::string &key, std::unique_ptr<Plan> plan) {
  auto &plans = recent_plans<Plan>();
  while (plans.size() >= kRecentPlans) plans.pop_back();
  plans.emplace_front(key, std::shared_ptr<Plan>(std::move(plan)));
  return plans.front().second;
}

// Winograd for fp32 everywhere; for bf16 (activations in and out) only where oneDNN runs
// AVX512-BF16 without AMX, where it was measured: AMX's direct bf16 kernels are another matter.
bool winograd_types(dt src, dt dst, dt user_src) {
  if (src == dt::f32 && dst == dt::f32 && user_src == dt::f32) return true;
  return src == dt::bf16 && dst == dt::bf16 && user_src == dt::bf16 &&
         dnnl::get_effective_cpu_isa() == dnnl::cpu_isa::avx512_core_bf16;
}

// One inference convolution: its shape, what is fused into it and its types. key() names its
// plan: 53 convolutions of a ResNet-50 have 24 distinct shapes.
struct ConvSpec {
  int64_t n, h, w, cin, cout, k, stride;
  bool relu = false;
  bool residual = false;    // a residual tensor added before the ReLU (oneDNN's binary post-op)
  // What the output buffer holds is added before the ReLU (oneDNN's sum post-op): the residual
  // addition in place, without reading another tensor.
  bool accumulate = false;
  bool nchw_input = false;  // the caller's x is NCHW (the image), converted by the plan
  dt src = dt::f32, dst = dt::f32, residual_type = dt::f32;
  dt user_src = dt::undef;  // the caller's x, when not of type `src` (converted first)
  tag layout = tag::nhwc;

  ConvSpec(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride)
      : n(n), h(h), w(w), cin(cin), cout(cout), k(k), stride(stride) {}
  ConvSpec &fused(bool with_relu, bool with_residual, bool accumulating = false) {
    relu = with_relu, residual = with_residual, accumulate = accumulating;
    return *this;
  }
  ConvSpec &types(dt source, dt destination, dt residual_input = dt::f32, dt caller_source = dt::undef) {
    src = source, dst = destination, residual_type = residual_input, user_src = caller_source;
    return *this;
  }
  ConvSpec &input(bool nchw, tag activations) {
    nchw_input = nchw, layout = activations;
    return *this;
  }
  dt user_src_type() const { return user_src == dt::undef ? src : user_src; }
  std::string key() const {
    return key_of({n, h, w, cin, cout, k, stride, relu, residual, static_cast<int64_t>(src), static_cast<int64_t>(dst),
                   static_cast<int64_t>(residual_type), static_cast<int64_t>(user_src_type()), accumulate, nchw_input,
                   static_cast<int64_t>(layout)});
  }
};

// oneDNN 3.2 picks its brgemm kernel first for float32 1x1 convolutions on AVX2 (no AVX-512);
// its jit_1x1 kernel ran each 1x1 shape of the backbone 7-20 % faster there (batch 8, 384x384,
// NHWC, ReLU fused; AMD Zen 4 with oneDNN capped to AVX2, one process timing both), the whole
// batch 1.02-1.06x (medians of 30 interleaved calls, two runs). Elsewhere oneDNN's first choice.
template <class Make>
dnnl::convolution_forward::primitive_desc preferred_inference_conv(const Make &make) {
  dnnl::convolution_forward::primitive_desc first = make();
  if (std::string(first.impl_info_str()) != "brgconv_1x1:avx2") return first;  // not bf16's avx2_vnni_2
  dnnl::convolution_forward::primitive_desc other = make();
  while (other.next_impl())
    if (std::string(other.impl_info_str()) == "jit_1x1:avx2") return other;
  return first;
}

bool winograd_fits(const ConvSpec &s) {
  return s.k == 3 && s.stride == 1 && winograd_types(s.src, s.dst, s.user_src_type()) && !s.residual &&
         !s.accumulate && !s.nchw_input && s.cin % 16 == 0 && s.cout % 16 == 0 && s.cin >= kWinogradMinChannels &&
         (s.layout == tag::nhwc || s.layout == tag::nChw16c);
}

std::shared_ptr<ConvPlan> shared_conv_plan(const ConvSpec &s) {
  const std::string key = s.key();
  if (auto found = recent_plan<ConvPlan>(key)) return found;

  auto plan = std::make_unique<ConvPlan>();
  const ConvWindow window = conv_window(s.n, s.h, s.w, s.cin, s.cout, s.k, s.stride, s.src, s.dst, s.layout);
  // oneDNN's kernels take blocked outputs from NCHW inputs (the stem), not from NHWC ones.
  plan->src = s.nchw_input && s.layout != tag::nhwc ? memory::desc({s.n, s.cin, s.h, s.w}, s.src, tag::nchw)
                                                    : window.src;
  plan->dst = window.dst;
  plan->user_weights = window.user_weights;
  plan->bias = memory::desc({s.cout}, dt::f32, tag::x);
  plan->scales = plan->bias;
  plan->residual = nhwc_desc(window.dst.get_dims()[0], window.dst.get_dims()[2], window.dst.get_dims()[3], s.cout,
                             s.residual_type, s.layout);
  plan->user_src = s.nchw_input ? memory::desc({s.n, s.cin, s.h, s.w}, s.user_src_type(), tag::nchw)
                                : nhwc_desc(s.n, s.h, s.w, s.cin, s.user_src_type(), s.layout);
  if (plan->user_src != plan->src) {
    plan->src_buffer = std::make_unique<memory>(plan->src, cpu_engine());
    plan->src_convert = dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), plan->user_src, cpu_engine(), plan->src));
  }

  if (winograd_fits(s)) {
    plan->winograd = winograd_plan(s.n, s.h, s.w, s.cin, s.cout, s.relu, s.layout, s.src == dt::bf16);
    plan->weights = plan->winograd->u;
    plan->implementation = plan->winograd->implementation;
    plan->weights_reorder =
        dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), plan->winograd->u_user, cpu_engine(), plan->weights));
    return keep_recent_plan(key, std::move(plan));
  }
  dnnl::post_ops post;
  if (s.residual) post.append_binary(dnnl::algorithm::binary_add, plan->residual);
  if (s.accumulate) post.append_sum(1.f);
  if (s.relu) post.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
  dnnl::primitive_attr attr;
  attr.set_post_ops(post);
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  const auto make = [&] {
    return dnnl::convolution_forward::primitive_desc(
        cpu_engine(), dnnl::prop_kind::forward_inference, dnnl::algorithm::convolution_direct, plan->src,
        window.any_weights, plan->bias, plan->dst, window.strides, window.pad_l, window.pad_r, attr);
  };
  const dnnl::convolution_forward::primitive_desc pd = preferred_inference_conv(make);
  plan->conv = dnnl::convolution_forward(pd);
  plan->implementation = pd.impl_info_str();
  plan->weights = pd.weights_desc();
  plan->scratch.fit(pd.scratchpad_desc());
  // The reorder into the convolution's weight layout also multiplies each output channel by
  // its BatchNorm scale, so folding BatchNorm costs no extra pass over the weights.
  dnnl::primitive_attr scaling;
  scaling.set_scales_mask(DNNL_ARG_SRC, 1 << 0);
  plan->weights_reorder = dnnl::reorder(
      dnnl::reorder::primitive_desc(cpu_engine(), plan->user_weights, cpu_engine(), plan->weights, scaling));
  return keep_recent_plan(key, std::move(plan));
}

// The plan of one call's convolution (valid until the next plan is made).
ConvPlan &conv_plan(const ConvSpec &s) { return *shared_conv_plan(s); }

// The fingerprint of one convolution's weights and BatchNorm scales (what its reorder depends on).
uint64_t weights_fingerprint(const ConvPlan &plan, const void *weights, const void *scales) {
  return fingerprint(scales, plan.scales.get_size(), fingerprint(weights, plan.user_weights.get_size(), 0));
}

// The convolution's weights in its layout, scaled by the BatchNorm scales: reordered only when
// these source weights are new to the plan or their values (or the scales) changed (`print`:
// their weights_fingerprint, computed by the caller).
memory &prepared_weights(ConvPlan &plan, dnnl::stream &stream, void *weights, void *scales, uint64_t print) {
  auto entry = std::find_if(plan.prepared.begin(), plan.prepared.end(),
                            [&](const PreparedWeights &p) { return p.source == weights; });
  if (entry != plan.prepared.end()) {
    plan.prepared.splice(plan.prepared.begin(), plan.prepared, entry);  // most recently used first
  } else {
    if (plan.prepared.size() >= ConvPlan::kMaxPrepared) plan.prepared.pop_back();
    plan.prepared.push_front(PreparedWeights{weights, 0, std::make_unique<memory>(plan.weights, cpu_engine())});
  }
  PreparedWeights &prepared = plan.prepared.front();
  if (prepared.fingerprint != print || print == 0) {
    prepared.fingerprint = 0;  // a failed reorder leaves nothing that looks valid
    if (plan.winograd) {
      const WinogradPlan &p = *plan.winograd;
      std::vector<float> u(16 * p.cin * p.cout);
      winograd_weights(p, static_cast<const float *>(weights), static_cast<const float *>(scales), u.data());
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, memory(p.u_user, cpu_engine(), u.data())},
                                            {DNNL_ARG_TO, *prepared.buffer}});
    } else {
      plan.weights_reorder.execute(stream, {{DNNL_ARG_FROM, memory(plan.user_weights, cpu_engine(), weights)},
                                            {DNNL_ARG_TO, *prepared.buffer},
                                            {DNNL_ARG_ATTR_SCALES | DNNL_ARG_SRC, memory(plan.scales, cpu_engine(), scales)}});
    }
    stream.wait();
    prepared.fingerprint = print;
    ++weight_reorders();
  }
  return *prepared.buffer;
}

// One planned convolution on the caller's buffers (`residual` only for plans with one).
void execute_conv(ConvPlan &plan, dnnl::stream &stream, void *x, void *weights, void *scales, void *bias, void *y,
                  void *residual, uint64_t print) {
  if (plan.winograd) {
    memory &u = prepared_weights(plan, stream, weights, scales, print);
    winograd_execute(*plan.winograd, stream, x, u, static_cast<const float *>(bias), y);
    return;
  }
  auto &engine = cpu_engine();
  memory src(plan.user_src, engine, x);
  if (plan.src_buffer) {
    plan.src_convert.execute(stream, src, *plan.src_buffer);
    src = *plan.src_buffer;
  }
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SRC, src},
      {DNNL_ARG_WEIGHTS, prepared_weights(plan, stream, weights, scales, print)},
      {DNNL_ARG_BIAS, memory(plan.bias, engine, bias)},
      {DNNL_ARG_DST, memory(plan.dst, engine, y)},
      {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.scratch.desc)},
  };
  if (residual) args[DNNL_ARG_ATTR_MULTIPLE_POST_OP(0) | DNNL_ARG_SRC_1] = memory(plan.residual, engine, residual);
  plan.conv.execute(stream, args);
}

// Shared body of the convolution entry points. Inputs: x (N, H, W, Cin) NHWC, weights
// (Cout, Cin, K, K), scale (Cout), bias (Cout), [residual (N, OH, OW, Cout) NHWC]; output
// (N, OH, OW, Cout) NHWC. Computes relu?(conv(x, weights * scale) + bias [+ residual]).
// Stride and ReLU are part of the entry point's name: MindSpore's PyNative mode caches output
// shapes per operator name, so two strides must not share one.
int run_conv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int64_t stride, bool relu,
             bool residual, bool bf16) {
  const int inputs = residual ? 5 : 4;
  if (nparam != inputs + 1) return fail("convolution: wrong number of inputs");
  const int out = inputs;
  // x, the residual and the output are float32 or bfloat16; weights, scale and bias float32.
  // The bf16 entry points compute in bf16 (a float32 x is converted first), the others in x's type.
  dt user_src_type, dst_type, residual_type = dt::f32;
  if (!activation_type(dtypes[0], &user_src_type) || !activation_type(dtypes[out], &dst_type) ||
      (residual && !activation_type(dtypes[4], &residual_type)))
    return fail("convolution: activations must be float32 or bfloat16");
  const dt src_type = bf16 ? dt::bf16 : user_src_type;
  for (int i = 1; i < 4; i++) {
    if (!is_f32(dtypes[i])) return fail("convolution: weights, scale and bias must be float32");
  }
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
    ConvPlan &plan = conv_plan(ConvSpec(x[0], x[1], x[2], x[3], wt[0], wt[2], stride)
                                   .fused(relu, residual)
                                   .types(src_type, dst_type, residual_type, user_src_type));
    dnnl::stream stream(cpu_engine());
    execute_conv(plan, stream, params[0], params[1], params[2], params[3], params[out], residual ? params[4] : nullptr,
                 weights_fingerprint(plan, params[1], params[2]));
    stream.wait();
  } catch (const dnnl::error &e) {
    return fail(e.what());
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// ----------------------------------------------------------------------------- training
// Fine-tuning on CPU: convolution forward / backward-to-input / backward-to-weights, BatchNorm
// with batch statistics and its backward, and max-pool with its backward, all on NHWC
// activations. Weights and their gradients stay OIHW, so MindSpore's Parameters, optimizer
// and checkpoints see exactly what the plain network has. MindSpore 2.8.0 cannot run
// BatchNorm on NHWC on CPU, hence BatchNorm here too.

// A weight layout chosen by a primitive, and the reorder between it and MindSpore's OIHW.
struct Reordered {
  memory::desc desc;
  dnnl::reorder reorder;
  std::unique_ptr<memory> buffer;
  bool needed = false;

  Reordered() = default;
  Reordered(const memory::desc &user, const memory::desc &wanted, bool to_user) : desc(wanted) {
    needed = user != wanted;
    if (!needed) return;
    buffer = std::make_unique<memory>(wanted, cpu_engine());
    reorder = to_user ? dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), wanted, cpu_engine(), user))
                      : dnnl::reorder(dnnl::reorder::primitive_desc(cpu_engine(), user, cpu_engine(), wanted));
  }
};

// In bf16 the three passes compute on bf16 x and dy and on bf16 weights, and write y and dx
// in the activations' type (bf16 between the ops of a bf16 network; the stem reads the float32
// image, converted inside the op) and dw in float32: oneDNN accumulates in float32, the master
// weights and the optimizer never see bf16. A convolution whose bf16 passes would run oneDNN's
// reference code computes in float32 instead, converting its bf16 operands in and out.
struct TrainConvPlan {
  memory::desc src, dst, user_weights;  // as MindSpore holds them: x and y/dy in their types, OIHW float32
  memory::desc src_c, dst_c;            // what the passes compute on: x and dy in the compute type
  memory::desc fwd_dst, data_diff_src;  // what the forward and backward-data passes write
  bool bf16 = false;                    // the compute type
  dnnl::convolution_forward fwd;
  dnnl::convolution_backward_data bwd_data;
  dnnl::convolution_backward_weights bwd_weights;
  memory::desc fwd_scratch, data_scratch, weights_scratch;
  Reordered fwd_w, data_w, diff_w;
  Scratch scratch;
  std::string implementation;  // of the three passes: "forward / backward data / backward weights"
};

// Buffers for converted copies of x (0), dy (1) and an output (2), shared by every plan (calls
// hold the kernel mutex).
memory converted(int which, const memory::desc &desc) {
  static std::unique_ptr<Buffer> buffers[3];
  static size_t sizes[3] = {0, 0, 0};
  if (desc.get_size() > sizes[which]) {
    buffers[which].reset();
    sizes[which] = 0;  // a failed allocation leaves no size that looks usable
    buffers[which] = std::make_unique<Buffer>(desc.get_size());
    sizes[which] = desc.get_size();
  }
  return memory(desc, cpu_engine(), buffers[which]->data);
}

memory::desc retyped(const memory::desc &d, dt type) { return memory::desc(d.get_dims(), type, d.get_strides()); }

// `src_type` / `dst_type`: the types of x and of y and dy as MindSpore holds them.
std::unique_ptr<TrainConvPlan> build_train_conv_plan(const ConvWindow &window, bool bf16, dt src_type, dt dst_type) {
  auto plan = std::make_unique<TrainConvPlan>();
  plan->bf16 = bf16;
  const dt compute = bf16 ? dt::bf16 : dt::f32;
  plan->src = retyped(window.src, src_type);
  plan->dst = retyped(window.dst, dst_type);
  plan->user_weights = window.user_weights;
  plan->src_c = retyped(window.src, compute);
  plan->dst_c = retyped(window.dst, compute);
  // bf16 kernels write float32 or bf16; float32 kernels float32 only.
  plan->fwd_dst = bf16 ? plan->dst : retyped(window.dst, dt::f32);
  plan->data_diff_src = bf16 ? plan->src : retyped(window.src, dt::f32);
  const memory::desc any_weights(window.user_weights.get_dims(), compute, tag::any);
  const memory::desc any_diff_weights(window.user_weights.get_dims(), dt::f32, tag::any);
  const memory::dims &strides = window.strides, &pad_l = window.pad_l, &pad_r = window.pad_r;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);

  dnnl::convolution_forward::primitive_desc fwd(cpu_engine(), dnnl::prop_kind::forward_training,
                                                dnnl::algorithm::convolution_direct, plan->src_c, any_weights,
                                                plan->fwd_dst, strides, pad_l, pad_r, attr);
  dnnl::convolution_backward_data::primitive_desc data(cpu_engine(), dnnl::algorithm::convolution_direct,
                                                       plan->data_diff_src, any_weights, plan->dst_c, strides, pad_l,
                                                       pad_r, fwd, attr);
  dnnl::convolution_backward_weights::primitive_desc weights(cpu_engine(), dnnl::algorithm::convolution_direct,
                                                             plan->src_c, any_diff_weights, plan->dst_c, strides,
                                                             pad_l, pad_r, fwd, attr);
  plan->implementation = std::string(fwd.impl_info_str()) + " / " + data.impl_info_str() + " / " +
                         weights.impl_info_str();
  plan->fwd = dnnl::convolution_forward(fwd);
  plan->bwd_data = dnnl::convolution_backward_data(data);
  plan->bwd_weights = dnnl::convolution_backward_weights(weights);
  plan->fwd_w = Reordered(plan->user_weights, fwd.weights_desc(), false);
  plan->data_w = Reordered(plan->user_weights, data.weights_desc(), false);
  plan->diff_w = Reordered(plan->user_weights, weights.diff_weights_desc(), true);
  plan->fwd_scratch = fwd.scratchpad_desc();
  plan->data_scratch = data.scratchpad_desc();
  plan->weights_scratch = weights.scratchpad_desc();
  for (const auto &d : {plan->fwd_scratch, plan->data_scratch, plan->weights_scratch}) plan->scratch.fit(d);
  return plan;
}

TrainConvPlan &train_conv_plan(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                               bool bf16, dt src_type = dt::f32, dt dst_type = dt::f32) {
  std::string key = key_of({n, h, w, cin, cout, k, stride, bf16, static_cast<int64_t>(src_type),
                            static_cast<int64_t>(dst_type)});
  if (auto found = recent_plan<TrainConvPlan>(key)) return *found;
  const ConvWindow window = conv_window(n, h, w, cin, cout, k, stride);
  std::unique_ptr<TrainConvPlan> plan;
  if (bf16) {
    try {
      plan = build_train_conv_plan(window, true, src_type, dst_type);
    } catch (const dnnl::error &) {  // no bf16 implementation at all: float32 below
    }
    if (plan && plan->implementation.find("ref") != std::string::npos) plan.reset();
  }
  if (!plan) plan = build_train_conv_plan(window, false, src_type, dst_type);
  return *keep_recent_plan(key, std::move(plan));
}

// OIHW weights as the primitive wants them: reordered into the plan's buffer, or used in place.
memory weights_for(Reordered &r, const memory::desc &user, void *data, dnnl::stream &stream) {
  memory given(user, cpu_engine(), data);
  if (!r.needed) return given;
  r.reorder.execute(stream, given, *r.buffer);
  return *r.buffer;
}

enum class ConvPass { forward, backward, backward_weights };

// A tensor the caller holds as `user`, as a primitive reads it (`wanted`): in place when the
// types agree, else converted into buffer `slot`.
memory read_as(dnnl::stream &stream, const memory::desc &user, const memory::desc &wanted, void *data, int slot) {
  memory given(user, cpu_engine(), data);
  if (user == wanted) return given;
  memory copy = converted(slot, wanted);
  dnnl::reorder(given, copy).execute(stream, given, copy);
  return copy;
}

// Where a primitive writes a tensor the caller holds as `user`: in place, or buffer 2 (then
// `written` converts it to the caller's).
memory write_as(const memory::desc &user, const memory::desc &produced, void *data) {
  return user == produced ? memory(user, cpu_engine(), data) : converted(2, produced);
}

void written(dnnl::stream &stream, memory produced, const memory::desc &user, void *data) {
  memory out(user, cpu_engine(), data);
  if (produced.get_data_handle() != data) dnnl::reorder(produced, out).execute(stream, produced, out);
}

// Inputs and outputs per pass (all activations NHWC, weights OIHW):
//   forward:          x (N, H, W, Cin), w (Cout, Cin, K, K)      -> y (N, OH, OW, Cout)
//   backward:         dy (N, OH, OW, Cout), w, x                 -> dx (N, H, W, Cin), dw (Cout, Cin, K, K)
//   backward_weights: x, dy, w (for its shape)                   -> dw
// One backward op for both gradients reads (and, if needed, converts) dy once.
void execute_train_conv(TrainConvPlan &plan, ConvPass pass, void **params, int inputs) {
  auto &engine = cpu_engine();
  dnnl::stream stream(engine);
  void *out = params[inputs];
  if (pass == ConvPass::forward) {
    memory weights = weights_for(plan.fwd_w, plan.user_weights, params[1], stream);
    memory y = write_as(plan.dst, plan.fwd_dst, out);
    plan.fwd.execute(stream, {{DNNL_ARG_SRC, read_as(stream, plan.src, plan.src_c, params[0], 0)},
                              {DNNL_ARG_WEIGHTS, weights},
                              {DNNL_ARG_DST, y},
                              {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.fwd_scratch)}});
    written(stream, y, plan.dst, out);
    stream.wait();
    return;
  }
  const bool both = pass == ConvPass::backward;
  memory diff_dst = read_as(stream, plan.dst, plan.dst_c, params[both ? 0 : 1], 1);
  if (both) {
    memory weights = weights_for(plan.data_w, plan.user_weights, params[1], stream);
    memory dx = write_as(plan.src, plan.data_diff_src, out);
    plan.bwd_data.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst},
                                   {DNNL_ARG_WEIGHTS, weights},
                                   {DNNL_ARG_DIFF_SRC, dx},
                                   {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.data_scratch)}});
    written(stream, dx, plan.src, out);
  }
  memory user(plan.user_weights, engine, params[both ? inputs + 1 : inputs]);
  memory diff = plan.diff_w.needed ? *plan.diff_w.buffer : user;
  plan.bwd_weights.execute(stream, {{DNNL_ARG_SRC, read_as(stream, plan.src, plan.src_c, params[both ? 2 : 0], 0)},
                                    {DNNL_ARG_DIFF_DST, diff_dst},
                                    {DNNL_ARG_DIFF_WEIGHTS, diff},
                                    {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.weights_scratch)}});
  if (plan.diff_w.needed) plan.diff_w.reorder.execute(stream, diff, user);
  stream.wait();
}

// An empty string when a training convolution's tensors fit each other and `pass`.
std::string train_conv_shape_problem(int64_t **shapes, int inputs, int64_t stride, ConvPass pass) {
  int x_at = 0, w_at = 1, dy_at = 0;
  if (pass == ConvPass::backward) x_at = 2;
  if (pass == ConvPass::backward_weights) dy_at = 1, w_at = 2;
  const int64_t *x = shapes[x_at], *wt = shapes[w_at];
  const int64_t oh = (x[1] + stride - 1) / stride, ow = (x[2] + stride - 1) / stride;
  const int64_t y[4] = {x[0], oh, ow, wt[0]};
  const int64_t *dy = pass == ConvPass::forward ? shapes[inputs] : shapes[dy_at];
  const int64_t *result = shapes[inputs];
  const int64_t *expected = pass == ConvPass::forward ? y : pass == ConvPass::backward ? x : wt;
  bool ok = wt[1] == x[3] && wt[2] == wt[3] && stride >= 1;
  for (int d = 0; d < 4; d++) ok = ok && dy[d] == y[d] && result[d] == expected[d];
  if (pass == ConvPass::backward)
    for (int d = 0; d < 4; d++) ok = ok && shapes[inputs + 1][d] == wt[d];
  if (ok) return "";
  char message[256];
  std::snprintf(message, sizeof(message),
                "training convolution: shapes do not match: x %ldx%ldx%ldx%ld, weights %ldx%ldx%ldx%ld, stride %ld, "
                "output %ldx%ldx%ldx%ld", (long)x[0], (long)x[1], (long)x[2], (long)x[3], (long)wt[0], (long)wt[1],
                (long)wt[2], (long)wt[3], (long)stride, (long)dy[0], (long)dy[1], (long)dy[2], (long)dy[3]);
  return message;
}

int run_train_conv(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int64_t stride,
                   ConvPass pass, bool bf16) {
  const int inputs = pass == ConvPass::forward ? 2 : 3, outputs = pass == ConvPass::backward ? 2 : 1;
  if (nparam != inputs + outputs) return fail("training convolution: wrong number of inputs");
  const int x_at = pass == ConvPass::backward ? 2 : 0, w_at = pass == ConvPass::backward_weights ? 2 : 1;
  const int y_at = pass == ConvPass::forward ? inputs : pass == ConvPass::backward ? 0 : 1;
  const int dx_at = pass == ConvPass::backward ? inputs : -1;
  dt src_type = dt::f32, dst_type = dt::f32;
  for (int i = 0; i < nparam; i++) {
    if (ndims[i] != 4) return fail("training convolution: tensors must be 4-d");
  }
  // float32 kernels take float32 only; bf16 kernels take x and y/dy in float32 or bf16 (dx in x's
  // type), the weights and their gradient in float32.
  bool types = activation_type(dtypes[x_at], &src_type) && activation_type(dtypes[y_at], &dst_type) &&
               (bf16 || (src_type == dt::f32 && dst_type == dt::f32));
  for (int i = 0; i < nparam; i++) {
    if (i == x_at || i == dx_at) types = types && std::strcmp(dtypes[i], dtypes[x_at]) == 0;
    else if (i != y_at) types = types && is_f32(dtypes[i]);
  }
  if (!types)
    return fail(bf16 ? "training convolution: x and y must be float32 or bfloat16, the weights float32"
                     : "training convolution: tensors must be float32");
  const std::string problem = train_conv_shape_problem(shapes, inputs, stride, pass);
  if (!problem.empty()) return fail(problem.c_str());
  const int64_t *x = shapes[x_at], *wt = shapes[w_at];
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    TrainConvPlan &plan = train_conv_plan(x[0], x[1], x[2], x[3], wt[0], wt[2], stride, bf16, src_type, dst_type);
    execute_train_conv(plan, pass, params, inputs);
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// What follows the normalisation: nothing, a ReLU (fused into oneDNN's batch-norm), or the
// residual addition and then a ReLU (the end of a bottleneck block). Either saves MindSpore's
// separate passes over the activations, forward and backward. oneDNN's own fused addition +
// ReLU has no CPU implementation, so that one is a binary primitive (add, ReLU post-op) after
// the batch-norm, and its backward an eltwise ReLU backward (from the output) before it.
enum class Fused { none, relu, add_relu };

struct BatchNormPlan {
  memory::desc data, stat, workspace;
  dnnl::batch_normalization_forward fwd;
  dnnl::batch_normalization_backward bwd;
  dnnl::binary add_relu;                // Fused::add_relu only
  dnnl::eltwise_backward relu_backward;  // Fused::add_relu only
  memory::desc fwd_scratch, bwd_scratch, add_scratch, relu_scratch;
  Scratch scratch;
};

dnnl::batch_normalization_forward::primitive_desc batch_norm_forward_desc(const memory::desc &data, float eps,
                                                                          Fused fused) {
  auto flags = dnnl::normalization_flags::use_scale | dnnl::normalization_flags::use_shift;
  if (fused == Fused::relu) flags |= dnnl::normalization_flags::fuse_norm_relu;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return dnnl::batch_normalization_forward::primitive_desc(cpu_engine(), dnnl::prop_kind::forward_training, data,
                                                           data, eps, flags, attr);
}

// `type`: of the activations and their gradients (float32 or bf16); statistics, scale and shift
// are float32 either way.
BatchNormPlan &batch_norm_plan(int64_t n, int64_t h, int64_t w, int64_t c, float eps, Fused fused, dt type) {
  int32_t eps_bits;
  std::memcpy(&eps_bits, &eps, sizeof(eps_bits));
  std::string key = key_of({n, h, w, c, eps_bits, static_cast<int64_t>(fused), static_cast<int64_t>(type)});
  if (auto found = recent_plan<BatchNormPlan>(key)) return *found;
  auto plan = std::make_unique<BatchNormPlan>();
  plan->data = nhwc_desc(n, h, w, c, type);
  plan->stat = memory::desc({c}, dt::f32, tag::x);
  auto fwd = batch_norm_forward_desc(plan->data, eps, fused);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::batch_normalization_backward::primitive_desc bwd(cpu_engine(), dnnl::prop_kind::backward, plan->data,
                                                         plan->data, plan->data, eps, fwd.get_flags(), fwd, attr);
  plan->fwd = dnnl::batch_normalization_forward(fwd);
  plan->bwd = dnnl::batch_normalization_backward(bwd);
  plan->workspace = fwd.workspace_desc();
  plan->fwd_scratch = fwd.scratchpad_desc();
  plan->bwd_scratch = bwd.scratchpad_desc();
  if (fused == Fused::add_relu) {
    dnnl::post_ops relu;
    relu.append_eltwise(dnnl::algorithm::eltwise_relu, 0.f, 0.f);
    dnnl::primitive_attr add_attr;  // not a copy of attr: that would share one handle
    add_attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    add_attr.set_post_ops(relu);
    dnnl::binary::primitive_desc add(cpu_engine(), dnnl::algorithm::binary_add, plan->data, plan->data, plan->data,
                                     add_attr);
    const auto relu_from_output = dnnl::algorithm::eltwise_relu_use_dst_for_bwd;
    dnnl::eltwise_forward::primitive_desc relu_hint(cpu_engine(), dnnl::prop_kind::forward_training,
                                                    relu_from_output, plan->data, plan->data, 0.f, 0.f, attr);
    dnnl::eltwise_backward::primitive_desc relu_bwd(cpu_engine(), relu_from_output, plan->data, plan->data,
                                                    plan->data, 0.f, 0.f, relu_hint, attr);
    plan->add_relu = dnnl::binary(add);
    plan->relu_backward = dnnl::eltwise_backward(relu_bwd);
    plan->add_scratch = add.scratchpad_desc();
    plan->relu_scratch = relu_bwd.scratchpad_desc();
  }
  for (const auto &d : {plan->fwd_scratch, plan->bwd_scratch, plan->add_scratch, plan->relu_scratch})
    plan->scratch.fit(d);
  return *keep_recent_plan(key, std::move(plan));
}

bool same_shape(const int64_t *a, const int64_t *b, int n) {
  for (int d = 0; d < n; d++)
    if (a[d] != b[d]) return false;
  return true;
}

struct PoolPlan {
  memory::desc src, dst, workspace;
  dnnl::pooling_forward fwd;
  dnnl::pooling_backward bwd;  // training plans only
  memory::desc fwd_scratch, bwd_scratch;
  Scratch scratch;
};

// Max-pool 3x3, stride 2, "same" padding over x (N, H, W, C) NHWC.
PoolPlan &pool_plan(int64_t n, int64_t h, int64_t w, int64_t c, bool training, dt type = dt::f32,
                    tag layout = tag::nhwc) {
  const int64_t kernel = 3, stride = 2;
  std::string key = key_of({n, h, w, c, training, static_cast<int64_t>(type), static_cast<int64_t>(layout)});
  if (auto *found = cached_plan<PoolPlan>(key)) return *found;
  auto plan = std::make_unique<PoolPlan>();
  const Window window = same_window(n, h, w, c, c, kernel, stride, type, type, layout);
  plan->src = window.src;
  plan->dst = window.dst;
  const memory::dims kernels{kernel, kernel}, dilation{0, 0};
  const memory::dims &strides = window.strides, &pad_l = window.pad_l, &pad_r = window.pad_r;
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::pooling_forward::primitive_desc fwd(
      cpu_engine(), training ? dnnl::prop_kind::forward_training : dnnl::prop_kind::forward_inference,
      dnnl::algorithm::pooling_max, plan->src, plan->dst, strides, kernels, dilation, pad_l, pad_r, attr);
  plan->fwd = dnnl::pooling_forward(fwd);
  plan->fwd_scratch = fwd.scratchpad_desc();
  plan->scratch.fit(plan->fwd_scratch);
  if (training) {
    plan->workspace = fwd.workspace_desc();
    // The workspace is handed to MindSpore as a uint8 tensor shaped like the output.
    if (plan->workspace.get_size() != plan->dst.get_size() / memory::data_type_size(type))
      throw std::runtime_error("max-pool: oneDNN's workspace is not one byte per output");
    dnnl::pooling_backward::primitive_desc bwd(cpu_engine(), dnnl::algorithm::pooling_max, plan->src, plan->dst,
                                               strides, kernels, dilation, pad_l, pad_r, fwd, attr);
    plan->bwd = dnnl::pooling_backward(bwd);
    plan->bwd_scratch = bwd.scratchpad_desc();
    plan->scratch.fit(plan->bwd_scratch);
  }
  return keep_plan(key, std::move(plan));
}

// x (N, H, W, C) at `x_at` and y (N, ceil(H/2), ceil(W/2), C) at `y_at`, both float32 or both
// bfloat16 (`bf16`: whether bfloat16 is asked for; inference takes either).
bool pool_shapes_ok(int *ndims, int64_t **shapes, const char **dtypes, int x_at, int y_at, bool inference, bool bf16) {
  const bool f32 = is_f32(dtypes[x_at]) && is_f32(dtypes[y_at]), half = is_bf16(dtypes[x_at]) && is_bf16(dtypes[y_at]);
  const bool types = inference ? f32 || half : bf16 ? half : f32;
  if (!types || ndims[x_at] != 4 || ndims[y_at] != 4) return false;
  const int64_t *x = shapes[x_at], *y = shapes[y_at];
  return y[0] == x[0] && y[3] == x[3] && y[1] == (x[1] + 1) / 2 && y[2] == (x[2] + 1) / 2;
}

enum class PoolPass { inference, training, backward };

// Shared body of the max-pool entry points. Tensors, in MindSpore's order (inputs, then outputs):
//   inference: x, y;  training: x, y, where (uint8, shaped like y);  backward: dy, where, x, dx.
// Training passes take float32, or bfloat16 with `bf16`.
int run_pool(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, PoolPass pass,
             bool bf16 = false) {
  const int x_at = pass == PoolPass::backward ? 2 : 0, y_at = pass == PoolPass::backward ? 0 : 1;
  const int where_at = pass == PoolPass::backward ? 1 : 2;
  bool ok = nparam == (pass == PoolPass::inference ? 2 : pass == PoolPass::training ? 3 : 4) &&
            pool_shapes_ok(ndims, shapes, dtypes, x_at, y_at, pass == PoolPass::inference, bf16);
  if (ok && pass != PoolPass::inference)
    ok = std::strcmp(dtypes[where_at], "uint8") == 0 && ndims[where_at] == 4 && same_shape(shapes[y_at], shapes[where_at], 4);
  if (ok && pass == PoolPass::backward)
    ok = std::strcmp(dtypes[3], dtypes[2]) == 0 && ndims[3] == 4 && same_shape(shapes[2], shapes[3], 4);
  if (!ok) return fail("max-pool: unexpected inputs");
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    const int64_t *x = shapes[x_at];
    PoolPlan &plan = pool_plan(x[0], x[1], x[2], x[3], pass != PoolPass::inference,
                               is_bf16(dtypes[x_at]) ? dt::bf16 : dt::f32);
    auto &engine = cpu_engine();
    dnnl::stream stream(engine);
    if (pass == PoolPass::backward) {
      plan.bwd.execute(stream, {{DNNL_ARG_DIFF_DST, memory(plan.dst, engine, params[0])},
                                {DNNL_ARG_WORKSPACE, memory(plan.workspace, engine, params[1])},
                                {DNNL_ARG_DIFF_SRC, memory(plan.src, engine, params[3])},
                                {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.bwd_scratch)}});
    } else {
      std::unordered_map<int, memory> args{{DNNL_ARG_SRC, memory(plan.src, engine, params[0])},
                                           {DNNL_ARG_DST, memory(plan.dst, engine, params[1])},
                                           {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.fwd_scratch)}};
      if (pass == PoolPass::training) args[DNNL_ARG_WORKSPACE] = memory(plan.workspace, engine, params[2]);
      plan.fwd.execute(stream, args);
    }
    stream.wait();
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// ------------------------------------------------------------------ the head (inference)
// The bottleneck head's Dense 2048->512 and BatchNorm1d, and the classifier's Dense, on oneDNN.
// They are tiny, but MindSpore's own CPU MatMul and BatchNorm run on MindSpore's thread pool,
// whose woken worker then spins (sched_yield) for ~0.15 s of CPU, through the next call's
// backbone: on 2 cores the README's call took 1.08x the backbone's time, against 1.00x here.
struct DensePlan {
  dnnl::matmul product;
  memory::desc src, weights, bias, dst;
  Scratch scratch;
};

// Plans by (rows, inputs, outputs): a few batch sizes and the two layers; bounded all the same.
DensePlan &dense_plan(int64_t n, int64_t k, int64_t m) {
  static std::unordered_map<std::string, std::unique_ptr<DensePlan>> plans;
  const std::string key = std::to_string(n) + "x" + std::to_string(k) + "x" + std::to_string(m);
  auto found = plans.find(key);
  if (found != plans.end()) return *found->second;
  if (plans.size() >= 32) plans.clear();
  auto plan = std::make_unique<DensePlan>();
  plan->src = memory::desc({n, k}, dt::f32, tag::ab);
  plan->weights = memory::desc({k, m}, dt::f32, tag::ba);  // Dense holds (outputs, inputs): W^T
  plan->bias = memory::desc({1, m}, dt::f32, tag::ab);
  plan->dst = memory::desc({n, m}, dt::f32, tag::ab);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  dnnl::matmul::primitive_desc pd(cpu_engine(), plan->src, plan->weights, plan->bias, plan->dst, attr);
  plan->product = dnnl::matmul(pd);
  plan->scratch.fit(pd.scratchpad_desc());
  return *(plans[key] = std::move(plan));
}

bool float_tensor(int at, int dims, int *ndims, const char **dtypes) { return ndims[at] == dims && is_f32(dtypes[at]); }

// x (N, K), weights (M, K), bias (M) [, gamma, beta, running mean, running variance (M), eps (1)]
// -> y (N, M) = x W^T + bias [then (y - mean) * gamma / sqrt(variance + eps) + beta]; float32.
int run_dense(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool batch_norm) {
  const int inputs = batch_norm ? 8 : 3;
  bool ok = nparam == inputs + 1 && float_tensor(0, 2, ndims, dtypes) && float_tensor(1, 2, ndims, dtypes) &&
            float_tensor(inputs, 2, ndims, dtypes);
  for (int i = 2; ok && i < inputs; i++) ok = float_tensor(i, 1, ndims, dtypes);
  const int64_t n = ok ? shapes[0][0] : 0, k = ok ? shapes[0][1] : 0, m = ok ? shapes[1][0] : 0;
  ok = ok && k > 0 && shapes[1][1] == k && shapes[inputs][0] == n && shapes[inputs][1] == m;
  for (int i = 2; ok && i < inputs; i++) ok = shapes[i][0] == (batch_norm && i == 7 ? 1 : m);
  if (!ok) return fail("dense: unexpected inputs");
  if (n == 0 || m == 0) return 0;
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    DensePlan &plan = dense_plan(n, k, m);
    auto &engine = cpu_engine();
    dnnl::stream stream(engine);
    plan.product.execute(stream, {{DNNL_ARG_SRC, memory(plan.src, engine, params[0])},
                                  {DNNL_ARG_WEIGHTS, memory(plan.weights, engine, params[1])},
                                  {DNNL_ARG_BIAS, memory(plan.bias, engine, params[2])},
                                  {DNNL_ARG_DST, memory(plan.dst, engine, params[inputs])},
                                  {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.scratch.desc)}});
    stream.wait();
    if (batch_norm) {
      const auto *gamma = static_cast<const float *>(params[3]), *beta = static_cast<const float *>(params[4]);
      const auto *mean = static_cast<const float *>(params[5]), *variance = static_cast<const float *>(params[6]);
      const float eps = *static_cast<const float *>(params[7]);
      auto *y = static_cast<float *>(params[inputs]);
      for (int64_t j = 0; j < m; j++) {
        const float scale = gamma[j] / std::sqrt(variance[j] + eps);
        for (int64_t i = 0; i < n; i++) y[i * m + j] = scale * (y[i * m + j] - mean[j]) + beta[j];
      }
    }
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// Batch-norm with batch statistics on NHWC tensors, followed by what `fused` says. Tensors, in
// MindSpore's order (inputs, then outputs):
//   forward:  x (N, H, W, C), gamma (C), beta (C), eps (1) [, identity (add_relu)] -> y, batch
//             mean (C), batch variance (C, biased: divided by N*H*W) [, workspace (relu: uint8
//             bytes that the backward needs)]
//   backward: dy, x, mean, variance, gamma, eps [, workspace (relu) | y (add_relu)] -> dx, dgamma,
//             dbeta [, d identity (add_relu)]
// Where a batch-norm op's tensors are among its parameters (-1: not there).
struct BatchNormArgs {
  bool backward, relu, add;
  int x_at, eps_at;
  int inputs, outputs;  // `inputs` is also the first output's index
  // The extra input (inputs - 1) or output (inputs + 3): the workspace, the identity (forward)
  // or y and the identity's gradient (backward).
  int workspace_at, identity_at, y_at, d_identity_at;

  BatchNormArgs(bool backward_pass, Fused fused) : backward(backward_pass) {
    relu = fused == Fused::relu, add = fused == Fused::add_relu;
    x_at = backward ? 1 : 0, eps_at = backward ? 5 : 3;
    inputs = eps_at + 1 + (add || (relu && backward));
    outputs = 3 + ((relu && !backward) || (add && backward));
    workspace_at = relu ? (backward ? inputs - 1 : inputs + 3) : -1;
    identity_at = add && !backward ? inputs - 1 : -1;
    y_at = add && backward ? inputs - 1 : -1, d_identity_at = add && backward ? inputs + 3 : -1;
  }
  // Activations or their gradients (the others are per-channel, but eps and the workspace).
  bool is_data(int i) const {
    return i == 0 || i == x_at || i == inputs || i == identity_at || i == y_at || i == d_identity_at;
  }
};

// Activations (and their gradients) in `data` type, the per-channel tensors and eps float32.
bool batch_norm_shapes_fit(const BatchNormArgs &a, int nparam, int *ndims, int64_t **shapes, const char **dtypes,
                           const char *data) {
  const int64_t *x = shapes[a.x_at], c = shapes[a.x_at][3];
  bool ok = true;
  for (int i = 0; i < nparam; i++) {
    if (i == a.workspace_at) continue;
    ok = ok && (a.is_data(i) ? std::strcmp(dtypes[i], data) == 0 && ndims[i] == 4 && same_shape(x, shapes[i], 4)
                             : is_f32(dtypes[i]) && ndims[i] == 1 && shapes[i][0] == (i == a.eps_at ? 1 : c));
  }
  return ok;
}

void execute_batch_norm(BatchNormPlan &plan, const BatchNormArgs &a, void **params) {
  auto &engine = cpu_engine();
  auto data = [&](int i) { return memory(plan.data, engine, params[i]); };
  auto stat = [&](int i) { return memory(plan.stat, engine, params[i]); };
  dnnl::stream stream(engine);
  const int in = a.inputs;
  // With add_relu the batch-norm's backward takes the ReLU's backward (written to the
  // identity's gradient, which it equals) instead of dy.
  if (a.add && a.backward) {
    plan.relu_backward.execute(stream, {{DNNL_ARG_DIFF_DST, data(0)}, {DNNL_ARG_DST, data(a.y_at)},
                                        {DNNL_ARG_DIFF_SRC, data(a.d_identity_at)},
                                        {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.relu_scratch)}});
  }
  std::unordered_map<int, memory> args;
  if (a.backward) {
    args = {{DNNL_ARG_DIFF_DST, data(a.add ? a.d_identity_at : 0)}, {DNNL_ARG_SRC, data(1)}, {DNNL_ARG_MEAN, stat(2)},
            {DNNL_ARG_VARIANCE, stat(3)}, {DNNL_ARG_SCALE, stat(4)}, {DNNL_ARG_DIFF_SRC, data(in)},
            {DNNL_ARG_DIFF_SCALE, stat(in + 1)}, {DNNL_ARG_DIFF_SHIFT, stat(in + 2)},
            {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.bwd_scratch)}};
  } else {
    args = {{DNNL_ARG_SRC, data(0)}, {DNNL_ARG_SCALE, stat(1)}, {DNNL_ARG_SHIFT, stat(2)},
            {DNNL_ARG_DST, data(in)}, {DNNL_ARG_MEAN, stat(in + 1)}, {DNNL_ARG_VARIANCE, stat(in + 2)},
            {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.fwd_scratch)}};
  }
  if (a.relu) args[DNNL_ARG_WORKSPACE] = memory(plan.workspace, engine, params[a.workspace_at]);
  if (a.backward)
    plan.bwd.execute(stream, args);
  else
    plan.fwd.execute(stream, args);
  if (a.add && !a.backward) {  // y = relu(y + identity), in place
    plan.add_relu.execute(stream, {{DNNL_ARG_SRC_0, data(in)}, {DNNL_ARG_SRC_1, data(a.identity_at)},
                                   {DNNL_ARG_DST, data(in)}, {DNNL_ARG_SCRATCHPAD, plan.scratch.at(plan.add_scratch)}});
  }
  stream.wait();
}

int run_batch_norm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool backward,
                   Fused fused, bool bf16) {
  const BatchNormArgs a(backward, fused);
  if (nparam != a.inputs + a.outputs) return fail("batch-norm: wrong number of inputs");
  if (!batch_norm_shapes_fit(a, nparam, ndims, shapes, dtypes, bf16 ? "bfloat16" : "float32"))
    return fail(backward ? "batch-norm backward: unexpected inputs" : "batch-norm: unexpected inputs");
  const int64_t *x = shapes[a.x_at];
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    const float eps = *static_cast<const float *>(params[a.eps_at]);
    BatchNormPlan &plan = batch_norm_plan(x[0], x[1], x[2], x[3], eps, fused, bf16 ? dt::bf16 : dt::f32);
    const int ws = a.workspace_at;
    if (a.relu && (std::strcmp(dtypes[ws], "uint8") != 0 || ndims[ws] != 1 ||
                   shapes[ws][0] != static_cast<int64_t>(plan.workspace.get_size())))
      return fail("batch-norm: the workspace has the wrong size");
    execute_batch_norm(plan, a, params);
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// Shared body of VnForkBf16 (x -> two copies) and its backward ((da, db) -> da + db): three bf16
// tensors of one shape.
int run_fork(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, bool backward) {
  bool ok = nparam == 3;
  for (int i = 0; ok && i < 3; i++) ok = is_bf16(dtypes[i]) && ndims[i] == ndims[0] && same_shape(shapes[i], shapes[0], ndims[0]);
  if (!ok) return fail("fork: expected three bfloat16 tensors of one shape");
  int64_t count = 1;
  for (int d = 0; d < ndims[0]; d++) count *= shapes[0][d];
  if (count == 0) return 0;
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    auto &engine = cpu_engine();
    dnnl::stream stream(engine);
    const memory::desc flat({count}, dt::bf16, tag::x);
    if (backward) {
      dnnl::binary::primitive_desc add(engine, dnnl::algorithm::binary_add, flat, flat, flat);
      dnnl::binary(add).execute(stream, {{DNNL_ARG_SRC_0, memory(flat, engine, params[0])},
                                         {DNNL_ARG_SRC_1, memory(flat, engine, params[1])},
                                         {DNNL_ARG_DST, memory(flat, engine, params[2])}});
    } else {
      const size_t bytes = static_cast<size_t>(count) * 2, chunk = 1 << 16;
      const int64_t chunks = static_cast<int64_t>((bytes + chunk - 1) / chunk);
      const auto *x = static_cast<const char *>(params[0]);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < chunks; i++) {
        const size_t at = static_cast<size_t>(i) * chunk, size = std::min(chunk, bytes - at);
        std::memcpy(static_cast<char *>(params[1]) + at, x + at, size);
        std::memcpy(static_cast<char *>(params[2]) + at, x + at, size);
      }
    }
    stream.wait();
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

// ----------------------------------------------------------------------------- whole backbone
// Inference of the whole ResNet-50 backbone in one call: image (N, 3, H, W) float32, the
// BatchNorm epsilon and the 53 convolutions' weights (OIHW) with their BatchNorms' gamma, beta,
// running mean and variance -> pooled features (N, 2048) float32. The same
// computation as the per-layer entry points, without MindSpore between them: the stem reads the
// NCHW image, activations live in four buffers of the plan in a blocked layout, and each block's
// residual addition accumulates in place into its identity (the block input, or the shortcut's
// output).
// The last block adds its residual into a float32 output as VnConv*AddS1ReluToF32 does, which
// is then averaged over H and W.

constexpr int kBlocks[4] = {3, 4, 6, 3};
constexpr int kMidChannels[4] = {64, 128, 256, 512};
constexpr int kConvs = 53;
constexpr int kPerConv = 5;  // backbone op inputs per convolution: weights, BatchNorm gamma, beta, mean, variance
// The layout of the activations between the backbone's kernels. Where oneDNN runs AVX512-BF16
// without AMX (AMD Zen 4, Intel Cooper Lake), channels in blocks of 16 (nChw16c; every channel
// count here is a multiple of 16): its direct kernels on them ran the network 1.02x (fp32) and
// 1.03x (bf16) as fast as brgemm on NHWC on Zen 4, layer1's residual 1x1 convolutions the most.
// Elsewhere NHWC: AVX2 has no kernels for nChw16c at all (oneDNN's reference code would run),
// and AMX's brgemm kernels want NHWC.
tag preferred_layout() {
  return dnnl::get_effective_cpu_isa() == dnnl::cpu_isa::avx512_core_bf16 ? tag::nChw16c : tag::nhwc;
}

// One step of the backbone: a planned convolution and where its operands live.
struct Step {
  std::shared_ptr<ConvPlan> plan;
  int in, out, residual;  // buffer indices (-1: the caller's image / none)
  int64_t weights[4];     // the OIHW shape its weights must have
};

struct BackbonePlan {
  std::vector<Step> steps;  // kConvs, in parameter order: stem, then per block conv1, conv2, conv3, shortcut
  PoolPlan *pool = nullptr;
  int pool_in = 0, pool_out = 0, features = 0;  // buffers; `features` is float32 (N, h, w, 2048)
  int64_t n = 0, h = 0, w = 0;  // of the features
  tag layout = tag::nhwc;
  std::vector<std::unique_ptr<Buffer>> buffers;
  std::vector<float> folded;  // per convolution, its folded BatchNorm: scale, then bias
};

// "17 jit:avx512_core, ..." : how many of the plan's convolutions each oneDNN implementation runs.
std::string implementations(const BackbonePlan &plan) {
  std::vector<std::pair<std::string, int>> counts;
  for (const Step &step : plan.steps) {
    auto found = std::find_if(counts.begin(), counts.end(), [&](auto &c) { return c.first == step.plan->implementation; });
    if (found == counts.end()) counts.emplace_back(step.plan->implementation, 1);
    else found->second++;
  }
  std::string out;
  for (auto &[name, count] : counts) out += (out.empty() ? "" : ", ") + std::to_string(count) + " " + name;
  return out + (plan.layout == tag::nhwc ? " (NHWC)" : " (nChw16c)");
}

// Backbone plans hold their activations: keep the two most recent input shapes only.
std::list<std::pair<std::string, std::unique_ptr<BackbonePlan>>> &backbone_plans() {
  static std::list<std::pair<std::string, std::unique_ptr<BackbonePlan>>> plans;
  return plans;
}

std::unique_ptr<BackbonePlan> build_backbone_plan(int64_t n, int64_t h, int64_t w, int64_t last_stride, bool bf16,
                                                  tag layout) {
  const dt act = bf16 ? dt::bf16 : dt::f32;
  auto plan = std::make_unique<BackbonePlan>();
  plan->layout = layout;
  size_t largest = 0;
  auto add = [&](const ConvSpec &spec, int in, int out, int residual) {
    std::shared_ptr<ConvPlan> conv = shared_conv_plan(spec);
    plan->steps.push_back({conv, in, out, residual, {spec.cout, spec.cin, spec.k, spec.k}});
    plan->folded.resize(plan->folded.size() + 2 * spec.cout);
    largest = std::max(largest, conv->dst.get_size());
  };
  // A convolution of the backbone's activations (type `act`, in `layout`).
  auto conv = [&](int64_t hh, int64_t ww, int64_t cin, int64_t cout, int64_t k, int64_t stride) {
    return ConvSpec(n, hh, ww, cin, cout, k, stride).types(act, act, act).input(false, layout);
  };
  // Buffers 0-3 hold activations; the block input moves between them.
  auto out_size = [](int64_t v, int64_t stride) { return (v + stride - 1) / stride; };
  int64_t hh = out_size(h, 2), ww = out_size(w, 2);
  add(conv(h, w, 3, 64, 7, 2).fused(true, false).types(act, act, act, dt::f32).input(true, layout), -1, 0, -1);
  plan->pool = &pool_plan(n, hh, ww, 64, false, act, layout);
  plan->pool_in = 0, plan->pool_out = 1;
  hh = out_size(hh, 2), ww = out_size(ww, 2);
  int cur = 1;
  int64_t channels = 64;
  for (int layer = 0; layer < 4; layer++) {
    for (int b = 0; b < kBlocks[layer]; b++) {
      const int64_t mid = kMidChannels[layer], out = mid * 4;
      const int64_t stride = b > 0 ? 1 : layer == 0 ? 1 : layer == 3 ? last_stride : 2;
      const bool last = layer == 3 && b == kBlocks[layer] - 1;
      const int t1 = (cur + 1) % 4, t2 = (cur + 2) % 4, shortcut = (cur + 3) % 4;
      const int64_t oh = out_size(hh, stride), ow = out_size(ww, stride);
      add(conv(hh, ww, channels, mid, 1, 1).fused(true, false), cur, t1, -1);
      add(conv(hh, ww, mid, mid, 3, stride).fused(true, false), t1, t2, -1);
      const int identity = b == 0 ? shortcut : cur;
      if (last) {  // float32 out, into t1 (free by now), the identity read as a residual
        add(conv(oh, ow, mid, out, 1, 1).fused(true, true).types(act, dt::f32, act), t2, t1, identity);
        plan->features = t1;
      } else {
        add(conv(oh, ow, mid, out, 1, 1).fused(true, false, true), t2, identity, -1);
      }
      if (b == 0) {  // the shortcut runs before conv3, which accumulates into its output
        add(conv(hh, ww, channels, out, 1, stride).fused(false, false), cur, shortcut, -1);
        std::swap(plan->steps[plan->steps.size() - 1], plan->steps[plan->steps.size() - 2]);
      }
      cur = identity;
      channels = out, hh = oh, ww = ow;
    }
  }
  plan->n = n, plan->h = hh, plan->w = ww;
  for (int i = 0; i < 4; i++) plan->buffers.push_back(std::make_unique<Buffer>(largest));
  return plan;
}

BackbonePlan &backbone_plan(int64_t n, int64_t h, int64_t w, int64_t last_stride, bool bf16) {
  const std::string key = key_of({n, h, w, last_stride, bf16});
  auto &plans = backbone_plans();
  for (auto it = plans.begin(); it != plans.end(); ++it) {
    if (it->first == key) {
      plans.splice(plans.begin(), plans, it);
      return *plans.front().second;
    }
  }
  if (plans.size() >= 2) plans.pop_back();  // before the new plan allocates its buffers
  auto plan = build_backbone_plan(n, h, w, last_stride, bf16, preferred_layout());
  // Never oneDNN's reference code for a blocked layout where NHWC has real kernels.
  if (plan->layout != tag::nhwc && implementations(*plan).find("ref") != std::string::npos) {
    plan.reset();
    plan = build_backbone_plan(n, h, w, last_stride, bf16, tag::nhwc);
  }
  plans.emplace_front(key, std::move(plan));
  return *plans.front().second;
}

// The weights fingerprint of every convolution of the backbone, on all threads at once: reading
// the 100 MB of float32 weights is bound by one core's memory bandwidth (a tenth of a bf16 call
// on one core of an Intel Xeon with AMX), the largest convolutions first so the threads end together.
std::vector<uint64_t> backbone_fingerprints(const BackbonePlan &plan, void **params, const std::vector<int> &order,
                                            const std::vector<float *> &scale) {
  std::vector<int> by_size(kConvs);
  for (int i = 0; i < kConvs; i++) by_size[i] = i;
  std::sort(by_size.begin(), by_size.end(), [&](int a, int b) {
    return plan.steps[a].plan->user_weights.get_size() > plan.steps[b].plan->user_weights.get_size();
  });
  std::vector<uint64_t> prints(kConvs);
#pragma omp parallel for schedule(dynamic, 1)
  for (int j = 0; j < kConvs; j++) {
    const int i = by_size[j];
    prints[i] = weights_fingerprint(*plan.steps[i].plan, params[2 + kPerConv * order[i]], scale[i]);
  }
  return prints;
}

// The backbone op's arguments: nullptr when usable, else what is wrong.
const char *backbone_arguments_problem(int nparam, int *ndims, int64_t **shapes, const char **dtypes) {
  if (nparam != 2 + kPerConv * kConvs + 1)
    return "backbone: expected the image, the BatchNorm epsilon, 53 x (weights, gamma, beta, mean, variance), "
           "and the output";
  const int out = nparam - 1;
  if (!is_f32(dtypes[0]) || ndims[0] != 4 || shapes[0][1] != 3 || !is_f32(dtypes[out]) || ndims[out] != 2 ||
      shapes[out][0] != shapes[0][0] || shapes[out][1] != 2048)
    return "backbone: the image must be float32 (N, 3, H, W) and the output float32 (N, 2048)";
  if (ndims[1] != 1 || shapes[1][0] != 1) return "backbone: the BatchNorm epsilon must be a (1,) tensor";
  for (int i = 1; i < out; i++)
    if (!is_f32(dtypes[i])) return "backbone: epsilon, weights and BatchNorm parameters must be float32";
  return nullptr;
}

// The parameters come in network order (conv3 before the shortcut); the plan runs a first
// block's shortcut before its conv3: the network position of each step's parameters.
const std::vector<int> &step_parameters() {
  static const std::vector<int> order = [] {
    std::vector<int> o(kConvs);
    for (int i = 0; i < kConvs; i++) o[i] = i;
    int step = 1;
    for (int layer = 0; layer < 4; layer++) {
      for (int b = 0; b < kBlocks[layer]; b++) {
        if (b == 0) std::swap(o[step + 2], o[step + 3]);  // steps: conv1, conv2, shortcut, conv3
        step += b == 0 ? 4 : 3;
      }
    }
    return o;
  }();
  return order;
}

// An empty string when every convolution's weights and BatchNorm have the plan's shapes.
std::string backbone_weights_problem(const BackbonePlan &plan, const std::vector<int> &order, int *ndims,
                                     int64_t **shapes) {
  for (int i = 0; i < kConvs; i++) {
    const int at = 2 + kPerConv * order[i];
    const int64_t *want = plan.steps[i].weights;
    bool ok = ndims[at] == 4 && same_shape(shapes[at], want, 4);
    for (int j = 1; j < kPerConv; j++) ok = ok && ndims[at + j] == 1 && shapes[at + j][0] == want[0];
    if (!ok) {
      char message[200];
      std::snprintf(message, sizeof(message),
                    "backbone: convolution %d's weights are not %ldx%ldx%ldx%ld (or its BatchNorm's not %ld)",
                    order[i], (long)want[0], (long)want[1], (long)want[2], (long)want[3], (long)want[0]);
      return message;
    }
  }
  return "";
}

// BatchNorm folded into each convolution: weights * scale (in the cached weight reorder)
// and a bias, with scale = gamma / sqrt(variance + eps), bias = beta - mean * scale: the
// same float32 operations, in the same order, as the network's _running_affine.
void fold_batch_norms(BackbonePlan &plan, void **params, const std::vector<int> &order, std::vector<float *> &scale,
                      std::vector<float *> &bias) {
  const float eps = *static_cast<const float *>(params[1]);
  float *folded = plan.folded.data();
  for (int i = 0; i < kConvs; i++) {
    const int at = 2 + kPerConv * order[i];
    const int64_t channels = plan.steps[i].weights[0];
    const auto *gamma = static_cast<const float *>(params[at + 1]), *beta = static_cast<const float *>(params[at + 2]);
    const auto *mean = static_cast<const float *>(params[at + 3]), *var = static_cast<const float *>(params[at + 4]);
    scale[i] = folded;
    bias[i] = folded + channels;
    for (int64_t c = 0; c < channels; c++) {
      const float sd = std::sqrt(var[c] + eps);
      scale[i][c] = gamma[c] / sd;
      const float shifted = mean[c] * scale[i][c];
      bias[i][c] = beta[c] - shifted;
    }
    folded += 2 * channels;
  }
}

// Global average pooling of the float32 features, per image and channel.
void global_average_pool(const BackbonePlan &plan, const float *features, float *pooled) {
  // NHWC: per image, (pixels, 2048); nChw16c: per image, 2048 / 16 blocks, each (pixels, 16).
  const int64_t pixels = plan.h * plan.w, c = 2048, width = plan.layout == tag::nhwc ? c : 16;
  for (int64_t image = 0; image < plan.n; image++) {
    float *sum = pooled + image * c;
    std::fill(sum, sum + c, 0.f);
    for (int64_t first = 0; first < c; first += width) {
      const float *block = features + image * pixels * c + first * pixels;
      for (int64_t p = 0; p < pixels; p++)
        for (int64_t j = 0; j < width; j++) sum[first + j] += block[p * width + j];
    }
    for (int64_t ch = 0; ch < c; ch++) sum[ch] /= static_cast<float>(pixels);
  }
}

// The plan's convolutions (and the max-pool after the stem) on the image params[0].
void run_backbone_steps(BackbonePlan &plan, void **params, const std::vector<int> &order,
                        const std::vector<float *> &scale, const std::vector<float *> &bias) {
  const std::vector<uint64_t> prints = backbone_fingerprints(plan, params, order, scale);
  dnnl::stream stream(cpu_engine());
  auto buffer = [&](int i) { return i < 0 ? params[0] : plan.buffers[i]->data; };
  for (int i = 0; i < kConvs; i++) {
    const Step &s = plan.steps[i];
    execute_conv(*s.plan, stream, buffer(s.in), params[2 + kPerConv * order[i]], scale[i], bias[i], buffer(s.out),
                 s.residual >= 0 ? buffer(s.residual) : nullptr, prints[i]);
    if (i == 0) {
      plan.pool->fwd.execute(stream, {{DNNL_ARG_SRC, memory(plan.pool->src, cpu_engine(), buffer(plan.pool_in))},
                                      {DNNL_ARG_DST, memory(plan.pool->dst, cpu_engine(), buffer(plan.pool_out))},
                                      {DNNL_ARG_SCRATCHPAD, plan.pool->scratch.at(plan.pool->fwd_scratch)}});
    }
  }
  stream.wait();
}

int run_backbone(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int64_t last_stride,
                 bool bf16) {
  if (const char *problem = backbone_arguments_problem(nparam, ndims, shapes, dtypes)) return fail(problem);
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    const int64_t *x = shapes[0];
    BackbonePlan &plan = backbone_plan(x[0], x[2], x[3], last_stride, bf16);
    const std::vector<int> &order = step_parameters();
    const std::string problem = backbone_weights_problem(plan, order, ndims, shapes);
    if (!problem.empty()) return fail(problem.c_str());
    std::vector<float *> scale(kConvs), bias(kConvs);
    fold_batch_norms(plan, params, order, scale, bias);
    run_backbone_steps(plan, params, order, scale, bias);
    const int features = plan.features;
    global_average_pool(plan, static_cast<const float *>(plan.buffers[features]->data),
                        static_cast<float *>(params[nparam - 1]));
  } catch (const std::exception &e) {
    return fail(e.what());
  }
  return 0;
}

}  // namespace

extern "C" {

#define VN_CONV(name, stride, relu, residual, bf16)                                                           \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {         \
    return run_conv(nparam, params, ndims, shapes, dtypes, stride, relu, residual, bf16);                         \
  }
VN_CONV(VnConvS1, 1, false, false, false)
VN_CONV(VnConvS1Relu, 1, true, false, false)
VN_CONV(VnConvS2, 2, false, false, false)
VN_CONV(VnConvS2Relu, 2, true, false, false)
VN_CONV(VnConvAddS1Relu, 1, true, true, false)
// bf16 convolutions (float32 accumulation). The input and output types are the tensors'; the
// names differ by output type because MindSpore's PyNative mode caches an operator's output
// type by name.
VN_CONV(VnConvBf16S1, 1, false, false, true)
VN_CONV(VnConvBf16S2, 2, false, false, true)
VN_CONV(VnConvBf16S1Relu, 1, true, false, true)
VN_CONV(VnConvBf16S2Relu, 2, true, false, true)
VN_CONV(VnConvBf16AddS1Relu, 1, true, true, true)
VN_CONV(VnConvBf16AddS1ReluToF32, 1, true, true, true)

// The whole backbone (see run_backbone), by layer4's stride and precision.
#define VN_BACKBONE(name, last_stride, bf16)                                                                     \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {         \
    return run_backbone(nparam, params, ndims, shapes, dtypes, last_stride, bf16);                                \
  }
VN_BACKBONE(VnBackboneL1, 1, false)
VN_BACKBONE(VnBackboneL2, 2, false)
VN_BACKBONE(VnBackboneBf16L1, 1, true)
VN_BACKBONE(VnBackboneBf16L2, 2, true)

#define VN_TRAIN_CONV(name, stride, pass, bf16)                                                                \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {         \
    return run_train_conv(nparam, params, ndims, shapes, dtypes, stride, pass, bf16);                             \
  }
VN_TRAIN_CONV(VnConvTrainS1, 1, ConvPass::forward, false)
VN_TRAIN_CONV(VnConvTrainS2, 2, ConvPass::forward, false)
// The same forward under another name, for a first layer whose input needs no gradient:
// MindSpore's graph mode finds a custom op's bprop by its function, so the name must differ.
VN_TRAIN_CONV(VnConvTrainNoInputGradS1, 1, ConvPass::forward, false)
VN_TRAIN_CONV(VnConvTrainNoInputGradS2, 2, ConvPass::forward, false)
VN_TRAIN_CONV(VnConvBackwardS1, 1, ConvPass::backward, false)
VN_TRAIN_CONV(VnConvBackwardS2, 2, ConvPass::backward, false)
VN_TRAIN_CONV(VnConvBackwardWeightsS1, 1, ConvPass::backward_weights, false)
VN_TRAIN_CONV(VnConvBackwardWeightsS2, 2, ConvPass::backward_weights, false)
// The same passes computing in bf16, float32 in and out (see TrainConvPlan).
VN_TRAIN_CONV(VnConvTrainBf16S1, 1, ConvPass::forward, true)
VN_TRAIN_CONV(VnConvTrainBf16S2, 2, ConvPass::forward, true)
VN_TRAIN_CONV(VnConvTrainNoInputGradBf16S1, 1, ConvPass::forward, true)
VN_TRAIN_CONV(VnConvTrainNoInputGradBf16S2, 2, ConvPass::forward, true)
VN_TRAIN_CONV(VnConvBackwardBf16S1, 1, ConvPass::backward, true)
VN_TRAIN_CONV(VnConvBackwardBf16S2, 2, ConvPass::backward, true)
VN_TRAIN_CONV(VnConvBackwardWeightsBf16S1, 1, ConvPass::backward_weights, true)
VN_TRAIN_CONV(VnConvBackwardWeightsBf16S2, 2, ConvPass::backward_weights, true)

// Max-pool 3x3, stride 2, NHWC in and out: x (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C).
// Padding is ignored by the maximum, as in MindSpore's MaxPool with pad_mode="same".
int VnMaxPool3x3S2(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run_pool(nparam, params, ndims, shapes, dtypes, PoolPass::inference);
}

// The same max-pool for training: x -> y and the positions of the maxima (uint8, shaped like y),
// which VnMaxPoolBackward3x3S2 needs.
int VnMaxPoolTrain3x3S2(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                        void *) {
  return run_pool(nparam, params, ndims, shapes, dtypes, PoolPass::training);
}

// Backward of VnMaxPoolTrain3x3S2: dy, the maxima's positions, x (for its shape) -> dx.
int VnMaxPoolBackward3x3S2(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  return run_pool(nparam, params, ndims, shapes, dtypes, PoolPass::backward);
}

// The same two on bf16 activations and gradients.
int VnMaxPoolBf16Train3x3S2(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                            void *) {
  return run_pool(nparam, params, ndims, shapes, dtypes, PoolPass::training, true);
}

int VnMaxPoolBf16Backward3x3S2(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                               void *) {
  return run_pool(nparam, params, ndims, shapes, dtypes, PoolPass::backward, true);
}

// The head's layers for inference (see run_dense): the classifier's Dense, and the embedding's
// Dense followed by BatchNorm1d with its running statistics.
int VnDense(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run_dense(nparam, params, ndims, shapes, dtypes, false);
}

int VnDenseBatchNorm(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run_dense(nparam, params, ndims, shapes, dtypes, true);
}

// A bf16 activation that two ops read (a block's input: its first convolution and its
// shortcut): two copies, so that MindSpore never adds their two gradients itself (it has no
// CPU addition of bfloat16). x -> (a, b).
int VnForkBf16(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {
  return run_fork(nparam, params, ndims, shapes, dtypes, false);
}

// Its backward: (da, db) -> da + db, rounded to bf16 once.
int VnForkBf16Backward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                       void *) {
  return run_fork(nparam, params, ndims, shapes, dtypes, true);
}

// Which oneDNN implementations run the whole backbone for this input and precision, e.g.
// "35 jit_1x1:avx512_core, 17 jit:avx512_core, 1 ... (nChw16c)". 0, or 1 with the error in `out`.
int VnBackboneImplementations(int64_t n, int64_t h, int64_t w, int64_t last_stride, int bf16, char *out, int size) {
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    std::snprintf(out, size, "%s", implementations(backbone_plan(n, h, w, last_stride, bf16 != 0)).c_str());
  } catch (const std::exception &e) {
    std::snprintf(out, size, "%s", e.what());
    return 1;
  }
  return 0;
}

// How many times convolution weights were reordered since the library was loaded.
int64_t VnWeightReorders() { return weight_reorders().load(); }

// Which oneDNN implementation serves a convolution of this shape (e.g. "brgconv:avx512_core"),
// for benchmarks and tests. Returns 0 and fills `out`, or 1 with the error in `out`.
// With bf16 != 0, the bf16 convolution (bf16 in and out).
int VnConvImplementation(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                         int bf16, char *out, int size) {
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    const dt type = bf16 ? dt::bf16 : dt::f32;
    ConvPlan &plan = conv_plan(ConvSpec(n, h, w, cin, cout, k, stride).fused(true, false).types(type, type, type, dt::f32));
    std::snprintf(out, size, "%s", plan.implementation.c_str());
  } catch (const std::exception &e) {
    std::snprintf(out, size, "%s", e.what());
    return 1;
  }
  return 0;
}

// The implementations of a training convolution's passes, "forward / backward data / backward
// weights" (with bf16 != 0, of the bf16 passes on bf16 activations, as a bf16 network runs them,
// or float32's where those would be reference code).
int VnTrainConvImplementation(int64_t n, int64_t h, int64_t w, int64_t cin, int64_t cout, int64_t k, int64_t stride,
                              int bf16, char *out, int size) {
  try {
    std::lock_guard<std::mutex> lock(kernel_mutex());
    const dt activations = bf16 ? dt::bf16 : dt::f32;
    TrainConvPlan &plan = train_conv_plan(n, h, w, cin, cout, k, stride, bf16 != 0, activations, activations);
    std::snprintf(out, size, "%s%s", plan.bf16 ? "bf16: " : "f32: ", plan.implementation.c_str());
  } catch (const std::exception &e) {
    std::snprintf(out, size, "%s", e.what());
    return 1;
  }
  return 0;
}

// The instruction set oneDNN uses here (its effective ISA: the CPU's, capped by
// DNNL_MAX_CPU_ISA), e.g. "avx512_core_amx"; and 1 if it has native bf16 arithmetic (AVX512-BF16,
// AVX512-FP16's superset, AMX, or AVX2-VNNI-2), else 0.
int VnCpuIsa(char *out, int size) {
  using isa = dnnl::cpu_isa;
  const isa effective = dnnl::get_effective_cpu_isa();
  const char *name = "unknown";
  switch (effective) {
    case isa::sse41: name = "sse41"; break;
    case isa::avx: name = "avx"; break;
    case isa::avx2: name = "avx2"; break;
    case isa::avx2_vnni: name = "avx2_vnni"; break;
    case isa::avx2_vnni_2: name = "avx2_vnni_2"; break;
    case isa::avx512_core: name = "avx512_core"; break;
    case isa::avx512_core_vnni: name = "avx512_core_vnni"; break;
    case isa::avx512_core_bf16: name = "avx512_core_bf16"; break;
    case isa::avx512_core_fp16: name = "avx512_core_fp16"; break;
    case isa::avx512_core_amx: name = "avx512_core_amx"; break;
    case isa::avx512_core_amx_fp16: name = "avx512_core_amx_fp16"; break;
    default: break;
  }
  std::snprintf(out, size, "%s", name);
  return effective == isa::avx512_core_bf16 || effective == isa::avx512_core_fp16 ||
         effective == isa::avx512_core_amx || effective == isa::avx512_core_amx_fp16 || effective == isa::avx2_vnni_2;
}

#define VN_BATCH_NORM(name, backward, fused, bf16)                                                             \
  int name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *, void *) {         \
    return run_batch_norm(nparam, params, ndims, shapes, dtypes, backward, fused, bf16);                          \
  }
VN_BATCH_NORM(VnBatchNormTrain, false, Fused::none, false)
VN_BATCH_NORM(VnBatchNormReluTrain, false, Fused::relu, false)
VN_BATCH_NORM(VnBatchNormAddReluTrain, false, Fused::add_relu, false)
VN_BATCH_NORM(VnBatchNormBackward, true, Fused::none, false)
VN_BATCH_NORM(VnBatchNormReluBackward, true, Fused::relu, false)
VN_BATCH_NORM(VnBatchNormAddReluBackward, true, Fused::add_relu, false)
// The same on bf16 activations and gradients (a bf16 network's, between its convolutions).
VN_BATCH_NORM(VnBatchNormBf16Train, false, Fused::none, true)
VN_BATCH_NORM(VnBatchNormBf16ReluTrain, false, Fused::relu, true)
VN_BATCH_NORM(VnBatchNormBf16AddReluTrain, false, Fused::add_relu, true)
VN_BATCH_NORM(VnBatchNormBf16Backward, true, Fused::none, true)
VN_BATCH_NORM(VnBatchNormBf16ReluBackward, true, Fused::relu, true)
VN_BATCH_NORM(VnBatchNormBf16AddReluBackward, true, Fused::add_relu, true)

// Bytes of workspace the batch-norm with fused ReLU needs for x (N, H, W, C) (float32, or bf16
// with bf16 != 0), so that MindSpore can allocate it as an output; -1 on error.
int64_t VnBatchNormReluWorkspaceBytes(int64_t n, int64_t h, int64_t w, int64_t c, int bf16) {
  try {
    const memory::desc data = nhwc_desc(n, h, w, c, bf16 ? dt::bf16 : dt::f32);
    return static_cast<int64_t>(batch_norm_forward_desc(data, 1e-5f, Fused::relu).workspace_desc().get_size());
  } catch (const std::exception &) {
    return -1;
  }
}

}  // extern "C"
