"""``quarot`` transform: QuaRot — Outlier-Free 4-Bit Inference in Rotated LLMs.

Ashkboos, Mohtashami, Croci, Li, Cameron, Jaggi, Alistarh, Hoefler, Hensman, NeurIPS 2024,
https://arxiv.org/abs/2404.00456.

A rotation method: it multiplies the residual stream by an orthogonal matrix ``Q`` chosen so that no channel
carries outliers any more, which makes both weights and activations easy to quantize (W4A4 with per-token
activations). The floating-point model's outputs do not change:

1. RMSNorm scales are folded into the linears that read the norm (``W ← W·diag(g)``; q/k/v after the attention
   norm, gate/up after the MLP norm, the lm_head after the final norm) and set to 1, so every norm is plain RMS
   normalisation, which commutes with an orthogonal ``Q`` (``‖xQ‖ = ‖x‖``).
2. The residual stream is rotated by a randomized Hadamard matrix ``Q = diag(±1)·H/√d`` (signs drawn from
   ``seed``): embedding rows ``E ← E·Q``; linears reading the residual ``W ← W·Q``; linears writing to it
   (o_proj, down_proj) ``W ← Qᵀ·W`` (bias ``b ← b·Q``); the lm_head ``W ← W·Q``.
3. Online Hadamard rotations (forward pre-hooks) before the down projection (the paper's online ``H`` on the MLP's
   intermediate activations) and before the attention output projection, with the weight rotated to match
   (``W ← W·H``, the hook computes ``x·H``), so the inputs that the activation quantizers see are incoherent too.

The rotations are a model-level transform stage; the weights are then quantized by the recipe's range and
rounding stages. The alias ``quarot`` is ``quarot+minmax+gptq`` (the paper's main setting: GPTQ through the shared
sequential pipeline, on calibration inputs of the rotated model); ``quarot+rtn`` is the paper's QuaRot-RTN
(round-to-nearest on the rotated weights, no calibration data drawn). On SmolLM2 QuaRot-RTN is much worse than plain
RTN at W3 (v_proj and gate/up_proj become far more sensitive to rounding error once the residual is rotated; see
methods/README.md), which is why the GPTQ default matters. Activation quantizers (the scheme's ``a_bits``) are
attached by the run loop after quantization; hooks run in registration order, so the online rotations run before
them and the activations are quantized in the rotated basis.

Hadamard matrices: ``hadamard(n)`` builds a genuine (orthogonal, ±1/√n entries) Hadamard matrix as the Kronecker
product of a Sylvester matrix (order 2^k) and a Paley matrix (Paley I: order q+1 for a prime q ≡ 3 mod 4; Paley II:
order 2(q+1) for a prime q ≡ 1 mod 4), which covers SmolLM2's sizes: 576 = 36·16 (Paley II, q = 17) and
1536 = 12·128 (Paley I, q = 11). When no such construction exists for a size (e.g. 9·64 per se would need an
order-9 Hadamard, which cannot exist), a seeded random orthogonal matrix (QR of a Gaussian, signs fixed) is used
instead; ``QuantResult.info`` records ``rotation_is_hadamard`` (residual ``Q``), ``online_down_is_hadamard`` and
``online_o_is_hadamard`` as 1/0.

Paper defaults kept: randomized Hadamard on the residual, online Hadamard before down_proj, lm_head kept in
floating point (the scheme's ``keep_fp``), GPTQ settings of ``methods/rounding/gptq.py`` (1% dampening, 128-column
blocks).
Deviations (documented):

- The paper splits the attention-output rotation into a per-head Hadamard fused offline into W_v/W_o and an
  online Hadamard across heads (a fast Walsh-Hadamard kernel); here the whole rotation of o_proj's input is one
  online matrix product (same transform family, more compute, exact the same way). SmolLM2's 9 heads have no
  order-9 Hadamard, so the paper's head-wise split would not be a Hadamard there anyway.
- No KV-cache quantization (the harness has none) and no activation clipping (the paper clips activations at
  0.9 of the range; the activation quantizers are the harness's own, attached by the run loop).
- Weights use the scheme's format (e.g. ``w4a4``: asymmetric per-channel); the paper's RTN baseline uses symmetric
  per-channel weights with a clipping-ratio search.
- The tied lm_head of models such as SmolLM2 is untied (its weight cloned into a new parameter) before folding: the
  embedding is rotated on its own and the lm_head gets the final norm's scale; this doubles that matrix in memory.

Supported models: Llama-style decoders (Llama, Mistral, Qwen2/3): RMSNorm, q/k/v/o and gate/up/down projections.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError
from ptqbench.models import decoder_layers
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import FORMATS
from ptqbench.stages import Transform, register_stage

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass
class QuaRotConfig(MethodConfig):
    seed: int = 0  # draws the ±1 signs of the randomized residual Hadamard (and any random orthogonal fallback)
    online_down: bool = True  # online Hadamard before down_proj (paper)
    online_o_proj: bool = True  # online Hadamard before o_proj (paper: per-head part fused into W_v, rest online)


# ------------------------------------------------------------------------------------------------ matrices
def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, int(math.isqrt(n)) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) matrix ``Q[i, j] = χ(j - i)`` with χ the quadratic character modulo the prime ``q``."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if a in residues else -1.0 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    return chi[idx]


def _paley(order: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of ``order`` from Paley's constructions with a prime field, or None."""
    q = order - 1
    if q % 4 == 3 and _is_prime(q):  # Paley I: skew conference matrix + I
        s = torch.zeros(order, order, dtype=torch.float64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(order, dtype=torch.float64)
    if order % 2 == 0:
        q = order // 2 - 1
        if q % 4 == 1 and _is_prime(q):  # Paley II: symmetric conference matrix C, H = C⊗A + I⊗B
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:] = 1
            c[1:, 0] = 1
            c[1:, 1:] = _jacobsthal(q)
            a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)
    return None


def _sylvester(order: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard_factors(n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Orthogonal factors ``(A, B)`` float64 with ``A ⊗ B`` a Hadamard matrix of order ``n`` (entries ±1/√n):
    ``A`` a Paley (or Sylvester) matrix of order p, ``B`` a Sylvester matrix of order 2^k, ``n = p·2^k``; the
    smallest Paley order is tried first. None when no such construction exists."""
    if n < 1:
        return None
    k = n & -n  # largest power of two dividing n
    while k >= 1:
        p = n // k
        core = _sylvester(p) if p & (p - 1) == 0 else _paley(p)
        if core is not None:
            a, b = core / math.sqrt(p), _sylvester(k) / math.sqrt(k)
            if torch.allclose(a @ a.T, torch.eye(p, dtype=torch.float64), atol=1e-10):
                return a, b
        k //= 2
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """Orthogonal Hadamard matrix (n, n) float64 with entries ±1/√n, or None when none is constructible here."""
    f = hadamard_factors(n)
    return None if f is None else torch.kron(*f)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """Haar-random orthogonal matrix (n, n) float64: QR of a Gaussian with the signs of R's diagonal fixed."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r))[None, :]


@dataclass
class Rotation:
    """Orthogonal ``R = diag(signs)·(A ⊗ B)`` (n, n), kept factored: ``x·R`` costs n·(p + k) per row, not n²."""

    a: torch.Tensor  # (p, p) orthogonal
    b: torch.Tensor  # (k, k) orthogonal
    signs: torch.Tensor | None  # (n,) ±1, or None
    is_hadamard: bool

    @property
    def n(self) -> int:
        return self.a.shape[0] * self.b.shape[0]

    def matrix(self) -> torch.Tensor:
        """The dense (n, n) float64 matrix (tests, small sizes)."""
        r = torch.kron(self.a.double(), self.b.double())
        return r if self.signs is None else self.signs.double()[:, None] * r

    def to(self, device: Any, dtype: torch.dtype) -> "Rotation":
        s = None if self.signs is None else self.signs.to(device, dtype)
        return Rotation(self.a.to(device, dtype), self.b.to(device, dtype), s, self.is_hadamard)

    def right(self, x: torch.Tensor) -> torch.Tensor:
        """``x·R`` for ``x`` (..., n), in ``x``'s dtype."""
        p, k = self.a.shape[0], self.b.shape[0]
        if self.signs is not None:
            x = x * self.signs
        if k == 1 or p == 1:  # a single dense factor (random orthogonal fallback, or a power of two)
            return x @ (self.a if k == 1 else self.b)
        y = x.reshape(*x.shape[:-1], p, k) @ self.b  # (..., p, k): B on the fast index
        y = self.a.T @ y  # (..., p, k): y[j, l] = Σ_i A[i, j] y[i, l]
        return y.reshape(x.shape)


def rotation(n: int, generator: torch.Generator, randomize: bool) -> Rotation:
    """``diag(±1)·H`` (``randomize``, signs from ``generator``) or ``H``, a Hadamard of order ``n``; a seeded
    random orthogonal matrix where no Hadamard of order ``n`` is available."""
    f = hadamard_factors(n)
    if f is None:
        return Rotation(random_orthogonal(n, generator), torch.ones(1, 1, dtype=torch.float64), None, False)
    signs = None
    if randomize:
        signs = torch.randint(0, 2, (n,), generator=generator, dtype=torch.float64) * 2 - 1
    return Rotation(f[0], f[1], signs, True)


# ------------------------------------------------------------------------------------------------ the model
class OnlineRotation:
    """Forward pre-hook computing ``x·R`` on a linear's input (the linear's weight holds ``W·R``)."""

    def __init__(self, r: Rotation) -> None:
        self.r = r

    def __call__(self, _mod: nn.Module, args: tuple) -> tuple:
        x = args[0]
        if self.r.a.device != x.device or self.r.a.dtype != x.dtype:
            self.r = self.r.to(x.device, x.dtype)
        return (self.r.right(x), *args[1:])


def _rot32(r: Rotation, like: torch.Tensor) -> Rotation:
    return r.to(like.device, torch.float32)


@torch.no_grad()
def _mul_in(lin: nn.Linear, r: Rotation) -> None:
    """The linear now reads ``x·R`` for the same output: ``W ← W·R`` (float32 products)."""
    lin.weight.copy_(_rot32(r, lin.weight).right(lin.weight.float()).to(lin.weight.dtype))


@torch.no_grad()
def _mul_out(lin: nn.Linear, r: Rotation) -> None:
    """The linear now writes ``y·R``: ``W ← Rᵀ·W = (Wᵀ·R)ᵀ``, ``b ← b·R``."""
    r = _rot32(r, lin.weight)
    lin.weight.copy_(r.right(lin.weight.float().T).T.to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_(r.right(lin.bias.float()).to(lin.bias.dtype))


@torch.no_grad()
def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """Move the RMSNorm scale ``g`` into the linears reading it (``W ← W·diag(g)``); the norm's scale becomes 1."""
    g = norm.weight.float()
    for lin in linears:
        lin.weight.copy_((lin.weight.float() * g[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0)


def _check_model(model: nn.Module) -> None:
    mtype = getattr(getattr(model, "config", None), "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"quarot supports Llama-style models {list(SUPPORTED_MODEL_TYPES)}, not {mtype!r}: "
                          f"choose another method for this model")
    if getattr(model, "lm_head", None) is None or getattr(getattr(model, "model", None), "norm", None) is None:
        raise ConfigError("quarot needs model.lm_head and model.model.norm (a Llama-style causal LM)")


def untie_lm_head(model: nn.Module) -> bool:
    """Give the lm_head its own weight when it shares the embedding's (tied embeddings); True if it did."""
    emb = model.get_input_embeddings().weight
    head = model.lm_head
    if head.weight is emb or head.weight.data_ptr() == emb.data_ptr():
        head.weight = nn.Parameter(emb.detach().clone(), requires_grad=emb.requires_grad)
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        return True
    return False


@torch.no_grad()
def rotate_model(model: nn.Module, seed: int = 0, online_down: bool = True, online_o_proj: bool = True,
                 residual: Rotation | None = None) -> dict[str, float]:
    """Apply QuaRot's computational-invariance transforms in place; the fp model's outputs stay the same.

    ``residual``: the residual-stream rotation to use instead of the seeded randomized Hadamard (e.g. a calibrated
    one, ``methods/transform/dartquant.py``); the seeded draw still happens, so the online rotations are the same.
    Returns facts for ``QuantResult.info`` (which rotations are Hadamard matrices, whether the head was untied).
    """
    _check_model(model)
    gen = torch.Generator().manual_seed(int(seed))
    untied = untie_lm_head(model)
    layers = decoder_layers(model)
    hidden = model.get_input_embeddings().weight.shape[1]

    for layer in layers:  # 1. fold norm scales
        att, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [att.q_proj, att.k_proj, att.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fold_norm(model.model.norm, [model.lm_head])

    q = rotation(hidden, gen, randomize=True)  # 2. rotate the residual stream
    if residual is not None:
        if residual.n != hidden:
            raise ValueError(f"residual rotation of order {residual.n} for a hidden size of {hidden}")
        q = residual
    emb = model.get_input_embeddings()
    emb.weight.copy_(_rot32(q, emb.weight).right(emb.weight.float()).to(emb.weight.dtype))  # (vocab, hidden) rows
    for layer in tqdm(layers, desc="quarot rotate", leave=False):
        att, mlp = layer.self_attn, layer.mlp
        for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
            _mul_in(lin, q)
        _mul_out(att.o_proj, q)
        _mul_out(mlp.down_proj, q)
    _mul_in(model.lm_head, q)

    info: dict[str, float] = {"rotation_is_hadamard": float(q.is_hadamard), "untied_lm_head": float(untied),
                              "rotation_dim": float(hidden)}
    # 3. online rotations: the weight takes W·H now, the hook computes x·H at run time
    for key, on, get in (("down", online_down, lambda lay: lay.mlp.down_proj),
                         ("o", online_o_proj, lambda lay: lay.self_attn.o_proj)):
        if not on:
            continue
        n = get(layers[0]).in_features
        h = rotation(n, gen, randomize=False)
        for layer in layers:
            lin = get(layer)
            _mul_in(lin, h)
            lin.register_forward_pre_hook(OnlineRotation(h.to(lin.weight.device, lin.weight.dtype)))
        info[f"online_{key}_is_hadamard"] = float(h.is_hadamard)
        info[f"online_{key}_dim"] = float(n)
    return info


# ------------------------------------------------------------------------------------------------ the stage
@register_stage
class QuaRot(Transform):
    """QuaRot (Ashkboos et al., 2024): Hadamard rotations that remove outliers, fused into the weights (model-level)."""

    name = "quarot"
    supported_formats = FORMATS  # an equivalence in floating point: any grid after it
    family = "rotation"
    config_cls = QuaRotConfig
    level = "model"
    paper = "https://arxiv.org/abs/2404.00456"
    config: QuaRotConfig

    def apply_model(self, model: nn.Module, calibration: Any) -> None:
        c = self.config
        self._info = rotate_model(model, c.seed, c.online_down, c.online_o_proj)
