"""Compute frozen work once: the frozen bottom of an encoder runs once per example, not once per step.

Under ``last_layers`` only the classification head trains, and under LoRA restricted to the last blocks
(``method.lora.layers: [4, 5]`` on a 6-block model) blocks 0-3 never change. Everything below the first
encoder block that holds a trainable parameter (the *cut*) is the *frozen prefix*: the embeddings and the
blocks under the cut. Its output for an example is the same in every step, epoch, seed, learning rate and
variant, provided it runs without dropout. ``train.frozen_prefix`` says how it runs:

- ``train`` (the default): in training mode like the rest of the model, dropout active (what peft and the
  reference recipe do). Nothing here is used.
- ``eval``: in eval mode (no dropout), recomputed every step. This is the reference that ``cache`` equals.
- ``cache``: in eval mode, computed once per example and kept on disk, then read back by every run that needs
  the same numbers. It gives ``eval``'s losses and metrics (within float rounding) without the frozen forward
  passes: a ``last_layers`` step is the head alone.

Dropout *above* the cut (the blocks that train, the head's dropout) is unchanged, and draws the same random
numbers in every mode, because the prefix draws none in eval mode.

How it is done without re-implementing any model: the model's own forward runs on both sides of the cut,
given a shortened block list. The prefix is the base model with only the blocks below the cut. The suffix is
the whole model with the blocks from the cut on, and embedding layers that pass the cached hidden states
through (handed in as ``inputs_embeds``). Attention masks, position handling and the head stay the model's.
Where the blocks and embeddings live is a registry by ``model_type`` (``SPLITS``). An architecture not in
it, or a task other than classification, falls back to ``train`` with a note in the record: no split is
ever guessed, so the result is never wrong.

The cache is one file per key under ``<data.cache_dir>/frozen/``. The key is a hash of the frozen weights
(the base model's frozen tensors outside the blocks above the cut), the model's config and dtype, the token
ids of every split (so data, tokenizer and ``max_length`` are all in it), ``max_length``, the cut, what is
stored, the precision, device type, thread count and torch/transformers versions. A seed, learning rate or
head never enters it, so the seeds, the tuning runs and every variant with the same cut share one file.
Per example it holds the hidden states at the cut without padding. When the cut is above the last block
(``last_layers``) only the first token is kept, because every supported head reads only that token
([CLS] / <s>). Rows are found by their token ids, so batching (``length_grouping`` too), evaluation,
``BestEpoch``, checkpoints and resume are unchanged. A lock makes concurrent jobs compute a missing file
once, and it is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lora_bench.atomic import replace_atomically
from lora_bench.config import RunConfig
from lora_bench.run.data import SPLITS as SPLIT_NAMES

# Bump when the file layout or what a key covers changes: old files are then never read.
CACHE_VERSION = 1


@dataclass(frozen=True)
class Split:
    """Where one architecture's frozen prefix lives, relative to its base model (``model.base_model``).

    ``embeddings``: the attributes that turn token ids into the first block's input. The base model calls them
    in order (ELECTRA projects its smaller embeddings up with ``embeddings_project``), and above the cut each
    is replaced by a pass-through. ``blocks``: the dotted path to the ``nn.ModuleList`` of transformer blocks.
    The head of every architecture here reads only the first token, so a cut above the last block stores
    that token alone.
    """

    embeddings: tuple[str, ...]
    blocks: str


_BERT_SPLIT = Split(embeddings=("embeddings",), blocks="encoder.layer")

# model_type -> its split. Others (ALBERT shares one block across depth, DeBERTa-v2 convolves after block 0,
# Llama is a decoder) fall back to ``train``.
SPLITS: dict[str, Split] = {
    "bert": _BERT_SPLIT,
    "roberta": _BERT_SPLIT,
    "xlm-roberta": _BERT_SPLIT,
    "camembert": _BERT_SPLIT,
    "mpnet": _BERT_SPLIT,
    "electra": Split(embeddings=("embeddings", "embeddings_project"), blocks="encoder.layer"),
    "distilbert": Split(embeddings=("embeddings",), blocks="transformer.layer"),
}


class FrozenCacheError(RuntimeError):
    """A batch holds an example the feature cache does not: the run stops rather than guess."""


class _PassThrough(nn.Module):
    """Stands in for an embedding layer above the cut: returns the hidden states it is handed."""

    def forward(self, *args, **kwargs):
        # Models call their embeddings with positional or keyword arguments; the one float tensor is ours.
        return next(v for v in (*args, *kwargs.values()) if torch.is_tensor(v) and v.is_floating_point())


def _blocks(base: nn.Module, split: Split) -> nn.ModuleList:
    return base.get_submodule(split.blocks)


def _embedding_names(base: nn.Module, split: Split) -> list[str]:
    return [name for name in split.embeddings if isinstance(getattr(base, name, None), nn.Module)]


@contextmanager
def _swapped(base: nn.Module, split: Split, blocks: nn.ModuleList, pass_through: bool):
    """The base model with ``blocks`` as its block list (and pass-through embeddings), restored afterwards."""
    parent_name, _, attribute = split.blocks.rpartition(".")
    parent = base.get_submodule(parent_name)
    original_blocks = getattr(parent, attribute)
    names = _embedding_names(base, split) if pass_through else []
    originals = {name: getattr(base, name) for name in names}
    setattr(parent, attribute, blocks)
    for name in names:
        setattr(base, name, _PassThrough())
    try:
        yield
    finally:
        setattr(parent, attribute, original_blocks)
        for name, module in originals.items():
            setattr(base, name, module)


def find_cut(model: nn.Module, split: Split) -> int | None:
    """Index of the first block with a trainable parameter (the number of blocks when none trains), or None
    when an embedding layer trains (no frozen prefix at all)."""
    base = model.base_model
    for name in _embedding_names(base, split):
        if any(p.requires_grad for p in getattr(base, name).parameters()):
            return None
    blocks = _blocks(base, split)
    return next((i for i, block in enumerate(blocks) if any(p.requires_grad for p in block.parameters())),
                len(blocks))


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _row_key(ids, token_types=None) -> bytes:
    """An example's identity in the cache: its token ids (and segment ids), unpadded, as int64 bytes."""
    key = np.asarray(ids, dtype=np.int64).tobytes()
    if token_types is not None:
        key += b"|" + np.asarray(token_types, dtype=np.int64).tobytes()
    return key


@dataclass
class FrozenFeatures:
    """The hidden states at the cut of every example, without padding, found by the example's token ids.

    ``values`` holds the examples' rows one after another plus a final zero row used as padding;
    example ``i`` is rows ``offsets[i] : offsets[i] + lengths[i]``.
    """

    values: torch.Tensor
    offsets: torch.Tensor
    lengths: torch.Tensor
    index: dict[bytes, int]

    def batch(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states, attention mask) of a padded batch of token ids, padded the same way (right)."""
        ids = input_ids.cpu().numpy()
        real = attention_mask.cpu().sum(1).tolist()
        types = token_type_ids.cpu().numpy() if token_type_ids is not None else None
        try:
            rows = [self.index[_row_key(ids[r, :n], types[r, :n] if types is not None else None)]
                    for r, n in enumerate(real)]
        except KeyError:
            raise FrozenCacheError("an example of this batch is not in the frozen-feature cache (were the "
                                   "batches built from other data than the cache?)") from None
        rows_t = torch.as_tensor(rows)
        lengths = self.lengths[rows_t]
        positions = torch.arange(int(lengths.max()))
        inside = positions[None, :] < lengths[:, None]
        gather = torch.where(inside, self.offsets[rows_t][:, None] + positions[None, :], len(self.values) - 1)
        return self.values[gather].to(device), inside.long().to(device)


class FrozenPrefixModel(nn.Module):
    """``model`` with its frozen prefix held in eval mode whatever ``train()`` says; given ``features``, the
    prefix is not run at all and the blocks above the cut read the cached hidden states instead.

    The wrapped model is ``self.model``: every parameter (frozen ones included) is still there, so parameter
    counts, memory figures and checkpoints see the same model.
    """

    def __init__(self, model: nn.Module, split: Split, cut: int, features: FrozenFeatures | None = None):
        super().__init__()
        self.model = model
        base = model.base_model
        blocks = _blocks(base, split)
        # Tuples: plain attributes, not registered as submodules (the modules are already under self.model).
        self._prefix = tuple(getattr(base, name) for name in _embedding_names(base, split)) + tuple(blocks[:cut])
        self._above = (nn.ModuleList(blocks[cut:]),)
        self._split, self._features = split, features

    @property
    def config(self):
        return self.model.config

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self._prefix:
            module.eval()
        return self

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, **kwargs):
        if self._features is None:
            inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
            return self.model(**{k: v for k, v in inputs.items() if v is not None}, **kwargs)
        hidden, mask = self._features.batch(input_ids, attention_mask, token_type_ids, input_ids.device)
        with _swapped(self.model.base_model, self._split, self._above[0], pass_through=True):
            return self.model(inputs_embeds=hidden, attention_mask=mask, **kwargs)


def _digest_tensors(digest, named: list[tuple[str, torch.Tensor]]) -> None:
    for name, tensor in named:
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(memoryview(flat.view(torch.uint8).numpy()))


def frozen_weights(model: nn.Module, split: Split, cut: int) -> list[tuple[str, torch.Tensor]]:
    """The tensors the prefix's output can depend on: the base model's frozen parameters and buffers outside
    the blocks from the cut on (LoRA factors and heads train, so a seed's initialisation never enters)."""
    base = model.base_model
    above = {id(t) for block in _blocks(base, split)[cut:] for t in (*block.parameters(), *block.buffers())}
    tensors = [(name, p) for name, p in base.named_parameters() if not p.requires_grad and id(p) not in above]
    tensors += [(name, b) for name, b in base.named_buffers() if id(b) not in above]
    return sorted(tensors, key=lambda item: item[0])


def _examples(splits, accepted: frozenset[str]) -> tuple[list[dict], list[bytes], bool]:
    """Every example of every split in order (train, validation, test), their cache keys, and whether segment
    ids are part of them."""
    with_types = "token_type_ids" in accepted and "token_type_ids" in splits[SPLIT_NAMES[0]].column_names
    examples, keys = [], []
    for name in SPLIT_NAMES:
        columns = splits[name][:]
        types = columns["token_type_ids"] if with_types else [None] * len(columns["input_ids"])
        for ids, label, token_types in zip(columns["input_ids"], columns["labels"], types):
            example = {"input_ids": ids, "labels": label}
            if token_types is not None:
                example["token_type_ids"] = token_types
            examples.append(example)
            keys.append(_row_key(ids, token_types))
    return examples, keys, with_types


def cache_key(cfg: RunConfig, model: nn.Module, split: Split, cut: int, keys: list[bytes], stored: str,
              device: torch.device) -> str:
    """Hash of everything the cached hidden states depend on (see the module docstring), never of a seed."""
    import transformers

    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items()
              if k not in ("id2label", "label2id", "num_labels", "transformers_version", "problem_type")}
    digest.update(json.dumps({
        "version": CACHE_VERSION, "model": [cfg.model.source, cfg.model.name, cfg.model.dtype], "config": config,
        "max_length": cfg.data.max_length, "cut": cut, "stored": stored, "precision": cfg.train.precision,
        "device": device.type, "threads": torch.get_num_threads(), "torch": torch.__version__,
        "transformers": transformers.__version__,
    }, sort_keys=True, default=str).encode())
    _digest_tensors(digest, frozen_weights(model, split, cut))
    for key in keys:
        digest.update(len(key).to_bytes(4, "little"))
        digest.update(key)
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_features(model: nn.Module, split: Split, cut: int, examples: list[dict], collate, accepted,
                     device: torch.device, precision: str, batch_size: int, first_token: bool) -> dict:
    """The prefix's output for every example in eval mode: a dict of tensors, the layout of a cache file."""
    base = model.base_model
    modes = {module: module.training for module in model.modules()}
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    outputs: list[torch.Tensor | None] = [None] * len(examples)
    try:
        with _swapped(base, split, nn.ModuleList(_blocks(base, split)[:cut]), pass_through=False):
            for start in range(0, len(order), batch_size):
                chunk = order[start : start + batch_size]
                batch = collate([examples[i] for i in chunk])
                inputs = {k: v.to(device) for k, v in batch.items() if k in accepted}
                with _autocast(device, precision):
                    hidden = base(**inputs).last_hidden_state
                hidden = hidden.cpu()  # one copy per batch, not one per example
                for row, i in enumerate(chunk):
                    keep = 1 if first_token else len(examples[i]["input_ids"])
                    outputs[i] = hidden[row, :keep].clone()
    finally:
        for module, training in modes.items():
            module.training = training
    lengths = torch.as_tensor([len(o) for o in outputs])
    return {"values": torch.cat(outputs), "lengths": lengths}


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path`` (created if needed): concurrent jobs compute a missing cache once."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): jobs may compute the same file twice, and write it atomically
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_compute(path: Path, key: str, expected_lengths: Callable[[torch.Tensor], bool],
                    compute: Callable[[], dict]) -> tuple[dict, str, list[str]]:
    """(payload, ``hit`` | ``miss`` | ``uncached``, notes): the cache file at ``path`` if it holds ``key``, else
    ``compute()`` written there atomically. A folder that cannot be written leaves the features in memory."""
    notes: list[str] = []
    with ExitStack() as stack:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(path.with_name(path.name + ".lock")))
        except OSError as exc:
            notes.append(f"frozen-feature cache {path.parent} is not writable ({exc}); computed for this run only")
            return compute(), "uncached", notes
        if path.is_file():
            try:
                payload = torch.load(path, map_location="cpu", weights_only=True)
                if payload.get("key") == key and expected_lengths(payload["lengths"]):
                    return payload, "hit", notes
                notes.append(f"frozen-feature cache {path} holds other features; recomputed")
            except Exception as exc:  # noqa: BLE001 - an unreadable cache file means "compute it again"
                notes.append(f"frozen-feature cache {path} is unreadable ({type(exc).__name__}); recomputed")
        payload = {**compute(), "key": key, "version": CACHE_VERSION}
        try:
            replace_atomically(path, lambda tmp: torch.save(payload, tmp))
        except OSError as exc:
            notes.append(f"could not write the frozen-feature cache {path} ({exc}); computed for this run only")
            return payload, "uncached", notes
        return payload, "miss", notes


def _prefix_names(model: nn.Module, split: Split, cut: int) -> list[str]:
    prefix = model.base_model_prefix
    names = [f"{prefix}.{name}" for name in _embedding_names(model.base_model, split)]
    return names + ([f"{prefix}.{split.blocks}.0-{cut - 1}"] if cut else [])


def attach_frozen_prefix(model: nn.Module, cfg: RunConfig, task, splits, device: torch.device
                         ) -> tuple[nn.Module, dict]:
    """Apply ``cfg.train.frozen_prefix`` to a prepared model (its trainable parameters already chosen).

    Returns the model to train (``model`` itself, or a ``FrozenPrefixModel`` around it) and the record's
    ``method.frozen_prefix`` block: the mode asked for, the one ``applied``, the cut, the frozen modules,
    and for ``cache`` whether the file was a ``hit`` or a ``miss``, its key and size and the seconds spent
    loading or computing it (part of ``timing.setup_s``). ``notes`` say why a mode was not applied.
    """
    mode = cfg.train.frozen_prefix
    info: dict = {"mode": mode, "applied": "train"}
    if mode == "train":
        return model, info
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    split = SPLITS.get(model_type)
    if cfg.task != "classification" or split is None or not hasattr(model, "base_model"):
        why = (f"task {cfg.task}" if cfg.task != "classification"
               else f"model_type {model_type!r} has no known block split (lora_bench/run/frozen.py SPLITS)")
        info["notes"] = [f"train.frozen_prefix {mode} not applied ({why}): the frozen layers ran in training "
                         "mode, dropout active, as with frozen_prefix train"]
        return model, info
    cut = find_cut(model, split)
    if cut is None:
        info["notes"] = [f"train.frozen_prefix {mode}: no frozen prefix (the embeddings train); nothing changed"]
        return model, info
    blocks = len(_blocks(model.base_model, split))
    info.update(applied="eval", architecture=model_type, cut=cut, blocks=blocks,
                eval_mode=_prefix_names(model, split, cut))
    if mode == "eval" or cut == 0:
        if mode == "cache":
            info["notes"] = ["train.frozen_prefix cache: only the embeddings are below the first trainable block; "
                             "they run in eval mode, not cached (a lookup would cost what computing them does)"]
        return FrozenPrefixModel(model, split, cut).train(model.training), info

    started = time.perf_counter()
    stored = "first_token" if cut == blocks else "sequence"
    examples, keys, _ = _examples(splits, task.accepted)
    key = cache_key(cfg, model, split, cut, keys, stored, device)
    first_token = stored == "first_token"
    expected = torch.as_tensor([1 if first_token else len(e["input_ids"]) for e in examples])
    path = Path(cfg.data.cache_dir) / "frozen" / f"{key}.pt"
    payload, status, notes = load_or_compute(
        path, key, lambda lengths: torch.equal(lengths, expected),
        lambda: compute_features(model, split, cut, examples, task.collate, task.accepted, device,
                                 cfg.train.precision, cfg.train.eval_batch_size, first_token))
    lengths = payload["lengths"]
    values = torch.cat([payload["values"], payload["values"].new_zeros(1, payload["values"].shape[-1])])
    offsets = torch.cumsum(lengths, 0) - lengths
    index: dict[bytes, int] = {}
    for i, row in enumerate(keys):
        index.setdefault(row, i)  # identical token ids have identical hidden states
    features = FrozenFeatures(values, offsets, lengths, index)
    info.update(applied="cache", stored=stored, cache=status, cache_key=key, cache_file=str(path),
                cache_bytes=int(payload["values"].numel() * payload["values"].element_size()),
                cache_examples=len(examples), cache_s=time.perf_counter() - started)
    if notes:
        info["notes"] = notes
    return FrozenPrefixModel(model, split, cut, features).train(model.training), info
