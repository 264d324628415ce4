"""Worst-group accuracy through lm-eval: the quantized in-memory model is evaluated by ``lm_eval.simple_evaluate``
with ``HFLM(pretrained=<model object>)``; nothing of the scoring is re-implemented here.

The ``tasks`` eval section holds suites (``conf/eval/tasks.yaml`` and the hub suites beside it)::

    tasks:
      batch_size: 16
      limit: null            # tests only: items per lm-eval task
      seed: 1234             # lm-eval's random/numpy/torch/fewshot seeds (not the calibration seed)
      suites:
        nextpassage:         # the suite's name is the rows' ``dataset``
          tasks: [ptqbench_nextpassage]   # lm-eval tasks or groups; their leaf tasks are the groups
          metric: acc
          higher_is_better: true
          num_fewshot: 0
          build: {n_per_domain: 64, ...}  # only for the embedded task: built offline (ptqbench.tasks)

Rows per suite: the metric of every group (leaf task, ``group`` = its name without the suite's common prefix, e.g.
``code`` or ``abstract_algebra``), then ``worst_group_<metric>`` (the minimum over groups, the maximum for metrics
where lower is better; the protocol names the worst group), ``mean_<metric>`` (unweighted mean over groups),
``gap_<metric>`` (|mean - worst|) and the drop of worst and mean against the unquantized model of the same cell
(``worst_group_<metric>_drop``, ``mean_<metric>_drop``; positive = worse than fp16). The fp16 results are computed
once per process: by the baseline cell, read from the results store when another process has written the fp16 cell,
or else, when a quantized cell comes first, on the cached full-precision model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from ptqbench.errors import ConfigError, UnavailableError
from ptqbench.evaluators import CellContext, register_evaluator

log = logging.getLogger(__name__)

LM_EVAL_SEED = 1234  # lm-eval's own default random seed; the numpy/torch/fewshot seeds take it too


@dataclass(frozen=True)
class Suite:
    """One ``tasks.suites`` entry: lm-eval task or group names whose leaf tasks are the groups."""

    name: str
    tasks: tuple[str, ...]
    metric: str = "acc"
    higher_is_better: bool = True
    num_fewshot: int = 0
    build: dict[str, Any] | None = None  # NextPassageSpec fields: the embedded offline task

    @property
    def offline(self) -> bool:
        return self.build is not None


_SUITE_KEYS = {"tasks", "metric", "higher_is_better", "num_fewshot", "build"}
_TOP_KEYS = {"batch_size", "limit", "seed", "suites", "enabled"}


def parse_suites(cfg: dict) -> list[Suite]:
    """The suites of a ``tasks`` section, validated (ConfigError names what to fix)."""
    unknown = sorted(set(cfg) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"eval.tasks has no key(s) {unknown}: valid ones are {sorted(_TOP_KEYS)}")
    suites = cfg.get("suites") or {}
    if not isinstance(suites, dict) or not suites:
        raise ConfigError("eval.tasks.suites is empty: give at least one suite (see conf/eval/tasks.yaml)")
    out = []
    for name, s in suites.items():
        if not s:
            continue  # a suite set to null in an override is switched off
        bad = sorted(set(s) - _SUITE_KEYS)
        if bad:
            raise ConfigError(f"eval.tasks.suites.{name} has no key(s) {bad}: valid ones are {sorted(_SUITE_KEYS)}")
        tasks = s.get("tasks")
        tasks = [tasks] if isinstance(tasks, str) else list(tasks or [])
        if not tasks:
            raise ConfigError(f"eval.tasks.suites.{name}.tasks is empty: list lm-eval task or group names")
        build = s.get("build")
        if build is not None:
            from ptqbench.tasks import NextPassageSpec

            try:
                NextPassageSpec(**build)
            except TypeError as e:
                raise ConfigError(f"eval.tasks.suites.{name}.build: {e}") from None
            build = dict(build)
        out.append(Suite(str(name), tuple(tasks), str(s.get("metric", "acc")), bool(s.get("higher_is_better", True)),
                         int(s.get("num_fewshot", 0) or 0), build))
    return out


def check_config(cfg: dict, preflight: bool = True) -> None:
    """Refuse a malformed ``tasks`` section before any model is loaded; offline, also hub suites whose datasets are
    not in the local cache (``preflight``: loads their lm-eval tasks once, which indexes lm-eval's task folder)."""
    if not cfg:
        return
    suites = parse_suites(cfg)
    hub = [s for s in suites if not s.offline]
    if not (preflight and hub and _offline()):
        return
    from lm_eval.tasks import TaskManager

    _quiet_lm_eval()
    tm = TaskManager()
    for s in hub:
        try:
            tm.load(list(s.tasks))
        except Exception as e:  # noqa: BLE001
            if _looks_unreachable(e):
                raise _unreachable(s, e) from None
            raise


def _offline() -> bool:
    return any(os.environ.get(k, "0").lower() in ("1", "true", "yes") for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"))


def _unreachable(suite: Suite, e: BaseException) -> UnavailableError:
    return UnavailableError(
        f"suite {suite.name} ({', '.join(suite.tasks)}) needs its datasets from the Hugging Face hub, which cannot be "
        f"reached here ({type(e).__name__}; HF_DATASETS_OFFLINE={os.environ.get('HF_DATASETS_OFFLINE')}): run once "
        f"online with HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 to fill the datasets cache, or use eval=tasks (the "
        f"embedded offline task)")


# ------------------------------------------------------------------------------------------ pure result handling
def leaf_tasks(results: dict, roots: list[str] | tuple[str, ...]) -> list[str]:
    """Leaf task names under ``roots`` in an lm-eval results dict (groups expanded through ``group_subtasks``)."""
    sub = results.get("group_subtasks") or {}
    out: list[str] = []

    def walk(name: str) -> None:
        children = sub.get(name)
        if children:
            for c in children:
                walk(c)
        elif name not in out:
            out.append(name)

    for r in roots:
        walk(r)
    return out


def metric_value(task_result: dict, metric: str) -> float:
    """``metric`` from one task's lm-eval result (``"acc,none"``; the first filter when there is no ``none``)."""
    if f"{metric},none" in task_result:
        return float(task_result[f"{metric},none"])
    keys = sorted(k for k in task_result if k.split(",")[0] == metric and "_stderr" not in k)
    if not keys:
        have = sorted({k.split(",")[0] for k in task_result if "," in k and "_stderr" not in k})
        raise ConfigError(f"lm-eval reported no metric {metric!r} (it reported {have}): set the suite's metric")
    return float(task_result[keys[0]])


def _common_prefix(names: list[str]) -> str:
    """The shared ``word_`` prefix of task names (``mmlu_``), so groups read ``abstract_algebra``."""
    if len(names) < 2:
        return ""
    prefix = os.path.commonprefix(names)
    return prefix[: prefix.rfind("_") + 1] if "_" in prefix else ""


def group_values(results: dict, roots: list[str] | tuple[str, ...], metric: str) -> dict[str, float]:
    """``{group: value}`` over the leaf tasks under ``roots``; group = leaf name without the common prefix."""
    leaves = leaf_tasks(results, roots)
    missing = [t for t in leaves if t not in results.get("results", {})]
    if missing or not leaves:
        raise ValueError(f"lm-eval results lack task(s) {missing or list(roots)}")
    prefix = _common_prefix(leaves)
    return {t[len(prefix):]: metric_value(results["results"][t], metric) for t in leaves}


def summarize(values: dict[str, float], higher_is_better: bool = True) -> dict[str, Any]:
    """Worst group (min, or max when lower is better), unweighted mean over groups and their gap (>= 0)."""
    if not values:
        raise ValueError("no groups to summarize")
    pick = min if higher_is_better else max
    worst_group = pick(values, key=lambda g: values[g])
    worst = values[worst_group]
    mean = sum(values.values()) / len(values)
    return {"worst": worst, "worst_group": worst_group, "mean": mean, "gap": abs(mean - worst)}


def drop(base: float, value: float, higher_is_better: bool = True) -> float:
    """How much worse than the baseline (positive = worse)."""
    return base - value if higher_is_better else value - base


# ------------------------------------------------------------------------------------------ running lm-eval
def _quiet_lm_eval() -> None:
    for name in ("lm_eval", "lm-eval", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
    except ImportError:
        pass


def _task_manager(cache: dict, include_path: str | None) -> Any:
    """A cached TaskManager: the embedded task alone (fast), or lm-eval's built-in tasks."""
    from lm_eval.tasks import TaskManager

    key = ("lm_eval_task_manager", include_path)
    if key not in cache:
        cache[key] = TaskManager(include_path=include_path, include_defaults=include_path is None)
    return cache[key]


def _tokenizer(cache: dict, tokenizer: Any, tokenizer_id: str) -> Any:
    # HFLM sets a pad token on the tokenizer it is given: give it a copy, never the process-wide one
    key = ("lm_eval_tokenizer", tokenizer_id)
    if key not in cache:
        cache[key] = copy.deepcopy(tokenizer)
    return cache[key]


def run_suite(model: Any, tokenizer: Any, suite: Suite, cfg: dict, cache: dict | None = None) -> dict:
    """lm-eval's results dict for ``suite`` on an in-memory HF causal LM (the model is not changed)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    cache = {} if cache is None else cache
    _quiet_lm_eval()
    include = None
    if suite.build is not None:
        from ptqbench.tasks import NextPassageSpec, build

        include = str(build(NextPassageSpec(**suite.build)))
    tm = _task_manager(cache, include)
    unknown = [t for t in suite.tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError(f"suite {suite.name}: lm-eval {lm_eval.__version__} knows no task(s) {unknown}")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=int(cfg.get("batch_size", 8)))
    seed = int(cfg.get("seed", LM_EVAL_SEED))
    try:
        out = lm_eval.simple_evaluate(
            model=lm, tasks=list(suite.tasks), num_fewshot=suite.num_fewshot, limit=cfg.get("limit"),
            task_manager=tm, bootstrap_iters=0, log_samples=False, random_seed=seed, numpy_random_seed=seed,
            torch_random_seed=seed, fewshot_random_seed=seed)
    except Exception as e:  # noqa: BLE001 (datasets/hub raise many types when a dataset cannot be fetched)
        if suite.offline or not _looks_unreachable(e):
            raise
        raise _unreachable(suite, e) from None
    if out is None:
        raise RuntimeError("lm-eval returned no results (non-zero rank?)")
    return out


def _looks_unreachable(e: BaseException) -> bool:
    names = {type(x).__name__ for x in (e, e.__cause__, e.__context__) if x is not None}
    text = str(e).lower()
    return bool(names & {"ConnectionError", "DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError",
                         "HfHubHTTPError", "FileNotFoundError", "DataFilesNotFoundError"}) or any(
        w in text for w in ("offline", "couldn't reach", "connection", "not found on the hub", "cannot find"))


def _lm_eval_version() -> str:
    import lm_eval

    return lm_eval.__version__


def suite_protocol(suite: Suite, cfg: dict, results: dict, leaves: list[str]) -> str:
    n = results.get("n-samples", {})
    sizes = [n.get(t, {}).get("effective") for t in leaves]
    built = ""
    if suite.build is not None:
        from ptqbench.tasks import NextPassageSpec

        built = "; " + NextPassageSpec(**suite.build).describe()
    return (f"lm-eval {_lm_eval_version()} simple_evaluate, HFLM on the in-memory model; tasks={','.join(suite.tasks)}; "
            f"{suite.num_fewshot}-shot; metric={suite.metric} ({'higher' if suite.higher_is_better else 'lower'} is "
            f"better); worst=min over groups (leaf tasks), mean=unweighted over groups; items per group={sizes}; "
            f"limit={cfg.get('limit')}; seed={cfg.get('seed', LM_EVAL_SEED)}; batch_size={cfg.get('batch_size', 8)}"
            f"{built}")


def _baseline_key(cell: CellContext, suite: Suite, cfg: dict) -> tuple:
    spec = {"suite": suite.name, "tasks": suite.tasks, "metric": suite.metric, "fewshot": suite.num_fewshot,
            "build": suite.build, "limit": cfg.get("limit"), "seed": cfg.get("seed", LM_EVAL_SEED)}
    return ("tasks_baseline", cell.model_name, cell.tokenizer_id, json.dumps(spec, sort_keys=True, default=str))


def _fp_model(cell: CellContext) -> Any:
    """The cached unquantized model of this process (``ptqbench.run`` keeps one under a ("model", ...) key)."""
    for k, v in cell.cache.items():
        if isinstance(k, tuple) and k and k[0] == "model" and getattr(getattr(v, "spec", None), "name", None) == \
                cell.model_name:
            return v.model
    raise RuntimeError(f"no cached full-precision {cell.model_name} to compute the fp16 task baseline on")


def _values(model: Any, tokenizer: Any, suite: Suite, cfg: dict, cache: dict) -> tuple[dict[str, float], str, float]:
    t0 = time.perf_counter()
    res = run_suite(model, tokenizer, suite, cfg, cache)
    leaves = leaf_tasks(res, suite.tasks)
    return group_values(res, suite.tasks, suite.metric), suite_protocol(suite, cfg, res, leaves), \
        time.perf_counter() - t0


def _stored_values(cell: CellContext, suite: Suite) -> dict[str, float] | None:
    """The suite's per-group values from the fp16 cell in the results store (same model and evaluation, so the
    same suite spec), or None when the store does not hold it."""
    rows = cell.stored_baseline() if cell.stored_baseline is not None else None
    values = {r["group"]: float(r["value"]) for r in rows or []
              if r.get("dataset") == suite.name and r.get("metric") == suite.metric
              and isinstance(r.get("group"), str) and r["group"] and r.get("status") == "ok"}
    if values:
        log.info("tasks: fp16 baseline of suite %s read from the results store", suite.name)
    return values or None


@register_evaluator("tasks")
def task_rows(cell: CellContext, cfg: dict) -> list[dict]:
    rows: list[dict] = []
    tok = _tokenizer(cell.cache, cell.tokenizer, cell.tokenizer_id)
    for suite in parse_suites(cfg):
        values, protocol, secs = _values(cell.model, tok, suite, cfg, cell.cache)
        key = _baseline_key(cell, suite, cfg)
        if cell.is_baseline:
            cell.cache[key] = values
        elif key not in cell.cache:
            cell.cache[key] = _stored_values(cell, suite)
            if cell.cache[key] is None:
                log.info("tasks: computing the fp16 baseline of suite %s for the drop rows", suite.name)
                cell.cache[key] = _values(_fp_model(cell), tok, suite, cfg, cell.cache)[0]
        base = cell.cache[key]
        m, hib = suite.metric, suite.higher_is_better
        s, b = summarize(values, hib), summarize(base, hib)
        common = {"dataset": suite.name, "unit": "", "protocol": protocol}
        rows += [{**common, "metric": m, "group": g, "value": v} for g, v in values.items()]
        rows += [
            {**common, "metric": f"worst_group_{m}", "group": "", "value": s["worst"],
             "protocol": protocol + f"; worst group={s['worst_group']}"},
            {**common, "metric": f"mean_{m}", "group": "", "value": s["mean"]},
            {**common, "metric": f"gap_{m}", "group": "", "value": s["gap"]},
            {**common, "metric": f"worst_group_{m}_drop", "group": "", "value": drop(b["worst"], s["worst"], hib),
             "protocol": protocol + f"; baseline worst={b['worst']:.4f} ({b['worst_group']})"},
            {**common, "metric": f"mean_{m}_drop", "group": "", "value": drop(b["mean"], s["mean"], hib),
             "protocol": protocol + f"; baseline mean={b['mean']:.4f}"},
            {**common, "metric": "task_eval_time_s", "group": "", "value": secs, "unit": "s",
             "protocol": "wall clock of lm-eval on this cell's model (baseline not included)"},
        ]
    for r in rows:
        if not math.isfinite(r["value"]):
            r["status"], r["error"] = "diverged", "non-finite task metric"
    return rows
