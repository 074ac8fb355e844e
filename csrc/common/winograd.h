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
// transformed tile, which is 16 GEMMs of (tiles × C)·(C × F); then each tile's Y = Aᵀ M A.
//
// d_weight follows from Y being linear in U = G g Gᵀ: ∂L/∂U = V ⊙ (A dY Aᵀ) for the block's 2×2 output
// gradient dY, and ∂L/∂g = Gᵀ (∂L/∂U) G. Summed over blocks, ∂L/∂U[ξ] = Σ_p (A dY_p Aᵀ)[ξ] V_p[ξ]: 16 GEMMs
// again, of (F × tiles)·(tiles × C), each filter's 4×4 sum then taken back to 3×3 by Gᵀ · G. No torch
// type: cuda/conv2d_winograd.cuh and its CPU emulation test include it.
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

// The transposes of the last two, for d_weight: z = A dy (2 values to 4) and g = Gᵀ u (4 to 3).
template <typename T>
C10_HOST_DEVICE inline void grad_output_1d(const T* dy, int step, T* z, int z_step) {  // z = A dy
  const T y0 = dy[0], y1 = dy[step];
  z[0] = y0;
  z[z_step] = y0 + y1;
  z[2 * z_step] = y0 - y1;
  z[3 * z_step] = -y1;
}
template <typename T>
C10_HOST_DEVICE inline void grad_filter_1d(const T* u, int step, T* g, int g_step) {  // g = Gᵀ u
  const T u0 = u[0], u1 = u[step], u2 = u[2 * step], u3 = u[3 * step], half_sum = T(0.5) * (u1 + u2);
  g[0] = u0 + half_sum;
  g[g_step] = T(0.5) * (u1 - u2);
  g[2 * g_step] = half_sum + u3;
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

// Z = A dy Aᵀ for a row-major 2×2 block dy of the output's gradient.
template <typename T>
C10_HOST_DEVICE inline void grad_output_tile(const T (&dy)[2][2], T (&z)[4][4]) {
  T rows[4][2];
  for (int j = 0; j < 2; ++j) grad_output_1d(&dy[0][j], 2, &rows[0][j], 2);  // A dy
  for (int i = 0; i < 4; ++i) grad_output_1d(&rows[i][0], 1, &z[i][0], 1);   // (A dy) Aᵀ
}

// dg = Gᵀ u G for a row-major 4×4 tile u (∂L/∂U of one filter).
template <typename T>
C10_HOST_DEVICE inline void grad_filter_tile(const T (&u)[4][4], T (&dg)[3][3]) {
  T rows[3][4];
  for (int j = 0; j < 4; ++j) grad_filter_1d(&u[0][j], 4, &rows[0][j], 4);   // Gᵀ u
  for (int i = 0; i < 3; ++i) grad_filter_1d(&rows[i][0], 1, &dg[i][0], 1);  // (Gᵀ u) G
}

}  // namespace winograd
}  // namespace torch_cs231n
