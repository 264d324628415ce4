"""OstQuant's optimisation: the KL-Top loss, the Cayley-parametrised rotations, the learnable transformation pairs
wrapped around the quantized linears (weights and activations fake-quantized with straight-through gradients) and
the training loop. The stage, its config and the fold into the weights are in ``methods/transform/ostquant.py``.

Training runs the (norm-folded) model in its own basis: every target linear is temporarily replaced by a
``PairLinear`` that moves its input into the transformed basis (``x·T``), fake-quantizes it, multiplies by the
fake-quantized transformed weight (``W·T^{-T}``, rows rotated too where the linear writes the residual stream) and
maps the output back. In floating point each wrapper computes exactly the linear it replaces, so layers kept in
floating point (``keep_fp``) are untouched and need no transform during training; after training the same
transforms are folded into the weights (``ostquant.fold``) and give the same quantized model.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from ptqbench.methods.transform.dartquant import _rotate_heads
from ptqbench.methods.transform.quarot import Rotation
from ptqbench.scheme import QuantScheme, quantize_activation, rtn_fake_quant


# ------------------------------------------------------------------------------------------------ pure cores
def kl_top(student_logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL-Top loss: ``Σ_{j ∈ top-k(p)} p_j (log p_j − log q_j)`` averaged over tokens, ``p`` the full-precision
    model's next-token distribution, ``q`` the quantized model's (both softmaxes over the whole vocabulary), the sum
    over the k most probable tokens of ``p`` only.

    ``student_logits`` (..., V); ``top_idx`` (..., k) and ``top_logp`` (..., k) the teacher's top-k token ids and
    their log-probabilities (``teacher_topk``).
    """
    logq = torch.log_softmax(student_logits.float(), dim=-1).gather(-1, top_idx)
    return (top_logp.exp() * (top_logp - logq)).sum(-1).mean()


@torch.no_grad()
def teacher_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most probable token ids (..., k) and their log-probabilities under ``logits`` (..., V)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    val, idx = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return idx, val


def cayley(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I + K)^{-1}(I − K)`` of the skew-symmetric part ``K = a − aᵀ`` of ``a`` (..., n, n): exactly
    orthogonal for every ``a`` (up to the solve's rounding), the identity at ``a = 0``, differentiable."""
    k = a - a.transpose(-1, -2)
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(k)
    return torch.linalg.solve(eye + k, eye - k)


def womi_scales(w: torch.Tensor, alpha: float) -> torch.Tensor:
    """Weight-outlier-minimising initial scales (in,) for the weights ``w`` (out, in) that read one input: the
    columns are scaled by ``s_j = (mean(m) / m_j)^alpha``, ``m_j = max_i |w_ij|``, which evens out the columns'
    ranges (``alpha = 1``: equal column maxima, the least weight outliers; 0: no scaling). The activations are
    divided by ``s`` so that the product is unchanged."""
    m = w.detach().abs().amax(0).double().clamp_min(1e-8)
    return (m.mean() / m).pow(alpha)


def _ste(x: torch.Tensor, q: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``q(x)`` in the forward pass, the identity's gradient in the backward pass (straight-through estimator)."""
    with torch.no_grad():
        d = q(x.detach()) - x.detach()
    return x + d


def weight_quantizer(scheme: QuantScheme) -> Callable[[torch.Tensor], torch.Tensor]:
    """Min-max round-to-nearest fake quantization of a weight (out, in) on the scheme's grid."""
    if scheme.w_bits >= 16:
        return lambda w: w
    if scheme.w_format != "int":
        from ptqbench.fp4 import fp4_fake_quant

        return lambda w: fp4_fake_quant(w, scheme.w_format, scheme.scale_search)
    return lambda w: rtn_fake_quant(w, scheme.w_bits, scheme.group_size, scheme.sym).to(w.dtype)


def act_quantizer(scheme: QuantScheme) -> Callable[[torch.Tensor], torch.Tensor]:
    """The scheme's dynamic activation fake quantization (per token, or the FP4 formats' blocks)."""
    return lambda x: quantize_activation(x, scheme.a_bits, "dynamic_per_token", scheme.a_sym, None, scheme.a_format)


# ------------------------------------------------------------------------------------------------ parameters
class OSTParams(nn.Module):
    """The learnable transformation pairs of a Llama-style model (the paper's Figure 5).

    - ``R_res = R0·cayley(A)``: the global residual rotation (hidden × hidden), from QuaRot's randomized Hadamard R0;
    - per layer: ``s_attn`` / ``s_ffn`` (hidden,) smoothing scales between the (folded) RMSNorms and q/k/v, gate/up;
    - per layer: ``R_ov = R0_ov·cayley(B)`` (n_kv, hd, hd) and ``s_ov`` (n_kv·hd,) between v_proj and o_proj;
    - per layer: ``s_ud`` (intermediate,) between up_proj and down_proj.

    Scales are stored as their logarithms (positive by construction).
    """

    def __init__(self, r0: torch.Tensor, r0_ov: torch.Tensor, n_layers: int, inter: int,
                 s_attn: torch.Tensor, s_ffn: torch.Tensor) -> None:
        super().__init__()
        hidden, (n_kv, hd) = r0.shape[0], r0_ov.shape[:2]
        self.register_buffer("r0", r0.float())
        self.register_buffer("r0_ov", r0_ov.float().unsqueeze(0).expand(n_layers, n_kv, hd, hd).clone())
        self.a_res = nn.Parameter(torch.zeros(hidden, hidden))
        self.a_ov = nn.Parameter(torch.zeros(n_layers, n_kv, hd, hd))
        self.log_s_attn = nn.Parameter(s_attn.float().log().clone())
        self.log_s_ffn = nn.Parameter(s_ffn.float().log().clone())
        self.log_s_ov = nn.Parameter(torch.zeros(n_layers, n_kv * hd))
        self.log_s_ud = nn.Parameter(torch.zeros(n_layers, inter))

    def rotations(self) -> list[nn.Parameter]:
        return [self.a_res, self.a_ov]

    def scales(self) -> list[nn.Parameter]:
        return [self.log_s_attn, self.log_s_ffn, self.log_s_ov, self.log_s_ud]

    def r_res(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.r0.to(dtype) @ cayley(self.a_res.to(dtype))

    def r_ov(self, i: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.r0_ov[i].to(dtype) @ cayley(self.a_ov[i].to(dtype))


# ------------------------------------------------------------------------------------------------ the wrappers
class PairLinear(nn.Module):
    """A linear computed through its transformation pair: ``y = out(Q_a(inp(x)) · Q_w(weight(W))ᵀ) + b``.

    ``inp``, ``weight`` and ``out`` are closures over the current step's transforms (``Step``); with no quantization
    ``y`` equals the wrapped linear's output.
    """

    def __init__(self, lin: nn.Linear, step: "Step", inp: Callable, weight: Callable, out: Callable) -> None:
        super().__init__()
        self.lin, self.step, self.inp, self.weight, self.out = lin, step, inp, weight, out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xt = _ste(self.inp(x.float()), self.step.qa)
        wt = _ste(self.weight(self.lin.weight.float()), self.step.qw)
        y = self.out(xt @ wt.T)
        if self.lin.bias is not None:
            y = y + self.lin.bias
        return y.to(x.dtype)


class Step:
    """The transforms of one optimisation step (``R_res`` computed once and shared by every layer), and the
    closures each wrapped linear uses."""

    def __init__(self, p: OSTParams, scheme: QuantScheme, n_heads: int, h_down: Rotation | None,
                 h_o: Rotation | None) -> None:
        self.p, self.n_heads = p, n_heads
        self.h_down = None if h_down is None else h_down.to("cpu", torch.float32)
        self.h_o = None if h_o is None else h_o.to("cpu", torch.float32)
        self.qa = act_quantizer(scheme) if scheme.a_bits < 16 else (lambda x: x)
        self.qw = weight_quantizer(scheme)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the rotations from the current parameters (once per step; every wrapper shares them)."""
        self.r = self.p.r_res()
        self.r_ov = self.p.r0_ov @ cayley(self.p.a_ov)  # (layers, n_kv, hd, hd): one batched solve

    def _hd(self, h: Rotation | None, x: torch.Tensor) -> torch.Tensor:
        if h is None:
            return x
        if h.a.device != x.device:
            h = h.to(x.device, torch.float32)
        return h.right(x)

    def _s_ov(self, i: int, heads: int) -> torch.Tensor:
        s = self.p.log_s_ov[i].exp()
        n_kv = self.p.a_ov.shape[1]
        return s.reshape(n_kv, -1).repeat_interleave(heads // n_kv, dim=0).reshape(-1)

    def wrappers(self, i: int, layer: nn.Module, names: set[str]) -> dict[str, PairLinear]:
        """PairLinears for the target linears ``names`` (short names: q_proj, ...) of decoder layer ``i``."""
        p, att, mlp = self.p, layer.self_attn, layer.mlp
        n_kv = p.a_ov.shape[1]
        s_a, s_f = (lambda: p.log_s_attn[i].exp()), (lambda: p.log_s_ffn[i].exp())
        s_ud = lambda: p.log_s_ud[i].exp()  # noqa: E731
        unrot = lambda y: y @ self.r.T  # noqa: E731  (a writer's output back from the rotated residual basis)
        ident = lambda y: y  # noqa: E731
        reader = {"attn": s_a, "mlp": s_f}
        out: dict[str, PairLinear] = {}
        for name, mod, grp in (("q_proj", att.q_proj, "attn"), ("k_proj", att.k_proj, "attn"),
                               ("v_proj", att.v_proj, "attn"), ("gate_proj", mlp.gate_proj, "mlp"),
                               ("up_proj", mlp.up_proj, "mlp")):
            if name not in names:
                continue
            s = reader[grp]
            inp = (lambda s: lambda x: x @ (self.r / s()))(s)
            cols = (lambda s: lambda w: w @ (self.r * s()))(s)  # W·R·diag(s): one saved (n, n) factor
            if name == "v_proj":  # rows: v_k ← v_k·R_ov,k / s_ov,k; the output mapped back for attention
                def weight(w, cols=cols):
                    wc = cols(w)
                    rows = _rotate_heads(wc.T, self.r_ov[i], n_kv).T
                    return rows / p.log_s_ov[i].exp()[:, None]

                def outf(y):
                    return _rotate_heads(y * p.log_s_ov[i].exp(), self.r_ov[i].transpose(-1, -2), n_kv)
                out[name] = PairLinear(mod, self, inp, weight, outf)
            elif name == "up_proj":  # rows ÷ s_ud, undone on the output (the SiLU gate multiplies it linearly)
                out[name] = PairLinear(mod, self, inp, lambda w, cols=cols: cols(w) / s_ud()[:, None],
                                       lambda y: y * s_ud())
            else:
                out[name] = PairLinear(mod, self, inp, cols, ident)
        if "o_proj" in names:
            def o_in(x):
                return self._hd(self.h_o, _rotate_heads(x, self.r_ov[i], self.n_heads) / self._s_ov(i, self.n_heads))

            def o_w(w):
                wc = self._hd(self.h_o, _rotate_heads(w, self.r_ov[i], self.n_heads) * self._s_ov(i, self.n_heads))
                return self.r.T @ wc
            out["o_proj"] = PairLinear(att.o_proj, self, o_in, o_w, unrot)
        if "down_proj" in names:
            out["down_proj"] = PairLinear(mlp.down_proj, self, lambda x: self._hd(self.h_down, x / s_ud()),
                                          lambda w: self.r.T @ self._hd(self.h_down, w * s_ud()), unrot)
        return out


class Checkpointed(nn.Module):
    """Stands in for a decoder layer: runs it under activation checkpointing (its transformed weights and
    activations are recomputed in the backward pass instead of being kept for all layers at once)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:  # models read attributes such as attention_type off their layers
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(self.inner, *args, use_reentrant=False, **kwargs)


@contextmanager
def wrapped(layers: nn.ModuleList, step: Step, targets: dict[int, set[str]],
            checkpoint: bool = False) -> Iterator[None]:
    """Swap the target linears of ``layers`` (layer index -> short names) for their PairLinears, and the layers for
    ``Checkpointed`` ones when ``checkpoint``; restore everything on exit."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    outer: dict[int, nn.Module] = {}
    try:
        for i, names in targets.items():
            layer = layers[i]
            for name, w in step.wrappers(i, layer, names).items():
                parent = layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
                swapped.append((parent, name, getattr(parent, name)))
                setattr(parent, name, w)
            if checkpoint:
                outer[i] = layer
                layers[i] = Checkpointed(layer)
        yield
    finally:
        for i, layer in outer.items():
            layers[i] = layer
        for parent, name, lin in reversed(swapped):
            setattr(parent, name, lin)


# ------------------------------------------------------------------------------------------------ the loop
def train(model: nn.Module, p: OSTParams, step: Step, targets: dict[int, set[str]], windows: torch.Tensor,
          teacher: list[tuple[torch.Tensor, torch.Tensor]], steps: int, lr_rot: float, lr_scale: float,
          batch: int, generator: torch.Generator, checkpoint: bool = True) -> list[float]:
    """Adam on the Cayley latents and log-scales, cosine-decayed learning rates, KL-Top against ``teacher`` (the
    full-precision top-k of each window of ``windows``). Returns the loss of every step."""
    layers = model.model.layers
    device = next(model.parameters()).device
    opt = torch.optim.Adam([{"params": p.rotations(), "lr": lr_rot}, {"params": p.scales(), "lr": lr_scale}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + math.cos(math.pi * t / max(steps, 1))))
    frozen = [q for q in model.parameters() if q.requires_grad]
    for q in frozen:
        q.requires_grad_(False)
    losses: list[float] = []
    order = torch.randperm(windows.shape[0], generator=generator)
    try:
        with torch.enable_grad(), wrapped(layers, step, targets, checkpoint):
            for t in (bar := tqdm(range(steps), desc="ostquant", leave=False)):
                pick = [int(order[(t * batch + b) % len(order)]) for b in range(batch)]
                step.refresh()
                logits = model(input_ids=windows[pick].to(device), use_cache=False).logits
                idx = torch.stack([teacher[j][0] for j in pick]).to(device)
                logp = torch.stack([teacher[j][1] for j in pick]).to(device)
                loss = kl_top(logits, idx, logp)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(loss.item())
                bar.set_postfix(kl_top=f"{losses[-1]:.4f}")
    finally:
        for q in frozen:
            q.requires_grad_(True)
    return losses
