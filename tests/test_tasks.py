"""Worst-group accuracy: the result handling on hand-built lm-eval results, the embedded task's construction
(deterministic, decontaminated, true continuations) and an end-to-end run through the real lm-eval."""

from __future__ import annotations

import copy

import pytest

from ptqbench import data
from ptqbench.errors import ConfigError, UnavailableError
from ptqbench.evaluators import CellContext
from ptqbench.evaluators import tasks as T
from ptqbench.tasks import nextpassage as npg

# shaped like lm-eval 0.4's simple_evaluate output: a group of groups of leaf tasks
MMLU_LIKE = {
    "results": {
        "mmlu": {"acc,none": 0.5, "acc_stderr,none": "N/A", "alias": "mmlu"},
        "mmlu_stem": {"acc,none": 0.4, "alias": " - stem"},
        "mmlu_humanities": {"acc,none": 0.6, "alias": " - humanities"},
        "mmlu_abstract_algebra": {"acc,none": 0.25, "acc_stderr,none": 0.04, "alias": "  - abstract_algebra"},
        "mmlu_astronomy": {"acc,none": 0.55, "alias": "  - astronomy"},
        "mmlu_philosophy": {"acc,none": 0.70, "alias": "  - philosophy"},
    },
    "group_subtasks": {"mmlu": ["mmlu_stem", "mmlu_humanities"],
                       "mmlu_stem": ["mmlu_abstract_algebra", "mmlu_astronomy"],
                       "mmlu_humanities": ["mmlu_philosophy"]},
    "n-samples": {"mmlu_abstract_algebra": {"original": 100, "effective": 100}},
}


def test_worst_group_from_lm_eval_results():
    assert T.leaf_tasks(MMLU_LIKE, ["mmlu"]) == ["mmlu_abstract_algebra", "mmlu_astronomy", "mmlu_philosophy"]
    values = T.group_values(MMLU_LIKE, ["mmlu"], "acc")
    assert values == {"abstract_algebra": 0.25, "astronomy": 0.55, "philosophy": 0.70}  # leaves only, prefix cut
    s = T.summarize(values)
    assert s["worst_group"] == "abstract_algebra" and s["worst"] == 0.25
    assert s["mean"] == pytest.approx((0.25 + 0.55 + 0.70) / 3)  # unweighted, not lm-eval's group number 0.5
    assert s["gap"] == pytest.approx(s["mean"] - 0.25)
    assert T.drop(0.40, 0.25) == pytest.approx(0.15)


def test_lower_is_better_metric_and_task_list():
    res = {"results": {"crows_pairs_english_age": {"pct_stereotype,none": 0.6},
                       "crows_pairs_english_gender": {"pct_stereotype,none": 0.7},
                       "crows_pairs_english_religion": {"pct_stereotype,none": 0.5}},
           "group_subtasks": {}}
    values = T.group_values(res, ["crows_pairs_english_age", "crows_pairs_english_gender",
                                  "crows_pairs_english_religion"], "pct_stereotype")
    assert set(values) == {"age", "gender", "religion"}
    s = T.summarize(values, higher_is_better=False)
    assert s["worst_group"] == "gender" and s["worst"] == 0.7 and s["gap"] == pytest.approx(0.1)
    assert T.drop(0.6, 0.7, higher_is_better=False) == pytest.approx(0.1)  # more biased = worse = positive
    # a zero-shot set of unrelated tasks keeps full names
    zs = {"results": {"arc_easy": {"acc,none": 0.7}, "piqa": {"acc,none": 0.6}}, "group_subtasks": {}}
    assert T.group_values(zs, ["arc_easy", "piqa"], "acc") == {"arc_easy": 0.7, "piqa": 0.6}


def test_metric_lookup_and_config_errors():
    assert T.metric_value({"acc,strict": 0.3, "acc_stderr,strict": 0.1}, "acc") == 0.3
    with pytest.raises(ConfigError, match="no metric 'acc_norm'"):
        T.metric_value({"acc,none": 0.3}, "acc_norm")
    with pytest.raises(ConfigError, match="no key"):
        T.parse_suites({"suites": {"x": {"tasks": ["a"], "metrc": "acc"}}})
    with pytest.raises(ConfigError, match="empty"):
        T.parse_suites({"suites": {}})
    with pytest.raises(ConfigError, match="domains"):
        T.parse_suites({"suites": {"x": {"tasks": ["a"], "build": {"domains": ["wikitext2"]}}}})


def test_passages_cut_at_mid_line_spaces():
    text = "\n".join(f"line {i} has a few words" for i in range(60))  # lines shorter than ctx/2
    ps = npg.passages(text, 64, 24)
    assert len(ps) > 5
    pos = 0
    for ctx, cont in ps:
        at = text.index(ctx + cont, pos)  # contiguous, in order, non-overlapping
        assert at >= pos
        pos = at + len(ctx) + len(cont)
        assert cont.startswith(" ") and not cont[1].isspace() and not ctx[-1].isspace()
        assert at == 0 or text[at - 1] == "\n"  # a line start exists in every window: contexts start there
        assert 32 <= len(ctx) <= 64 and 12 <= len(cont) <= 24


SMALL = npg.NextPassageSpec(n_per_domain=16, seed=3)


@pytest.fixture(scope="module")
def small_items():
    return npg.build_items(SMALL)


def test_nextpassage_deterministic(small_items, tmp_path):
    items, _ = small_items
    again, _ = npg.build_items(SMALL)
    for d in SMALL.domains:
        assert npg.jsonl_bytes(items[d]) == npg.jsonl_bytes(again[d])  # same seed -> same bytes
    other, _ = npg.build_items(npg.NextPassageSpec(n_per_domain=16, seed=4))
    assert npg.jsonl_bytes(other["prose"]) != npg.jsonl_bytes(items["prose"])  # the seed matters
    a, b = npg.build(SMALL, tmp_path / "a"), npg.build(SMALL, tmp_path / "b")
    for d in SMALL.domains:
        name = f"{npg.TASK}_{d}.jsonl"
        assert (a / name).read_bytes() == (b / name).read_bytes() == npg.jsonl_bytes(items[d])
        assert (a / f"{npg.TASK}_{d}.yaml").is_file()
    assert (a / f"{npg.TASK}.yaml").is_file()


def test_nextpassage_items_are_true_continuations_and_clean(small_items):
    items, stats = small_items
    calib = "\n".join(doc for src in data.EMBEDDED_SOURCES for doc in data.documents(src, "calib"))
    shingles = npg.calib_shingles(SMALL.ngram)
    for d in SMALL.domains:
        rows = items[d]
        assert len(rows) == 16 and stats[d]["items"] == 16
        conts = {r["choices"][r["label"]] for r in rows}
        eval_docs = data.documents(d, "eval")
        for r in rows:
            true = r["choices"][r["label"]]
            assert any(r["context"] + true in doc for doc in eval_docs)  # the answer really follows the context
            assert len(set(r["choices"])) == SMALL.n_choices and set(r["choices"]) <= conts  # same-domain distractors
            assert not npg._shingles(r["context"] + true, SMALL.ngram) & shingles
            assert true.strip() not in calib and r["context"].strip() not in calib
        labels = [r["label"] for r in rows]
        assert len(set(labels)) > 1  # the answer's position varies


@pytest.mark.slow
def test_tasks_evaluator_end_to_end(smol):
    """Real lm-eval, HFLM on the in-memory model, 3 items per domain; then a W3 RTN copy against that baseline."""
    from ptqbench.scheme import QuantScheme

    cfg = {"batch_size": 16, "limit": 3, "seed": 1234,
           "suites": {"nextpassage": {"tasks": ["ptqbench_nextpassage"], "metric": "acc", "build": {}}}}
    cache: dict = {}
    pad_before = smol.tokenizer.pad_token
    ctx = CellContext(smol.model, smol.tokenizer, smol.tokenizer_id, "smollm2_135m", "cpu", None, None, True, 0,
                      None, cache)
    rows = {(r["metric"], r["group"]): r for r in T.task_rows(ctx, cfg)}
    accs = {g: rows[("acc", g)]["value"] for g in ("code", "docs", "prose")}
    assert all(v in (0, 1 / 3, 2 / 3, 1) for v in accs.values())
    assert rows[("worst_group_acc", "")]["value"] == min(accs.values())
    assert rows[("mean_acc", "")]["value"] == pytest.approx(sum(accs.values()) / 3)
    assert rows[("mean_acc", "")]["value"] >= 0.5  # fp model well above chance (0.25) on these 9 items
    assert rows[("worst_group_acc_drop", "")]["value"] == 0.0
    assert "ptqbench_nextpassage v1" in rows[("acc", "code")]["protocol"]
    assert smol.tokenizer.pad_token == pad_before  # HFLM got a copy: the process-wide tokenizer is untouched

    from ptqbench.quantizer import get_method

    model = copy.deepcopy(smol.model)
    get_method("rtn")(QuantScheme(w_bits=2, group_size=64)).quantize(model, None)  # W2: near-random model
    qctx = CellContext(model, smol.tokenizer, smol.tokenizer_id, "smollm2_135m", "cpu", None, None, False, 0, None,
                       cache)
    q = {(r["metric"], r["group"]): r["value"] for r in T.task_rows(qctx, cfg)}
    assert q[("worst_group_acc_drop", "")] == pytest.approx(rows[("worst_group_acc", "")]["value"]
                                                            - q[("worst_group_acc", "")])
    assert q[("mean_acc_drop", "")] == pytest.approx(rows[("mean_acc", "")]["value"] - q[("mean_acc", "")])
    assert q[("mean_acc", "")] < rows[("mean_acc", "")]["value"]  # W2 RTN destroys the model



@pytest.mark.parametrize("name,suites", [("tasks", {"nextpassage"}), ("embedded_tasks", {"nextpassage"}),
                                         ("mmlu", {"mmlu"}), ("zeroshot", {"zeroshot"}),
                                         ("hub_tasks", {"mmlu", "crows_pairs_english", "zeroshot"})])
def test_eval_configs_compose(compose, name, suites):
    from omegaconf import OmegaConf

    ev = OmegaConf.to_container(compose([f"eval={name}"]).eval, resolve=True)
    assert {s.name for s in T.parse_suites(ev["tasks"])} == suites
    assert ev["memory"]["packed"] is True
    assert ("perplexity" in ev) == (name == "embedded_tasks")


@pytest.mark.slow
def test_hub_suite_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cfg = {"suites": {"crows": {"tasks": ["crows_pairs_english_age"], "metric": "pct_stereotype",
                                "higher_is_better": False}}}
    with pytest.raises(UnavailableError, match="HF_DATASETS_OFFLINE=0"):
        T.check_config(cfg)
