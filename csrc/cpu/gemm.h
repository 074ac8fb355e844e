// Our GEMM for the convolution: C = A·B, with packed panels and register-blocked micro-kernels
// (gemm_microkernel.h), BLIS-style. docs/conv2d.md ("The GEMM") draws the blocking.
//
// float32 and float64 (the latter for gradcheck, portable code). A and B are strided views, so a
// transposed operand needs no copy of its own: packing reads it in whatever order it lies. C is row-major
// with unit column stride. Beside the plain product: B written by a callback (im2col into the panels),
// B read in place by rows (shifted planes), and sums over segments with A read in place (NHWC).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

namespace torch_cs231n {
namespace cpu {

// Scratch memory of the calling thread, kept from call to call: large buffers allocated afresh on every
// call go back to the OS when freed and come back one page fault per 4 KiB (measured: a 9 ms overhead on a
// 4 ms convolution in this VM). `slot` tells apart the buffers in use at the same time (Scratch below);
// the contents are not initialised. What stays allocated is the largest size each slot was asked for,
// which the convolution bounds independently of the batch size (docs/conv2d.md).
enum class Scratch : int { kPackA, kPackB, kFilters, kRows, kOut, kPadded, kGrad, kPartial, kTransposed, kCount };

template <typename T>
T* thread_scratch(Scratch slot, int64_t size) {
  thread_local std::vector<T> buffers[static_cast<int>(Scratch::kCount)];
  std::vector<T>& buffer = buffers[static_cast<int>(slot)];
  if (static_cast<int64_t>(buffer.size()) < size) buffer.resize(size);
  return buffer.data();
}

// Element (i, j) of a matrix view lies at data[i * rs + j * cs], or at data[rows[i] + j * cs] when the
// view has a table of its rows (A's rows are then where the table says: the real pixels of a padded
// plane, for one; only A may have one).
template <typename T>
struct MatrixView {
  const T* data;
  int64_t rs, cs;
  const int64_t* rows = nullptr;

  const T* row(int64_t i) const { return data + (rows ? rows[i] : i * rs); }
};

// What is added to A·B when C is written:
//   C[i, j] = A·B[i, j] + (accumulate ? C[i, j] : 0) + (row_bias ? row_bias[i] : 0) + (col_bias ? col_bias[j] : 0)
template <typename T>
struct GemmEpilogue {
  bool accumulate = false;
  const T* row_bias = nullptr;
  const T* col_bias = nullptr;
};

// Writes B[p0 .. p0+kc, j0 .. j0+nc) into dst in the packed layout: slivers of nr columns one after the
// other, sliver s holding for each k its nr values (kc * nr floats; columns past nc are zero). Lets the
// convolution run im2col straight into the GEMM's panels, so that the column matrix is never stored.
template <typename T>
using PackB = std::function<void(int64_t p0, int64_t j0, int64_t kc, int64_t nc, int nr, T* dst)>;

// One row of B's block, row[0 .. nc) = B[p0 + p, j0 .. j0+nc), into its place in the slivers of a PackB.
template <typename T>
inline void scatter_row_to_slivers(const T* row, int64_t p, int64_t kc, int64_t nc, int nr, T* dst) {
  for (int64_t s = 0; s < nc; s += nr) {
    T* out = dst + s * kc + p * nr;
    const int64_t cols = nc - s < nr ? nc - s : nr;
    for (int64_t j = 0; j < cols; ++j) out[j] = row[s + j];
    for (int64_t j = cols; j < nr; ++j) out[j] = T(0);
  }
}

// C (m x n) = A · B with B's rows read in place: B[p, j] = b[b_off[p] + j] (the shifted planes of a
// convolution, or a 1x1 layer's input planes). On AVX-512 (float32) B is never packed (and no row is
// read past its n elements); elsewhere it is packed by copying the rows.
template <typename T>
void gemm_rows_b(int64_t m, int64_t n, int64_t k, MatrixView<T> a, const T* b, const int64_t* b_off, T* c, int64_t ldc,
                 const GemmEpilogue<T>& epilogue = {});

// For a PackB whose B is the transpose of rows that lie in memory: B[p0 + p, j] = rows[j][p0 + p] for
// p < kc, j < nc (d_W's col(x)ᵀ, whose columns are runs of the input). Reads each run once and writes
// it down its sliver; on AVX-512 in 16 x 16 blocks transposed in registers.
template <typename T>
void pack_transposed_rows(const T* const* rows, int64_t p0, int64_t kc, int64_t nc, int nr, T* dst);

// The columns past nc of the last sliver of a PackB's block, zeros in all kc rows (the micro-kernels
// read whole slivers).
template <typename T>
inline void zero_last_sliver_tail(T* dst, int64_t kc, int64_t nc, int nr) {
  const int64_t tail = nc % nr;
  if (tail == 0) return;
  T* last = dst + (nc / nr) * kc * nr;
  for (int64_t p = 0; p < kc; ++p) {
    for (int64_t j = tail; j < nr; ++j) last[p * nr + j] = T(0);
  }
}

// A run of row p of B's block, columns [q, q+len) (q counted from the block's first column), copied into
// its place in the slivers of a PackB.
template <typename T>
inline void copy_run_to_slivers(const T* run, int64_t q, int64_t len, int64_t p, int64_t kc, int nr, T* dst) {
  while (len > 0) {
    const int64_t sliver = q / nr, offset = q % nr, piece = len < nr - offset ? len : nr - offset;
    T* out = dst + sliver * kc * nr + p * nr + offset;
    for (int64_t j = 0; j < piece; ++j) out[j] = run[j];
    run += piece;
    q += piece;
    len -= piece;
  }
}

// dst[j * dst_stride + i] = src[i * src_stride + j] for i < rows, j < cols (the layout changes of the
// convolution: NCHW samples to pixels x channels and back); AVX-512 moves 16 x 16 blocks in registers.
// Outside a parallel region a large matrix is split among the threads.
template <typename T>
void transpose_matrix(const T* src, int64_t src_stride, int64_t rows, int64_t cols, T* dst, int64_t dst_stride);

// C (m x n, row stride ldc) from A (m x k) and B (k x n), with B a strided view or written by a PackB.
// float32 runs the micro-kernel of cpu_isa(), float64 the portable one (gemm_microkernel.h). The packing
// buffers are the thread's own and bounded (gemm.cpp), whatever m, n and k. The columns of C (or its
// rows, when it has few columns) are split among at::parallel_for's threads; inside a parallel region
// it runs on the calling thread alone.
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixView<T> a, MatrixView<T> b, T* c, int64_t ldc,
          const GemmEpilogue<T>& epilogue = {});
template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatrixView<T> a, const PackB<T>& b, T* c, int64_t ldc,
          const GemmEpilogue<T>& epilogue = {});

// The B of gemm_segments (nseg*kc x n: the segments' B one after the other) through three strides:
//     B[s*kc + i, j] = data[s*ss + i*rs + j*cs]        segment s < nseg, row i < kc of it, column j < n
// A convolution's filters in torch's own layout are such a view, whatever the layout (NCHW: the taps are
// contiguous, ss = ±1; channels_last: the channels are) and for the transposed convolution too.
template <typename T>
struct SegmentedView {
  const T* data;
  int64_t ss, rs, cs;
};

// That B prepared once for all the products that share it (one per sample): packed in slivers of 64
// columns where the AVX-512 kernel will read it, the view itself elsewhere.
template <typename T>
struct SegmentsB {
  SegmentedView<T> view;
  int64_t nseg, kc, n;
  const T* packed;  // null unless the AVX-512 kernel runs
};

// The elements the packed form needs (0 where the kernel reads the view itself), and the preparation,
// which packs into `storage` (that many elements, which must outlive the products) in parallel.
template <typename T>
int64_t segments_b_size(int64_t k, int64_t n);
template <typename T>
SegmentsB<T> prepare_segments_b(int64_t nseg, int64_t kc, int64_t n, SegmentedView<T> b, T* storage);

// C (m x n) = Σ_s A_s · B_s (+ the epilogue) over b's nseg segments of kc: A_s is m x kc with unit
// column stride, its row i at a_seg[s] + a_rows[i] (a table of m offsets), or a_seg[s] + i * lda
// without one. The channels_last convolution's form: the segments are the filter's taps, A_s the input's
// pixels shifted by the tap (the table skips the padding's pixels), B the filters. On AVX-512 (float32)
// A is never packed (microkernel_avx512_segments); elsewhere it is one packed GEMM per segment.
template <typename T>
void gemm_segments(int64_t m, const T* const* a_seg, int64_t lda, const SegmentsB<T>& b, T* c, int64_t ldc,
                   const GemmEpilogue<T>& epilogue = {}, const int64_t* a_rows = nullptr);

// C (m x n) = A · B (+ the epilogue) with neither operand packed, for d_W in NHWC (d_Wᵀ = col(x)ᵀ · dY):
//     A[i, p] = a_row[i][a_col[p]]     row i's start, plus column p's offset (a tap's shift of the padded
//                                      input, plus an output's pixel: a column's rows are channels side by side)
//     B[p, j] = b[p * ldb + j]         dY's rows as they lie
// Only where the AVX-512 kernel runs (float32: gather_a_available()); elsewhere the caller packs. Inside
// a parallel region on the calling thread; outside one, its rows are split among the threads.
bool gather_a_available();
void gemm_gather_a(int64_t m, int64_t n, int64_t k, const float* const* a_row, const int64_t* a_col, const float* b,
                   int64_t ldb, float* c, int64_t ldc, const GemmEpilogue<float>& epilogue = {});

}  // namespace cpu
}  // namespace torch_cs231n
