"""``dartquant`` transform: DartQuant — Efficient Rotational Distribution Calibration for LLM Quantization.

Shao, Chen, Wang, Yu, Lin, Yao, Wei, Cheng, NeurIPS 2025, https://arxiv.org/abs/2511.04063
(reference code: github.com/CAS-CLab/DartQuant, ``calibrater/``).

QuaRot's rotations, with the residual rotation ``R1`` (and the per-head value rotation ``R2``) *calibrated* instead of
random. The calibration never backpropagates through the model (no end-to-end loss, unlike SpinQuant/OSTQuant):

1. **Rotational distribution calibration.** One forward pass of the full-precision model over the calibration set
   records the activations each rotation acts on: for ``R1`` the inputs of q/k/v and of gate/up in every layer as
   the norm-folded model sees them (the residual stream divided by its RMS: RMSNorm without its scale), for ``R2``
   the inputs of every o_proj (the attention heads' outputs). Algorithm 1's ``token_sampling``: a seeded random
   subset of ``tokens_per_layer`` tokens per layer and site is kept.
2. **Whip loss** (Eq. 4): ``Whip(o) = Σ_i exp(-|o_i|)`` over the channels of a rotated activation ``o = x·R``,
   averaged over tokens. Its gradient is largest near zero, so small entries are pushed away from zero; since a
   rotation keeps the norm, the large ones (outliers) shrink: the Laplace-like distribution becomes uniform-like on
   a narrower range, which a per-token quantizer represents with less error.
3. **QR-Orth**: the rotation is ``R = Q`` of ``QR(Z)`` (signs fixed so that R's diagonal is positive, which makes
   ``Q`` a function of ``Z`` and ``Q(H) = H`` for an orthogonal ``H``) of an unconstrained latent ``Z``, optimised
   by plain SGD with momentum; ``Z`` is discarded afterwards. No Cayley/Riemannian optimiser is needed.

``R1`` starts from QuaRot's randomized Hadamard of the same ``seed`` (``init=hadamard``; ``random``: a seeded
random orthogonal matrix) and is learned on the pooled q/k/v- and gate/up-inputs of all layers (one ``R1`` for the
model, as in the paper); ``R2`` is one ``head_dim × head_dim`` rotation per key/value head and layer (shared by the
query heads of a group, as in the reference code), started from a randomized Hadamard, learned on the layer's o_proj
inputs and fused into v_proj's output rows and o_proj's input columns. The learned ``R1`` is then applied exactly as
QuaRot applies its Hadamard (``quarot.rotate_model``: RMSNorm scales folded, embedding and residual linears
rotated, tied lm_head untied, online Hadamards before down_proj — the paper's ``R4`` — and, by default here, before
o_proj), so the floating-point model's outputs do not change. The weights are then quantized by the recipe's range
and rounding stages; the paper's main setting is ``dartquant+minmax+gptq`` (GPTQ weights, per-token activations).

Paper/reference-code defaults kept: Whip loss; QR-Orth with SGD, momentum 0.9, no learning-rate schedule; Hadamard
initialisation; ``R1`` learning rate 1.5e-3 for 130 steps (the reference's Llama-2-7B run: 10 epochs of a random
10% of the 128 × 2048-token samples × 32 layers × 2 sites in minibatches of 64 samples: 13 steps an epoch); ``R2``
learning rate 1e-3 for 10 full-batch steps per layer (the reference's R2 script: 10 epochs of one accumulated step
over all samples); ``R3`` (online Hadamard on queries/keys for the KV cache) is moot here: the harness has no KV-cache
quantization.

Deviations (documented):

- Token budget (CPU): the paper calibrates on 128 × 2048 WikiText-2 tokens and each ``R1`` step sees 64 × 2048
  tokens; here the harness's calibration set (``calib``: 32 × 512 docs tokens by default) is subsampled to
  ``tokens_per_layer = 1024`` tokens per layer and site (61 440 vectors for SmolLM2's 30 layers) and each ``R1`` step
  draws ``r1_batch_tokens = 8192`` of them. ``tokens_per_layer=0`` keeps every token and ``r1_batch_tokens=131072``
  gives the paper's minibatch (with a paper-sized ``calib``; far beyond 2 CPU cores in 5 minutes).
- ``online_o_proj=true`` (default) keeps the harness QuaRot's online rotation of o_proj's whole input, after ``R2``;
  the paper's layout (``R2`` fused offline, no online rotation before o_proj) is ``online_o_proj=false``. The default
  makes ``dartquant`` and ``quarot`` differ only in the calibrated rotations.
- No activation clipping (the reference clips activations at 0.9 of the range) and the scheme's weight format (the
  reference uses symmetric group-128 weights with an MSE clip search), as for ``quarot``.
- ``R1``'s calibration activations come from the full-precision model (as in the reference code); the tied lm_head
  is untied as in ``quarot``.

Supported models: Llama-style decoders (Llama, Mistral, Qwen2/3), as ``quarot``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError
from ptqbench.methods.transform.quarot import Rotation, _check_model, random_orthogonal, rotate_model, rotation
from ptqbench.models import decoder_layers
from ptqbench.quantizer import MethodConfig
from ptqbench.scheme import FORMATS
from ptqbench.stages import Transform, register_stage

INITS = ("hadamard", "random")
OPTIMIZERS = ("sgd", "adam")


@dataclass
class DartQuantConfig(MethodConfig):
    seed: int = 0  # randomized-Hadamard signs (as quarot's) and the token sample
    init: str = "hadamard"  # R1/R2 start: randomized Hadamard (paper) or a seeded random orthogonal matrix
    optimizer: str = "sgd"  # optimizer of the QR-Orth latents (paper: SGD; the reference also offers Adam)
    momentum: float = 0.9  # SGD momentum (reference code)
    r1_lr: float = 1.5e-3  # R1 learning rate (reference code, Llama-2-7B)
    r1_steps: int = 130  # R1 optimizer steps (reference: 10 epochs × 13 minibatches); 0 keeps the Hadamard
    r1_batch_tokens: int = 8192  # activation vectors per R1 step (reference: 64 × 2048; CPU deviation)
    r2: bool = True  # learn the per-head value rotation R2 (paper); false: no R2 at all (as quarot)
    r2_lr: float = 1e-3  # R2 learning rate (reference code)
    r2_steps: int = 10  # R2 full-batch steps per layer (reference: 10 epochs, one accumulated step each)
    tokens_per_layer: int = 1024  # token_sampling: tokens kept per layer and site (0: all; CPU deviation)
    online_down: bool = True  # online Hadamard before down_proj (the paper's R4)
    online_o_proj: bool = True  # online rotation of o_proj's input as quarot's (paper: false, R2 only)
    batch_size: int = 1  # calibration windows per forward pass while recording activations (memory only)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ConfigError(f"dartquant.init={self.init!r}: use one of {list(INITS)} (paper: hadamard)")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"dartquant.optimizer={self.optimizer!r}: use one of {list(OPTIMIZERS)} (paper: sgd)")
        for name in ("r1_lr", "r2_lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ConfigError(f"dartquant.{name}={v}: use a positive learning rate (paper: 1.5e-3 R1, 1e-3 R2)")
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"dartquant.momentum={self.momentum}: use a momentum in [0, 1) (paper: 0.9)")
        for name in ("r1_steps", "r2_steps", "tokens_per_layer"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"dartquant.{name}={getattr(self, name)}: use a count >= 0")
        if self.r1_batch_tokens < 1:
            raise ConfigError(f"dartquant.r1_batch_tokens={self.r1_batch_tokens}: use a positive number of tokens")
        if self.batch_size < 1:
            raise ConfigError(f"dartquant.batch_size={self.batch_size}: use a positive number of windows")
        super().__post_init__()


# ------------------------------------------------------------------------------------------------ pure cores
def qr_orth(z: torch.Tensor) -> torch.Tensor:
    """QR-Orth: the orthogonal factor of ``z`` (..., n, n) with signs fixed so that R's diagonal is positive
    (unique, differentiable; an orthogonal ``z`` maps to itself)."""
    q, r = torch.linalg.qr(z)
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    s = torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))
    return q * s.unsqueeze(-2)


def whip(o: torch.Tensor) -> torch.Tensor:
    """Whip loss (Eq. 4): ``Σ_i exp(-|o_i|)`` over the last dimension, averaged over the rest."""
    return torch.exp(-o.abs()).sum(dim=-1).mean()


def _rotate_heads(x: torch.Tensor, r: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``x`` (N, n_heads·hd) with head h rotated by ``r[h // (n_heads / n_kv)]``; ``r`` (n_kv, hd, hd)."""
    n_kv, hd = r.shape[0], r.shape[-1]
    xh = x.reshape(-1, n_kv, n_heads // n_kv, hd)  # heads of one key/value group are consecutive (repeat_kv)
    return torch.einsum("ngrd,gde->ngre", xh, r).reshape(x.shape)


def calibrate_rotation(x: torch.Tensor, init: torch.Tensor, steps: int, lr: float, momentum: float = 0.9,
                       batch: int | None = None, generator: torch.Generator | None = None, optimizer: str = "sgd",
                       n_heads: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Algorithm 1: minimise the Whip loss of ``x·R`` over orthogonal ``R = qr_orth(Z)``, ``Z`` from ``init``.

    ``x`` (N, n) activations (float32); ``init`` (n, n) orthogonal, or (n_kv, hd, hd) per-head rotations with
    ``n_heads`` (``x`` is then (N, n_heads·hd)). Each step uses ``batch`` rows drawn from ``generator`` (all rows when
    None or ≥ N). Returns ``R`` (float64, orthogonal) and the Whip loss on all of ``x`` before and after.
    """
    x = x.float()
    rot = (lambda v, r: v @ r) if n_heads is None else (lambda v, r: _rotate_heads(v, r, n_heads))
    z = nn.Parameter(init.detach().float().clone())
    opt = (torch.optim.SGD([z], lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam([z], lr=lr))
    n = x.shape[0]
    with torch.no_grad():
        before = float(whip(rot(x, qr_orth(init.detach().double()).float())))
    with torch.enable_grad():
        for _ in range(steps):
            xb = x if batch is None or batch >= n else x[torch.randint(0, n, (batch,), generator=generator)]
            loss = whip(rot(xb, qr_orth(z)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    r = qr_orth(z.detach().double())  # float64 QR of the learned latent: orthogonal to ~1e-15
    with torch.no_grad():
        after = float(whip(rot(x, r.float())))
    return r, {"whip_init": before, "whip_final": after}


# ------------------------------------------------------------------------------------------------ the model
@torch.no_grad()
def record_activations(model: nn.Module, input_ids: torch.Tensor, tokens_per_layer: int, batch_size: int,
                       generator: torch.Generator, with_o: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward pass of the (unrotated) model: the RMS-normalised residual stream at every attention and MLP
    norm (what q/k/v and gate/up read once the norm scales are folded) and every o_proj's input, a seeded sample of
    ``tokens_per_layer`` tokens per layer (the same tokens for a layer's sites). Returns (R1 pool (M, hidden),
    per-layer o_proj inputs)."""
    layers = decoder_layers(model)
    n_tok = input_ids.numel()
    k = n_tok if tokens_per_layer <= 0 else min(tokens_per_layer, n_tok)
    picks = [torch.randperm(n_tok, generator=generator)[:k].sort().values for _ in layers]
    r1: list[list[torch.Tensor]] = [[] for _ in layers]
    o_in: list[list[torch.Tensor]] = [[] for _ in layers]
    state = {"off": 0, "len": 0}

    def take(i: int, x: torch.Tensor) -> torch.Tensor:
        p = picks[i]
        p = p[(p >= state["off"]) & (p < state["off"] + state["len"])] - state["off"]
        return x.reshape(-1, x.shape[-1])[p.to(x.device)].float().cpu()

    def norm_hook(i: int, norm: nn.Module):
        eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))

        def f(_m: nn.Module, args: tuple) -> None:
            h = take(i, args[0])
            r1[i].append(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps))
        return f

    def o_hook(i: int):
        def f(_m: nn.Module, args: tuple) -> None:
            o_in[i].append(take(i, args[0]))
        return f

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.input_layernorm.register_forward_pre_hook(norm_hook(i, layer.input_layernorm)))
        handles.append(layer.post_attention_layernorm.register_forward_pre_hook(
            norm_hook(i, layer.post_attention_layernorm)))
        if with_o:
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i)))
    base = model.model  # the decoder without the lm_head: no (tokens × vocab) logits
    device = next(model.parameters()).device
    try:
        for chunk in tqdm(input_ids.split(batch_size), desc="dartquant activations", leave=False):
            state["len"] = chunk.numel()
            base(input_ids=chunk.to(device), use_cache=False)
            state["off"] += chunk.numel()
    finally:
        for h in handles:
            h.remove()
    pool = torch.cat([t for per in r1 for t in per])
    return pool, [torch.cat(per) for per in o_in] if with_o else []


@torch.no_grad()
def fuse_head_rotations(layer: nn.Module, r: torch.Tensor, n_heads: int) -> None:
    """Fuse per-key/value-head rotations ``r`` (n_kv, hd, hd) into v_proj's output rows (``v_k ← v_k·R_k``) and
    o_proj's input columns (head h: ``W_o[:, h] ← W_o[:, h]·R_{h // rep}``); the layer's output is unchanged."""
    v, o = layer.self_attn.v_proj, layer.self_attn.o_proj
    n_kv, hd = r.shape[0], r.shape[-1]
    r = r.double()
    wv = v.weight.double().reshape(n_kv, hd, -1)  # (n_kv, hd, hidden)
    v.weight.copy_(torch.matmul(r.transpose(1, 2), wv).reshape(v.weight.shape).to(v.weight.dtype))
    if v.bias is not None:
        v.bias.copy_(torch.einsum("gd,gde->ge", v.bias.double().reshape(n_kv, hd), r).reshape(-1).to(v.bias.dtype))
    o.weight.copy_(_rotate_heads(o.weight.double(), r, n_heads).to(o.weight.dtype))


def _init_matrix(n: int, gen: torch.Generator, init: str) -> torch.Tensor:
    if init == "random":
        return random_orthogonal(n, gen)
    return rotation(n, gen, randomize=True).matrix()  # randomized Hadamard (a random orthogonal where none exists)


# ------------------------------------------------------------------------------------------------ the stage
@register_stage
class DartQuant(Transform):
    """DartQuant (Shao et al., 2025): rotations calibrated by the Whip loss under QR-Orth, fused as QuaRot's."""

    name = "dartquant"
    supported_formats = FORMATS  # an equivalence in floating point: any grid after it
    family = "rotation"
    config_cls = DartQuantConfig
    level = "model"
    requires_calibration = True
    paper = "https://arxiv.org/abs/2511.04063"
    config: DartQuantConfig

    def apply_model(self, model: nn.Module, calibration: Any) -> None:
        c = self.config
        _check_model(model)
        if calibration is None:
            raise ValueError("dartquant needs calibration data")
        if torch.is_inference_mode_enabled():
            raise ConfigError("dartquant optimises its rotations with autograd: run it outside torch.inference_mode()")
        t0 = time.perf_counter()
        was_training = model.training
        model.eval()
        cfg = model.config
        hidden = model.get_input_embeddings().weight.shape[1]
        n_heads = cfg.num_attention_heads
        n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
        hd = model.model.layers[0].self_attn.o_proj.in_features // n_heads

        gen = torch.Generator().manual_seed(int(c.seed))
        r1_init = _init_matrix(hidden, torch.Generator().manual_seed(int(c.seed)), c.init)  # quarot's Q for hadamard
        pool, o_inputs = record_activations(model, calibration.input_ids, c.tokens_per_layer, c.batch_size, gen,
                                            with_o=c.r2)
        t_rec = time.perf_counter() - t0
        dev = next(model.parameters()).device  # the rotations are optimised where the model runs
        pool, r1_init = pool.to(dev), r1_init.to(dev)

        r1, s1 = calibrate_rotation(pool, r1_init, c.r1_steps, c.r1_lr, c.momentum, c.r1_batch_tokens, gen,
                                    c.optimizer)
        with torch.no_grad():
            tmax0 = float((pool @ r1_init.float()).abs().amax(-1).mean())
            tmax1 = float((pool @ r1.float()).abs().amax(-1).mean())
        info = {"r1_whip_init": s1["whip_init"], "r1_whip_final": s1["whip_final"], "r1_token_absmax_init": tmax0,
                "r1_token_absmax_final": tmax1, "r1_calib_tokens": float(pool.shape[0])}
        del pool
        r1 = r1.cpu()
        self.r1 = r1  # the learned residual rotation (hidden, hidden) float64, for inspection
        if c.r2:
            w0, w1 = [], []
            for layer, x in zip(tqdm(decoder_layers(model), desc="dartquant R2", leave=False), o_inputs):
                init = _init_matrix(hd, gen, c.init).unsqueeze(0).repeat(n_kv, 1, 1).to(dev)
                r2, s2 = calibrate_rotation(x.to(dev), init, c.r2_steps, c.r2_lr, c.momentum, None, gen, c.optimizer,
                                            n_heads=n_heads)
                fuse_head_rotations(layer, r2, n_heads)
                w0.append(s2["whip_init"])
                w1.append(s2["whip_final"])
            info.update({"r2_whip_init": sum(w0) / len(w0), "r2_whip_final": sum(w1) / len(w1)})
        del o_inputs
        t_cal = time.perf_counter() - t0
        info.update(rotate_model(model, c.seed, c.online_down, c.online_o_proj,
                                 residual=Rotation(r1, torch.ones(1, 1, dtype=torch.float64), None, False)))
        info.update({"rotation_calib_s": t_cal, "rotation_record_s": t_rec})
        self._info = info
        model.train(was_training)
