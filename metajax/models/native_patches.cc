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

// Runs body(first, last) over [0, total) in chunks on the calling thread and the XLA intra-op
// pool. The caller works too and waits only for chunks a helper has already claimed, so it
// never blocks on a helper that the (possibly busy) pool has not started.
struct Chunks {
  std::function<void(int64_t, int64_t)> body;
  int64_t total = 0, chunk = 1;
  std::atomic<int64_t> next{0}, done{0};
  void Work() {
    for (;;) {
      const int64_t first = next.fetch_add(chunk);
      if (first >= total) return;
      const int64_t last = std::min(total, first + chunk);
      body(first, last);
      done.fetch_add(last - first);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t total, int64_t chunk,
                 std::function<void(int64_t, int64_t)> body) {
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), (total + chunk - 1) / chunk - 1);
  if (helpers <= 0) {
    body(0, total);
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
              [&](int64_t a, int64_t b) { Images<T, kToImage>(g, src, dst, a, b); });
  return ffi::Error::Success();
}

}  // namespace

#define METAJAX_BIND(D)                                                                  \
  ffi::Ffi::Bind()                                                                       \
      .Ctx<ffi::ThreadPool>()                                                            \
      .Arg<ffi::Buffer<D>>()                                                             \
      .Ret<ffi::Buffer<D>>()                                                             \
      .Attr<int64_t>("kh")                                                               \
      .Attr<int64_t>("kw")                                                               \
      .Attr<int64_t>("stride")                                                           \
      .Attr<int64_t>("pad")

XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxIm2colF32, (Run<ffi::F32, false>), METAJAX_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxIm2colF64, (Run<ffi::F64, false>), METAJAX_BIND(ffi::F64));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxCol2imF32, (Run<ffi::F32, true>), METAJAX_BIND(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(MetajaxCol2imF64, (Run<ffi::F64, true>), METAJAX_BIND(ffi::F64));
