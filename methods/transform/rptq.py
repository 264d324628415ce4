"""``rptq`` transform: RPTQ — Reorder-based Post-training Quantization for Large Language Models.

Yuan, Niu, Liu, Liu, Wang, Shang, Sun, Wu, Wu, Wu, 2023, https://arxiv.org/abs/2304.01089
(reference code: github.com/hahnyuan/RPTQ4LLM).

The obstacle to low-bit activations is not only a few outlier channels but that channels have very different
ranges (one lives in [-100, -50], another in [80, 100]): one range per tensor or per token wastes most levels on
every channel. RPTQ clusters the channels of each activation by their calibration range, reorders them so each
cluster is contiguous, and quantizes each cluster with its own static range. A layer-level transform, inside the
shared calibration loop, on each layer's calibration inputs:

1. One pass of the layer over its calibration inputs records, per channel and per window, the min and max of the
   four activations that feed quantized linears: the attention norm's output (q/k/v's input, the paper's R1), the
   attention output (o_proj's input, R3), the MLP norm's output (gate/up's input, R4) and the MLP's intermediate
   activation (down_proj's input, R5).
2. k-means on each channel's ``(max, min)`` partitions the channels (``clusters_qkv``, ``clusters_gate_up``,
   ``clusters_down`` clusters; ``clusters_o`` per attention head, since a reorder of o_proj's input can only move
   channels within a head: it comes from v_proj's rows through the attention). Written here in torch (k-means++,
   ``kmeans_init`` restarts, seeded): deterministic, no scikit-learn.
3. The reorder is folded into the model, so the floating-point outputs do not change: the norms write their outputs
   in the new order (a forward hook gathering the output, the reference code's ``ReorderLayerNorm``; its CUDA kernel
   writes in place) and q/k/v, gate/up take the matching column order; v_proj's rows are permuted within each
   key-value head and o_proj's columns within each query head of its group; gate/up's rows and down_proj's columns
   take the intermediate order.
4. Each quantized linear gets a static asymmetric activation quantizer with one range per contiguous cluster
   (``ptqbench.actquant.ClusterActQuantizer``), left on the linear for ``attach_activation_quant``: the run loop
   inserts it in place of the scheme's quantizer (the scheme's ``a_mode`` and ``a_sym`` do not apply there). The
   weights are then rounded by the recipe's range and rounding stages on the reordered layer; the alias ``rptq``
   is ``rptq+minmax+gptq`` (the reference code's default ``--w_quantizer gptq``, asymmetric per-channel weights);
   ``rptq+rtn`` rounds to nearest.

``supported_a_bits`` includes 3 (the paper's W4A3); methods with the scheme's per-token quantizers refuse ``a_bits=3``.

Defaults (the reference code's): 32 clusters for the norm outputs and for down_proj's input, 4 per head for
o_proj's input; static ranges, the per-channel min/max of each calibration window accumulated as the reference's
``ema_minmax`` does (first window, then ``0.99·old + 0.01·new`` per window; ``act_range=minmax`` takes the plain
min/max over all windows); k-means on the channel's true (max, min) over the calibration set, 10 restarts.

Deviations (documented):

- Weights follow the scheme (``w4a4``: one range per output channel). The reference code's weight quantizer also
  splits each row at the activation clusters (one range per row and cluster: 32 variable-size groups per row of
  q/k/v, gate/up, down), i.e. more weight scales than per-channel W4.
- GPTQ is the harness's ``gptq`` rounding (1% dampening, act-order, true-sequential, 128-column blocks); the
  reference's GPTQ has neither act-order nor true-sequential order and takes the ranges from the unupdated weight.
- The reference code quantizes the norm outputs (q/k/v's and gate/up's inputs) at ``max(8, a_bits)`` bits and only
  o_proj's and down_proj's inputs (and the KV cache) at ``a_bits``; here every linear input is at the scheme's
  ``a_bits`` (an honest W4A4/W4A3), and ``norm_min_bits=8`` reproduces the reference.
- The per-cluster grid has ``2^bits`` levels from ``lo`` to ``hi`` (``scale = (hi - lo)/(2^bits - 1)``, integer zero
  point); the reference divides by ``2^bits`` and clamps to ``[-2^(bits-1), 2^(bits-1) - 1]``, which clips the top.
- No KV-cache or attention-matmul quantization (the harness quantizes linear inputs only), hence no reorder of the
  q/k outputs (the paper's R2); with rotary embeddings that reorder would not commute anyway.
- Grouped-query attention (SmolLM2: 9 query heads, 3 key-value heads): the channels of a key-value head are clustered
  on the ``(max, min)`` of all its query heads' o_proj channels together (the reference clusters ``[q, k]`` jointly
  the same way for R2), and each query head keeps its own per-cluster ranges.
- Calibration layers see the outputs of the earlier layers with their weights quantized and their activations in
  floating point (the harness's shared pipeline; activation quantizers are attached after quantization). The
  reference runs the earlier layers with activation quantization on. As in the reference, the ranges are calibrated
  on the layer before its own weights are rounded.
- k-means: k-means++ seeding with one candidate per step (scikit-learn tries ``2 + log k``), Lloyd iterations up to
  300 with scikit-learn's tolerance, float64; clusters ordered by centroid (max, then min), channels within a
  cluster in their original order (the reference orders clusters by label).

Supported models: Llama-style decoders (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``), any number of key-value heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ptqbench.actquant import ClusterActQuantizer, set_activation_quantizer
from ptqbench.errors import ConfigError
from ptqbench.pipeline import LayerContext
from ptqbench.quantizer import MethodConfig
from ptqbench.stages import Transform, register_stage

ACT_RANGES = ("ema", "minmax")
EMA_MOMENTUM = 0.99  # the reference code's ema_minmax: range ← 0.99·range + 0.01·window's range


@dataclass
class RPTQConfig(MethodConfig):
    clusters_qkv: int = 32  # R1: clusters of the attention norm's output (q/k/v's input)
    clusters_o: int = 4  # R3: clusters per attention head of o_proj's input
    clusters_gate_up: int = 32  # R4: clusters of the MLP norm's output (gate/up's input)
    clusters_down: int = 32  # R5: clusters of down_proj's input
    act_range: str = "ema"  # static ranges: ema (reference code's ema_minmax) | minmax (over all calibration windows)
    kmeans_init: int = 10  # k-means restarts, the best (least inertia) kept (scikit-learn's n_init, as the reference)
    seed: int = 0  # seeds the k-means++ draws
    norm_min_bits: int = 0  # q/k/v and gate/up inputs at max(a_bits, this); 0: a_bits (reference code: 8)

    def __post_init__(self) -> None:
        for name in ("clusters_qkv", "clusters_o", "clusters_gate_up", "clusters_down"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"rptq.{name}={v!r}: use a positive number of clusters (paper: "
                                  f"{4 if name == 'clusters_o' else 32}{' per head' if name == 'clusters_o' else ''})")
        if self.act_range not in ACT_RANGES:
            raise ConfigError(f"rptq.act_range={self.act_range!r}: use one of {list(ACT_RANGES)} (reference: ema)")
        if isinstance(self.kmeans_init, bool) or not isinstance(self.kmeans_init, int) or self.kmeans_init < 1:
            raise ConfigError(f"rptq.kmeans_init={self.kmeans_init!r}: use a positive number of restarts "
                              f"(reference: 10)")
        if self.norm_min_bits != 0 and not 2 <= self.norm_min_bits <= 16:
            raise ConfigError(f"rptq.norm_min_bits={self.norm_min_bits!r}: use 0 (the scheme's a_bits) or a bit "
                              f"width in [2, 16] (reference code: 8)")
        super().__post_init__()


# ------------------------------------------------------------------------------------------------ k-means
def kmeans(points: torch.Tensor, k: int, n_init: int = 10, seed: int = 0, max_iter: int = 300,
           tol: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of ``points`` (n, f): ``(labels (n,) long, centers (k', f))``, the restart with the least inertia.

    k-means++ seeding from a generator seeded with ``seed`` (deterministic), Lloyd iterations until the centers move
    less than ``tol`` times the mean per-feature variance (scikit-learn's criterion). ``k`` is capped at the number of
    distinct points; a cluster that empties takes the point farthest from its center. Labels are renumbered so that
    clusters are ordered by their centers (first feature, then the next), and no label is empty.
    """
    x = points.detach().double().cpu()
    n = x.shape[0]
    k = min(int(k), int(torch.unique(x, dim=0).shape[0]))
    if k <= 1:
        return torch.zeros(n, dtype=torch.long), x.mean(0, keepdim=True)
    gen = torch.Generator().manual_seed(int(seed))
    thresh = tol * float(x.var(0, unbiased=False).mean())
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(n_init):
        centers = _kmeans_pp(x, k, gen)
        for _ in range(max_iter):
            dist = torch.cdist(x, centers)  # (n, k)
            labels = dist.argmin(1)
            counts = torch.bincount(labels, minlength=k)
            sums = torch.zeros_like(centers).index_add_(0, labels, x)
            new = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], centers)
            empty = (counts == 0).nonzero().flatten()
            if len(empty):  # each empty cluster takes one of the worst-served points
                far = dist.gather(1, labels[:, None]).squeeze(1).argsort(descending=True, stable=True)
                new[empty] = x[far[: len(empty)]]
            shift = float((new - centers).pow(2).sum())
            centers = new
            if shift <= thresh:
                break
        labels = torch.cdist(x, centers).argmin(1)
        inertia = float((x - centers[labels]).pow(2).sum())
        if best is None or inertia < best[0]:
            best = (inertia, labels, centers)
    assert best is not None
    _, labels, centers = best
    used = torch.unique(labels)  # ascending
    centers = centers[used]
    order = sorted(range(len(used)), key=lambda i: tuple(centers[i].tolist()))
    rank = torch.empty(int(used.max()) + 1, dtype=torch.long)
    rank[used[order]] = torch.arange(len(order))
    return rank[labels], centers[order]


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: the first center uniformly, each next one with probability ∝ squared distance."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=gen))]
    d2 = (x - x[idx[0]]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # every point sits on a center already
            rest = [i for i in range(n) if i not in set(idx)]
            idx.append(rest[int(torch.randint(len(rest), (1,), generator=gen))])
        else:
            idx.append(int(torch.multinomial(d2 / total, 1, generator=gen)))
        d2 = torch.minimum(d2, (x - x[idx[-1]]).pow(2).sum(1))
    return x[idx].clone()


def cluster_order(labels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The permutation (n,) that makes each cluster contiguous (clusters in label order, channels in their original
    order within a cluster) and the cluster sizes."""
    perm = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels).tolist()
    return perm, [c for c in counts if c > 0]


def reorder_index(cmax: torch.Tensor, cmin: torch.Tensor, k: int, n_init: int, seed: int
                  ) -> tuple[torch.Tensor, list[int]]:
    """RPTQ's reorder of one activation's channels: k-means on the per-channel ``(max, min)`` (n,) — or
    (n, heads) for channels shared by several heads, clustered on all their ranges — into ``k`` clusters;
    returns ``(perm, cluster sizes)``."""
    feats = torch.cat([cmax.reshape(cmax.shape[0], -1), cmin.reshape(cmin.shape[0], -1)], dim=1)
    labels, _ = kmeans(feats, k, n_init, seed)
    return cluster_order(labels)


# ------------------------------------------------------------------------------------------------ statistics
class _RangeStats:
    """Per-channel statistics of one linear's input over the calibration windows: the true min/max (for k-means)
    and the static range (ema of per-window ranges, or min/max)."""

    def __init__(self, seq: int, act_range: str) -> None:
        self.seq, self.act_range = seq, act_range
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> None:  # (tokens, in), whole windows of ``seq`` tokens
        xw = x.detach().float().reshape(-1, self.seq, x.shape[-1])
        wmin, wmax = xw.amin(1), xw.amax(1)  # (windows, in)
        for lo, hi in zip(wmin, wmax):
            if self.min is None:
                self.min, self.max, self.lo, self.hi = lo.clone(), hi.clone(), lo.clone(), hi.clone()
                continue
            self.min, self.max = torch.minimum(self.min, lo), torch.maximum(self.max, hi)
            if self.act_range == "minmax":
                self.lo, self.hi = self.min, self.max
            else:
                self.lo = EMA_MOMENTUM * self.lo + (1 - EMA_MOMENTUM) * lo
                self.hi = EMA_MOMENTUM * self.hi + (1 - EMA_MOMENTUM) * hi


def cluster_ranges(lo: torch.Tensor, hi: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each contiguous cluster's range: the min of its channels' ``lo`` and the max of their ``hi``."""
    parts = list(zip(lo.split(counts), hi.split(counts)))
    return torch.stack([a.min() for a, _ in parts]), torch.stack([b.max() for _, b in parts])


# ------------------------------------------------------------------------------------------------ folding
class ReorderOutput:
    """Forward hook: the module's output channels (last dim) in the order ``perm`` (a norm writing reordered)."""

    def __init__(self, perm: torch.Tensor) -> None:
        self.perm = perm

    def __call__(self, _mod: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
        if self.perm.device != out.device:
            self.perm = self.perm.to(out.device)
        return out.index_select(-1, self.perm)


@torch.no_grad()
def _permute_in(lin: nn.Linear, perm: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[:, perm.to(lin.weight.device)].contiguous()


@torch.no_grad()
def _permute_out(lin: nn.Linear, perm: torch.Tensor) -> None:
    p = perm.to(lin.weight.device)
    lin.weight.data = lin.weight.data[p].contiguous()
    if lin.bias is not None:
        lin.bias.data = lin.bias.data[p].contiguous()


def _llama_parts(layer: nn.Module) -> dict[str, nn.Module]:
    try:
        att, mlp = layer.self_attn, layer.mlp
        parts = {"input_layernorm": layer.input_layernorm, "post_attention_layernorm": layer.post_attention_layernorm,
                 "q": att.q_proj, "k": att.k_proj, "v": att.v_proj, "o": att.o_proj,
                 "gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj}
    except AttributeError:
        raise ConfigError(f"rptq supports Llama-style decoder layers (input_layernorm, self_attn.q/k/v/o_proj, "
                          f"post_attention_layernorm, mlp.gate/up/down_proj), not {type(layer).__name__}: choose "
                          f"another method for this model") from None
    if not all(isinstance(parts[n], nn.Linear) for n in ("q", "k", "v", "o", "gate", "up", "down")):
        raise ConfigError(f"rptq: the projections of {type(layer).__name__} are not nn.Linear: choose another method")
    return parts


def _heads(layer: nn.Module, parts: dict[str, nn.Module]) -> tuple[int, int, int]:
    """(query heads, key-value heads, head dim) of the attention."""
    att = layer.self_attn
    cfg = getattr(att, "config", None)
    hd = getattr(att, "head_dim", None) or (cfg.hidden_size // cfg.num_attention_heads)
    n_q, n_kv = parts["o"].in_features // hd, parts["v"].out_features // hd
    if n_q * hd != parts["o"].in_features or n_kv * hd != parts["v"].out_features or n_q % n_kv:
        raise ConfigError(f"rptq: cannot split o_proj's input ({parts['o'].in_features}) into heads of {hd} channels "
                          f"matching v_proj's {n_kv} key-value heads")
    return n_q, n_kv, hd


# ------------------------------------------------------------------------------------------------ the stage
@register_stage
class RPTQ(Transform):
    """RPTQ (Yuan et al., 2023): channels clustered by range and reordered, per-cluster static activation ranges."""

    name = "rptq"
    family = "reordering"
    config_cls = RPTQConfig
    level = "layer"
    requires_calibration = True
    supported_a_bits = (3, 4, 8, 16)
    supplies_act_quant = True  # attaches its own activation quantizers (``ptqbench.actquant``)
    paper = "https://arxiv.org/abs/2304.01089"
    config: RPTQConfig

    def __init__(self, scheme, config=None) -> None:
        super().__init__(scheme, config)
        self._n_clusters: list[int] = []
        self._range_fraction: list[float] = []

    def apply_layer(self, ctx: LayerContext) -> None:
        if not ctx.targets:
            return
        c = self.config
        parts = _llama_parts(ctx.layer)
        n_q, n_kv, hd = _heads(ctx.layer, parts)
        names = {id(m): n for n, m in ctx.layer.named_modules()}
        rel = {k: names[id(m)] for k, m in parts.items()}
        for key, k, width in (("q", c.clusters_qkv, parts["q"].in_features), ("o", c.clusters_o, hd),
                              ("gate", c.clusters_gate_up, parts["gate"].in_features),
                              ("down", c.clusters_down, parts["down"].in_features)):
            if k > width:
                field_name = {"q": "clusters_qkv", "o": "clusters_o", "gate": "clusters_gate_up",
                              "down": "clusters_down"}[key]
                raise ConfigError(f"rptq.{field_name}={k} is more than the {width} channels it clusters"
                                  f"{' per head' if key == 'o' else ''}: use at most {width}")

        # 1. one pass: per-channel min/max of the four inputs (R1 q/k/v, R3 o, R4 gate/up, R5 down)
        seq = ctx.inputs[0].shape[1]
        stats = {key: _RangeStats(seq, c.act_range) for key in ("q", "o", "gate", "down")}
        ctx.run_hooked({rel[key]: stats[key] for key in stats})

        bits = self.scheme.a_bits
        norm_bits = max(bits, c.norm_min_bits) if c.norm_min_bits else bits
        seed = c.seed + 1000 * ctx.index

        # 2-4. cluster, fold the reorder, leave the per-cluster quantizers
        for key, norm, lins, k in (("q", "input_layernorm", ("q", "k", "v"), c.clusters_qkv),
                                   ("gate", "post_attention_layernorm", ("gate", "up"), c.clusters_gate_up)):
            s = stats[key]
            perm, counts = reorder_index(s.max, s.min, k, c.kmeans_init, seed)
            parts[norm].register_forward_hook(ReorderOutput(perm))
            for n in lins:
                _permute_in(parts[n], perm)
            self._leave(parts, lins, norm_bits, counts, s.lo[perm], s.hi[perm])

        s = stats["o"]  # per key-value head: the query heads of its group share v's channel order
        rep = n_q // n_kv
        o_perm, v_perm, o_counts = [], [], []
        for g in range(n_kv):
            heads = range(g * rep, (g + 1) * rep)
            cmax = torch.stack([s.max[h * hd:(h + 1) * hd] for h in heads], 1)  # (hd, rep)
            cmin = torch.stack([s.min[h * hd:(h + 1) * hd] for h in heads], 1)
            p, counts = reorder_index(cmax, cmin, c.clusters_o, c.kmeans_init, seed + 1 + g)
            v_perm.append(p + g * hd)
            for h in heads:
                o_perm.append(p + h * hd)
            o_counts.append(counts)
        v_perm_t, o_perm_t = torch.cat(v_perm), torch.cat(o_perm)
        _permute_out(parts["v"], v_perm_t)
        _permute_in(parts["o"], o_perm_t)
        counts = [n for h in range(n_q) for n in o_counts[h // rep]]
        self._leave(parts, ("o",), bits, counts, s.lo[o_perm_t], s.hi[o_perm_t])

        s = stats["down"]
        perm, counts = reorder_index(s.max, s.min, c.clusters_down, c.kmeans_init, seed + 1 + n_kv)
        _permute_out(parts["gate"], perm)
        _permute_out(parts["up"], perm)
        _permute_in(parts["down"], perm)
        self._leave(parts, ("down",), bits, counts, s.lo[perm], s.hi[perm])

    def _leave(self, parts: dict[str, nn.Module], lins: tuple[str, ...], bits: int, counts: list[int],
               lo: torch.Tensor, hi: torch.Tensor) -> None:
        """One per-cluster quantizer for the linears ``lins`` reading the same (reordered) input."""
        c_lo, c_hi = cluster_ranges(lo, hi, counts)
        q = ClusterActQuantizer(bits, counts, c_lo, c_hi)
        for n in lins:
            set_activation_quantizer(parts[n], q)
        self._n_clusters.append(len(counts))
        width = float((hi.max() - lo.min()).clamp_min(1e-12))  # one range for the whole tensor
        per_channel = (c_hi - c_lo).repeat_interleave(torch.tensor(counts, device=c_hi.device))
        self._range_fraction.append(float(per_channel.mean()) / width)

    def info(self) -> dict[str, float]:
        out = dict(self._info)
        if self._n_clusters:
            out["rptq_clusters_per_input"] = sum(self._n_clusters) / len(self._n_clusters)
            # each channel's cluster range over the range of its whole tensor, averaged (1: no gain over per-tensor)
            out["rptq_cluster_range_fraction"] = sum(self._range_fraction) / len(self._range_fraction)
        return out
