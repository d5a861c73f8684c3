// im2col and its transpose (col2im) for NHWC convolutions, as XLA FFI custom calls on CPU.
// Built and loaded by metajax/models/native_patches.py; see its docstring for why.
//
// patches[..., i, j, (dy*kw + dx)*C + c] = image[..., i*stride + dy - pad, j*stride + dx - pad, c]
// (zero outside the image). The output height and width are the patch buffer's, so any
// high-side padding the caller's shapes imply works (e.g. a 2x2 window with pad 0 and
// Ho = H). Every leading dimension before (H, W, C) counts as images, so vmap folds in.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define METAJAX_X86 1
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

struct Geometry {
  int64_t images, h, w, c, ho, wo, kh, kw, stride, pad;
};

// image: (..., H, W, C); patches: (..., Ho, Wo, kh*kw*C). Output sizes come from the patch
// buffer, so the high-side padding is implied (any value a caller's shapes encode).
Geometry MakeGeometry(ffi::Span<const int64_t> image, ffi::Span<const int64_t> patches,
                      int64_t kh, int64_t kw, int64_t stride, int64_t pad) {
  Geometry g{1, 0, 0, 0, 0, 0, kh, kw, stride, pad};
  const int64_t rank = image.size();
  for (int64_t k = 0; k < rank - 3; ++k) g.images *= image[k];
  g.h = image[rank - 3];
  g.w = image[rank - 2];
  g.c = image[rank - 1];
  g.ho = patches[rank - 3];
  g.wo = patches[rank - 2];
  return g;
}

bool Consistent(ffi::Span<const int64_t> image, ffi::Span<const int64_t> patches,
                const Geometry& g) {
  if (image.size() < 3 || image.size() != patches.size()) return false;
  for (size_t k = 0; k + 3 < image.size(); ++k) {
    if (image[k] != patches[k]) return false;
  }
  return patches[image.size() - 1] == g.kh * g.kw * g.c && g.stride > 0 && g.pad >= 0;
}

// Runs body(first, last, slot) over [0, total) in chunks on the calling thread and the XLA
// intra-op pool; slot numbers the threads that take part (0 .. threads - 1), so a body can
// keep per-thread state. The caller works too and waits only for chunks a helper has already
// claimed, so it never blocks on a helper that the (possibly busy) pool has not started.
struct Chunks {
  std::function<void(int64_t, int64_t, int64_t)> body;
  int64_t total = 0, chunk = 1;
  std::atomic<int64_t> next{0}, done{0}, slots{0};
  void Work() {
    const int64_t slot = slots.fetch_add(1);
    for (;;) {
      const int64_t first = next.fetch_add(chunk);
      if (first >= total) return;
      const int64_t last = std::min(total, first + chunk);
      body(first, last, slot);
      done.fetch_add(last - first);
    }
  }
};

// How many threads ParallelFor may use for `total` items in chunks of `chunk`.
int64_t ParallelThreads(ffi::ThreadPool& pool, int64_t total, int64_t chunk) {
  return 1 + std::max<int64_t>(0, std::min<int64_t>(pool.num_threads(),
                                                    (total + chunk - 1) / chunk - 1));
}

void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t chunk,
                 std::function<void(int64_t, int64_t, int64_t)> body) {
  const int64_t helpers = ParallelThreads(pool, total, chunk) - 1;
  if (helpers <= 0) {
    body(0, total, 0);
    return;
  }
  auto shared = std::make_shared<Chunks>();
  shared->body = std::move(body);
  shared->total = total;
  shared->chunk = chunk;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([shared] { shared->Work(); });
  shared->Work();
  while (shared->done.load() < total) std::this_thread::yield();
}

// Images [first, last): im2col copies each in-bounds tap (zeros elsewhere); col2im (kToImage)
// adds each in-bounds tap of the patches back into its pixel.
template <typename T, bool kToImage>
void Images(const Geometry& g, const T* in, T* out, int64_t first, int64_t last) {
  const int64_t c = g.c, image_size = g.h * g.w * c, patch_size = g.ho * g.wo * g.kh * g.kw * c;
  for (int64_t n = first; n < last; ++n) {
    const T* src = in + n * (kToImage ? patch_size : image_size);
    T* dst = out + n * (kToImage ? image_size : patch_size);
    if (kToImage) std::memset(dst, 0, image_size * sizeof(T));
    int64_t tap = 0;  // offset of the current (row of) taps in the patch matrix
    for (int64_t i = 0; i < g.ho; ++i) {
      for (int64_t j = 0; j < g.wo; ++j) {
        const int64_t x0 = j * g.stride - g.pad, span = g.kw * c;
        const bool columns_inside = x0 >= 0 && x0 + g.kw <= g.w;
        for (int64_t dy = 0; dy < g.kh; ++dy, tap += span) {
          const int64_t y = i * g.stride + dy - g.pad;
          if (y < 0 || y >= g.h) {  // a padding row: no pixel of it is read
            if (!kToImage) std::memset(dst + tap, 0, span * sizeof(T));
            continue;
          }
          if (columns_inside) {  // the row's kw taps are kw adjacent pixels: one contiguous run
            const int64_t pixel = (y * g.w + x0) * c;
            if (kToImage) {
              for (int64_t k = 0; k < span; ++k) dst[pixel + k] += src[tap + k];
            } else if (span < 16) {  // e.g. 3 floats of a single-channel image: no memcpy call
              for (int64_t k = 0; k < span; ++k) dst[tap + k] = src[pixel + k];
            } else {
              std::memcpy(dst + tap, src + pixel, span * sizeof(T));
            }
            continue;
          }
          for (int64_t dx = 0; dx < g.kw; ++dx) {
            const int64_t x = x0 + dx, at = tap + dx * c;
            const bool inside = x >= 0 && x < g.w;
            const int64_t pixel = (y * g.w + x) * c;
            if (kToImage) {
              if (!inside) continue;
              for (int64_t k = 0; k < c; ++k) dst[pixel + k] += src[at + k];
            } else {
              for (int64_t k = 0; k < c; ++k) dst[at + k] = inside ? src[pixel + k] : T(0);
            }
          }
        }
      }
    }
  }
}

// About 256 KiB of output per chunk: enough work to pay for a pool task.
int64_t ImagesPerChunk(int64_t bytes_per_image) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, bytes_per_image));
}

// One handler for both directions: im2col reads the image and writes the patches, col2im
// (kToImage) reads the patches and writes the image.
template <ffi::DataType D, bool kToImage>
ffi::Error Run(ffi::ThreadPool pool, ffi::Buffer<D> in, ffi::ResultBuffer<D> out, int64_t kh,
               int64_t kw, int64_t stride, int64_t pad) {
  using T = ffi::NativeType<D>;
  const char* name = kToImage ? "col2im" : "im2col";
  const auto image = kToImage ? out->dimensions() : in.dimensions();
  const auto patches = kToImage ? in.dimensions() : out->dimensions();
  if (image.size() < 3 || patches.size() != image.size()) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": image and patches need the same rank >= 3");
  }
  const Geometry g = MakeGeometry(image, patches, kh, kw, stride, pad);
  if (!Consistent(image, patches, g)) {
    return ffi::Error::InvalidArgument(std::string(name) +
                                       ": patch shape does not match the image and window");
  }
  const T* src = in.typed_data();
  T* dst = out->typed_data();
  ParallelFor(pool, g.images, ImagesPerChunk(g.ho * g.wo * kh * kw * g.c * sizeof(T)),
              [&](int64_t a, int64_t b, int64_t) { Images<T, kToImage>(g, src, dst, a, b); });
  return ffi::Error::Success();
}


// Patch rows of pixels [first, last) (pixel = (image, i, j) in row-major order): the same
// values im2col writes, into a dense (last - first) x kh*kw*C buffer.
template <typename T>
void PatchRows(const Geometry& g, const T* image, int64_t first, int64_t last, T* rows) {
  const int64_t c = g.c, features = g.kh * g.kw * c, pixels = g.ho * g.wo;
  for (int64_t p = first; p < last; ++p) {
    const int64_t n = p / pixels, i = (p % pixels) / g.wo, j = p % g.wo;
    const T* src = image + n * g.h * g.w * c;
    T* dst = rows + (p - first) * features;
    for (int64_t dy = 0; dy < g.kh; ++dy) {
      const int64_t y = i * g.stride + dy - g.pad;
      for (int64_t dx = 0; dx < g.kw; ++dx, dst += c) {
        const int64_t x = j * g.stride + dx - g.pad;
        if (y < 0 || y >= g.h || x < 0 || x >= g.w) {
          std::fill(dst, dst + c, T(0));
        } else {
          std::copy(src + (y * g.w + x) * c, src + (y * g.w + x + 1) * c, dst);
        }
      }
    }
  }
}

// out[k, n] += sum_p a[p, k] * b[p, n] over rows [k0, k1) and columns [n0, n1) of out;
// a is rows x K, b is rows x N, out is K x N, all row-major.
template <typename T>
void AddProductTNGeneric(const T* a, const T* b, T* out, int64_t rows, int64_t K, int64_t N,
                         int64_t k0, int64_t k1, int64_t n0, int64_t n1) {
  for (int64_t p = 0; p < rows; ++p) {
    for (int64_t k = k0; k < k1; ++k) {
      const T av = a[p * K + k];
      T* o = out + k * N;
      const T* bp = b + p * N;
      for (int64_t n = n0; n < n1; ++n) o[n] += av * bp[n];
    }
  }
}

#ifdef METAJAX_X86
// A 6 x 16 block of out, accumulated in twelve named registers (an array of __m256 is
// spilled to the stack by GCC, which halves the speed).
__attribute__((target("avx2,fma"))) void Block6x16(const float* a, int64_t lda, const float* b,
                                                   int64_t ldb, float* out, int64_t ldo,
                                                   int64_t rows) {
#define METAJAX_LOAD(r)                                  \
  __m256 c##r##0 = _mm256_loadu_ps(out + (r) * ldo),     \
         c##r##1 = _mm256_loadu_ps(out + (r) * ldo + 8);
  METAJAX_LOAD(0) METAJAX_LOAD(1) METAJAX_LOAD(2) METAJAX_LOAD(3) METAJAX_LOAD(4) METAJAX_LOAD(5)
  for (int64_t p = 0; p < rows; ++p) {
    const __m256 b0 = _mm256_loadu_ps(b + p * ldb), b1 = _mm256_loadu_ps(b + p * ldb + 8);
    const float* ap = a + p * lda;
    __m256 av;
#define METAJAX_FMA(r)                                   \
  av = _mm256_broadcast_ss(ap + (r));                    \
  c##r##0 = _mm256_fmadd_ps(av, b0, c##r##0);            \
  c##r##1 = _mm256_fmadd_ps(av, b1, c##r##1);
    METAJAX_FMA(0) METAJAX_FMA(1) METAJAX_FMA(2) METAJAX_FMA(3) METAJAX_FMA(4) METAJAX_FMA(5)
  }
#define METAJAX_STORE(r)                                 \
  _mm256_storeu_ps(out + (r) * ldo, c##r##0);            \
  _mm256_storeu_ps(out + (r) * ldo + 8, c##r##1);
  METAJAX_STORE(0) METAJAX_STORE(1) METAJAX_STORE(2) METAJAX_STORE(3) METAJAX_STORE(4)
  METAJAX_STORE(5)
#undef METAJAX_LOAD
#undef METAJAX_FMA
#undef METAJAX_STORE
}

bool HasAvx2Fma() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}
#endif

template <typename T>
void AddProductTN(const T* a, const T* b, T* out, int64_t rows, int64_t K, int64_t N) {
  int64_t k_tiled = 0, n_tiled = 0;
#ifdef METAJAX_X86
  if (std::is_same<T, float>::value && HasAvx2Fma()) {
    k_tiled = K - K % 6;
    n_tiled = N - N % 16;
    for (int64_t k = 0; k < k_tiled; k += 6) {
      for (int64_t n = 0; n < n_tiled; n += 16) {
        Block6x16(reinterpret_cast<const float*>(a) + k, K, reinterpret_cast<const float*>(b) + n,
                  N, reinterpret_cast<float*>(out) + k * N + n, N, rows);
      }
    }
  }
#endif
  AddProductTNGeneric(a, b, out, rows, K, N, 0, k_tiled, n_tiled, N);  // right edge
  AddProductTNGeneric(a, b, out, rows, K, N, k_tiled, K, 0, N);        // bottom rows
}

// Pixels per patch-row buffer: 48 rows of 576 floats (108 KiB) and their dz rows stay in L2.
constexpr int64_t kRowsPerBlock = 48;

template <typename T>
void WeightGradPixels(const Geometry& g, const T* image, const T* dz, int64_t cout,
                      int64_t first, int64_t last, T* out) {
  const int64_t features = g.kh * g.kw * g.c;
  std::vector<T> rows(kRowsPerBlock * features);
  for (int64_t p = first; p < last; p += kRowsPerBlock) {
    const int64_t end = std::min(last, p + kRowsPerBlock);
    PatchRows(g, image, p, end, rows.data());
    AddProductTN(rows.data(), dz + p * cout, out, end - p, features, cout);
  }
}

// image: (G..., N..., H, W, C); dz: (G..., N..., Ho, Wo, C_out); dw: (G..., kh, kw, C, C_out).
// The G dims (as many as dw has before its last four; vmap adds them) are separate
// problems; the N dims are summed over.
template <ffi::DataType D>
ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<D> image, ffi::Buffer<D> dz,
                      ffi::ResultBuffer<D> dw, int64_t kh, int64_t kw, int64_t stride,
                      int64_t pad) {
  using T = ffi::NativeType<D>;
  const auto xd = image.dimensions(), zd = dz.dimensions(), wd = dw->dimensions();
  const int64_t rank = xd.size(), groups_rank = static_cast<int64_t>(wd.size()) - 4;
  bool ok = groups_rank >= 0 && rank >= groups_rank + 3 && zd.size() == xd.size() &&
            stride > 0 && pad >= 0;
  for (int64_t k = 0; ok && k < rank - 3; ++k) ok = xd[k] == zd[k];
  for (int64_t k = 0; ok && k < groups_rank; ++k) ok = xd[k] == wd[k];
  ok = ok && wd[groups_rank] == kh && wd[groups_rank + 1] == kw &&
       wd[groups_rank + 2] == xd[rank - 1] && wd[groups_rank + 3] == zd[rank - 1];
  if (!ok) {
    return ffi::Error::InvalidArgument(
        "conv_weight_grad: need image (G..., N..., H, W, C), dz (G..., N..., Ho, Wo, C_out) "
        "and a (G..., kh, kw, C, C_out) result");
  }
  int64_t groups = 1, images = 1;
  for (int64_t k = 0; k < groups_rank; ++k) groups *= xd[k];
  for (int64_t k = groups_rank; k < rank - 3; ++k) images *= xd[k];
  Geometry g{images, xd[rank - 3], xd[rank - 2], xd[rank - 1], zd[rank - 3], zd[rank - 2],
             kh, kw, stride, pad};
  const int64_t cout = zd[rank - 1], features = kh * kw * g.c, size = features * cout;
  const int64_t pixels = images * g.ho * g.wo;
  // Blocks of pixels are taken by whichever thread is free (so a busy pool thread does not
  // hold up the rest), each thread summing into its own buffer; a product of fewer than
  // about 4 MFLOP stays on one thread.
  const int64_t block = 4 * kRowsPerBlock;
  const int64_t blocks = (pixels + block - 1) / block;
  const int64_t threads = pixels * size >= (int64_t{1} << 21)
                              ? ParallelThreads(pool, blocks, 1) : 1;
  std::vector<T> partial((threads - 1) * size);
  for (int64_t grp = 0; grp < groups; ++grp) {
    const T* x = image.typed_data() + grp * images * g.h * g.w * g.c;
    const T* z = dz.typed_data() + grp * pixels * cout;
    T* out = dw->typed_data() + grp * size;
    std::fill(out, out + size, T(0));
    std::fill(partial.begin(), partial.end(), T(0));
    auto run = [&](int64_t a, int64_t b, int64_t slot) {
      T* target = slot == 0 ? out : partial.data() + (slot - 1) * size;
      WeightGradPixels(g, x, z, cout, a * block, std::min(pixels, b * block), target);
    };
    if (threads == 1) {
      run(0, blocks, 0);
    } else {
      ParallelFor(pool, blocks, 1, run);
    }
    for (int64_t slot = 1; slot < threads; ++slot) {
      const T* src = partial.data() + (slot - 1) * size;
      for (int64_t k = 0; k < size; ++k) out[k] += src[k];
    }
  }
  return ffi::Error::Success();
}

}  // namespace

// A handler on XLA's thread pool with `args` buffers of type D, one result of D, and the window.
#define METAJAX_BIND(D, args)                                                            \
  args(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>(), D)                                       \
      .Ret<ffi::Buffer<D>>()                                                             \
      .Attr<int64_t>("kh")                                                               \
      .Attr<int64_t>("kw")                                                               \
      .Attr<int64_t>("stride")                                                           \
      .Attr<int64_t>("pad")
#define METAJAX_ONE_ARG(b, D) b.Arg<ffi::Buffer<D>>()
#define METAJAX_TWO_ARGS(b, D) b.Arg<ffi::Buffer<D>>().Arg<ffi::Buffer<D>>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxIm2colF32, (Run<ffi::F32, false>), METAJAX_BIND(ffi::F32, METAJAX_ONE_ARG));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxIm2colF64, (Run<ffi::F64, false>), METAJAX_BIND(ffi::F64, METAJAX_ONE_ARG));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxCol2imF32, (Run<ffi::F32, true>), METAJAX_BIND(ffi::F32, METAJAX_ONE_ARG));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxCol2imF64, (Run<ffi::F64, true>), METAJAX_BIND(ffi::F64, METAJAX_ONE_ARG));

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxConvWeightGradF32, WeightGrad<ffi::F32>,
                              METAJAX_BIND(ffi::F32, METAJAX_TWO_ARGS));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxConvWeightGradF64, WeightGrad<ffi::F64>,
                              METAJAX_BIND(ffi::F64, METAJAX_TWO_ARGS));
