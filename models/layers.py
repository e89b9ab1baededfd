"""Building blocks shared by the backbones, written for meta-learning.

The inner loop differentiates through its own gradient steps (second order) and runs every task at
once under `torch.func.vmap`. That rules out the fused library layers:
`scaled_dot_product_attention`, `nn.MultiheadAttention` and `nn.TransformerEncoderLayer` use kernels
without double backward, and `nn.GRU` (cuDNN) has neither double backward nor a vmap rule. So attention
is written with plain matmuls and a softmax, and the GRU is a cell of `nn.Linear` layers looped over
time. Everything is out-of-place and free of data-dependent Python control flow, so it runs under vmap.
"""
import math

import torch
from torch import nn


def masked_fill_value(dtype):
    """A large finite negative for masked attention scores.

    Not -inf: a row whose keys were all masked would give NaN in the softmax and in its gradients.
    The backbones always let a query see itself, so no row is fully masked, but a finite value keeps any
    such row (another caller's mask) a harmless uniform average. Half of the dtype's minimum, so that
    it stays finite in half precision and adding a score to it cannot overflow.
    """
    return torch.finfo(dtype).min / 2


# Dropout masks are drawn at 16-bit resolution: p is rounded to a multiple of 2⁻¹⁶ (0.1 → 0.100006).
DROPOUT_LEVELS = 2 ** 16


def dtype_view_batches():
    """Can `vmap` batch `Tensor.view(dtype)`? torch 2.13 can; torch 2.11 has no batching rule for it."""
    try:
        torch.func.vmap(lambda t: t.view(torch.int16))(torch.zeros(1, 1, dtype=torch.int64))
    except RuntimeError:
        return False
    return True


DTYPE_VIEW_BATCHES = dtype_view_batches()


def sixteen_bit_quarters(bits, width):
    """The first `width` 16-bit quarters of int64 `bits` along the last dimension, as signed values.

    The same numbers as `bits.view(torch.int16)` (little-endian: the low quarter first), which costs
    nothing; where vmap cannot batch that view, shifts and masks give them (u ^ 2¹⁵ − 2¹⁵ is the signed
    reading of the unsigned quarter u), so the masks and every result stay the same on either torch.
    """
    if DTYPE_VIEW_BATCHES:
        return bits.view(torch.int16)[..., :width]
    quarters = torch.stack([(bits >> shift) & 0xFFFF for shift in (0, 16, 32, 48)], dim=-1)
    return (quarters.flatten(-2)[..., :width] ^ 0x8000) - 0x8000


class Dropout(nn.Dropout):
    """`nn.Dropout` with a cheaper CPU mask: one 64-bit draw gives four elements' 16-bit uniforms.

    ATen's CPU random draws are serial, and a float32 `rand` costs ~4.6 ns per element here (an AMD
    EPYC), an int64 `random_` (64 random bits over the full range) ~4 ns per draw; with dropout's masks a
    large part of a transformer's meta-training iteration, that matters. Each 16-bit quarter, read as a
    signed int16 v, is uniform on [−2¹⁵, 2¹⁵); an element is kept when v ≥ round(p · 2¹⁶) − 2¹⁵, i.e.
    with probability 1 − p' where p' is p rounded to a multiple of 2⁻¹⁶, and is scaled by 1 / (1 − p'):
    still unbiased. On CUDA, and for in-place, 0-d or p = 1, it is `nn.Dropout`. Under
    `vmap(randomness="different")` the input must be batched (in-place random ops refuse an unbatched
    tensor there); in the backbones every dropout input depends on the item ids.
    """

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        threshold = round(self.p * DROPOUT_LEVELS)
        if x.device.type != "cpu" or self.inplace or threshold >= DROPOUT_LEVELS or x.dim() == 0:
            return super().forward(x)
        width = x.shape[-1]
        # empty_like keeps vmap's batch dimension (randomness="different" draws per task)
        bits = torch.empty_like(x[..., :(width + 3) // 4], dtype=torch.int64,
                                memory_format=torch.contiguous_format).random_(-2 ** 63, None)  # 64 bits
        keep = sixteen_bit_quarters(bits, width) >= threshold - DROPOUT_LEVELS // 2
        return x * keep.to(x.dtype).mul_(DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` with the affine part written out, or folded into the linear layer that follows.

    Under `vmap`, the double backward of the fused affine layer norm gives wrong gradients for its
    weight and bias when its input depends on the adapted parameters (torch 2.13, CPU; about 5% off in
    float64). Normalising without the affine part and applying it by hand gives exact gradients;
    tests/test_meta_learner.py compares against the per-task path and finite differences.

    Every LayerNorm of the transformers feeds a linear layer, so `project` folds the affine part into that
    layer's weight and bias: W (n ⊙ γ + β) + c = (W diag γ) n + (W β + c). The same function of the same
    parameters, but the per-position multiply and add (and their backward and double backward, on
    [tasks, windows, L, D] tensors) become products of the small weights: ~5% of a transformer's
    meta-training iteration here (README, Performance).
    """

    def normalise(self, x):
        return nn.functional.layer_norm(x, self.normalized_shape, eps=self.eps)

    def forward(self, x):
        return self.normalise(x) * self.weight + self.bias

    def project(self, x, linear):
        """`linear(self(x))` with this norm's affine part folded into `linear`'s weight and bias."""
        weight = linear.weight * self.weight  # W diag(γ)
        bias = linear.bias + torch.matmul(linear.weight, self.bias)  # W β + c
        return linear.project(self.normalise(x), weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` whose product can be applied with another weight and bias (`LayerNorm.project`)."""

    def forward(self, x):
        return self.project(x, self.weight, self.bias)

    @staticmethod
    def project(x, weight, bias):
        return nn.functional.linear(x, weight, bias)


class WideningLinear(Linear):
    """`nn.Linear` for out_features > in_features (the qkv and first feed-forward projections), with
    the transposed weight made contiguous before the matmul.

    The layout decides how autograd writes the inner loop's weight gradient: for a column-major
    (transposed) weight it is gᵀ·x, and the outer double backward then hands the wide gradient g its
    own gradient in a transposed layout, which every later elementwise op (GELU's double backward,
    the dropout mask, the accumulation) reads against contiguous tensors at several times the cost.
    With a contiguous copy of the (small) weight it is xᵀ·g, and the transposed layout lands on the
    narrow input instead. Same product; ~5% less time for a transformer block under the
    meta-learning pattern.
    """

    @staticmethod
    def project(x, weight, bias):
        return torch.matmul(x, weight.t().contiguous()) + bias


def attention_bias(allowed, dtype):
    """The additive form of a boolean attention mask: 0 where a query may see a key, a large negative
    (`masked_fill_value`) where not. Adding it is exact: a masked score's exp underflows to 0, as with
    `torch.where`, and an add has a free backward (where's needs a zero-filled copy)."""
    return torch.full_like(allowed, masked_fill_value(dtype), dtype=dtype).masked_fill(allowed, 0.0)


class SelfAttention(nn.Module):
    """Multi-head self-attention with an additive mask (`attention_bias`) on the scores."""

    def __init__(self, hidden, num_heads, dropout):
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = WideningLinear(hidden, 3 * hidden)  # one matmul for queries, keys and values
        self.out = Linear(hidden, hidden)
        self.dropout = Dropout(dropout)

    def forward(self, x, bias, norm=None):
        """x: [B, L, D]; bias: additive mask, broadcastable to [B, heads, L(query), L(key)]; norm: a
        LayerNorm to apply to x first, folded into the qkv projection."""
        head_dim = x.shape[-1] // self.num_heads
        qkv = self.qkv(x) if norm is None else norm.project(x, self.qkv)
        # [B, L, 3D] -> [3, B, heads, L, head_dim] in one copy, so the matmuls need no copies of their own
        q, k, v = (qkv.unflatten(-1, (3, self.num_heads, head_dim)).movedim(-3, 0)
                   .transpose(-3, -2).contiguous().unbind(0))
        # the scale on q ([.., L, head_dim]) rather than on the scores ([.., L, L]): fewer elements
        scores = torch.matmul(q * (1.0 / math.sqrt(head_dim)), k.transpose(-1, -2)) + bias
        weights = self.dropout(torch.softmax(scores, dim=-1))
        context = torch.matmul(weights, v).transpose(-3, -2).flatten(-2)  # [B, L, D]
        return self.out(context)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: attention and a GELU feed-forward, each residual.

    Pre-LN keeps the residual path an identity, which trains stably without warm-up; the model applies
    a final LayerNorm after the last block.
    """

    def __init__(self, hidden, num_heads, dropout, ff_multiplier=4):
        super().__init__()
        self.attention_norm = LayerNorm(hidden)
        self.attention = SelfAttention(hidden, num_heads, dropout)
        self.feed_forward_norm = LayerNorm(hidden)
        self.feed_forward = nn.Sequential(
            WideningLinear(hidden, ff_multiplier * hidden),
            nn.GELU(),
            Dropout(dropout),
            Linear(ff_multiplier * hidden, hidden),
        )
        self.dropout = Dropout(dropout)

    def forward(self, x, bias):
        """x: [B, L, D]; bias: the additive attention mask (`attention_bias`)."""
        x = x + self.dropout(self.attention(x, bias, norm=self.attention_norm))
        widening, *rest = self.feed_forward
        hidden = self.feed_forward_norm.project(x, widening)
        for layer in rest:
            hidden = layer(hidden)
        return x + self.dropout(hidden)


# A pre-activation whose sigmoid is exactly 0.0 (exp(1e4) overflows to inf in every float type torch
# computes sigmoid in), representable in float16 and bfloat16.
PAD_LOGIT = -1e4


class GRU(nn.Module):
    """A multi-layer GRU built from `nn.Linear`, with padded steps skipped.

    The equations of `nn.GRU`, with its update gate written as u = 1 − z (the same family: the z
    weights are negated, and nn.GRU's symmetric initialisation is kept):
        r = σ(W_ir x + b_ir + W_hr h + b_hr),  u = σ(W_iu x + b_iu + W_hu h + b_hu)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn)),  h' = h + u ⊙ (n − h)
    At a padded step u's pre-activation gets PAD_LOGIT, so u and its derivative are exactly 0 and
    h_t = h_{t−1} exactly: left padding is a no-op and the padding embedding can never reach a real
    position (nor receive a gradient).

    Speed: the loop runs L steps, and the inner loop differentiates it twice, so every op per step counts
    (on a GPU each is a kernel launch). The first layer's input projections of all steps are one matmul
    before the loop (the padding bias rides along there); a step is one matmul, two gate nonlinearities
    and a `lerp`. Several layers run as a wavefront: in wave s layer l does its step s − l, so the L + N − 1
    waves do the gate arithmetic of all N layers together (one set of ops on [N, B, 3H]) instead of N × L
    separate steps; a layer outside its steps gets PAD_LOGIT too and holds its state exactly.
    """

    def __init__(self, input_size, hidden_size, num_layers):
        super().__init__()
        self.hidden_size = hidden_size
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.input_proj = nn.ModuleList(nn.Linear(size, 3 * hidden_size) for size in sizes)  # [r, u, n]
        self.hidden_proj = nn.ModuleList(nn.Linear(hidden_size, 3 * hidden_size) for _ in sizes)
        bound = 1.0 / math.sqrt(hidden_size)  # nn.GRU's initialisation
        for parameter in self.parameters():
            nn.init.uniform_(parameter, -bound, bound)

    def forward(self, x, real):
        """x: [B, L, input_size]; real: bool [B, L] (False = padding). Returns states [B, L, hidden]."""
        hidden, layers = self.hidden_size, len(self.hidden_proj)
        gate = torch.arange(3 * hidden, device=x.device)
        is_update_gate = (gate >= hidden) & (gate < 2 * hidden)  # the u third of [r, u, n]
        projected = self.input_proj[0](x)  # the first layer's input projections, all steps at once
        if layers == 1:
            pad_bias = torch.where(real.unsqueeze(-1) | ~is_update_gate, 0.0, PAD_LOGIT)
            # in the projections' dtype, which autocast may have lowered (lerp wants one dtype)
            return self._single_layer(projected + pad_bias.to(projected.dtype))
        return self._wavefront(projected, real, is_update_gate)

    def _step(self, h, input_gates, recurrent_gates):
        """One GRU step on pre-activations: h' = lerp(h, n, u)."""
        hidden = self.hidden_size
        input_ru, input_n = input_gates.split([2 * hidden, hidden], dim=-1)
        recurrent_ru, recurrent_n = recurrent_gates.split([2 * hidden, hidden], dim=-1)
        r, u = torch.sigmoid(input_ru + recurrent_ru).chunk(2, dim=-1)
        n = torch.tanh(input_n + r * recurrent_n)
        return torch.lerp(h, n, u)

    def _single_layer(self, projected):
        hidden_proj = self.hidden_proj[0]
        # unbind (not [:, t]) so the backward is one stack, not L full-size zero-filled copies
        steps = projected.unbind(-2)
        h = torch.zeros_like(steps[0][..., :self.hidden_size])
        states = []
        for step in steps:
            h = self._step(h, step, hidden_proj(h))
            states.append(h)
        return torch.stack(states, dim=-2)

    def _wavefront(self, projected, real, is_update_gate):
        hidden, layers, length = self.hidden_size, len(self.hidden_proj), projected.shape[-2]
        dtype = projected.dtype
        # Layer l's steps run in waves l .. l + L - 1; outside them (and at padded steps) u gets PAD_LOGIT.
        active = torch.stack([nn.functional.pad(real, (l, layers - 1 - l), value=False) for l in range(layers)])
        pad_bias = torch.where(active.unsqueeze(-1) | ~is_update_gate, 0.0, PAD_LOGIT).to(dtype)
        pad_bias = pad_bias.unbind(-2)  # waves of [layers, B, 3H]
        first = nn.functional.pad(projected, (0, 0, 0, layers - 1)).unbind(-2)  # waves of [B, 3H]
        recurrent_weight = torch.stack([p.weight for p in self.hidden_proj]).transpose(-1, -2)  # [N, H, 3H]
        recurrent_bias = torch.stack([p.bias for p in self.hidden_proj]).unsqueeze(-2)  # [N, 1, 3H]
        input_weight = torch.stack([p.weight for p in self.input_proj[1:]]).transpose(-1, -2)  # [N-1, H, 3H]
        input_bias = torch.stack([p.bias for p in self.input_proj[1:]]).unsqueeze(-2)
        h = projected.new_zeros((layers,) + projected.shape[:-2] + (hidden,))  # [N, B, H]
        states = []
        for wave in range(length + layers - 1):
            # layer l's input is layer l - 1's state of the previous wave, i.e. of the same step
            # (.to: under autocast the matmuls are lowered, their float32 biases would promote them back)
            inputs = torch.cat([first[wave].unsqueeze(0), (torch.matmul(h[:-1], input_weight) + input_bias).to(dtype)])
            recurrent = (torch.matmul(h, recurrent_weight) + recurrent_bias).to(dtype)
            h = self._step(h, inputs + pad_bias[wave], recurrent)
            if wave >= layers - 1:
                states.append(h[-1])
        return torch.stack(states, dim=-2)


def rating_head_output(logits):
    """Map head logits to a normalised rating in (0.1, 1.1): ratings are stored as stars / 5,
    so half a star is 0.1 and five stars 1.0."""
    return 0.1 + torch.sigmoid(logits)


__all__ = ["Dropout", "GRU", "LayerNorm", "Linear", "SelfAttention", "TransformerBlock", "attention_bias",
           "masked_fill_value", "rating_head_output", "WideningLinear"]
