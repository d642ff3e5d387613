"""Instruction finetuning of a causal LM: response-only loss, perplexity and closed-answer accuracy.

Evaluation never samples. The response loss is the mean negative log-likelihood per response token
(perplexity is its exponential); with a closed answer set (``instruct.format: labelled``) every candidate
answer is scored by its summed log-likelihood after the shared prompt, and the prediction is the most likely
one. The prompt is run once per example and its key/value cache is shared by the candidates, so scoring K
answers costs about one forward pass, not K. ``InstructTask`` plugs all this into the shared training loop of
``run/train.py`` (the contract: ``lora_bench.run.tasks.base.Task``); the models come from ``run/causal_lm.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from lora_bench.atomic import replace_atomically
from lora_bench.config import ConfigError, MethodConfig, ModelConfig, RunConfig
from lora_bench.run.causal_lm import load_causal_lm, load_causal_tokenizer
from lora_bench.run.data import macro_f1
from lora_bench.run.diagnostics import prediction_shape
from lora_bench.run.instruct_data import describe_instruct_splits, prepare_instruct_splits
from lora_bench.run.methods import builds_layer_by_layer
from lora_bench.run.predictions import ITEMS_KEY, dataset_example_ids, item_block
from lora_bench.run.tasks.base import Autocast

# transformers 5 renamed the key/value cache from ``past_key_values`` to ``cache`` (argument and output; the old
# argument is a deprecated alias until 5.40, and warns on every call), 4.x knows only the old name.
CACHE_KEYWORD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# ----------------------------------------------------------------------------------------------------
# Loss and scoring


def _decoder_and_head(model: nn.Module):
    """The transformer body and the output projection, so logits are computed only where they are needed."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None
    return (decoder, head) if decoder is not None and head is not None else (None, None)


def response_logits(model: nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions that predict a labelled token, and those tokens (shifted by one)."""
    targets = labels[:, 1:]
    keep = targets != -100
    decoder, head = _decoder_and_head(model)
    if decoder is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
        return logits[keep].float(), targets[keep]
    hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
    # The vocabulary projection is the largest single matrix of a small LM; apply it to response positions only.
    return head(hidden[keep]).float(), targets[keep]


def make_causal_collate(pad_id: int):
    def collate(batch: list[dict]) -> dict[str, torch.Tensor]:
        longest = max(len(example["input_ids"]) for example in batch)
        input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), longest), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    return collate


@torch.no_grad()
def score_candidates(model: nn.Module, prompts: list[list[int]], candidates: list[list[list[int]]], pad_id: int,
                     device, batch_size: int = 16, autocast=contextlib.nullcontext) -> list[list[float]]:
    """Summed log-likelihood of every candidate continuation after its prompt, without sampling.

    Prompts are left-padded (with explicit position ids) and run once; their key/value cache is repeated for
    the K candidates of each prompt, which are then scored in one batched pass.
    """
    model.eval()
    out: list[list[float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        cands = candidates[start:start + batch_size]
        k = len(cands[0])
        if any(len(c) != k for c in cands):
            raise ValueError("every prompt of a closed-answer task needs the same number of candidates")
        b, lp = len(chunk), max(len(p) for p in chunk)
        ids = torch.full((b, lp), pad_id, dtype=torch.long)
        mask = torch.zeros((b, lp), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, lp - len(prompt):] = torch.as_tensor(prompt)
            mask[row, lp - len(prompt):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
        with autocast():
            first = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1)
        first_logp = torch.log_softmax(first.logits[:, -1].float(), -1)  # [b, V]
        cache = getattr(first, CACHE_KEYWORD)
        cache.batch_repeat_interleave(k)
        flat = [c for row in cands for c in row]
        lc = max(len(c) for c in flat)
        cont = torch.full((b * k, lc), pad_id, dtype=torch.long)
        cont_mask = torch.zeros((b * k, lc), dtype=torch.long)
        for row, cand in enumerate(flat):
            cont[row, :len(cand)] = torch.as_tensor(cand)
            cont_mask[row, :len(cand)] = 1
        lengths = mask.sum(-1).repeat_interleave(k)
        cont_positions = lengths[:, None] + torch.arange(lc, device=device)[None]
        full_mask = torch.cat([mask.repeat_interleave(k, 0), cont_mask.to(device)], dim=1)
        cont = cont.to(device)
        with autocast():
            second = model(input_ids=cont, attention_mask=full_mask, position_ids=cont_positions,
                           use_cache=False, **{CACHE_KEYWORD: cache})
        logp = torch.log_softmax(second.logits.float(), -1)  # position j predicts token j + 1
        scores = first_logp.repeat_interleave(k, 0).gather(1, cont[:, :1]).squeeze(1)
        if lc > 1:
            later = logp[:, :-1].gather(2, cont[:, 1:, None]).squeeze(2)
            scores = scores + (later * cont_mask[:, 1:].to(device)).sum(-1)
        out += scores.view(b, k).cpu().tolist()
    return out


@torch.no_grad()
def response_loss(model: nn.Module, loader, device, autocast=contextlib.nullcontext) -> tuple[float, int]:
    """Summed response-token negative log-likelihood over ``loader`` and the number of response tokens."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        with autocast():
            logits, targets = response_logits(model, batch["input_ids"].to(device),
                                              batch["attention_mask"].to(device), batch["labels"].to(device))
        total += nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        count += int(targets.numel())
    return total, count


def closed_answer_metrics(scores: list[list[float]], gold: list[int], candidates: list[list[list[int]]]) -> dict:
    """Accuracy, macro-F1, and the response loss of the gold answers, from candidate log-likelihoods."""
    scores_arr = np.asarray(scores)
    predicted = scores_arr.argmax(1)
    gold_arr = np.asarray(gold)
    nll = -float(scores_arr[np.arange(len(gold_arr)), gold_arr].sum())
    tokens = sum(len(c[g]) for c, g in zip(candidates, gold))
    loss = nll / tokens
    return {"accuracy": float((predicted == gold_arr).mean()),
            "macro_f1": macro_f1(gold_arr, predicted),
            "loss": loss, "perplexity": math.exp(min(loss, 700.0)), **prediction_shape(gold_arr, predicted)}


def closed_answer_items(example_ids, scores: list[list[float]], gold: list[int]) -> dict:
    """Per-example results of closed-answer scoring: prediction, the gold answer's log-probability among the
    candidates (their log-likelihoods normalised over the answer set) and its summed token log-likelihood."""
    scores_arr = np.asarray(scores, dtype=np.float64)
    gold_arr = np.asarray(gold)
    rows = np.arange(len(gold_arr))
    normalised = scores_arr - np.logaddexp.reduce(scores_arr, axis=1, keepdims=True)
    return item_block(example_ids, gold_arr, scores_arr.argmax(1), normalised[rows, gold_arr],
                      scores_arr[rows, gold_arr])


# ----------------------------------------------------------------------------------------------------
# The task


def causal_method(method: MethodConfig) -> MethodConfig:
    """A causal LM has no classification head: its output layer is the (often tied) vocabulary projection,
    which stays frozen and, under QLoRA, unquantized."""
    return dataclasses.replace(method, train_classifier=False, head_patterns=method.head_patterns or ["lm_head"])


class InstructTask:
    """Instruction finetuning of a causal LM: response-only loss; loss, perplexity and closed-answer accuracy.

    Implements ``lora_bench.run.tasks.base.Task``; ``instruct.zero_shot`` says whether epoch 0 is evaluated.
    """

    name = "instruct"

    def __init__(self, cfg: RunConfig, device: torch.device, autocast: Autocast = contextlib.nullcontext):
        self.cfg, self.device, self.autocast = cfg, device, autocast
        self.zero_shot = cfg.instruct.zero_shot
        self.splits = None
        self.pad_id = 0
        self.collate = None

    @staticmethod
    def prepare_data(cfg: RunConfig) -> tuple[dict, dict]:
        tokenizer = load_causal_tokenizer(cfg.model, cfg.data.cache_dir)
        splits, info = prepare_instruct_splits(cfg.data, cfg.instruct, tokenizer, _tokenizer_id(cfg.model))
        return splits, describe_instruct_splits(splits, info)

    def load(self):
        splits, data_info = self.prepare_data(self.cfg)
        loaded = load_causal_lm(self.cfg.model, self.device, defer=builds_layer_by_layer(self.cfg.method),
                                cache_dir=self.cfg.data.cache_dir)
        limit = getattr(loaded.model.config, "max_position_embeddings", None)
        if limit is not None and self.cfg.data.max_length > limit:
            raise ConfigError(f"{self.cfg.source}: data.max_length {self.cfg.data.max_length} is longer than model "
                              f"{self.cfg.model.name!r} accepts ({limit} positions); set data.max_length <= {limit}")
        if self.cfg.instruct.lm_eval.tasks:
            check_lm_eval()
        tokenizer = loaded.tokenizer
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.tokenizer = tokenizer
        self.splits = splits
        self.data_cache = data_info.get("cache")
        self.collate = make_causal_collate(self.pad_id)
        return loaded, splits, data_info

    def method(self, method: MethodConfig) -> MethodConfig:
        return causal_method(method)

    def zero_shot_metrics(self, compute: Callable[[], dict]) -> dict:
        """The epoch-0 evaluation, reused across runs that evaluate the same model on the same data.

        LoRA starts with B = 0, so before training every variant and seed of a (model, data, quantization)
        computes exactly the base model; a study's zero-shot evaluation is done once and read back by the
        other runs from ``<data.cache_dir>/zero_shot/<key>.json`` (its entry says ``zero_shot_cache``).
        """
        cfg = self.cfg
        quant = cfg.method.quant.__dict__ if cfg.method.name == "qlora" else None
        if cfg.method.name not in ("lora", "qlora"):
            return compute()  # other methods leave nothing to share reliably
        key = hashlib.sha256(json.dumps({
            "model": cfg.model.__dict__, "data_cache": self.data_cache, "method": cfg.method.name, "quant": quant,
            "precision": cfg.train.precision, "device": self.device.type, "eval_train": cfg.train.eval_train,
            # Thread count and eval batching change float summation order, so a cached result is reused
            # only where recomputing it would give the same bits.
            "threads": torch.get_num_threads(), "eval_batch_size": cfg.train.eval_batch_size,
            # A random-weights model is drawn from the run's seed: runs of another seed evaluate another model
            # (sharing across seeds made the cached value depend on which run finished first).
            "seed": cfg.seed if cfg.model.source == "random" else None,
            "version": 2,
        }, sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = Path(cfg.data.cache_dir) / "zero_shot" / f"{key}.json"
        if path.is_file():
            try:
                return {**json.loads(path.read_text()), "zero_shot_cache": str(path)}
            except (OSError, json.JSONDecodeError):
                pass  # a damaged file is recomputed and replaced
        metrics = compute()
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(metrics)))
        return metrics

    def loss(self, model: nn.Module, batch: dict):
        with self.autocast():
            logits, targets = response_logits(model, batch["input_ids"].to(self.device),
                                              batch["attention_mask"].to(self.device), batch["labels"].to(self.device))
        loss = nn.functional.cross_entropy(logits, targets)
        # The epoch's train loss is a mean per response token, so it is weighted by tokens.
        return loss, int(targets.numel()), len(batch["input_ids"]), int(batch["attention_mask"].sum())

    def evaluate(self, model: nn.Module, split: str) -> dict:
        data = self.splits[split]
        if "candidates" in data.column_names:
            prompts = [ids[:n] for ids, n in zip(data["input_ids"], data["prompt_len"])]
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
            candidates = data["candidates"]
            scores = score_candidates(model, [prompts[i] for i in order], [candidates[i] for i in order],
                                      self.pad_id, self.device, self.cfg.train.eval_batch_size, self.autocast)
            unsorted = [None] * len(order)
            for position, i in enumerate(order):
                unsorted[i] = scores[position]
            metrics = closed_answer_metrics(unsorted, data["answer"], candidates)
            ids = dataset_example_ids(data)
            if ids is not None:
                metrics[ITEMS_KEY] = closed_answer_items(ids, unsorted, data["answer"])
            return metrics
        columns = data.select_columns(["input_ids", "labels"])
        order = sorted(range(len(columns)), key=lambda i: len(columns[i]["input_ids"]))
        loader = torch.utils.data.DataLoader(columns.select(order), batch_size=self.cfg.train.eval_batch_size,
                                             collate_fn=self.collate)
        total, count = response_loss(model, loader, self.device, self.autocast)
        loss = total / max(count, 1)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    @staticmethod
    def select(record: dict) -> tuple:
        """Best epoch: highest validation accuracy (closed answers), else lowest validation loss."""
        if "validation_accuracy" in record:
            return (record["validation_accuracy"], -record["epoch"])
        return (-record.get("validation_loss", math.inf), -record["epoch"])

    def after_training(self, model: nn.Module) -> dict:
        """Extra final metrics: the LM evaluation harness on ``instruct.lm_eval.tasks`` (GPU profiles)."""
        if not self.cfg.instruct.lm_eval.tasks:
            return {}
        return run_lm_eval(model, self.tokenizer, self.cfg.instruct.lm_eval)


def _tokenizer_id(spec: ModelConfig) -> str:
    return f"causal:{spec.source}:{spec.name}:{spec.gguf_file or ''}"


def check_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise ConfigError("instruct.lm_eval.tasks needs the optional extra lm-eval: pip install 'lora-bench[lm-eval]'"
                          " (and Hub access for its task data)") from exc


def run_lm_eval(model: nn.Module, tokenizer, lm_cfg) -> dict:  # pragma: no cover - needs lm-eval, Hub and a GPU
    """Accuracy-like metrics of the LM evaluation harness, as {task: {metric: value}}."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=lm_cfg.batch_size)
    results = simple_evaluate(model=lm, tasks=list(lm_cfg.tasks), limit=lm_cfg.limit)["results"]
    out = {}
    for task, values in results.items():
        out[task] = {key.split(",")[0]: float(v) for key, v in values.items()
                     if isinstance(v, (int, float)) and "stderr" not in key}
    return {"lm_eval": out}


__all__ = ["InstructTask", "causal_method", "response_logits", "score_candidates"]
