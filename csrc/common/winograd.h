// Winograd's minimal filtering F(2×2, 3×3) (Lavin and Gray, "Fast Algorithms for Convolutional Neural
// Networks", 2015): a 2×2 block of a 3×3 correlation's outputs from a 4×4 tile of its input with 16
// multiplications instead of 36. With the transforms
//     Bᵀ = [1  0 -1  0]      G = [ 1    0    0 ]      Aᵀ = [1  1  1  0]
//          [0  1  1  0]          [1/2  1/2  1/2]           [0  1 -1 -1]
//          [0 -1  1  0]          [1/2 -1/2  1/2]
//          [0  1  0 -1]          [ 0    0    1 ]
// the block is Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d Bᵀᵀ)] A for a filter g (3×3) and an input tile d (4×4); along one
// axis, y0 = g0 d0 + g1 d1 + g2 d2 and y1 = g0 d1 + g1 d2 + g2 d3 (a correlation, as conv2d is). Over C
// input channels the products sum: M[ξ] = Σ_c U[ξ][c] V[ξ][c] for each of the 16 positions ξ of the
// transformed tile, which is 16 GEMMs of (tiles × C)·(C × F); then each tile's Y = Aᵀ M A. No torch type:
// cuda/conv2d_winograd.cuh and its CPU emulation test include it.
#pragma once

#include <c10/macros/Macros.h>

namespace torch_cs231n {
namespace winograd {

// One axis of each transform, on values `step` apart (so that a 2-D transform is rows, then columns).
template <typename T>
C10_HOST_DEVICE inline void input_1d(const T* d, int step, T* v, int v_step) {  // v = Bᵀ d
  const T d0 = d[0], d1 = d[step], d2 = d[2 * step], d3 = d[3 * step];
  v[0] = d0 - d2;
  v[v_step] = d1 + d2;
  v[2 * v_step] = d2 - d1;
  v[3 * v_step] = d1 - d3;
}
template <typename T>
C10_HOST_DEVICE inline void filter_1d(const T* g, int step, T* u, int u_step) {  // u = G g
  const T g0 = g[0], g1 = g[step], g2 = g[2 * step];
  u[0] = g0;
  u[u_step] = T(0.5) * (g0 + g1 + g2);
  u[2 * u_step] = T(0.5) * (g0 - g1 + g2);
  u[3 * u_step] = g2;
}
template <typename T>
C10_HOST_DEVICE inline void output_1d(const T* m, int step, T* y, int y_step) {  // y = Aᵀ m
  const T m0 = m[0], m1 = m[step], m2 = m[2 * step], m3 = m[3 * step];
  y[0] = m0 + m1 + m2;
  y[y_step] = m1 - m2 - m3;
}

// V = Bᵀ d B for a row-major 4×4 tile d.
template <typename T>
C10_HOST_DEVICE inline void input_tile(const T (&d)[4][4], T (&v)[4][4]) {
  T rows[4][4];
  for (int j = 0; j < 4; ++j) input_1d(&d[0][j], 4, &rows[0][j], 4);  // Bᵀ d, column by column
  for (int i = 0; i < 4; ++i) input_1d(&rows[i][0], 1, &v[i][0], 1);  // (Bᵀ d) B, row by row
}

// U = G g Gᵀ for a row-major 3×3 filter g.
template <typename T>
C10_HOST_DEVICE inline void filter_tile(const T (&g)[3][3], T (&u)[4][4]) {
  T rows[4][3];
  for (int j = 0; j < 3; ++j) filter_1d(&g[0][j], 3, &rows[0][j], 3);  // G g
  for (int i = 0; i < 4; ++i) filter_1d(&rows[i][0], 1, &u[i][0], 1);  // (G g) Gᵀ
}

// Y = Aᵀ m A for a row-major 4×4 tile m.
template <typename T>
C10_HOST_DEVICE inline void output_tile(const T (&m)[4][4], T (&y)[2][2]) {
  T rows[2][4];
  for (int j = 0; j < 4; ++j) output_1d(&m[0][j], 4, &rows[0][j], 4);  // Aᵀ m
  for (int i = 0; i < 2; ++i) output_1d(&rows[i][0], 1, &y[i][0], 1);  // (Aᵀ m) A
}

}  // namespace winograd
}  // namespace torch_cs231n
