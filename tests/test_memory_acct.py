"""Memory accounting: exact bits of a known layer, packed bytes, and the kept-in-fp breakdown of a tied model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ptqbench.evaluators.memory_acct import classify_parameters, memory_rows, quantized_bytes
from ptqbench.quantizer import QuantResult
from ptqbench.scheme import rtn_quantize


def _layer(out=8, inp=2048, bits=4, group=64, sym=False):
    torch.manual_seed(0)
    return rtn_quantize(torch.randn(out, inp), bits, group, sym)


def test_known_layer_bits_4bit_g64_asym():
    qw = _layer()
    # codes 4 bits + fp16 scale per 64 weights + 4-bit zero per 64 weights
    assert QuantResult({"l": qw}).effective_bits() == 4 + 16 / 64 + 4 / 64 == 4.3125
    for packed in (True, False):  # 2048 columns, 32 groups: the packed form has no padding here
        nbytes, how = quantized_bytes(qw, packed)
        assert nbytes == 8 * 2048 * 4.3125 / 8 == 8832
        assert how == ("packed" if packed else "storage_bits")


def test_sym_and_padding():
    assert QuantResult({"l": _layer(sym=True)}).effective_bits() == 4 + 16 / 64  # no zeros stored
    qw = _layer(out=4, inp=256, bits=3, group=64)  # 4 groups: packed zeros take a whole 32-group chunk
    assert quantized_bytes(qw, False)[0] == 4 * (256 * 3 + 4 * 16 + 4 * 3) // 8
    assert quantized_bytes(qw, True)[0] == 4 * (256 * 3 // 8 + 4 * 2 + 3 * 4)  # codes + scales + 3 int32 words


class Tiny(nn.Module):
    """embed (tied lm_head) -> linear (quantized) -> linear (kept) -> norm."""

    def __init__(self, vocab=64, hidden=2048):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.q_proj = nn.Linear(hidden, 8, bias=False)
        self.kept = nn.Linear(8, 8, bias=True)
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied

    def get_output_embeddings(self):
        return self.lm_head


def test_memory_rows_of_a_tied_model():
    m = Tiny()
    qw = _layer()
    rows = {(r["metric"], r["group"]): r["value"] for r in memory_rows(m, {"q_proj": qw})}
    assert rows[("quant_linear_params", "")] == 8 * 2048
    assert rows[("quant_linear_bytes", "")] == 8832
    assert rows[("packed_bits_per_weight", "")] == 4.3125
    assert rows[("quant_linear_size_ratio", "")] == pytest.approx(4.3125 / 16)
    assert rows[("kept_fp_params", "embeddings")] == 64 * 2048
    assert rows[("kept_fp_params", "lm_head")] == 0  # tied: counted once, as the embedding
    assert rows[("kept_fp_params", "norms")] == 16
    assert rows[("kept_fp_params", "linears")] == 64
    assert rows[("kept_fp_params", "other")] == 8  # the kept linear's bias
    kept = 64 * 2048 + 16 + 64 + 8
    assert rows[("kept_fp_params", "total")] == kept and rows[("kept_fp_bytes", "total")] == 2 * kept
    assert rows[("model_bytes", "")] == 8832 + 2 * kept
    assert rows[("model_fp16_bytes", "")] == 2 * sum(p.numel() for p in m.parameters())
    # the baseline: nothing quantized, every parameter kept
    base = {(r["metric"], r["group"]): r["value"] for r in memory_rows(m, {})}
    assert base[("model_size_ratio", "")] == 1.0 and base[("packed_bits_per_weight", "")] == 16.0


def test_llama_breakdown():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    m = LlamaForCausalLM(cfg)
    quant = {n for n, mod in m.named_modules() if isinstance(mod, nn.Linear) and n != "lm_head"}
    groups = classify_parameters(m, quant)
    assert groups["embeddings"]["params"] == 128 * 64
    assert groups["lm_head"]["params"] == 0
    assert groups["norms"]["params"] == (2 * 2 + 1) * 64  # two per layer + the final norm
    assert groups["linears"]["params"] == groups["other"]["params"] == 0
