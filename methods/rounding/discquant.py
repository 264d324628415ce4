"""``discquant`` rounding: DiscQuant — A Quantization Method for Neural Networks Inspired by Discrepancy Theory.

Chee, Backurs, Heck, Zhang, Kulkarni, Rothvoss, Gopi, COLT 2025, https://arxiv.org/abs/2501.06417, reference code
https://github.com/jerry-chee/DiscQuant. ``method=discquant`` is the recipe ``none+minmax+discquant``; it also
follows model-level transforms (``quarot+discquant``).

Data-dependent rounding on a fixed grid, over the whole model at once. Each weight ``w`` of every target linear
lies between two neighbouring points of its group's grid (the range stage's scales and zeros): ``lo`` (floor code)
and ``hi`` (ceil code, codes clamped to [0, 2^b - 1]). An interpolation variable ``x ∈ [0, 1]`` per weight gives
``W(x) = lo + x·(hi - lo)``; ``y`` is the ``x`` of the full-precision weight and ``round(y)`` is RTN. DiscQuant
minimizes, by projected stochastic gradient descent (AdamW, then clamping ``x`` to [0, 1]),

    ⟨1 - 2y, x⟩  +  (ρ/δ²)·E_z KL(p_FP(·|z) ‖ p_W(x)(·|z))

a linear term whose minimum over the cube is the RTN vertex (it pushes every ``x`` to a corner), plus the
distillation KL of next-token distributions on calibration windows (teacher: the full-precision model). The theory
(a Lovett-Meka walk) has most coordinates end at a vertex with small loss; the few still fractional are rounded to
nearest (``round(x)``) at the end. ``δ²`` is the mean over linears of ``12·mean((RTN(w) - w)²)`` (≈ the squared
grid step, so ``ρ`` does not depend on the grid's scale), and the scaled distillation gradient is clamped entrywise
to ``[-clamp, clamp]`` before the linear term's gradient is added: the reference code's form (the linear term has
weight 1, the distillation ``ρ``; a weight λ on the linear term is ``1/ρ``).

Defaults of the reference code, with which the paper's experiments were run (``preset=paper``; README.md tables,
scripts/discq.sh, utils.py ``parse_args``, discq.py ``train``, linearutils.py): AdamW (β = 0.9, 0.999, torch's
weight decay 0.01), learning rate 0.05 and clamp 1.0 (README, Llama-3.1-8B W3 g64 row; Phi-3 W3 g64: lr 0.1, clamp
0.5), ρ = 200, 1024 RedPajama windows of 2048 tokens, 8 windows per optimizer step (batch 1, gradient accumulation
8), one epoch = 128 steps, HF's cosine schedule with 128 warm-up steps (so the rate ramps linearly over the whole
run and never decays), ``x`` initialized uniformly at random (``init_x=rand``), projection by clamping after each
step, final ``round(x)``; bfloat16 on a GPU.

Deviations (documented):

- CPU default (``preset=cpu``): 64 steps of 1 window (64 window passes: two epochs of the default 32 × 512
  calibration; the paper: 1024 passes of 2048 tokens, 64× the tokens), learning rate 0.1, ``x`` initialized at
  ``y`` (the full-precision weights; the reference's ``init_x=orig``): with so few steps a random start does not
  reach its vertex (each Adam step moves ``x`` by about the learning rate). Measured on SmolLM2's first 2 layers
  (W3 g64, 32 steps on 4 × 256 docs tokens, docs perplexity): init orig 16.45, rand 16.79, rand at lr 0.05 18.19;
  GPTQ 16.65, RTN 17.73. A step costs about 7 s on one busy CPU thread for SmolLM2-135M (teacher forward, student
  forward and backward of one 512-token window; AdamW over 106 M variables), plus about 20 s fixed: about 8 minutes
  (estimated from 1- and 4-step runs). The paper's setting is ``method.params.rounding.preset=paper`` (with a 1024 ×
  2048 calibration set to match); a field set explicitly overrides the preset.
- Calibration: the harness's windows (default 32 × 512 docs tokens), visited in seeded random order, epoch after
  epoch, instead of 1024 × 2048 RedPajama windows.
- The teacher is the model itself: its weights stay full precision during the optimization and the student runs
  with ``W(x)`` substituted (``torch.func.functional_call``), so each window costs a teacher forward, a student
  forward and a backward, as in the reference; nothing is stored per token (all teacher logits of 32 × 512 tokens
  would be 3 GB). Extra memory: ``x``, its gradient, AdamW's two moments, ``lo``, ``hi - lo``, the linear term and
  ``W(x)`` with its gradient, float32 copies of the target weights (peak 5.4 GB resident for SmolLM2-135M).
- The KL uses ``log_softmax`` (the reference adds 1e-10 to softmax probabilities); float32 on a CPU.
- The grid is the range stage's (min-max with an integer zero by default); the reference builds its own GPTQ-style
  symmetric grid. Activations are full precision during the optimization, as in the paper.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ptqbench.errors import ConfigError
from ptqbench.models import linear_layers
from ptqbench.quantizer import MethodConfig, set_linear_weight
from ptqbench.scheme import QuantizedWeight, qmax
from ptqbench.stages import RangeStage, Rounding, register_stage

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(steps=64, batch=1, lr=0.1, init="orig"),
    "paper": dict(steps=128, batch=8, lr=0.05, init="rand"),
}
INITS = ("orig", "rand")


@dataclass
class DiscQuantConfig(MethodConfig):
    """``None`` fields take the preset's value (``PRESETS``), so a preset can be chosen on the command line after the
    Hydra node's defaults; the config hash covers the fields as given (the preset's name and explicit values)."""

    preset: str = "cpu"  # cpu: fits 15 min on 2 cores for SmolLM2-135M; paper: the reference setting
    steps: int | None = None  # optimizer steps (cpu 64, paper 128)
    batch: int | None = None  # calibration windows per step, accumulated one at a time (cpu 1, paper 8)
    lr: float | None = None  # peak AdamW learning rate (cpu 0.1, paper 0.05)
    init: str | None = None  # x at the start: orig (= y, the FP weights) or rand (uniform) (cpu orig, paper rand)
    rho: float = 200.0  # weight of the distillation gradient (a weight λ on the linear term is 1/ρ)
    clamp: float = 1.0  # entrywise clamp of the scaled distillation gradient
    warmup: float = 1.0  # fraction of the steps with linear warm-up, cosine decay after (reference: all of them)
    weight_decay: float = 0.01  # AdamW's (torch's default, as in the reference)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"discquant.preset={self.preset!r}: use one of {sorted(PRESETS)}")
        r = self.resolved_values()
        if r["steps"] < 1:
            raise ConfigError(f"discquant.steps={r['steps']}: use a positive number of steps (paper: 128)")
        if r["batch"] < 1:
            raise ConfigError(f"discquant.batch={r['batch']}: use a positive number of windows per step (paper: 8)")
        if not r["lr"] > 0:
            raise ConfigError(f"discquant.lr={r['lr']}: use a positive learning rate (paper: 0.05)")
        if r["init"] not in INITS:
            raise ConfigError(f"discquant.init={r['init']!r}: use one of {list(INITS)} (paper: rand)")
        if not self.rho > 0:
            raise ConfigError(f"discquant.rho={self.rho}: use a positive gradient scale (paper: 200)")
        if not self.clamp > 0:
            raise ConfigError(f"discquant.clamp={self.clamp}: use a positive clamp (paper: 0.5 or 1.0)")
        if not 0 <= self.warmup <= 1:
            raise ConfigError(f"discquant.warmup={self.warmup}: use a fraction of the steps in [0, 1] (paper: 1.0)")
        if self.weight_decay < 0:
            raise ConfigError(f"discquant.weight_decay={self.weight_decay}: use a non-negative value (paper: 0.01)")
        super().__post_init__()

    def resolved_values(self) -> dict[str, Any]:
        """Every field, ``None`` replaced by the preset's value."""
        d = dataclasses.asdict(self)
        return {k: (PRESETS[self.preset][k] if v is None and k in PRESETS[self.preset] else v) for k, v in d.items()}


# ------------------------------------------------------------------------------------------- pure tensor core
def neighbour_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor and ceil codes (out, in) of ``w`` (out, in) on the grid ``scale``, ``zero`` (out, in), clamped."""
    t = w.float() / scale
    return (torch.floor(t) + zero).clamp_(0, qmax(bits)), (torch.ceil(t) + zero).clamp_(0, qmax(bits))


def interpolation(w: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """``y`` (out, in) with ``w = lo + y·step``; 0.5 where both neighbours coincide (any x gives the same weight)."""
    y = (w.float() - lo) / torch.where(step > 0, step, torch.ones_like(step))
    return torch.where(step > 0, y.clamp(0, 1), torch.full_like(y, 0.5))


def kl_div(teacher_logp: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student); ``teacher_logp`` log-probabilities (tokens, vocab)."""
    s = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_logp.exp() * (teacher_logp - s)).sum(-1).mean()


def x_gradient(lin_coef: torch.Tensor, kl_grad_w: torch.Tensor, step: torch.Tensor, rho: float, clamp: float
               ) -> torch.Tensor:
    """The update direction (out, in) of ``x``: the linear term's gradient plus the clamped, scaled KL gradient
    (chain rule through ``W(x) = lo + x·step``)."""
    return lin_coef + (rho * kl_grad_w.float() * step).clamp_(-clamp, clamp)


def lr_factor(t: int, steps: int, warmup: float) -> float:
    """Linear warm-up over ``warmup·steps`` steps, then cosine decay to 0 (the reference's HF schedule)."""
    n_warm = round(warmup * steps)
    if t < n_warm:
        return t / n_warm
    return 0.5 * (1 + math.cos(math.pi * (t - n_warm) / max(1, steps - n_warm)))


def window_order(n: int, total: int, gen: torch.Generator) -> list[int]:
    """``total`` window indices: seeded permutations of ``range(n)``, one epoch after another."""
    order: list[int] = []
    while len(order) < total:
        order += torch.randperm(n, generator=gen).tolist()
    return order[:total]


def _logits(model: nn.Module, ids: torch.Tensor, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    out = functional_call(model, params, (ids,)) if params else model(ids)
    return getattr(out, "logits", out)  # HF causal LMs return an output object; plain modules a tensor


@dataclass
class _Linear:
    """One target linear during the optimization."""

    qw: QuantizedWeight  # the range stage's RTN result: its grid is kept, its codes replaced
    down: torch.Tensor  # (out, in) uint8 floor codes
    open: torch.Tensor  # (out, in) bool: ceil code > floor code
    lo: torch.Tensor  # (out, in) float32 dequantized floor point
    step: torch.Tensor  # (out, in) float32 hi - lo (0 where the neighbours coincide)
    lin_coef: torch.Tensor  # (out, in) float32 1 - 2y: gradient of the linear term
    x: torch.Tensor  # (out, in) float32 interpolation variable, the optimized leaf
    rtn_err: float  # 12·mean((RTN - w)²): ≈ the squared grid step (RTN's error is uniform on ±step/2)


def _check_gradients(model: nn.Module, names: list[str]) -> None:
    mods = linear_layers(model)
    if torch.is_inference_mode_enabled():
        raise ConfigError("discquant needs gradients through the model: call quantize outside torch.inference_mode()")
    if any(mods[n].weight.is_inference() for n in names):
        raise ConfigError("discquant needs gradients through the model, and its weights are inference tensors: load "
                          "the model outside torch.inference_mode()")


@register_stage
class DiscQuant(Rounding):
    """DiscQuant (Chee et al., 2025): distillation over the whole model toward a vertex of the rounding cube."""

    name = "discquant"
    family = "optimization"
    config_cls = DiscQuantConfig
    requires_calibration = True
    level = "model"
    paper = "https://arxiv.org/abs/2501.06417"
    config: DiscQuantConfig

    @torch.no_grad()
    def _setup(self, name: str, lin: nn.Linear, rng: RangeStage, gen: torch.Generator, init: str) -> _Linear:
        w = rng.prepare(name, lin.weight.data, None)
        qw = rng.nearest(name, w)
        dev, g = w.device, qw.g_idx.long()
        s = qw.scales.float()[:, g].to(dev)  # (out, in) the stored (fp16) scales: the grid the codes will use
        z = qw.zeros.float()[:, g].to(dev)  # (out, in)
        down, up = neighbour_codes(w, s, z, qw.bits)
        lo, step = (down - z) * s, (up - down) * s
        y = interpolation(w, lo, step)
        x = y.clone() if init == "orig" else torch.rand(y.shape, generator=gen).to(dev)
        rtn_err = 12 * (lo + torch.round(y) * step - w.float()).square().mean().item()
        return _Linear(qw, down.to(torch.uint8), up > down, lo, step, 1 - 2 * y, x.requires_grad_(), rtn_err)

    def quantize_model(self, model: nn.Module, calibration: Any, rng: RangeStage,
                       targets: list[str]) -> dict[str, QuantizedWeight]:
        _check_gradients(model, targets)
        c = DiscQuantConfig(**self.config.resolved_values())
        mods = linear_layers(model)
        gen = torch.Generator().manual_seed(int(getattr(calibration, "seed", 0)))  # local: no global RNG use
        lins = {n: self._setup(n, mods[n], rng, gen, c.init) for n in targets}
        windows = calibration.input_ids  # (n, seq_len)
        order = window_order(windows.shape[0], c.steps * c.batch, gen)
        frozen = {p: p.requires_grad for p in model.parameters()}
        for p in frozen:
            p.requires_grad_(False)  # only W(x) needs gradients
        try:
            kls = self._optimize(model, lins, windows, order, c)
        finally:
            for p, req in frozen.items():
                p.requires_grad_(req)
        out: dict[str, QuantizedWeight] = {}
        n_flip = n_all = n_frac = 0
        with torch.no_grad():
            for n, s in lins.items():
                n_frac += int((torch.minimum(s.x, 1 - s.x) > 0.01)[s.open].sum())  # not yet at a vertex
                codes = (s.down + (torch.round(s.x) * s.open).to(torch.uint8)).cpu()  # (out, in) final rounding
                qw = dataclasses.replace(s.qw, qweight=codes, meta={**s.qw.meta})
                set_linear_weight(mods[n], qw)
                out[n] = qw
                n_flip += int((codes != s.qw.qweight).sum())
                n_all += codes.numel()
        lins.clear()
        self._info = {"train_kl_first_step": kls[0], "train_kl_last_step": kls[-1],
                      "changed_vs_rtn": n_flip / max(n_all, 1), "fractional_at_end": n_frac / max(n_all, 1)}
        return out

    def _optimize(self, model: nn.Module, lins: dict[str, _Linear], windows: torch.Tensor, order: list[int],
                  c: DiscQuantConfig) -> list[float]:
        """Projected AdamW on every ``x``; returns the mean training KL of each step."""
        mods = linear_layers(model)
        d2 = sum(s.rtn_err for s in lins.values()) / max(len(lins), 1)  # δ², the reference's normalizer of the KL
        delta2 = d2 if d2 > 0 else 1.0
        opt = torch.optim.AdamW([s.x for s in lins.values()], lr=c.lr, betas=(0.9, 0.999),
                                weight_decay=c.weight_decay)
        dev = next(iter(lins.values())).lo.device if lins else torch.device("cpu")
        kls: list[float] = []
        bar = tqdm(range(c.steps), desc=self.name, leave=False)
        for t in bar:
            for grp in opt.param_groups:
                grp["lr"] = c.lr * lr_factor(t, c.steps, c.warmup)
            with torch.no_grad():  # W(x) as leaves: built once a step, their gradients accumulated over windows
                leaves = {n: (s.lo + s.x * s.step).to(mods[n].weight.dtype).requires_grad_() for n, s in lins.items()}
            params = {f"{n}.weight": v for n, v in leaves.items()}
            kl_step = 0.0
            for i in order[t * c.batch: (t + 1) * c.batch]:  # one window at a time: one window's logits in memory
                ids = windows[i: i + 1].to(dev)
                with torch.no_grad():  # the teacher: the model's own full-precision weights
                    teacher = torch.log_softmax(_logits(model, ids).float(), -1).flatten(0, -2)
                with torch.enable_grad():
                    kl = kl_div(teacher, _logits(model, ids, params).flatten(0, -2))
                    (kl / (c.batch * delta2)).backward()
                kl_step += kl.item() / c.batch
            with torch.no_grad():
                for n, s in lins.items():
                    g = leaves[n].grad  # None for a linear the forward never used
                    s.x.grad = x_gradient(s.lin_coef, torch.zeros_like(s.lo) if g is None else g, s.step,
                                          c.rho, c.clamp)
                del leaves, params
                opt.step()
                opt.zero_grad(set_to_none=True)
                for s in lins.values():
                    s.x.clamp_(0, 1)  # projection onto the cube
            kls.append(kl_step)
            bar.set_postfix(kl=f"{kl_step:.4f}")
        return kls
