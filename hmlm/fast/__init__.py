"""The fast path of the HM-LSTM stack: the function of `cell.reference_step`, run over a whole sequence with a
hand-written backward through time. `tests/test_model.py` holds it to the reference in float64.

Where the time goes, and what this package does about it (measure with `hmlm bench`):
- Autograd. Stepping the reference cell makes ~30 autograd nodes per layer and step. Here the whole sequence is
  one node (`HMLSTMSequence`), and forward and backward are plain tensor ops.
- Small ops. What is left of a step is elementwise work on (B, H) tensors, done by one of the backends of
  hmlm/fast/kernels/ (`Plan.kernels`, chosen by hmlm.fast.kernels.select), every one through the same three
  functions (kernels.FusedKernels), in one call per layer and step forward (forward.py's `cell_step`) and two
  backward (backward.py's `layer_step_backward`): a fused one, C++ on the CPU or Triton on CUDA, or a few dozen
  torch ops (hmlm/fast/kernels/torch_ops.py), each paying microseconds of dispatch. Every way, results go into
  buffers allocated once per call, the per-step views of those buffers are made once per call, and h_t is
  written straight into the slot of the next step's matmul input.
- Matmuls. One per layer and step, [gates | zhat] from the concatenated masked inputs [z^{l-1}_t h^{l-1}_t |
  h^l_{t-1} | z^l_{t-1} h^{l+1}_{t-1}] against the layer's weight [W_below | U_rec | U_above] (masking the
  inputs rather than the products gives the same numbers: z is one scalar per row), and one backward. Layer 1's
  input projection is one matmul over all steps, made by the caller. The weight gradients are one matmul per
  layer over all B*T rows after the loop, instead of T thin ones accumulated into a large matrix; the layer norm
  gains likewise.
- Launches. On a GPU each of those calls is a kernel launch, and a step's launches cost more than its work at
  the paper's shapes, so the kernels also do what would be calls of their own: a layer step's kernel writes
  its h, masked, into the next matmul inputs of its own layer and of the layers above and below (`linked` tapes);
  the backward's kernel adds the loss's gradient of h in; under autocast the kernels take the matmul's bf16
  product and write ds again in bf16, so no cast runs per step, and the weights are cast once per call. That is
  3 matmuls and 3 kernels per step forward and 3 + 3 + 3 backward at 3 layers (hmlm/bench/launches.py counts them;
  `hmlm bench --launches`).
- Evaluation and sampling (no gradient needed) keep nothing but the outputs, and reuse their scratch buffers
  from one call to the next. On the CPU a large layer's gates matmul then runs on oneDNN (ONEDNN_MIN_WEIGHT),
  and hmlm/fast/copy_skip.py skips the steps that COPY.
What that buys is in docs/performance.md (`hmlm bench`). In short, on a 2-core CPU: at small widths
(3x128), where dispatch dominated, training runs ~2.4x the reference on one thread and ~3x on two; at the
paper's PTB width (3x512) matmuls are ~80% of a step, most of them of 64 rows at the BLAS's speed for that,
and leave the fast path at about half of nn.LSTM's speed for ~1.5x its arithmetic.

The blend of cell.blend, rearranged with the same values. With copy = (1 - z_prev)(1 - z_below),
update = (1 - z_prev) z_below and keep = 1 - copy (= flush + update):
    c = keep*i*g + (copy + update*f)*c_prev        exactly c_prev on a COPY (0*x + 1*c_prev)
    h = lerp(o*tanh(c), h_prev, copy)              exactly h_prev on a COPY (torch.lerp is exact at 0 and 1)
    z = keep*zraw                                  zraw = 1[zhat > 0], a Bernoulli draw, or hard_sigmoid(zhat)
In the backward everything that reaches z_prev and z_below goes through two per-row scalars, kept negated:
    N_copy = -d loss / d copy = <dh, o*tanh(c) - h_prev> + <dc, i*g - c_prev> + dz*zraw
    G_upd  =  d loss / d update = <dc, f*c_prev>
    d z_prev  = N_copy - z_below (G_upd + N_copy)          d z_below = (1 - z_prev)(G_upd + N_copy)
Layer 1 (z_below = 1) never copies and skips the copy terms.

Device-agnostic (CPU and CUDA): no backend synchronizes with the host inside the loops. Under autocast the
matmuls run in the autocast dtype (bf16) and add their products into fp32 pre-activation buffers: everything
elementwise (so every backend's kernels), and the carried state, stay in fp32.

The modules, each importing only those above it:
    kernels/       a layer step's elementwise work, per backend (imports nothing else of hmlm.fast)
    tape.py        Plan, LayerTape (a layer's buffers and per-step views), TapeCache, LayerGrads
    forward.py     forward_sequence, layer_step, cell_step, the step weights (oneDNN)
    backward.py    backward_sequence, layer_step_backward, parameter_gradients
    sequence.py    HMLSTMSequence (the autograd node) and run (the entry point)
    copy_skip.py   no-gradient layer steps that skip COPY
This package re-exports their names (fast.run, fast.Plan, ...). A module-level name is read where it is
defined: set ONEDNN_MIN_WEIGHT, or replace layer_step or matmul_add, on hmlm.fast.forward, not on this package.
"""

from hmlm.fast import kernels
from hmlm.fast.backward import backward_sequence, layer_step_backward, parameter_gradients
from hmlm.fast.forward import (
    ONEDNN_MIN_WEIGHT,
    LayerStep,
    OneDNNWeight,
    StepWeights,
    cell_step,
    forward_sequence,
    layer_step,
    matmul_add,
    step_weights,
    uses_onednn,
)
from hmlm.fast.kernels import LN_EPS, ZRAW_MODES, LayerNormParams
from hmlm.fast.sequence import HMLSTMSequence, flatten_inputs, outputs, run, unflatten_inputs
from hmlm.fast.tape import TAPES, LayerGrads, LayerTape, Plan, TapeCache

__all__ = [
    "LN_EPS",
    "ONEDNN_MIN_WEIGHT",
    "TAPES",
    "ZRAW_MODES",
    "HMLSTMSequence",
    "LayerGrads",
    "LayerNormParams",
    "LayerStep",
    "LayerTape",
    "OneDNNWeight",
    "Plan",
    "StepWeights",
    "TapeCache",
    "backward_sequence",
    "cell_step",
    "flatten_inputs",
    "forward_sequence",
    "kernels",
    "layer_step",
    "layer_step_backward",
    "matmul_add",
    "outputs",
    "parameter_gradients",
    "run",
    "step_weights",
    "unflatten_inputs",
    "uses_onednn",
]
