"""``run(cfg)``: one cell of a sweep — resolve, skip if done, load, calibrate, quantize, evaluate, record.

Everything a cell needs is resolved and validated from the config before any model is loaded; a cell whose
config hash is already complete in the results folder is skipped (``force=true`` recomputes). The full-precision
model, tokenized text, calibration sets and evaluation windows are cached in the process, so the cells of one
Hydra multirun share them.

Several processes may share a results folder (two sweeps at once, launcher workers): a cell is claimed before any
work (``ptqbench.store``); a cell another live process has claimed is deferred and ``finish_deferred()`` comes
back for it at the end, computing it only if that process died before writing it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ptqbench import __version__, data, memory, mirror, models, results, store, validate
from ptqbench.errors import ConfigError
from ptqbench.evaluators import CellContext, evaluators
from ptqbench.pipeline import check_config_scheme, check_model_scheme, target_linears
from ptqbench.quantizer import MethodConfig, Quantizer, build_config, get_method
from ptqbench.scheme import QuantScheme

log = logging.getLogger("ptqbench")

PROTOCOL_VERSION = 1  # bump when a change to the harness changes numbers; it is part of every config hash
_CACHE: dict[Any, Any] = {}  # process-wide: models, tokens, calibration sets, eval windows, baseline results
_WRITTEN_HERE: set[tuple[str, str]] = set()  # (results folder, config hash) of the cells this process wrote
# (config hash, method, error) of the cells that failed in this process: __main__ lists them and exits non-zero
# once Hydra returns, so a sweep finishes its other cells and scripts and CI still notice the failure
_FAILED_HERE: list[tuple[str, str, str]] = []
# (results folder, config hash, composed config) of the cells another live process had claimed: finish_deferred()
# comes back for them once this process has run everything else
_DEFERRED: list[tuple[Path, str, Any]] = []


@dataclass
class Cell:
    """A resolved cell: every spec built and validated, nothing loaded yet."""

    model: models.ModelSpec
    method_cls: type[Quantizer]
    method_cfg: MethodConfig
    scheme: QuantScheme
    calib: data.CalibSpec | None  # None when the method needs no calibration data
    calib_name: str
    seed: int
    eval_cfg: dict[str, Any]
    results_dir: Path
    sweep: str
    force: bool
    runtime: dict[str, Any]
    store: store.StoreSettings = field(default_factory=store.StoreSettings)  # not in the hash: who, not what
    hub_mirror: Path | None = None  # not in the hash: where the hub's files are read from, not what is computed

    @property
    def is_baseline(self) -> bool:
        return self.method_cls.family == "baseline"

    def identity(self) -> dict[str, Any]:
        """Everything that changes the numbers, and nothing that does not (paths, logger, sweep name)."""
        return {
            "protocol_version": PROTOCOL_VERSION,
            "model": self.model.identity(),
            "method": getattr(self.method_cls, "recipe", self.method_cls.name),  # aliases hash as their recipe
            "method_cfg": self.method_cfg.to_dict(),
            "scheme": None if self.is_baseline else _scheme_identity(self.scheme),
            "calib": None if self.calib is None else dataclasses.asdict(self.calib),
            "seed": self.seed if self.calib is not None else None,
            "eval": self.eval_cfg,
            "calib_batch_size": self.runtime.get("calib_batch_size") if self.calib is not None else None,
        }

    @property
    def config_hash(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _scheme_identity(s: QuantScheme) -> dict[str, Any]:
    d = dataclasses.asdict(s)
    d.pop("name")
    for k, default in (("w_format", "int"), ("a_format", "int"), ("scale_search", "minmax")):
        if d[k] == default:  # integer schemes keep the hashes they had before FP4 formats existed
            d.pop(k)
    if s.a_bits >= 16:
        d.pop("a_mode"), d.pop("a_sym")
    return d


def _plain(obj: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(obj, (DictConfig, ListConfig)):
        return OmegaConf.to_container(obj, resolve=True)
    return obj


def _check_missing(cfg: Any) -> None:
    """A mandatory value left at ``???`` (``model=hf`` without ``model.path``) is named, not passed on as text."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        missing = sorted(k for k in OmegaConf.missing_keys(cfg) if not k.startswith("hydra."))
        if missing:
            raise ConfigError(f"{', '.join(missing)} must be set: add {' '.join(f'{k}=<value>' for k in missing)} "
                              f"to the command line")


def _check_method_params(method_cls: type[Quantizer], params: dict[str, Any]) -> None:
    """Types of the method's parameters (per stage for recipes); unknown names are refused by build_config."""
    stages = getattr(method_cls, "stage_classes", None)
    if stages is None:
        validate.check_types("method.params", method_cls.config_cls, params)
        return
    for st in stages:
        p = params.get(st.kind)
        if p is not None and not isinstance(p, dict):
            raise ConfigError(f"method.params.{st.kind}={p!r}: use a mapping of the {st.name} stage's parameters, "
                              f"e.g. method.params.{st.kind}.<field>=<value>")
        validate.check_types(f"method.params.{st.kind}", st.config_cls, p or {})


def _check_runtime(runtime: dict[str, Any]) -> None:
    validate.positive_int("runtime.calib_batch_size", runtime.get("calib_batch_size", 8))
    validate.positive_int("runtime.threads", runtime.get("threads"), allow_none=True)


def resolve(cfg: Any) -> Cell:
    """Build and validate every spec of a cell from the composed config (no model is loaded)."""
    _check_missing(cfg)
    cfg = _plain(cfg)
    method_cls = get_method(cfg["method"]["name"])
    method_cls.validate_environment()
    params = cfg["method"].get("params") or {}
    _check_method_params(method_cls, params)
    method_cfg = build_config(method_cls, params)
    q = dict(cfg["quant"])
    validate.check_types("quant", QuantScheme, q)
    try:
        scheme = QuantScheme(**q)
    except TypeError as e:
        raise ConfigError(f"quant: {e}") from None
    method_cls.check_scheme(scheme)
    m = dict(cfg["model"])
    validate.check_types("model", models.ModelSpec, m)
    try:
        model_spec = models.ModelSpec(**m)
    except TypeError as e:
        raise ConfigError(f"model: {e}") from None
    c = dict(cfg["calib"])
    sources = c.get("sources") or {c["name"]: 1.0}
    needs_calib = method_cls.requires_calibration or (scheme.a_bits < 16 and scheme.a_mode == "static_per_tensor"
                                                      and not method_cls.family == "baseline")
    for k in ("n_samples", "seq_len"):  # types here; CalibSpec refuses values that cannot work
        if isinstance(c.get(k), bool) or not isinstance(c.get(k), int):
            raise ConfigError(f"calib.{k}={c.get(k)!r}: use an integer >= {1 if k == 'n_samples' else 2}")
    for k, v in sources.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"calib.sources.{k}={v!r}: use a positive number (the source's weight)")
    calib = data.CalibSpec(c["name"], tuple((k, float(v)) for k, v in sources.items()), c["n_samples"],
                           c["seq_len"]) if needs_calib else None
    eval_cfg = {k: v for k, v in (cfg.get("eval") or {}).items() if v and (not isinstance(v, dict)
                                                                            or v.get("enabled", True))}
    known = evaluators()
    for k in eval_cfg:
        if k not in known:
            raise ConfigError(f"eval section {k!r} has no evaluator: known sections are {sorted(known)}")
    from ptqbench.evaluators.perplexity import check_config

    check_config(eval_cfg.get("perplexity", {}))
    seed = validate.positive_int("seed", cfg.get("seed", 0), minimum=0)
    _check_runtime(dict(cfg.get("runtime") or {}))
    return Cell(model_spec, method_cls, method_cfg, scheme, calib, c["name"] if calib else "none", seed, eval_cfg,
                Path(cfg.get("results_dir", "results/default")), cfg.get("sweep_name", "default"),
                bool(cfg.get("force", False)), dict(cfg.get("runtime") or {}), _store_settings(cfg.get("store")),
                mirror.check(cfg.get("hub_mirror")))


def _store_settings(s: Any) -> store.StoreSettings:
    if s is not None and not isinstance(s, dict):
        raise ConfigError(f"store={s!r}: use a mapping, e.g. store.stale_after_s=600")
    validate.check_types("store", store.StoreSettings, s or {})
    try:
        return store.StoreSettings(**(s or {}))
    except TypeError as e:
        raise ConfigError(f"store: {e}") from None


# ------------------------------------------------------------------------------------------------ provenance
def _git_sha() -> str:
    if "git_sha" not in _CACHE:
        try:
            _CACHE["git_sha"] = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                text=True, timeout=5).stdout.strip() or "unknown"
        except (OSError, subprocess.SubprocessError):
            _CACHE["git_sha"] = "unknown"
    return _CACHE["git_sha"]


def _versions() -> str:
    import transformers

    return (f"ptqbench={__version__};torch={torch.__version__};transformers={transformers.__version__};"
            f"python={platform.python_version()}")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        # the index says which GPU of the machine a worker took (see _gpu_for_this_process)
        return f"{device}: {torch.cuda.get_device_name(torch.device(device))} (driver/cuda {torch.version.cuda})"
    return f"cpu:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def _worker_rank() -> int | None:
    """This process's rank among a launcher's workers: the cluster's local rank when it sets one, else the Hydra
    job number this process ran first (``PTQBENCH_RANK``, set by ``python -m ptqbench``)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID", "PTQBENCH_RANK"):
        v = os.environ.get(var, "")
        if v.isdigit():
            return int(v)
    return None


def _gpu_for_this_process(spec: models.ModelSpec) -> models.ModelSpec:
    """With several visible GPUs and ``model.device=auto``, each worker takes its own GPU (rank modulo the count)
    instead of all of them piling onto cuda:0. The device is not part of the config hash."""
    if spec.device != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return spec
    rank = _worker_rank()
    return spec if rank is None else dataclasses.replace(spec, device=f"cuda:{rank % torch.cuda.device_count()}")


# ------------------------------------------------------------------------------------------------ cached work
def _model(spec: models.ModelSpec) -> models.LoadedModel:
    key = ("model", json.dumps(spec.identity(), sort_keys=True), spec.device, models.hub_path(spec))
    if key not in _CACHE:
        for k in [k for k in _CACHE if isinstance(k, tuple) and k[0] == "model"]:
            del _CACHE[k]  # one full-precision model per process
        _CACHE[key] = models.load(spec)
    return _CACHE[key]


def _calibration(cell: Cell, loaded: models.LoadedModel) -> data.Calibration | None:
    if cell.calib is None:
        return None
    key = ("calib", cell.calib, cell.seed, loaded.tokenizer_id, cell.hub_mirror)  # a mirror's text may differ
    if key not in _CACHE:
        _CACHE[key] = data.draw_calibration(cell.calib, cell.seed, loaded.tokenizer, loaded.tokenizer_id)
    return _CACHE[key]


def _base_row(cell: Cell, calib: data.Calibration | None, device: str) -> dict[str, Any]:
    s = cell.scheme
    base = cell.is_baseline
    return {
        "model": cell.model.label, "method": cell.method_cls.name, "family": cell.method_cls.family,
        **_stage_columns(cell.method_cls),
        "w_bits": 16 if base else s.w_bits, "a_bits": 16 if base else s.a_bits,
        "group_size": -1 if base else s.group_size, "sym": False if base else s.sym,
        "quant": "fp16" if base else s.label,
        "calib": cell.calib_name, "calib_n": cell.calib.n_samples if cell.calib else 0,
        "calib_seqlen": cell.calib.seq_len if cell.calib else 0, "seed": cell.seed,
        "calib_fingerprint": calib.fingerprint if calib else "",
        "config_hash": cell.config_hash, "sweep": cell.sweep, "git_sha": _git_sha(), "versions": _versions(),
        "device": _device_name(device), "status": "ok", "error": "", "dataset": "", "group": "", "unit": "",
        "protocol": "",
    }


def _stage_columns(cls: type[Quantizer]) -> dict[str, str]:
    """The recipe's stages as columns (empty for whole methods such as fp16 and pbllm)."""
    recipe = getattr(cls, "recipe", None)
    t, r, q = recipe.split("+") if recipe else ("", "", "")
    return {"transform": t, "range": r, "rounding": q}


# ------------------------------------------------------------------------------------------------ the cell
def run(cfg: Any) -> list[dict[str, Any]]:
    """Run one cell and return its rows (also written to the results folder)."""
    cell = resolve(cfg)
    with mirror.active(cell.hub_mirror):  # hub models and datasets read from the mirror (None: the hub) meanwhile
        return _run(cfg, cell)


def _run(cfg: Any, cell: Cell) -> list[dict[str, Any]]:
    _logger(cfg, cell)  # a bad logger config (or wandb missing) fails here, before any work
    h = cell.config_hash
    log.info("cell %s: model=%s method=%s quant=%s calib=%s seed=%d -> %s", h, cell.model.label,
             cell.method_cls.name, cell.scheme.label, cell.calib_name, cell.seed, results.cell_path(cell.results_dir, h))
    done = _already_done(cell)
    if done is not None:
        store.clear_stale(cell.results_dir, h, cell.store)
        return done
    validate.check_writable(cell.results_dir)  # else the cell would be computed and then lost
    models.check_available(cell.model)  # fail fast on unreachable hub models, before any loading
    _check_before_loading(cell)
    claim = store.try_claim(cell.results_dir, h, cell.store)
    if claim is None:
        log.info("cell %s is claimed by another process: deferred to the end of this run", h)
        _DEFERRED.append((cell.results_dir, h, cfg))
        return []
    with claim:
        done = _already_done(cell)  # another process may have written it between our first look and the claim
        return done if done is not None else _compute(cfg, cell)


def _already_done(cell: Cell) -> list[dict[str, Any]] | None:
    """The cell's stored rows when it needs no work (complete, and not forced or already recomputed here)."""
    h = cell.config_hash
    # force=true recomputes a cell once per process: sweep cells that share a hash (fp16 across schemes, RTN across
    # calibration sets) are not recomputed again by the same sweep
    fresh = (str(cell.results_dir), h) in _WRITTEN_HERE
    if (not cell.force or fresh) and results.cell_status(cell.results_dir, h) == "complete":
        log.info("cell %s already complete%s: skipped (force=true recomputes)", h, " (this process)" if fresh else "")
        return results.read_cell(results.cell_path(cell.results_dir, h)).to_dict("records")
    return None


def finish_deferred() -> list[list[dict[str, Any]]]:
    """Come back for the cells another process had claimed: wait until each is written (its rows are read) or its
    claim goes stale (its owner was killed or lost), then compute it here. Returns each deferred cell's rows."""
    out = []
    while _DEFERRED:
        results_dir, h, cfg = _DEFERRED.pop(0)
        settings = _store_settings(_plain(cfg.get("store")))
        while (state := store.claim_state(results_dir, h, settings)) == "live":
            time.sleep(settings.poll_s)
        if state == "free" and results.cell_status(results_dir, h) in ("complete", "failed"):
            # the other process wrote it (a failure too: a rerun, not this sweep, retries it)
            log.info("cell %s: written by the process that had claimed it", h)
            out.append(results.read_cell(results.cell_path(results_dir, h)).to_dict("records"))
            continue
        log.info("cell %s: back to the deferred cell (its claim %s)", h, "went stale" if state == "stale" else "is gone")
        out.append(run(cfg))  # claims and computes it (a new live claim defers it again)
    return out


def _compute(cfg: Any, cell: Cell) -> list[dict[str, Any]]:
    """Load, calibrate, quantize, evaluate and write one claimed cell."""
    h = cell.config_hash
    t_cell = time.perf_counter()
    loaded = _model(_gpu_for_this_process(cell.model))
    if not cell.is_baseline:
        check_model_scheme(loaded.model, cell.scheme)  # group sizes that do not fit: refuse before any work
    calib: data.Calibration | None = None
    base = _base_row(cell, None, loaded.device)
    rows: list[dict[str, Any]] = []
    try:
        calib = _calibration(cell, loaded)
        base = _base_row(cell, calib, loaded.device)
        memory.reset_peaks()
        model = copy.deepcopy(loaded.model)
        quantizer = cell.method_cls(cell.scheme, cell.method_cfg)
        t0 = time.perf_counter()
        qres = quantizer.quantize(model, calib)
        if not cell.is_baseline and cell.scheme.a_bits < 16:
            from ptqbench.actquant import attach_activation_quant

            names, _ = target_linears(model, cell.scheme)
            attach_activation_quant(model, [n for n in names if n in qres.layers], cell.scheme,
                                    calib.input_ids if calib is not None else None)
        quant_s = time.perf_counter() - t0
        peak_q = memory.peak_host_gib()
        gpu_q = memory.peak_gpu_gib()
        model.eval()
        rows += [
            {"metric": "quant_time_s", "value": quant_s, "unit": "s", "protocol": "wall clock of quantize()"},
            {"metric": "peak_host_mem_quant_gib", "value": peak_q, "unit": "GiB", "protocol": "VmHWM, reset per cell"},
            {"metric": "effective_bits", "value": 16.0 if cell.is_baseline else qres.effective_bits(),
             "unit": "bits/weight", "protocol": "codes+fp16 scales+zeros(+extras) over quantized linears"},
        ]
        if gpu_q is not None:
            rows.append({"metric": "peak_gpu_mem_quant_gib", "value": gpu_q, "unit": "GiB",
                         "protocol": "torch.cuda.max_memory_allocated, reset per cell"})
        for k, v in qres.info.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                rows.append({"metric": f"info:{k}", "value": float(v), "unit": "", "protocol": "method info"})
        memory.reset_peaks()
        ctx = CellContext(model, loaded.tokenizer, loaded.tokenizer_id, cell.model.label, loaded.device, qres,
                          cell.scheme, cell.is_baseline, cell.seed, calib, _CACHE,
                          stored_baseline=lambda: _stored_baseline(cell))
        t1 = time.perf_counter()
        for name, fn in evaluators().items():
            if name in cell.eval_cfg:
                rows += fn(ctx, cell.eval_cfg[name])
        rows.append({"metric": "eval_time_s", "value": time.perf_counter() - t1, "unit": "s",
                     "protocol": "wall clock of all evaluators"})
        rows.append({"metric": "peak_host_mem_eval_gib", "value": memory.peak_host_gib(), "unit": "GiB",
                     "protocol": "VmHWM, reset per cell"})
        del model
    except Exception as e:  # noqa: BLE001  (a failing cell is recorded and the sweep goes on)
        log.error("cell %s failed: %s: %s", h, type(e).__name__, e)
        log.debug("%s", traceback.format_exc())
        rows = [{"metric": "cell", "value": float("nan"), "unit": "", "status": "failed",
                 "error": f"{type(e).__name__}: {e}"[:2000], "protocol": ""}]
    wall = time.perf_counter() - t_cell
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    out = []
    for r in rows:
        row = {**base, **r, "wall_s": wall, "timestamp": stamp}
        v = row["value"]
        if row["status"] == "ok" and isinstance(v, float) and not math.isfinite(v) and row["metric"] != "cell":
            row["status"], row["error"] = "diverged", row.get("error") or "non-finite value"
        out.append(row)
    if rows and rows[0]["metric"] == "cell" and rows[0].get("status") == "failed":
        _FAILED_HERE.append((h, cell.method_cls.name, rows[0]["error"]))
    path = results.write_cell(cell.results_dir, h, out)
    _WRITTEN_HERE.add((str(cell.results_dir), h))
    log.info("cell %s written to %s (%.1f s)", h, path, wall)
    _logger(cfg, cell).log_cell(_plain(cfg), out)
    return out


def baseline_hash(cell: Cell) -> str:
    """The config hash of the fp16 baseline cell that goes with ``cell`` (same model and evaluation)."""
    fp16 = get_method("fp16")
    return dataclasses.replace(cell, method_cls=fp16, method_cfg=build_config(fp16, {}), calib=None,
                               calib_name="none").config_hash


def _stored_baseline(cell: Cell) -> list[dict[str, Any]] | None:
    """The fp16 baseline cell's rows when another process (or an earlier run) has written it complete: drop rows
    read it instead of every worker recomputing the baseline."""
    h = baseline_hash(cell)
    if results.cell_status(cell.results_dir, h) != "complete":
        return None
    return results.read_cell(results.cell_path(cell.results_dir, h)).to_dict("records")


def _check_before_loading(cell: Cell) -> None:
    """What can be refused from the model's config.json and the text alone, so a cell that cannot work fails in
    seconds instead of after the model loads: a group size that does not divide a layer's input features, windows
    longer than the calibration or evaluation text (also loads hub datasets, so an unreachable one, or a file the hub
    mirror lacks, fails here)."""
    config = None if cell.is_baseline else models.model_config(cell.model)
    if config is not None:
        check_config_scheme(config, cell.scheme)
    ppl = cell.eval_cfg.get("perplexity") or {}
    data.check_lengths(cell.calib, ppl.get("seq_len"), list(ppl.get("datasets") or []), cell.model.label)


def failed_cells() -> list[tuple[str, str, str]]:
    """(config hash, method, error) of every cell that failed in this process, in order."""
    return list(_FAILED_HERE)


def _logger(cfg: Any, cell: Cell):
    """The sweep's experiment logger (W&B or none), one per process and sweep."""
    from ptqbench.loggers import make_logger

    lcfg = _plain(cfg.get("logger")) if hasattr(cfg, "get") else None
    key = ("logger", json.dumps(lcfg, sort_keys=True, default=str), cell.sweep, str(cell.results_dir))
    if key not in _CACHE:
        _CACHE[key] = make_logger(lcfg, cell.sweep, str(cell.results_dir))
    return _CACHE[key]


def finish_loggers() -> None:
    """End of a run or sweep: let each logger publish the sweep's table (e.g. a wandb.Table)."""
    for key in [k for k in _CACHE if isinstance(k, tuple) and k[0] == "logger"]:
        logger = _CACHE.pop(key)
        try:
            df = results.load_results(key[3])
        except results.ResultsError:
            continue
        logger.finish_sweep(df[df["sweep"] == key[2]] if "sweep" in df else df)


def configure_threads(runtime: dict[str, Any]) -> None:
    n = runtime.get("threads")
    if n:
        torch.set_num_threads(int(n))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
