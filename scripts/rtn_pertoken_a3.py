"""The per-token reference ``method=rtn quant=w4a3`` refuses by design: RTN weights, 3-bit per-token activations.

``python scripts/rtn_pertoken_a3.py [--a-bits 3] [--out results/dev_rptq/rtn_pertoken_w4a3.csv]``

RTN's weights do not depend on the activation bits, so the model is quantized exactly as ``method=rtn quant=w4a4``
(4-bit asymmetric per-channel min-max, lm_head kept in floating point) and the scheme's own per-token dynamic
symmetric activation quantizer (``ptqbench.actquant``, ``ptqbench.scheme.quantize_activation``) is attached at
``a_bits``; perplexity follows ``conf/eval/embedded.yaml`` (docs, code, prose; 20 windows of 512 tokens, GPTQ
protocol), so the numbers sit next to the ``eval=embedded`` cells. With ``--a-bits 4`` it reproduces the
``method=rtn quant=w4a4`` cell (a check of the script). Nothing is written to the results store (this is not a
cell the harness accepts); the values go to stdout and to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a-bits", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="results/dev_rptq/rtn_pertoken_w4a3.csv")
    args = ap.parse_args()

    import torch
    from omegaconf import OmegaConf

    from ptqbench import conf_dir, data, models
    from ptqbench.actquant import attach_activation_quant
    from ptqbench.evaluators.perplexity import perplexity
    from ptqbench.quantizer import get_method
    from ptqbench.scheme import QuantScheme

    torch.set_num_threads(args.threads)
    mcfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "model" / "smollm2_135m.yaml"))
    qcfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "quant" / "w4a4.yaml"))
    ecfg = OmegaConf.to_container(OmegaConf.load(conf_dir() / "eval" / "embedded.yaml"))["perplexity"]
    fields = {f.name for f in dataclasses.fields(models.ModelSpec)}
    loaded = models.load(models.ModelSpec(**{k: v for k, v in mcfg.items() if k in fields}))
    w4a4 = QuantScheme(**{k: v for k, v in qcfg.items() if k != "name"}, name="w4a4")
    scheme = dataclasses.replace(w4a4, a_bits=args.a_bits, name=f"w4a{args.a_bits}")

    model = loaded.model
    cls = get_method("rtn")
    t0 = time.perf_counter()
    res = cls(w4a4, None).quantize(model, None)  # RTN weights: identical whatever the activation bits
    n = attach_activation_quant(model, list(res.layers), scheme)  # per-token dynamic, symmetric, a_bits
    model.eval()
    rows = []
    for name in ecfg["datasets"]:
        ev = data.eval_set(name, ecfg["seq_len"], ecfg.get("max_windows"), loaded.tokenizer, loaded.tokenizer_id)
        r = perplexity(model, ev, batch_size=ecfg.get("batch_size", 1))
        rows.append({"method": "rtn (per-token activations)", "quant": scheme.label, "a_bits": args.a_bits,
                     "dataset": name, "perplexity": r["value"], "windows": r["windows"], "tokens": r["n_tokens"],
                     "protocol": ev.protocol, "act_quantizers": n})
        print(f"{name}: {r['value']:.6g}", flush=True)
    print(f"total {time.perf_counter() - t0:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
