"""``ptqbench_nextpassage``: an offline, grouped multiple-choice task built from the embedded evaluation text.

Construction (deterministic: the same spec and the same source text give the same bytes):

1. Each document of a domain's *evaluation* split (``ptqbench.data.documents(domain, "eval")``) is cut, in order,
   into non-overlapping passages: a context of about ``context_chars`` characters that starts at a line start (else
   a word start) and ends before a space between two words, then a continuation of about ``continuation_chars``
   characters that starts with that space and ends at a whitespace boundary. Cutting on characters, not tokens, keeps
   the task the same for every tokenizer; cutting before a mid-line space gives every choice the same leading
   character, so the format gives no answer away.
2. Passages are dropped when they are near-empty, repeat an earlier passage, or overlap the calibration text of any
   embedded domain (every calibration source, so ``calib=mix`` and cross-domain calibrations are covered too): a
   shared ``ngram``-word shingle (13 words, the decontamination n-gram of GPT-3, Brown et al. 2020, arXiv:2005.14165)
   or a context/continuation found verbatim in the calibration text.
3. ``n_per_domain`` passages are drawn with ``random.Random(f"{seed}:{domain}")``, at most ``ceil(n / 8)`` per
   document in a first pass (so a few long files do not dominate), then filled without the cap.
4. The ``n_choices - 1`` distractors of an item are the continuations of other drawn items of the same domain, from
   other documents when the domain has enough of them; every continuation is thus the answer once and a distractor
   about ``n_choices - 1`` times, so choices cannot be told apart by how generic they are across items. The answer's
   position is drawn from the same generator.

lm-eval scores each choice by its summed log-likelihood after the context (``acc``; ``acc_norm`` divides by the
choice's length in bytes), zero-shot, with an empty target delimiter (the choice carries its own leading space).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ptqbench import data
from ptqbench.errors import ConfigError
from ptqbench.models import cache_root

BUILDER_VERSION = 1  # bump when a change here changes the items (it is part of the folder name and the protocol)
TASK = "ptqbench_nextpassage"


@dataclass(frozen=True)
class NextPassageSpec:
    """What the task is built from; every field changes the items."""

    domains: tuple[str, ...] = ("code", "docs", "prose")
    n_per_domain: int = 48
    context_chars: int = 192
    continuation_chars: int = 80
    n_choices: int = 4
    seed: int = 0
    ngram: int = 13  # decontamination shingle length in whitespace-separated words

    def __post_init__(self) -> None:
        object.__setattr__(self, "domains", tuple(self.domains))
        bad = [d for d in self.domains if d not in data.EMBEDDED_SOURCES]
        if not self.domains or bad:
            raise ConfigError(f"nextpassage domains {bad or '[]'}: choose among {list(data.EMBEDDED_SOURCES)}")
        if self.n_per_domain < self.n_choices:
            raise ConfigError(f"nextpassage n_per_domain={self.n_per_domain}: use at least n_choices={self.n_choices}")
        if self.context_chars < 32 or self.continuation_chars < 16:
            raise ConfigError("nextpassage: use context_chars >= 32 and continuation_chars >= 16")
        if self.n_choices < 2:
            raise ConfigError(f"nextpassage n_choices={self.n_choices}: use at least 2")
        if self.ngram < 4:
            raise ConfigError(f"nextpassage ngram={self.ngram}: use at least 4 words")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["domains"] = list(self.domains)
        return d

    def describe(self) -> str:
        return (f"{TASK} v{BUILDER_VERSION}: {self.n_per_domain}/domain from eval splits of "
                f"{','.join(self.domains)}; context~{self.context_chars} chars, continuation~"
                f"{self.continuation_chars} chars, {self.n_choices}-way, distractors=same-domain continuations; "
                f"seed={self.seed}; decontaminated vs all calib splits ({self.ngram}-gram + verbatim)")


# ------------------------------------------------------------------------------------------ passages of a document
def _split_point(text: str, target: int, lo: int, hi: int) -> int | None:
    """The position nearest ``target`` in [lo, hi] of a space between two non-space characters."""
    for d in range(max(target - lo, hi - target) + 1):
        for i in (target - d, target + d):
            if lo <= i <= hi and text[i] == " " and not text[i - 1].isspace() and not text[i + 1].isspace():
                return i
    return None


def _start_point(text: str, lo: int, hi: int) -> int | None:
    """The first line start in [lo, hi], else the first word start, else None."""
    for j in range(lo, hi + 1):
        if j == 0 or text[j - 1] == "\n":
            return j
    for j in range(lo, hi + 1):
        if text[j - 1].isspace() and not text[j].isspace():
            return j
    return None


def _end_point(text: str, p: int, cont: int) -> int | None:
    """End of the continuation starting at ``p``: the last whitespace in (p + cont/2, p + cont], or the text end."""
    if p + cont >= len(text):
        return len(text)
    return next((j for j in range(p + cont, p + cont // 2, -1) if text[j].isspace()), None)


def passages(text: str, context_chars: int, continuation_chars: int) -> list[tuple[str, str]]:
    """Non-overlapping (context, continuation) pairs of one document, in order."""
    out: list[tuple[str, str]] = []
    ctx, cont, n = context_chars, continuation_chars, len(text)
    pos = 0
    while pos < n:
        lo, hi = pos + ctx // 2, min(pos + ctx, n - cont // 2 - 2)
        if lo > hi:
            break
        p = _split_point(text, min(pos + ctx, hi), max(lo, 1), hi)
        if p is None:
            pos += ctx
            continue
        q = _end_point(text, p, cont)
        s = _start_point(text, max(pos, p - ctx), p - ctx // 2)
        if q is None or s is None:
            pos = p + 1
            continue
        out.append((text[s:p], text[p:q].rstrip()))
        pos = q
    return out


def _ok(context: str, continuation: str) -> bool:
    """Enough text on both sides to tell continuations apart."""
    alnum = sum(c.isalnum() for c in continuation)
    return alnum >= 8 and len(continuation.split()) >= 3 and len(context.split()) >= 8


# ------------------------------------------------------------------------------------------------ decontamination
def _shingles(text: str, n: int) -> set[bytes]:
    words = text.split()
    return {hashlib.blake2b(" ".join(words[i:i + n]).encode(), digest_size=8).digest()
            for i in range(max(len(words) - n + 1, 0))}


@lru_cache(maxsize=4)
def calib_shingles(n: int, sources: tuple[str, ...] = tuple(data.EMBEDDED_SOURCES)) -> frozenset[bytes]:
    """Hashed ``n``-word shingles of the calibration splits of ``sources`` (per document, joined)."""
    out: set[bytes] = set()
    for src in sources:
        for doc in data.documents(src, "calib"):
            out |= _shingles(doc, n)
    return frozenset(out)


@lru_cache(maxsize=2)
def calib_text(sources: tuple[str, ...] = tuple(data.EMBEDDED_SOURCES)) -> str:
    return "\n\x00\n".join(doc for src in sources for doc in data.documents(src, "calib"))


def overlaps_calibration(context: str, continuation: str, ngram: int) -> bool:
    """True when the passage shares an ``ngram``-word shingle with, or a side occurs verbatim in, calibration text."""
    if _shingles(context + continuation, ngram) & calib_shingles(ngram):
        return True
    text = calib_text()
    return continuation.strip() in text or context.strip() in text


# ------------------------------------------------------------------------------------------------ items
def build_items(spec: NextPassageSpec) -> tuple[dict[str, list[dict[str, Any]]], dict[str, Any]]:
    """The items of each domain (lists of JSON-ready dicts) and build statistics."""
    items: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, Any] = {}
    for domain in spec.domains:
        docs = data.documents(domain, "eval")
        cands: list[tuple[int, str, str]] = []
        seen: set[str] = set()
        for di, doc in enumerate(docs):
            for ctx, cont in passages(doc, spec.context_chars, spec.continuation_chars):
                if _ok(ctx, cont) and ctx not in seen and cont not in seen:
                    seen.update((ctx, cont))
                    cands.append((di, ctx, cont))
        rng = random.Random(f"{spec.seed}:{domain}")
        order = list(range(len(cands)))
        rng.shuffle(order)
        cap = math.ceil(spec.n_per_domain / 8)
        per_doc: dict[int, int] = {}
        chosen: list[int] = []
        rejected = 0
        clean: dict[int, bool] = {}
        for capped in (True, False):  # first with a per-document cap, then filled without it
            for i in order:
                if len(chosen) >= spec.n_per_domain:
                    break
                di = cands[i][0]
                if i in chosen or (capped and per_doc.get(di, 0) >= cap):
                    continue
                if i not in clean:
                    clean[i] = not overlaps_calibration(cands[i][1], cands[i][2], spec.ngram)
                    rejected += not clean[i]
                if clean[i]:
                    chosen.append(i)
                    per_doc[di] = per_doc.get(di, 0) + 1
        if len(chosen) < spec.n_choices:
            raise ConfigError(f"nextpassage: domain {domain} has only {len(chosen)} usable passages: lower "
                              f"context_chars/continuation_chars or n_choices")
        out = []
        for k, i in enumerate(chosen):
            di, ctx, cont = cands[i]
            others = [j for j in chosen if j != i and cands[j][2] != cont]
            far = [j for j in others if cands[j][0] != di]
            pool = far if len(far) >= spec.n_choices - 1 else others
            choices = [cands[j][2] for j in rng.sample(pool, spec.n_choices - 1)]
            label = rng.randrange(spec.n_choices)
            choices.insert(label, cont)
            out.append({"id": f"{domain}-{k:04d}", "domain": domain, "context": ctx, "choices": choices,
                        "label": label})
        items[domain] = out
        stats[domain] = {"documents": len(docs), "candidates": len(cands), "checked": len(clean),
                         "rejected_overlap": rejected, "items": len(out), "documents_used": len(per_doc)}
    return items, stats


def jsonl_bytes(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def _source_digest(domains: tuple[str, ...]) -> str:
    """Hash of the text the items depend on: the domains' eval splits and every embedded calibration split."""
    h = hashlib.sha256()
    for name in domains:
        for doc in data.documents(name, "eval"):
            h.update(doc.encode("utf-8", "surrogatepass"))
    h.update(calib_text().encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def _task_yaml(domain: str, jsonl: Path) -> dict[str, Any]:
    return {
        "task": f"{TASK}_{domain}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(jsonl)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "context",
        "doc_to_choice": "choices",
        "doc_to_target": "label",
        "target_delimiter": "",  # each choice starts with its own space
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": BUILDER_VERSION},
    }


def build(spec: NextPassageSpec, root: str | os.PathLike | None = None) -> Path:
    """Write the task (one JSONL and one YAML per domain, a group YAML, a manifest) and return its folder.

    The folder is ``<cache_root>/tasks/nextpassage-<digest>`` (or ``root``); the digest covers the spec, the
    builder version and the source text, so an existing folder is reused as is.
    """
    import yaml

    key = json.dumps({"v": BUILDER_VERSION, "spec": spec.to_dict(), "src": _source_digest(spec.domains)},
                     sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    folder = Path(root) if root is not None else cache_root() / "tasks" / f"nextpassage-{digest}"
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("digest") == digest:
        return folder
    items, stats = build_items(spec)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {}
    for domain, rows in items.items():
        blob = jsonl_bytes(rows)
        (tmp / f"{TASK}_{domain}.jsonl").write_bytes(blob)
        files[f"{TASK}_{domain}.jsonl"] = hashlib.sha256(blob).hexdigest()
        # the YAML names the JSONL at its final place (the folder is renamed into place below)
        (tmp / f"{TASK}_{domain}.yaml").write_text(
            yaml.safe_dump(_task_yaml(domain, folder.resolve() / f"{TASK}_{domain}.jsonl"), sort_keys=False))
    group = {"group": TASK, "task": [f"{TASK}_{d}" for d in items],
             "aggregate_metric_list": [{"metric": "acc", "aggregation": "mean", "weight_by_size": False}],
             "metadata": {"version": BUILDER_VERSION}}
    (tmp / f"{TASK}.yaml").write_text(yaml.safe_dump(group, sort_keys=False))
    (tmp / "manifest.json").write_text(json.dumps(
        {"digest": digest, "builder_version": BUILDER_VERSION, "spec": spec.to_dict(), "stats": stats,
         "sha256": files, "python": data.python_version_tag(), "protocol": spec.describe()}, indent=1,
        sort_keys=True))
    shutil.rmtree(folder, ignore_errors=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, folder)
    return folder
