"""Every config composes; bad input fails fast with a clear message, before any model is loaded."""

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ptqbench import conf_dir, run as run_mod
from ptqbench.errors import ConfigError, UnavailableError
from ptqbench.models import check_available

SWEEPS = sorted(p.stem for p in (conf_dir() / "sweep").glob("*.yaml"))


def _combos(cfg):
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    keys = list(params)
    values = [[v.strip() for v in str(params[k]).split(",")] for k in keys]
    return [[f"{k}={v}" for k, v in zip(keys, combo)] for combo in itertools.product(*values)]


@pytest.mark.parametrize("sweep", SWEEPS)
def test_every_sweep_composes_and_resolves(compose, sweep):
    cfg = compose([f"+sweep={sweep}"], return_hydra_config=True)
    assert cfg.hydra.mode.name == "MULTIRUN"
    combos = _combos(cfg)
    assert combos
    for overrides in combos:
        c = compose([f"+sweep={sweep}", *overrides])
        cell = run_mod.resolve(c)
        assert cell.sweep == cfg.sweep_name
        assert len(cell.config_hash) == 16


def test_smollm2_w4_sweep_shape(compose):
    cfg = compose(["+sweep=smollm2_w4"], return_hydra_config=True)
    combos = _combos(cfg)
    assert len(combos) == 12
    hashes = {run_mod.resolve(compose(["+sweep=smollm2_w4", *o])).config_hash for o in combos}
    # fp16 once, rtn once per scheme (needs no calibration), gptq per scheme x calib
    assert len(hashes) == 1 + 2 + 4


@pytest.mark.parametrize("group", ["model", "method", "quant", "calib", "eval", "logger"])
def test_every_group_option_composes(compose, group):
    for path in sorted((conf_dir() / group).glob("*.yaml")):
        cfg = compose([f"{group}={path.stem}"] + (["model.path=x/y"] if path.stem == "hf" else []))
        assert cfg[group] is not None


def test_hash_ignores_paths_and_logger_but_not_seed(compose):
    base = run_mod.resolve(compose(["method=gptq"])).config_hash
    assert run_mod.resolve(compose(["method=gptq", "results_root=/tmp/x", "sweep_name=other"])).config_hash == base
    assert run_mod.resolve(compose(["method=gptq", "seed=1"])).config_hash != base
    assert run_mod.resolve(compose(["method=gptq", "calib=code"])).config_hash != base
    assert run_mod.resolve(compose(["method=gptq", "method.params.rounding.percdamp=0.1"])).config_hash != base
    # methods without calibration do not depend on calib or seed
    assert run_mod.resolve(compose(["method=rtn", "seed=3", "calib=code"])).config_hash == \
        run_mod.resolve(compose(["method=rtn"])).config_hash


@pytest.mark.parametrize("overrides,match", [
    (["method=awq", "quant=w4a4"], "awq transform stage does not support a_bits=4"),
    (["method=rtn", "quant.w_bits=16"], "does not support w_bits=16"),
    (["quant.w_bits=9"], "w_bits=9"),
    (["method=gptq", "+method.params.nope=1"], "has no parameter"),
    (["method=gptq", "+method.params.rounding.nope=1"], "gptq rounding stage has no parameter"),
    (["method=gptq", "method.params.rounding.percdamp=-1"], "gptq.percdamp=-1"),
    (["eval.perplexity.datasets=[nope]"], "unknown text source"),
    (["calib=docs", "calib.sources.docs=0"], "must be > 0"),
    (["calib.n_samples=0"], "n_samples"),
])
def test_bad_input_fails_before_loading(compose, overrides, match):
    run_mod._CACHE.clear()
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=match):
        run_mod.run(compose(overrides))
    assert time.perf_counter() - t < 5
    assert not any(isinstance(k, tuple) and k[0] == "model" for k in run_mod._CACHE)


def test_gptq_rounding_accepts_weight_activation_schemes(compose):
    # GPTQ is a rounding stage: with quantized activations (quarot+gptq's W4A4) it is accepted, unlike awq above
    for method in ("gptq", "quarot"):
        cell = run_mod.resolve(compose([f"method={method}", "quant=w4a4"]))
        assert cell.scheme.a_bits == 4 and cell.method_cls.recipe.endswith("+minmax+gptq")


def test_hub_model_offline_is_a_clear_error(compose, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cell = run_mod.resolve(compose(["model=llama2_7b", "quant=w3g128"]))
    with pytest.raises(UnavailableError, match="smollm2_135m"):
        check_available(cell.model)


def test_cli_one_line_error_and_unknown_name(tmp_path):
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run([sys.executable, "-m", "ptqbench", "method=awq", "quant=w4a4", f"results_root={tmp_path}"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    errs = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert errs == ["error: method awq: the awq transform stage does not support a_bits=4: "
                    "choose quant with a_bits in [16] (it is weight-only)"]
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "ptqbench", "method=nope"], cwd=root, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode != 0 and "Available options in 'method'" in p.stderr and "gptq" in p.stderr
