// The elementwise part of one HM-LSTM layer step on the CPU, forward and backward, fused into one pass over
// the batch: what the torch-op backend (hmlm/fast/kernels/torch_ops.py) does with a few dozen torch ops per step
// (each paying microseconds of dispatch), done here in one call. The matmuls stay in Python (torch's BLAS); the
// three functions, and their arguments, are those of torch_ops.py's `cell_forward`, `cell_backward` and
// `route_backward` (hmlm.fast.kernels.FusedKernels), with the arithmetic explained in hmlm/fast/'s docstring, and
// tests/test_model.py holds both to the reference cell in float64. hmlm/fast/kernels/triton.py is the same for
// CUDA. Built on first use by hmlm/fast/kernels/cpu.py.
//
// Every (B, width) argument may be a row-strided view (the last dimension contiguous); an absent optional
// argument means "this layer has none": no layer below (layer 1, z_below = 1), no layer above (the top layer:
// no boundary), no layer norm, or nothing saved for the backward. Every tensor has the state's dtype: the matmuls
// run in it too (hmlm.fast.kernels chooses these kernels only then), so the arguments for a matmul in another dtype
// (`addend`, `ds_mm`) are never given here.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>

namespace {

using OptTensor = std::optional<at::Tensor>;

// Row b of a (B, width) tensor, or nullptr rows for an absent one.
template <typename T>
struct Rows {
  T* data = nullptr;
  int64_t stride = 0;
  Rows() = default;
  explicit Rows(const at::Tensor& t) {
    TORCH_CHECK(t.dim() == 2, "hmlm_cpu: expected a 2-d tensor, got ", t.dim(), " dimensions");
    TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "hmlm_cpu: the last dimension must be contiguous");
    data = t.data_ptr<T>();
    stride = t.stride(0);
  }
  explicit Rows(const OptTensor& t) {
    if (t.has_value() && t->defined()) *this = Rows(*t);
  }
  T* operator[](int64_t b) const { return data + b * stride; }
  explicit operator bool() const { return data != nullptr; }
};

template <typename T>
const T* ptr_or_null(const OptTensor& t) {  // a parameter vector, read as one flat array
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_contiguous(), "hmlm_cpu: the layer norm parameters must be contiguous");
  return t->data_ptr<T>();
}

// torch.lerp(start, end, weight), written as torch writes it, so that it is exact at weight 0 and 1.
template <typename T>
inline T lerp(T start, T end, T weight) {
  return weight < T(0.5) ? start + weight * (end - start) : end - (end - start) * (T(1) - weight);
}

// The reductions are written for the vectorizer: `omp simd reduction` (-fopenmp-simd) lets it sum in any order,
// which a plain loop over floats may not do; the sums differ from torch's in the last bits only.
template <typename T>
inline T sum(const T* x, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k];
  return s;
}

template <typename T>
inline T dot(const T* x, const T* y, int64_t n) {
  T s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < n; ++k) s += x[k] * y[k];
  return s;
}

// Mean and reciprocal standard deviation (biased variance) of n values, as F.layer_norm normalizes.
template <typename T>
inline void moments(const T* x, int64_t n, double eps, T& mean, T& rstd) {
  mean = sum(x, n) / T(n);
  T var = 0;
#pragma omp simd reduction(+ : var)
  for (int64_t k = 0; k < n; ++k) var += (x[k] - mean) * (x[k] - mean);
  rstd = T(1) / std::sqrt(var / T(n) + T(eps));
}

// Layer norm's backward for one row: from dy (the gradient of gain*xhat + bias) and x to dx (added to dx when
// accumulate), with the gain and bias gradients added to d_gain and d_bias. xhat is scratch of n values.
template <typename T>
inline void layer_norm_backward(const T* dy, const T* x, const T* gain, int64_t n, T mean, T rstd, T* xhat, T* dx,
                                bool accumulate, T* d_gain, T* d_bias) {
  T sum_dn = 0, sum_dn_xhat = 0;
#pragma omp simd reduction(+ : sum_dn, sum_dn_xhat)
  for (int64_t k = 0; k < n; ++k) {
    xhat[k] = (x[k] - mean) * rstd;
    const T dn = dy[k] * gain[k];
    sum_dn += dn;
    sum_dn_xhat += dn * xhat[k];
  }
  const T a = sum_dn / T(n), b = sum_dn_xhat / T(n);
  for (int64_t k = 0; k < n; ++k) {
    const T v = rstd * (dy[k] * gain[k] - a - xhat[k] * b);
    dx[k] = accumulate ? dx[k] + v : v;
    d_gain[k] += dy[k] * xhat[k];
    d_bias[k] += dy[k];
  }
}

// The blend's per-row coefficients, from z_prev and z_below (1 for layer 1): see hmlm/fast/'s docstring.
template <typename T>
struct Blend {
  T update, keep, copy;
  Blend(T z_prev, T z_below) : update(z_below - z_prev * z_below), keep(z_prev + update), copy(T(1) - keep) {}
};

enum ZrawMode : int64_t { kStep = 0, kSoft = 1, kGiven = 2 };

// Rows per task of at::parallel_for: about 32k elements of work each, so small batches stay on one thread.
int64_t grain(int64_t H) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 8 * H)); }

template <typename T>
void cell_forward_impl(const at::Tensor& gates, const OptTensor& zhat_t, const OptTensor& ln_gain_t,
                       const OptTensor& ln_bias_t, const OptTensor& cell_gain_t, const OptTensor& cell_bias_t,
                       const at::Tensor& h_prev_t, const at::Tensor& c_prev_t, const at::Tensor& z_prev_t,
                       const OptTensor& z_below_t, const at::Tensor& act_t, const at::Tensor& keep_f_t,
                       const at::Tensor& c_t, const at::Tensor& tc_t, const at::Tensor& h_t,
                       const OptTensor& h_rec_t, const OptTensor& h_up_t, const OptTensor& h_down_t,
                       const OptTensor& neg_dh_t, const OptTensor& neg_dc_t, const OptTensor& zraw_t,
                       const OptTensor& z_t, const OptTensor& gates_mean_t, const OptTensor& gates_rstd_t,
                       const OptTensor& cell_mean_t, const OptTensor& cell_rstd_t, int64_t zraw_mode, bool seed,
                       double slope, double eps) {
  const int64_t B = gates.size(0), H = c_t.size(1);
  const Rows<T> g_in(gates), zhat(zhat_t), h_prev(h_prev_t), c_prev(c_prev_t), z_prev(z_prev_t), z_below(z_below_t);
  const Rows<T> act(act_t), keep_f(keep_f_t), c_out(c_t), tc_out(tc_t), h_out(h_t), neg_dh(neg_dh_t), neg_dc(neg_dc_t);
  const Rows<T> zraw(zraw_t), z_out(z_t), g_mean(gates_mean_t), g_rstd(gates_rstd_t), c_mean(cell_mean_t),
      c_rstd(cell_rstd_t);
  const Rows<T> h_rec(h_rec_t), h_up(h_up_t), h_down(h_down_t);
  const T* ln_gain = ptr_or_null<T>(ln_gain_t);
  const T* ln_bias = ptr_or_null<T>(ln_bias_t);
  const T* cell_gain = ptr_or_null<T>(cell_gain_t);
  const T* cell_bias = ptr_or_null<T>(cell_bias_t);
  const bool bottom = !z_below;
  const T S = T(slope);

  // The transcendental functions run as one torch sigmoid over the whole batch, vectorized (a scalar std::exp
  // in the loops would cost more than all the rest), with tanh(x) = 2 sigm(2x) - 1: torch's tanh takes about
  // three times as long as its sigmoid on the CPU. Between them, one pass over the rows does the rest.
  // Gates: sigm(f), sigm(i), sigm(o), tanh(g), each block layer-normalized on its own first; the g block goes
  // into the sigmoid doubled.
  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t j = 0; j < 4; ++j) {
        const T* xj = g_in[b] + j * H;
        T* aj = act[b] + j * H;
        const T scale = j == 3 ? T(2) : T(1);
        if (ln_gain) {
          T mean, rstd;
          moments(xj, H, eps, mean, rstd);
          if (g_mean) g_mean[b][j] = mean, g_rstd[b][j] = rstd;
          const T *gain = ln_gain + j * H, *bias = ln_bias + j * H;
          for (int64_t k = 0; k < H; ++k) aj[k] = scale * (bias[k] + (xj[k] - mean) * rstd * gain[k]);
        } else {
          for (int64_t k = 0; k < H; ++k) aj[k] = scale * xj[k];
        }
      }
    }
  });
  act_t.sigmoid_();

  // c = keep*i*g + (copy + update*f)*c_prev, and into tc what goes into the tanh: c, or c layer-normalized.
  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T zp = z_prev[b][0];
      const auto [update, keep, copy] = Blend<T>(zp, bottom ? T(1) : z_below[b][0]);
      const T *f = act[b], *i = f + H, *cp = c_prev[b];
      T *g = act[b] + 3 * H, *kf = keep_f[b], *c = c_out[b], *tc = tc_out[b];
      for (int64_t k = 0; k < H; ++k) {
        g[k] = T(2) * g[k] - T(1);  // tanh, from the sigmoid of the doubled input
        const T ig = i[k] * g[k];
        if (bottom) {
          kf[k] = f[k] - f[k] * zp;
          c[k] = ig + kf[k] * cp[k];
        } else {
          kf[k] = copy + f[k] * update;
          c[k] = ig * keep + kf[k] * cp[k];
          if (neg_dc) neg_dc[b][k] = ig - cp[k];
        }
      }
      if (cell_gain) {
        T mean, rstd;
        moments(c, H, eps, mean, rstd);
        if (c_mean) c_mean[b][0] = mean, c_rstd[b][0] = rstd;
        for (int64_t k = 0; k < H; ++k) tc[k] = T(2) * ((c[k] - mean) * rstd * cell_gain[k] + cell_bias[k]);
      } else {
        for (int64_t k = 0; k < H; ++k) tc[k] = T(2) * c[k];
      }
    }
  });
  tc_t.sigmoid_();

  // h = lerp(o*tanh(c), h_prev, copy), and the boundary: z = keep*zraw (the seed's cell: zraw, COPY included).
  // Then h where the next matmuls read it:
  // this layer's own next input (where h does not live there), the layer below's next top-down input z_below*h,
  // and the layer above's next bottom-up input z*h.
  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T zb = bottom ? T(1) : z_below[b][0];
      const auto [update, keep, copy] = Blend<T>(z_prev[b][0], zb);
      const T *o = act[b] + 2 * H, *hp = h_prev[b];
      T *tc = tc_out[b], *h = h_out[b];
      for (int64_t k = 0; k < H; ++k) {
        tc[k] = T(2) * tc[k] - T(1);  // tanh, as for g
        const T otc = o[k] * tc[k];
        if (neg_dh) neg_dh[b][k] = otc - hp[k];
        h[k] = bottom ? otc : lerp(otc, hp[k], copy);
      }
      if (h_rec) std::copy(h, h + H, h_rec[b]);
      if (h_down) {
        for (int64_t k = 0; k < H; ++k) h_down[b][k] = h[k] * zb;
      }
      if (zraw) {
        T& zr = zraw[b][0];
        if (zraw_mode == kStep) {
          zr = zhat[b][0] > T(0) ? T(1) : T(0);
        } else if (zraw_mode == kSoft) {
          zr = std::min(T(1), std::max(T(0), (S * zhat[b][0] + T(1)) / T(2)));
        }  // kGiven: drawn by the caller (Bernoulli, in the reference's order)
        z_out[b][0] = bottom || seed ? zr : keep * zr;
        if (h_up) {
          const T z_new = z_out[b][0];
          for (int64_t k = 0; k < H; ++k) h_up[b][k] = h[k] * z_new;
        }
      }
    }
  });
}

template <typename T>
void cell_backward_impl(const at::Tensor& pair_t, const OptTensor& g_ext_t, const at::Tensor& g_z_t,
                        const at::Tensor& act_t,
                        const at::Tensor& tc_t, const at::Tensor& c_prev_t, const at::Tensor& c_t,
                        const at::Tensor& keep_f_t, const OptTensor& neg_d_copy_t, const OptTensor& zraw_t,
                        const OptTensor& zhat_t, const OptTensor& gates_t, const OptTensor& gates_mean_t,
                        const OptTensor& gates_rstd_t, const OptTensor& cell_mean_t, const OptTensor& cell_rstd_t,
                        const OptTensor& ln_gain_t, const OptTensor& cell_gain_t, const OptTensor& ln_grad_t,
                        const at::Tensor& z_prev_t, const OptTensor& z_below_t, const at::Tensor& ds_t,
                        const at::Tensor& dc_prev_t, const at::Tensor& gz_prev_t, const OptTensor& gz_below_t,
                        bool seed, double slope) {
  const int64_t B = act_t.size(0), H = tc_t.size(1);
  const Rows<T> pair(pair_t), g_ext(g_ext_t), g_z(g_z_t), act(act_t), tc_in(tc_t), c_prev(c_prev_t), c_in(c_t), keep_f(keep_f_t);
  const Rows<T> neg_d_copy(neg_d_copy_t), zraw(zraw_t), zhat(zhat_t), gates(gates_t), g_mean(gates_mean_t),
      g_rstd(gates_rstd_t), c_mean(cell_mean_t), c_rstd(cell_rstd_t);
  const Rows<T> z_prev(z_prev_t), z_below(z_below_t), ds(ds_t), dc_prev(dc_prev_t), gz_prev(gz_prev_t),
      gz_below(gz_below_t);
  const T* ln_gain = ptr_or_null<T>(ln_gain_t);
  const T* cell_gain = ptr_or_null<T>(cell_gain_t);
  T* ln_grad = ln_grad_t.has_value() && ln_grad_t->defined() ? ln_grad_t->data_ptr<T>() : nullptr;
  const bool bottom = !z_below, layer_norm = ln_gain != nullptr;
  const T S = T(slope);
  std::mutex ln_grad_lock;

  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
    // Per task: the gradients after the activations (d), of c, scratch, and this task's share of the layer
    // norm parameters' gradients, [gates gain 4H | gates bias 4H | cell gain H | cell bias H].
    std::vector<T> d_act(4 * H), g_c(H), d_cn(H), xhat(H), ln_part(layer_norm ? 10 * H : 0, T(0));
    for (int64_t b = begin; b < end; ++b) {
      const T zp = z_prev[b][0], zb = bottom ? T(1) : z_below[b][0];
      const auto [update, keep, copy] = Blend<T>(zp, zb);
      if (g_ext) {  // the loss's own gradient of h_t, added here and kept: route_backward reads the sum
        for (int64_t k = 0; k < H; ++k) pair[b][k] += g_ext[b][k];
      }
      const T *g_h = pair[b], *g_c_in = pair[b] + H;
      const T* a = act[b];
      const T *f = a, *i = a + H, *o = a + 2 * H, *g = a + 3 * H;
      const T *tc = tc_in[b], *cp = c_prev[b], *kf = keep_f[b];
      // Without layer norm the gradients after the activations are those of the pre-activations: into ds.
      T* d = layer_norm ? d_act.data() : ds[b];
      T *df = d, *di = d + H, *d_o = d + 2 * H, *dg = d + 3 * H;

      // h = lerp(o*tanh(cn), h_prev, copy): into o, and into c through tanh (and the cell's layer norm).
      const T h_scale = bottom ? T(1) : keep;
      for (int64_t k = 0; k < H; ++k) {
        const T g_otc = g_h[k] * h_scale;
        d_o[k] = g_otc * tc[k];
        d_cn[k] = g_otc * o[k] * (T(1) - tc[k] * tc[k]);
        g_c[k] = g_c_in[k];
      }
      if (layer_norm) {
        layer_norm_backward(d_cn.data(), c_in[b], cell_gain, H, c_mean[b][0], c_rstd[b][0], xhat.data(), g_c.data(),
                            true, ln_part.data() + 8 * H, ln_part.data() + 9 * H);
      } else {
        for (int64_t k = 0; k < H; ++k) g_c[k] += d_cn[k];
      }
      // c = keep*i*g + (copy + update*f)*c_prev; g_c is now the whole d loss / d c_t.
      for (int64_t k = 0; k < H; ++k) {
        const T g_ig = g_c[k] * h_scale;
        di[k] = g_ig * g[k];
        dg[k] = g_ig * i[k];
        df[k] = g_c[k] * cp[k] * update;
        dc_prev[b][k] = g_c[k] * kf[k];
      }
      T g_update = 0;
#pragma omp simd reduction(+ : g_update)
      for (int64_t k = 0; k < H; ++k) g_update += g_c[k] * cp[k] * f[k];
      // Through the nonlinearities (and the gates' layer norm) into the pre-activations.
      for (int64_t k = 0; k < 3 * H; ++k) d[k] *= a[k] * (T(1) - a[k]);
      for (int64_t k = 0; k < H; ++k) dg[k] *= T(1) - g[k] * g[k];
      if (layer_norm) {
        for (int64_t j = 0; j < 4; ++j) {
          layer_norm_backward(d + j * H, gates[b] + j * H, ln_gain + j * H, H, g_mean[b][j], g_rstd[b][j],
                              xhat.data(), ds[b] + j * H, false, ln_part.data() + j * H, ln_part.data() + (4 + j) * H);
        }
      }
      // Into the choice of operation (z_prev, z_below), and through z = keep*zraw into zhat (straight-through,
      // the hard sigmoid's derivative as torch.clamp defines it: the bounds count as inside). The seed's cell
      // chooses with no gradient, and its z is zraw.
      if (seed) {
        gz_prev[b][0] = T(0);
        if (!bottom) gz_below[b][0] = T(0);
      } else if (bottom) {
        gz_prev[b][0] = -g_update;
      } else {
        T neg_g_copy = dot(g_h, neg_d_copy[b], H) + dot(g_c.data(), neg_d_copy[b] + H, H);
        if (zraw) neg_g_copy += g_z[b][0] * zraw[b][0];
        const T diff = g_update + neg_g_copy;
        gz_prev[b][0] = neg_g_copy - zb * diff;
        gz_below[b][0] = (T(1) - zp) * diff;
      }
      if (zraw) {
        const T y = (S * zhat[b][0] + T(1)) / T(2);
        const T st = (y >= T(0) && y <= T(1)) ? S / T(2) : T(0);
        ds[b][4 * H] = g_z[b][0] * (seed ? T(1) : keep) * st;
      }
    }
    if (layer_norm) {
      std::lock_guard<std::mutex> guard(ln_grad_lock);
      for (int64_t k = 0; k < 10 * H; ++k) ln_grad[k] += ln_part[k];
    }
  });
}

template <typename T>
void route_backward_impl(const at::Tensor& dx_t, int64_t D, const at::Tensor& pair_t, const at::Tensor& z_prev_t,
                         const OptTensor& z_below_t, const at::Tensor& pair_next_t, const OptTensor& above_pair_t,
                         const OptTensor& h_above_t, const OptTensor& below_pair_t, const OptTensor& h_below_t,
                         const at::Tensor& gz_prev_t, const OptTensor& gz_below_t, const OptTensor& below_dz_t) {
  const int64_t B = dx_t.size(0), H = pair_next_t.size(1) / 2;
  const Rows<T> dx(dx_t), pair(pair_t), z_prev(z_prev_t), z_below(z_below_t), pair_next(pair_next_t);
  const Rows<T> above_pair(above_pair_t), h_above(h_above_t), below_pair(below_pair_t), h_below(h_below_t);
  const Rows<T> gz_prev(gz_prev_t), gz_below(gz_below_t), below_dz(below_dz_t);
  const bool bottom = !z_below;
  const int64_t A = above_pair ? above_pair_t->size(1) / 2 : 0;

  at::parallel_for(0, B, grain(H), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const T zp = z_prev[b][0], zb = bottom ? T(1) : z_below[b][0];
      const T copy = Blend<T>(zp, zb).copy;
      const T* d = dx[b];
      // d h_{t-1}: the recurrent matmul, and COPY's pass-through.
      for (int64_t k = 0; k < H; ++k) pair_next[b][k] = bottom ? d[D + k] : d[D + k] + pair[b][k] * copy;
      if (above_pair) {  // into layer l+1's h_{t-1} (masked by z_prev) and into z_prev
        const T* d_above = d + D + H;
        for (int64_t k = 0; k < A; ++k) above_pair[b][k] += d_above[k] * zp;
        gz_prev[b][0] += dot(d_above, h_above[b], A);
      }
      if (below_pair) {  // into layer l-1's h_t (masked by z_below) and its z_t
        for (int64_t k = 0; k < D; ++k) below_pair[b][k] += d[k] * zb;
        below_dz[b][0] += gz_below[b][0] + dot(d, h_below[b], D);
      }
    }
  });
}

bool given(const OptTensor& t) { return t.has_value() && t->defined(); }

void cell_forward(const at::Tensor& gates, const OptTensor& zhat, const OptTensor& addend, const OptTensor& ln_gain,
                  const OptTensor& ln_bias, const OptTensor& cell_gain, const OptTensor& cell_bias,
                  const at::Tensor& h_prev, const at::Tensor& c_prev, const at::Tensor& z_prev,
                  const OptTensor& z_below, const at::Tensor& act, const at::Tensor& keep_f, const at::Tensor& c,
                  const at::Tensor& tc, const at::Tensor& h, const OptTensor& h_rec, const OptTensor& h_up,
                  const OptTensor& h_down, const OptTensor& neg_dh, const OptTensor& neg_dc, const OptTensor& zraw, const OptTensor& z,
                  const OptTensor& gates_mean, const OptTensor& gates_rstd, const OptTensor& cell_mean,
                  const OptTensor& cell_rstd, int64_t zraw_mode, bool seed, double slope, double eps) {
  TORCH_CHECK(!given(addend), "hmlm_cpu: the matmuls run in the state's dtype here: no addend");
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "hmlm_cell_forward", [&] {
    cell_forward_impl<scalar_t>(gates, zhat, ln_gain, ln_bias, cell_gain, cell_bias, h_prev, c_prev, z_prev, z_below,
                                act, keep_f, c, tc, h, h_rec, h_up, h_down, neg_dh, neg_dc, zraw, z, gates_mean, gates_rstd, cell_mean,
                                cell_rstd, zraw_mode, seed, slope, eps);
  });
}

void cell_backward(const at::Tensor& pair, const OptTensor& g_ext, const at::Tensor& g_z, const at::Tensor& act,
                   const at::Tensor& tc, const at::Tensor& c_prev, const at::Tensor& c, const at::Tensor& keep_f,
                   const OptTensor& neg_d_copy, const OptTensor& zraw, const OptTensor& zhat, const OptTensor& gates,
                   const OptTensor& gates_mean, const OptTensor& gates_rstd, const OptTensor& cell_mean,
                   const OptTensor& cell_rstd, const OptTensor& ln_gain, const OptTensor& cell_gain,
                   const OptTensor& ln_grad, const at::Tensor& z_prev, const OptTensor& z_below, const at::Tensor& ds,
                   const OptTensor& ds_mm, const at::Tensor& dc_prev, const at::Tensor& gz_prev,
                   const OptTensor& gz_below, bool seed, double slope) {
  TORCH_CHECK(!given(ds_mm), "hmlm_cpu: the matmuls run in the state's dtype here: no ds_mm");
  AT_DISPATCH_FLOATING_TYPES(act.scalar_type(), "hmlm_cell_backward", [&] {
    cell_backward_impl<scalar_t>(pair, g_ext, g_z, act, tc, c_prev, c, keep_f, neg_d_copy, zraw, zhat, gates, gates_mean,
                                 gates_rstd, cell_mean, cell_rstd, ln_gain, cell_gain, ln_grad, z_prev, z_below, ds,
                                 dc_prev, gz_prev, gz_below, seed, slope);
  });
}

void route_backward(const at::Tensor& dx, int64_t D, const at::Tensor& pair, const at::Tensor& z_prev,
                    const OptTensor& z_below, const at::Tensor& pair_next, const OptTensor& above_pair,
                    const OptTensor& h_above, const OptTensor& below_pair, const OptTensor& h_below,
                    const at::Tensor& gz_prev, const OptTensor& gz_below, const OptTensor& below_dz) {
  AT_DISPATCH_FLOATING_TYPES(dx.scalar_type(), "hmlm_route_backward", [&] {
    route_backward_impl<scalar_t>(dx, D, pair, z_prev, z_below, pair_next, above_pair, h_above, below_pair, h_below,
                                  gz_prev, gz_below, below_dz);
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cell_forward", &cell_forward, "One layer step's elementwise forward (see hmlm/fast/forward.py's layer_step).");
  m.def("cell_backward", &cell_backward, "One layer step's elementwise backward, up to the matmul.");
  m.def("route_backward", &route_backward, "The step's input gradient dx, routed to h_prev and the layers around.");
}
