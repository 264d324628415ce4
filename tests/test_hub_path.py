"""The hub path without the hub: a local hub mirror (``hub_mirror=<folder>``) that holds a tiny random Llama under
``meta-llama/Llama-2-7b-hf`` and the hub datasets' own files (same repos, file names, splits and columns), with
small synthetic English text. Cells of ``+sweep=llama_w3`` run through the real loaders (``ptqbench.data``'s hub
sources, ``ptqbench.models.load``) from it; every dataset split carries its own marker word, so the tokens a cell
calibrates and evaluates on are traced back to the file they came from.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import torch

from ptqbench import data, mirror, models
from ptqbench import run as run_mod
from ptqbench.errors import UnavailableError

LLAMA = "meta-llama/Llama-2-7b-hf"
WORDS = ("the a of and to in is was for on that with as by at from it an be this are or his which had have not were "
         "but they one all their there been has when who will more no if out so said what up its about into than "
         "them can only other new some could time these two may then do first any my now such like our over man me "
         "even most made after also did many before must through back years where much your way well down should "
         "because each just those people how too little state good very make world still own see men work long get "
         "here between both life being under never day same another know while last might us great old year off "
         "come since against go came right used take three river music city north water house").split()
# one marker word per (dataset, split): it appears in every sentence of that file and nowhere else
MARKERS = {"wikitext2:train": "quokka", "wikitext2:test": "wombat", "wikitext2:validation": "numbat",
           "c4:train": "platypus", "c4:validation": "dingo", "ptb:train": "kookaburra", "ptb:test": "bilby",
           "ptb:validation": "echidna", "pile:validation": "wallaby"}
# a cell of the sweep (its sweeper sets model, method, quant and calib), shrunk to seconds on the tiny model
SMALL = ["method=gptq", "quant=w3g128", "calib.n_samples=4", "calib.seq_len=64", "eval.perplexity.seq_len=64",
         "eval.perplexity.max_windows=4"]


def _sentences(rng: random.Random, marker: str, n: int) -> list[str]:
    out = []
    for _ in range(n):
        words = rng.choices(WORDS, k=rng.randint(5, 10))
        words.insert(rng.randrange(len(words) + 1), marker)  # every sentence, so every 64-token window has it
        out.append(" ".join(words) + " .")
    return out


def _parquet(path: Path, column: str, rows: list[str]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({column: rows}), path)


def _jsonl(path: Path, records: list[dict], compress) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(compress("".join(json.dumps(r) + "\n" for r in records).encode()))


def _zst(raw: bytes) -> bytes:
    import zstandard  # a dependency (pyproject.toml): the Pile's hub file is zstd-compressed

    return zstandard.ZstdCompressor().compress(raw)


def _write_datasets(root: Path, rng: random.Random) -> dict[str, list[str]]:
    """The hub datasets' files under ``root``, as the hub names them; returns each file's rows (texts)."""
    rows: dict[str, list[str]] = {}
    for split, n in (("train", 240), ("test", 120), ("validation", 40)):
        # WikiText's rows are lines: headings, paragraphs and empty lines, each paragraph a few sentences
        lines = []
        for i in range(n // 6):
            lines += [f" = {MARKERS['wikitext2:' + split].title()} {i} = ", ""]
            lines += [" " + " ".join(_sentences(rng, MARKERS["wikitext2:" + split], 3)) + " ", ""]
        rows[f"wikitext2:{split}"] = lines
        _parquet(root / f"Salesforce/wikitext/wikitext-2-raw-v1/{split}-00000-of-00001.parquet", "text", lines)
        rows[f"ptb:{split}"] = _sentences(rng, MARKERS["ptb:" + split], n)
        _parquet(root / f"ptb-text-only/ptb_text_only/penn_treebank/{split}/0000.parquet", "sentence",
                 rows[f"ptb:{split}"])
    for split, file, n in (("train", "en/c4-train.00000-of-01024.json.gz", 200),
                           ("validation", "en/c4-validation.00000-of-00008.json.gz", 80)):
        docs = [" ".join(_sentences(rng, MARKERS["c4:" + split], 2)) for _ in range(n)]
        rows[f"c4:{split}"] = docs
        _jsonl(root / "allenai/c4" / file, [{"text": t, "timestamp": "2019-04-25T12:57:54Z",
                                             "url": f"https://example.org/{split}/{i}"} for i, t in enumerate(docs)],
               gzip.compress)
    docs = [" ".join(_sentences(rng, MARKERS["pile:validation"], 3)) for _ in range(60)]
    rows["pile:validation"] = docs
    _jsonl(root / "mit-han-lab/pile-val-backup/val.jsonl.zst",
           [{"text": t, "meta": {"pile_set_name": "Pile-CC"}} for t in docs], _zst)
    return rows


def _write_model(folder: Path, texts: list[str]) -> None:
    """A tiny random Llama and a byte-level BPE tokenizer trained on ``texts`` (every word one token, so a 64-token
    window spans several sentences), saved as a hub folder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1024, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    # hidden 128 and intermediate 256: group size 128 (the sweep's w3g128) divides every linear layer's inputs
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, bos_token_id=0,
                      eos_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> tuple[Path, dict[str, list[str]]]:
    """The mirror folder and each file's rows; caches (tokens, datasets' Arrow files) go to a temporary folder."""
    import datasets

    root = tmp_path_factory.mktemp("hub")
    rows = _write_datasets(root, random.Random(0))
    _write_model(root / LLAMA, [t for texts in rows.values() for t in texts])
    caches = tmp_path_factory.mktemp("caches")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv(mirror.ENV, raising=False)
        mp.setenv("PTQBENCH_CACHE", str(caches / "ptqbench"))  # the fake llama2_7b's tokens stay out of the real one
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", caches / "datasets")
        mp.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", caches / "datasets" / "downloads")
        mp.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", caches / "datasets" / "downloads" / "extracted")
        run_mod._CACHE.clear()
        yield root, rows
    run_mod._CACHE.clear()  # the tiny model and its text must not serve a later test as llama2_7b
    data.documents.cache_clear()


def _cell(compose, hub_root: Path, tmp: Path, *overrides: str) -> list[dict]:
    return run_mod.run(compose(["+sweep=llama_w3", "model=llama2_7b", *SMALL, f"hub_mirror={hub_root}",
                                f"results_root={tmp}", *overrides]))


def _decoded(ids: torch.Tensor) -> list[str]:
    tok = next(v for k, v in run_mod._CACHE.items() if isinstance(k, tuple) and k[0] == "model").tokenizer
    return [tok.decode(row.tolist()) for row in ids]


def _markers(text: str) -> set[str]:
    return {k for k, m in MARKERS.items() if m in text}


def _cached(kind: str, name: str | None = None):
    return [v for k, v in run_mod._CACHE.items() if isinstance(k, tuple) and k[0] == kind and name in (None, k[1])]


@pytest.mark.parametrize("calib,calib_file", [("c4", "c4:train"), ("wikitext2", "wikitext2:train")])
def test_llama_w3_cell_runs_from_the_mirror(compose, hub, tmp_path, calib, calib_file):
    root, _ = hub
    rows = _cell(compose, root, tmp_path, f"calib={calib}")
    assert {r["status"] for r in rows} == {"ok"}, [r["error"] for r in rows if r["status"] != "ok"]
    assert {r["model"] for r in rows} == {"llama2_7b"} and {r["calib"] for r in rows} == {calib}
    assert {r["quant"] for r in rows} == {"w3g128"} and {r["sweep"] for r in rows} == {"llama_w3"}
    ppl = {r["dataset"]: r for r in rows if r["metric"] == "perplexity"}
    assert set(ppl) == {"wikitext2", "c4"}
    for r in ppl.values():
        assert 1 < r["value"] < 1e4 and "seq_len=64;windows=4/" in r["protocol"], r
    # the weights came from the mirror's folder, not the hub or its cache
    loaded = _cached("model")[0]
    assert loaded.info["hub_mirror"] == str(root / LLAMA) and loaded.spec.path == LLAMA
    # every calibration window comes from the calibration file, and only from it
    (calibration,) = [c for c in _cached("calib") if c.spec.name == calib]
    assert rows[0]["calib_fingerprint"] == calibration.fingerprint
    for text in _decoded(calibration.input_ids):
        assert _markers(text) == {calib_file}, text
    # the evaluation windows come from WikiText-2's test file and C4's validation file
    for name, file in (("wikitext2", "wikitext2:test"), ("c4", "c4:validation")):
        (evalset,) = _cached("evalset", name)
        assert len(evalset.windows) == 4
        assert all(_markers(text) == {file} for text in _decoded(evalset.windows))


def test_the_mirror_is_not_part_of_the_config_hash(compose, hub, monkeypatch):
    root, _ = hub
    cell = ["+sweep=llama_w3", "model=llama2_7b", "method=gptq", "calib=c4"]
    without = run_mod.resolve(compose(cell))
    with_mirror = run_mod.resolve(compose([*cell, f"hub_mirror={root}"]))
    assert without.hub_mirror is None and with_mirror.hub_mirror == root.resolve()
    assert with_mirror.config_hash == without.config_hash
    monkeypatch.setenv(mirror.ENV, str(root))  # the environment variable is the config's default
    from_env = run_mod.resolve(compose(cell))
    assert from_env.hub_mirror == root.resolve() and from_env.config_hash == without.config_hash
    assert run_mod.resolve(compose([*cell, "hub_mirror=null"])).hub_mirror is None  # the command line wins
    # a cell of the committed smollm2_w4 baseline keeps the hash it was recorded under (float32: model.device=cpu)
    stored = ["+sweep=smollm2_w4", "method=gptq", "quant=w4g64", "calib=docs", "model.device=cpu"]
    assert run_mod.resolve(compose([*stored, f"hub_mirror={root}"])).config_hash == "184204e1f75ca39b"


def test_ptb_reads_the_parquet_export_from_the_mirror(hub):
    root, rows = hub
    with mirror.active(root):
        assert data.documents("ptb", "calib") == (" ".join(rows["ptb:train"]),)
        assert data.documents("ptb", "eval") == (" ".join(rows["ptb:test"]),)


def test_c4_and_wikitext2_loaders_keep_the_gptq_conventions(hub, monkeypatch):
    root, rows = hub
    monkeypatch.setenv(mirror.ENV, str(root))  # outside a run, the environment variable alone sets the mirror
    assert data.documents("c4", "calib") == tuple(rows["c4:train"])  # one document per line of the shard
    assert data.documents("c4", "eval") == (" ".join(rows["c4:validation"]),)
    assert data.documents("wikitext2", "calib") == ("\n\n".join(rows["wikitext2:train"]),)
    assert data.documents("wikitext2", "eval") == ("\n\n".join(rows["wikitext2:test"]),)


def test_pile_reads_val_jsonl_zst_from_the_mirror(hub):
    root, rows = hub
    with mirror.active(root):
        calib, ev = data.documents("pile", "calib"), data.documents("pile", "eval")
    assert set(calib) | set(ev) == set(rows["pile:validation"]) and not set(calib) & set(ev)


def test_pile_without_zstandard_names_the_package(hub, monkeypatch):
    """zstandard is a dependency; an installation without it gets the package to install, not datasets' "Compression
    type zstd not supported"."""
    root, _ = hub
    data.documents.cache_clear()
    monkeypatch.setattr(data, "_missing_codec", lambda file: "zstandard" if file.endswith(".zst") else None)
    with mirror.active(root), pytest.raises(UnavailableError) as info:
        data.documents("pile", "calib")
    msg = str(info.value)
    assert "val.jsonl.zst needs the zstandard package" in msg and "pip install zstandard" in msg and "\n" not in msg


def test_a_file_missing_from_the_mirror_is_named(compose, hub, tmp_path):
    root, _ = hub
    partial = tmp_path / "partial"  # the model and WikiText-2, but no C4
    for sub in (LLAMA, "Salesforce"):
        (partial / sub).parent.mkdir(parents=True, exist_ok=True)
        (partial / sub).symlink_to(root / sub, target_is_directory=True)
    missing = partial / "allenai/c4/en/c4-train.00000-of-01024.json.gz"
    with mirror.active(partial), pytest.raises(UnavailableError) as info:
        data.documents("c4", "calib")
    assert str(missing) in str(info.value) and "\n" not in str(info.value)
    # a cell stops before its model is loaded, with the same line
    run_mod._CACHE.clear()
    with pytest.raises(UnavailableError, match="the hub mirror has no .*c4-train.00000-of-01024.json.gz"):
        _cell(compose, partial, tmp_path / "res", "calib=c4")
    assert not _cached("model")


def test_a_model_missing_from_the_mirror_names_the_folder(compose, hub):
    root, _ = hub
    cell = run_mod.resolve(compose(["model=llama3_8b", f"hub_mirror={root}"]))
    with mirror.active(cell.hub_mirror), pytest.raises(UnavailableError) as info:
        models.check_available(cell.model)  # offline (HF_HUB_OFFLINE=1) and not in the mirror
    msg = str(info.value)
    assert str(root / cell.model.path) in msg and "\n" not in msg, msg
