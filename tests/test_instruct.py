"""Instruction finetuning of causal LMs: the response-only loss mask, prompt templates, named errors for bad
records, log-likelihood scoring, GGUF loading, and a tiny Llama that learns with LoRA."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lora_bench.adapters.lora import count_parameters
from lora_bench.config import ConfigError, InstructConfig, ModelConfig, RunConfig
from lora_bench.run.causal_lm import causal_tiny_tokenizer, load_causal_lm
from lora_bench.run.data import DataError
from lora_bench.run.instruct_data import Record, add_noise, encode, load_records, pack, prepare_instruct_splits
from lora_bench.run.methods import prepare_model
from lora_bench.run.tasks.instruct import InstructTask, closed_answer_metrics, score_candidates
from lora_bench.run.train import run_training

# A minimal ChatML-like template (as SmolLM2's), so the chat path runs without a download.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}[SEP]{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _write_jsonl(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _data_spec(name: str, tmp_path, **over):
    raw = {"data": {"source": "local", "name": name, "cache_dir": str(tmp_path / "cache"), "max_length": 128,
                    "split": {"train": 0.5, "validation": 0.25, "test": 0.25}, **over}}
    return RunConfig.from_dict(raw).data


# ----------------------------------------------------------------------------------------------------
# Config


def test_classification_configs_are_unchanged_by_the_task_keys():
    # A finished classification run's resolved config (a Snakemake params value) must not change.
    out = RunConfig.from_dict({}).to_dict()
    assert "task" not in out and "instruct" not in out and "gguf_file" not in out["model"]
    cfg = RunConfig.from_dict({"task": "instruct", "model": {"source": "local", "name": "x.gguf"}})
    assert cfg.to_dict()["instruct"]["format"] == "labelled"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_instruct_key_is_a_named_error():
    with pytest.raises(ConfigError, match="instruct"):
        RunConfig.from_dict({"task": "instruct", "instruct": {"answer_set": ["a", "b"]}})
    with pytest.raises(ConfigError, match="answer twice"):
        RunConfig.from_dict({"task": "instruct", "instruct": {"answers": ["yes", "yes"]}})


# ----------------------------------------------------------------------------------------------------
# Prompts and the loss mask


def test_response_only_mask_covers_exactly_the_prompt():
    tokenizer = causal_tiny_tokenizer()
    messages = [{"role": "user", "content": "is it good?"}, {"role": "assistant", "content": "yes"}]
    encoded = encode(tokenizer, messages, chat=False)
    prompt = tokenizer("### Instruction:\nis it good?\n\n### Response:\n", add_special_tokens=False)["input_ids"]
    response = tokenizer("yes", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert encoded["input_ids"] == prompt + response
    masked = [i for i, label in enumerate(encoded["labels"]) if label == -100]
    assert masked == list(range(len(prompt)))  # the masked positions are exactly the prompt
    assert encoded["labels"][len(prompt):] == response
    assert encoded["prompt_len"] == len(prompt)
    everything = encode(tokenizer, messages, chat=False, response_only_loss=False)
    assert everything["labels"] == everything["input_ids"]


def test_chat_template_path_masks_the_templated_prompt():
    tokenizer = causal_tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and?"}, {"role": "assistant", "content": "done"}]
    encoded = encode(tokenizer, messages, chat=True)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    pieces = [(ids("<user>hi[SEP]<assistant>"), False), (ids("ok[SEP]"), True),
              (ids("<user>and?[SEP]<assistant>"), False), (ids("done[SEP]"), True)]
    assert encoded["input_ids"] == [t for piece, _ in pieces for t in piece]
    assert encoded["labels"] == [t if response else -100 for piece, response in pieces for t in piece]
    # Scoring conditions on everything before the last response.
    assert encoded["prompt_len"] == sum(len(p) for p, _ in pieces[:3])


def test_chat_template_that_is_not_prefix_stable_is_a_named_error():
    tokenizer = causal_tiny_tokenizer()
    # Puts a count of the messages first: a shorter conversation is not a prefix of a longer one.
    tokenizer.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="instruct.template: plain"):
        encode(tokenizer, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], chat=True)


# ----------------------------------------------------------------------------------------------------
# Records


def test_malformed_instruction_records_are_named_by_file_and_row(tmp_path):
    rows = [{"instruction": "say a", "input": "", "output": "a"}] * 6
    rows = [*rows[:2], {"instruction": "say b", "input": ""}, {"instruction": "  ", "output": "x"}, *rows[2:]]
    path = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    spec = _data_spec(path, tmp_path)
    with pytest.raises(DataError, match=r"alpaca\.jsonl, row 3: missing field 'output'"):
        load_records(spec, InstructConfig(format="alpaca", bad_records="error"))
    pool = load_records(spec, InstructConfig(format="alpaca", bad_records="skip"))
    assert [(bad.row, bad.reason) for bad in pool.skipped] == [(3, "missing field 'output'"),
                                                              (4, "field 'instruction' is empty")]
    assert sum(len(records) for records in pool.splits.values()) == 6

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl, line 2: not valid JSON"):
        load_records(_data_spec(str(broken), tmp_path), InstructConfig(format="alpaca"))

    turns = [{"conversations": ["q", "a"]}] * 4 + [{"conversations": ["q", ""]},
                                                   {"conversations": [{"from": "robot", "value": "x"}]}]
    conv = _write_jsonl(tmp_path / "lima.jsonl", turns)
    with pytest.raises(DataError, match=r"lima\.jsonl, row 5: field 'conversations\[1\]' is empty"):
        load_records(_data_spec(conv, tmp_path), InstructConfig(format="conversation", bad_records="error"))
    pool = load_records(_data_spec(conv, tmp_path), InstructConfig(format="conversation"))
    assert [bad.row for bad in pool.skipped] == [5, 6] and "speaker 'robot'" in pool.skipped[1].reason


def test_conversation_formats_lima_sharegpt_and_chat(tmp_path):
    rows = [{"conversations": ["hello", "hi there", "how are you", "fine"]},
            {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                               {"role": "assistant", "content": "a"}, {"role": "user", "content": "dangling"}]},
            {"conversations": ["x", "y"]}]
    spec = _data_spec(_write_jsonl(tmp_path / "c.jsonl", rows), tmp_path)
    pool = load_records(spec, InstructConfig(format="auto"))
    by_row = {r.row: r.messages for records in pool.splits.values() for r in records}
    assert [m["role"] for m in by_row[1]] == ["user", "assistant", "user", "assistant"]
    assert by_row[2] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert [m["role"] for m in by_row[3]] == ["system", "user", "assistant"]  # the unanswered turn is dropped


def test_too_long_records_are_skipped_or_rejected(tmp_path):
    rows = [{"instruction": "say a", "output": "a"}] * 8 + [{"instruction": "x " * 100, "output": "a"}]
    path = _write_jsonl(tmp_path / "long.jsonl", rows)
    spec = _data_spec(path, tmp_path, max_length=64, split={"train": 0.6, "validation": 0.2, "test": 0.2})
    tokenizer = causal_tiny_tokenizer()
    with pytest.raises(DataError, match=r"long\.jsonl, row 9: is \d+ tokens long, longer than data.max_length 64"):
        prepare_instruct_splits(spec, InstructConfig(format="alpaca", bad_records="error"), tokenizer, "tiny")
    splits, info = prepare_instruct_splits(spec, InstructConfig(format="alpaca"), tokenizer, "tiny")
    assert info["skipped"] == 1 and "row 9" in info["skipped_records"][0]
    assert sum(len(splits[name]) for name in splits) == 8


def test_noise_gives_the_configured_fraction_wrong_answers():
    answers = ["negative", "positive"]
    records = [Record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": answers[i % 2]}],
                      "x", i, i % 2) for i in range(40)]
    changed = add_noise(records, 0.25, seed=3, answers=answers)
    wrong = [r for i, r in enumerate(records) if r.answer != i % 2]
    assert changed == len(wrong) == 10
    assert all(r.messages[-1]["content"] == answers[r.answer] for r in records)
    free = [Record([{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}], "x", i)
            for i in range(10)]
    assert add_noise(free, 0.5, seed=0, answers=None) == 5
    assert sum(r.messages[-1]["content"] != f"a{r.row}" for r in free) == 5


def test_packing_keeps_every_token_and_respects_the_length():
    columns = {"input_ids": [[1] * 5, [2] * 7, [3] * 4, [4] * 9], "labels": [[-100] * 5, [2] * 7, [3] * 4, [4] * 9]}
    packed = pack(columns, 12)
    assert all(len(row) <= 12 for row in packed["input_ids"])
    assert sum(packed["input_ids"], []) == sum(columns["input_ids"], [])
    assert sum(packed["labels"], []) == sum(columns["labels"], [])


# ----------------------------------------------------------------------------------------------------
# Scoring


def _tiny_llama():
    torch.manual_seed(0)
    return load_causal_lm(ModelConfig("random", "tiny-llama", "float32")).model.eval()


# The cache goes in under the name this transformers expects: a deprecated alias would warn on every batch.
@pytest.mark.filterwarnings("error::FutureWarning")
def test_shared_prefix_scoring_equals_scoring_each_sequence():
    model = _tiny_llama()
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 60, (n,), generator=generator).tolist() for n in (7, 12, 3, 9)]
    candidates = [[torch.randint(5, 60, (n,), generator=generator).tolist() for n in (1, 3)] for _ in prompts]
    fast = score_candidates(model, prompts, candidates, pad_id=0, device="cpu", batch_size=3)
    with torch.no_grad():
        for prompt, options, scores in zip(prompts, candidates, fast):
            for option, score in zip(options, scores):
                logp = torch.log_softmax(model(torch.tensor([prompt + option])).logits[0], -1)
                expected = sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(option))
                assert score == pytest.approx(expected, abs=1e-4)


def test_log_likelihood_scoring_picks_the_answer_the_model_prefers():
    model = _tiny_llama()
    preferred, other = 17, 23
    with torch.no_grad():
        # Blocks add nothing (zero output projections), so the final hidden state is the normalised token
        # embedding; every embedding has a large positive first coordinate and only the preferred token's
        # output row reads it: the model prefers that token after any prompt.
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 10.0
        model.lm_head.weight.zero_()
        model.lm_head.weight[preferred, 0] = 5.0
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    candidates = [[[preferred], [other]], [[other], [preferred]], [[other, other], [preferred, preferred]]]
    scores = score_candidates(model, prompts, candidates, pad_id=0, device="cpu")
    assert [int(np.argmax(s)) for s in scores] == [0, 1, 1]
    metrics = closed_answer_metrics(scores, [0, 1, 1], candidates)
    assert metrics["accuracy"] == 1.0 and metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]))
    assert closed_answer_metrics(scores, [1, 0, 0], candidates)["accuracy"] == 0.0


# ----------------------------------------------------------------------------------------------------
# Models


def test_gguf_file_loads(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    path = tmp_path / "tiny.gguf"
    # Only a missing gguf package skips; an error of our own writer below is a failure, not a skip.
    _write_tiny_llama_gguf(gguf, path)
    loaded = load_causal_lm(ModelConfig("local", str(path), "float32"))
    assert loaded.info["gguf"]["tensor_types"]["F32"] > 0 and not loaded.info["gguf"]["dequantized_from_4bit"]
    model = loaded.model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1
    torch.testing.assert_close(model.model.layers[0].self_attn.v_proj.weight,
                               torch.from_numpy(_TINY_WEIGHTS["blk.0.attn_v.weight"]))
    ids = loaded.tokenizer("ab", add_special_tokens=False)["input_ids"]
    assert model(torch.tensor([ids])).logits.shape[-1] == 8


def test_gguf_conversion_is_cached_and_gives_the_same_model(tmp_path, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    from lora_bench.run import causal_lm

    path = tmp_path / "tiny.gguf"
    _write_tiny_llama_gguf(gguf, path)
    spec, cache = ModelConfig("local", str(path), "float32"), tmp_path / "cache"
    direct = load_causal_lm(spec)
    conversions = []
    real = causal_lm._from_pretrained

    def counting(where, gguf_file, *rest):
        if gguf_file:
            conversions.append(gguf_file)
        return real(where, gguf_file, *rest)

    monkeypatch.setattr(causal_lm, "_from_pretrained", counting)
    first, second = load_causal_lm(spec, cache_dir=cache), load_causal_lm(spec, cache_dir=cache)
    tokenizer = causal_lm.load_causal_tokenizer(spec, cache_dir=cache)
    assert conversions == ["tiny.gguf"]  # converted once; the second model and the tokenizer read the folder
    folder = Path(first.info["gguf_cache"])
    assert folder.parent == cache / "gguf" and second.info["gguf_cache"] == str(folder)
    assert first.info["gguf"] == direct.info["gguf"]
    expected = direct.model.state_dict()
    for loaded in (first, second):
        got = loaded.model.state_dict()
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    texts = ["ab c", "bcab", "a b c"]
    for candidate in (first.tokenizer, tokenizer):
        assert candidate(texts)["input_ids"] == direct.tokenizer(texts)["input_ids"]
        assert candidate.pad_token_id == direct.tokenizer.pad_token_id
    ids = torch.tensor([direct.tokenizer("abc", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, direct.model(ids).logits)
    # Another dtype or another file content is another conversion; the first one stays.
    load_causal_lm(ModelConfig("local", str(path), "bfloat16"), cache_dir=cache)
    _TINY_SEED[0] = 1
    _write_tiny_llama_gguf(gguf, path)
    changed = load_causal_lm(spec, cache_dir=cache)
    assert conversions == ["tiny.gguf"] * 3 and len(list((cache / "gguf").iterdir())) == 3 and folder.is_dir()
    torch.testing.assert_close(changed.model.model.layers[0].self_attn.v_proj.weight,
                               torch.from_numpy(_TINY_WEIGHTS["blk.0.attn_v.weight"]))


def test_prune_cache_removes_only_conversions_no_run_can_read(tmp_path, capsys, monkeypatch):
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
    from lora_bench.cli import main
    from lora_bench.run import causal_lm

    path, cache = tmp_path / "tiny.gguf", tmp_path / "cache"
    _write_tiny_llama_gguf(gguf, path)
    spec = ModelConfig("local", str(path), "float32")
    replaced = Path(load_causal_lm(spec, cache_dir=cache).info["gguf_cache"])
    monkeypatch.setattr(sys.modules[__name__], "_TINY_SEED", [_TINY_SEED[0] + 1])  # the file is replaced
    _write_tiny_llama_gguf(gguf, path)
    current = Path(load_causal_lm(spec, cache_dir=cache).info["gguf_cache"])
    other_dtype = Path(load_causal_lm(ModelConfig("local", str(path), "bfloat16"), cache_dir=cache).info["gguf_cache"])
    # A conversion by another transformers version, and one from before folders recorded their key.
    old_version = other_dtype.with_name(other_dtype.name + "-old")
    shutil.copytree(other_dtype, old_version)
    key = json.loads((old_version / causal_lm.GGUF_KEY_FILE).read_text())
    (old_version / causal_lm.GGUF_KEY_FILE).write_text(json.dumps({**key, "transformers": "0.0.1"}))
    unkeyed = shutil.copytree(other_dtype, other_dtype.with_name("tiny-unkeyed"))
    (unkeyed / causal_lm.GGUF_KEY_FILE).unlink()

    reasons = dict(causal_lm.stale_gguf_conversions(cache))
    assert set(reasons) == {replaced, old_version, unkeyed}
    assert "has changed" in reasons[replaced] and "transformers 0.0.1" in reasons[old_version]
    assert main(["prune-cache", "--cache-dir", str(cache), "--dry-run"]) == 0
    assert all(folder.is_dir() for folder in reasons) and capsys.readouterr().out.count("would remove") == 3
    assert main(["prune-cache", "--cache-dir", str(cache)]) == 0
    assert sorted((cache / "gguf").iterdir()) == sorted([other_dtype, current])
    assert causal_lm.stale_gguf_conversions(cache) == []
    # What is left still loads without converting again.
    assert load_causal_lm(spec, cache_dir=cache).info["gguf_cache"] == str(current)


_TINY_WEIGHTS: dict[str, np.ndarray] = {}
_TINY_SEED = [0]


def _write_tiny_llama_gguf(gguf, path) -> None:
    """A 1-layer Llama with an 8-token BPE vocabulary, every tensor F32 (so the values can be compared)."""
    rng = np.random.default_rng(_TINY_SEED[0])
    hidden, ffn, vocab = 8, 16, 8
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(32)
    writer.add_embedding_length(hidden)
    writer.add_block_count(1)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // 2)
    writer.add_tokenizer_model("gpt2")
    tokens = ["<s>", "</s>", "a", "b", "c", "ab", "bc", " "]
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 1, 1, 1, 1, 1, 1])
    writer.add_token_merges(["a b", "b c"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    shapes = {
        "token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden),
        "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_k.weight": (hidden, hidden),
        "blk.0.attn_v.weight": (hidden, hidden), "blk.0.attn_output.weight": (hidden, hidden),
        "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    for name, shape in shapes.items():
        values = (np.ones(shape) if name.endswith("norm.weight") else rng.normal(0, 0.1, shape)).astype(np.float32)
        _TINY_WEIGHTS[name] = values
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_coverage_presets_and_qlora_on_the_causal_model():
    cfg = RunConfig.from_dict({"task": "instruct", "method": {"lora": {"rank": 2, "targets": ["query", "value"]}}})
    task = InstructTask(cfg, torch.device("cpu"))
    model = _tiny_llama()
    info = prepare_model(model, task.method(cfg.method))
    # tiny-llama: 2 blocks, hidden 32, 4 heads, 2 KV heads (v_proj 32 -> 16).
    assert count_parameters(model)[0] == 2 * (2 * (32 + 32) + 2 * (32 + 16)) and info["fully_trained"] == []
    every = RunConfig.from_dict({"task": "instruct", "method": {
        "name": "qlora", "lora": {"rank": 2, "targets": ["query", "key", "value", "projection", "mlp"]}}})
    model = _tiny_llama()
    info = prepare_model(model, task.method(every.method))
    assert len(info["lora_modules"]) == 2 * 7
    assert "lm_head" not in info["quantized_frozen"] and type(model.lm_head) is torch.nn.Linear
    assert model(torch.tensor([[5, 6, 7]])).logits.shape == (1, 3, 128)


# ----------------------------------------------------------------------------------------------------
# Training


def _learnable_alpaca(path, n: int = 96) -> str:
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(list("abc"), size=3))
        rows.append({"instruction": f"repeat {word}", "input": "", "output": word})
    return _write_jsonl(path, rows)


def _instruct_run(tmp_path, data: dict, **train) -> dict:
    return {
        "task": "instruct",
        "model": {"source": "random", "name": "tiny-llama"},
        "data": {"cache_dir": str(tmp_path / "cache"), "max_length": 64, **data},
        "method": {"name": "lora", "lora": {"rank": 4, "alpha": 8, "targets": ["query", "key", "value",
                                                                          "projection", "mlp"]}},
        "train": {"epochs": 3, "batch_size": 8, "lr": 2.0e-2, "device": "cpu", "threads": 1, "progress": "never",
                  "eval_train": False, "schedule": "constant", **train},
    }


def test_tiny_llama_learns_instructions_with_lora(tmp_path):
    path = _learnable_alpaca(tmp_path / "repeat.jsonl")
    raw = _instruct_run(tmp_path, {"source": "local", "name": path}, lr=5.0e-2)
    raw["instruct"] = {"format": "alpaca"}
    result = run_training(RunConfig.from_dict(raw))
    epochs = result.metrics["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1, 2, 3]  # epoch 0 = zero-shot, before training
    assert "train_loss" not in epochs[0]
    # A random tiny Llama's frozen output layer (init std 0.02) bounds how far its logits can move, so the
    # loss cannot fall far; that it falls clearly below the zero-shot loss is the point.
    losses = [e["validation_loss"] for e in epochs]
    assert losses[-1] < losses[0] - 0.15 and min(losses[1:]) < losses[0], losses
    assert epochs[-1]["test_perplexity"] == pytest.approx(math.exp(epochs[-1]["test_loss"]))
    assert result.metrics["selected_epoch"] == min(epochs[1:], key=lambda e: e["validation_loss"])["epoch"]
    assert result.data_info["template"] == "plain" and result.data_info["skipped"] == 0
    assert result.params["trainable"] == 2 * 4 * (2 * (32 + 32) + 2 * (32 + 16) + 3 * (32 + 64))


def test_closed_answer_task_on_labelled_data_records_zero_shot_and_gain(sentiment_csv, tmp_path):
    raw = _instruct_run(tmp_path, {"source": "local", "name": str(sentiment_csv), "max_length": 128},
                        epochs=1, lr=1.0e-2)
    raw["instruct"] = {"question": "good or bad?", "noise_fraction": 0.25, "packing": True}
    result = run_training(RunConfig.from_dict(raw))
    zero, trained = result.metrics["epochs"]
    assert {"test_accuracy", "test_macro_f1", "test_loss", "test_perplexity"} <= set(zero)
    assert result.data_info["answers"] == ["0", "1"] and result.data_info["noisy_train_records"] > 0
    assert result.data_info["sizes"]["train"] < result.data_info["examples"]["train"]  # packed rows

    from lora_bench.analysis.tables import record_rows
    from lora_bench.run.record import base_record

    record = {**base_record(RunConfig.from_dict(raw).to_dict(), {"family": "f", "variant": "v", "seed": 0}),
              "status": "ok", "metrics": result.metrics}
    _, rows = record_rows(record, tmp_path / "r.json")
    frame = pd.DataFrame(rows)
    zero_rows = frame[frame["stage"] == "zero_shot"]
    assert set(zero_rows["epoch"]) == {0} and "accuracy" in set(zero_rows["metric"])
    gain = frame[(frame["metric"] == "accuracy_gain") & (frame["split"] == "test")]["value"].item()
    assert gain == pytest.approx(trained["test_accuracy"] - zero["test_accuracy"])


def test_zero_shot_evaluation_is_shared_by_runs_of_the_same_model_and_data(sentiment_csv, tmp_path):
    raw = _instruct_run(tmp_path, {"source": "local", "name": str(sentiment_csv), "max_length": 128}, epochs=1)
    first = run_training(RunConfig.from_dict(raw)).metrics["epochs"][0]
    raw["method"]["lora"]["rank"] = 2  # another rank: still the untouched base model
    second = run_training(RunConfig.from_dict(raw)).metrics["epochs"][0]
    assert "zero_shot_cache" not in first and second.pop("zero_shot_cache").endswith(".json")
    assert second == first
    # A random-weights model is drawn from the run's seed: another seed is another model, evaluated anew.
    raw["seed"] = 1
    assert "zero_shot_cache" not in run_training(RunConfig.from_dict(raw)).metrics["epochs"][0]
    raw["train"]["eval_batch_size"] = 3  # other batching sums in another order: recomputed, not reused
    assert "zero_shot_cache" not in run_training(RunConfig.from_dict(raw)).metrics["epochs"][0]
    raw["method"]["name"] = "qlora"  # a 4-bit base model is another model
    third = run_training(RunConfig.from_dict(raw)).metrics["epochs"][0]
    assert "zero_shot_cache" not in third


def test_instruct_claims_pair_variants_by_their_configs():
    from lora_bench.analysis.claims import instruct_claims

    variants = {
        "lora": {"cfg.method.lora.targets": "query+value", "cfg.method.lora.rank": 8, "cfg.method.lora.alpha": 16,
                 "cfg.train.optimizer": "adamw", "cfg.train.schedule": "cosine", "cfg.train.epochs": 1},
        "epochs3": {"cfg.train.epochs": 3},
        "large-noisy": {"cfg.instruct.noise_fraction": 0.3},
        "all-layers": {"cfg.method.lora.targets": "query+key+value+projection+mlp"},
        "alpha-r": {"cfg.method.lora.alpha": 8},
        "sgd-constant": {"cfg.train.optimizer": "sgd", "cfg.train.schedule": "constant"},
        "sgd-cosine": {"cfg.train.optimizer": "sgd"},
    }
    base = {"cfg.method.name": "lora", "cfg.instruct.noise_fraction": 0.0, **variants["lora"]}
    effects = {"lora": 0.0, "epochs3": 0.0, "large-noisy": -0.1, "all-layers": 0.05, "alpha-r": 0.0,
               "sgd-constant": -0.2, "sgd-cosine": -0.05}
    runs, metrics = [], []
    for variant, changes in variants.items():
        for seed in range(4):
            label = {"family": "ins", "family_kind": "instruct", "variant": variant, "seed": seed,
                     "is_baseline": variant == "lora", "status": "ok"}
            runs.append({**label, **base, **changes})
            value = 0.7 + effects[variant] + 0.01 * seed
            metrics.append({**label, "metric": "accuracy", "split": "test", "stage": "final", "epoch": 1,
                            "value": value, "unit": "fraction", "higher_is_better": True})
            if variant == "epochs3":
                for epoch, drop in ((1, 0.0), (2, -0.03 - 0.002 * seed), (3, -0.05)):
                    metrics.append({**metrics[-1], "stage": "epoch", "epoch": epoch, "value": value + drop})
    claims = instruct_claims(pd.DataFrame(metrics), pd.DataFrame(runs)).set_index("claim")
    assert claims.loc["epochs", "comparison"] == "epochs3@epoch1 vs epochs3@epoch2"
    assert claims.loc["data_quality", "comparison"] == "lora vs large-noisy"
    assert claims.loc["coverage", "comparison"] == "all-layers vs lora"
    assert claims.loc["alpha", "comparison"] == "lora vs alpha-r"
    assert claims.loc["cosine_sgd", "comparison"] == "sgd-cosine vs sgd-constant"
    assert claims.loc["data_quality", "diff"] == pytest.approx(0.1)
    assert claims.loc["data_quality", "support"] == "not shown"  # constant differences: no t test possible
    assert (claims["p_holm"].dropna() >= claims["p_value"].dropna()).all()
    assert claims.loc["epochs", "support"] == "supported" and claims.loc["epochs", "n_pairs"] == 4
    # What each claim's test could find: positive where the paired differences vary, undefined where they do not.
    assert 0 < claims.loc["epochs", "detectable_diff"] < 0.03
    assert np.isnan(claims.loc["data_quality", "detectable_diff"])


def test_the_epochs_claim_uses_a_variant_that_tested_every_epoch():
    """A 2-epoch baseline that tests once (at the selected epoch) cannot give epoch 2 vs epoch 1: the claim
    takes the epochs variant that tested after every epoch, and the baseline when it is the one that did."""
    from lora_bench.analysis.claims import instruct_pairs

    def runs(baseline_tests_each: bool) -> pd.DataFrame:
        rows = [{"family": "ins", "family_kind": "instruct", "variant": "lora", "seed": 0, "is_baseline": True,
                 "status": "ok", "cfg.train.epochs": 2, "cfg.train.test_every_epoch": baseline_tests_each},
                {"family": "ins", "family_kind": "instruct", "variant": "epochs3", "seed": 0, "is_baseline": False,
                 "status": "ok", "cfg.train.epochs": 3, "cfg.train.test_every_epoch": True}]
        return pd.DataFrame(rows)

    assert instruct_pairs(runs(False), "ins")["epochs"][0] == ("epochs3", 1)
    only_baseline = runs(True)
    only_baseline.loc[1, "cfg.train.test_every_epoch"] = False
    assert instruct_pairs(only_baseline, "ins")["epochs"][0] == ("lora", 1)
    neither = runs(False)
    neither.loc[1, "cfg.train.test_every_epoch"] = False
    assert "epochs" not in instruct_pairs(neither, "ins")


def test_the_epochs_claim_prefers_separate_one_and_two_epoch_runs_that_differ_in_nothing_else():
    """The reference compared a run of one epoch with a run of two, each with its whole schedule: when a family has
    such a pair (rates may differ, each tuned) the claim reads the one-epoch run after epoch 1 against the two-epoch
    run after epoch 2, not epochs 1 and 2 of one longer run; a pair that differs in anything else is no such pair."""
    from lora_bench.analysis.claims import instruct_claims, instruct_pairs

    base = {"family": "ins", "family_kind": "instruct", "status": "ok", "cfg.method.name": "lora",
            "cfg.train.test_every_epoch": True, "cfg.data.max_examples.train": 288, "cfg.train.schedule": "cosine"}
    rows = [{**base, "variant": "lora", "is_baseline": True, "cfg.train.epochs": 3, "cfg.train.test_every_epoch": False,
             "cfg.data.max_examples.train": 96, "cfg.train.lr": 5e-4},
            {**base, "variant": "epochs3", "is_baseline": False, "cfg.train.epochs": 3, "cfg.train.lr": 1e-3},
            {**base, "variant": "epochs1", "is_baseline": False, "cfg.train.epochs": 1, "cfg.train.lr": 1.5e-3},
            {**base, "variant": "epochs2", "is_baseline": False, "cfg.train.epochs": 2, "cfg.train.lr": 5e-4}]
    runs = pd.DataFrame([{**row, "seed": seed, "cfg.seed": seed} for row in rows for seed in range(3)])
    assert instruct_pairs(runs, "ins")["epochs"] == (("epochs1", 1), ("epochs2", 2), "epoch")

    # Read at epoch 2 of the two-epoch runs, whichever epoch their validation selected: a planted drop is found.
    metrics = []
    for row in runs.to_dict("records"):
        label = {k: row[k] for k in ("family", "family_kind", "variant", "seed", "is_baseline", "status")}
        metric = {**label, "metric": "accuracy", "split": "test", "unit": "fraction", "higher_is_better": True}
        for epoch in range(1, int(row["cfg.train.epochs"]) + 1):
            value = 0.8 + 0.01 * row["seed"] - (0.05 + 0.003 * row["seed"] if row["variant"] == "epochs2"
                                                 and epoch == 2 else 0.0)
            metrics.append({**metric, "stage": "epoch", "epoch": epoch, "value": value})
        metrics.append({**metric, "stage": "final", "epoch": 1, "value": 0.8 + 0.01 * row["seed"]})
    claim = instruct_claims(pd.DataFrame(metrics), runs).set_index("claim").loc["epochs"]
    assert claim["comparison"] == "epochs1@epoch1 vs epochs2@epoch2"
    assert claim["diff"] == pytest.approx(0.053) and claim["test_support"] == "supported"

    for key, other in (("cfg.data.max_examples.train", 96), ("cfg.train.schedule", "constant"),
                       ("cfg.train.test_every_epoch", False)):
        changed = runs.copy()
        changed.loc[changed["variant"] == "epochs2", key] = other
        # Not alike: back to epochs 1 and 2 of the run that tested every epoch.
        assert instruct_pairs(changed, "ins")["epochs"][:2] == (("epochs3", 1), ("epochs3", 2)), key


def test_per_epoch_report_shows_only_variants_tested_after_every_epoch():
    """A baseline that tests once has one test value per seed, at whichever epoch its validation picked; listed
    per epoch (or drawn as a line) it would read as a curve with n = 1-2. Only the epochs variant has a curve."""
    from lora_bench.analysis.claims import instruct_claims
    from lora_bench.report import figures
    from lora_bench.report.sections.instruct import instruct_section

    runs, metrics = [], []
    for variant, epochs, every in (("lora", 2, False), ("epochs3", 3, True)):
        for seed in range(3):
            label = {"family": "ins", "family_kind": "instruct", "variant": variant, "seed": seed,
                     "is_baseline": variant == "lora", "status": "ok"}
            runs.append({**label, "cfg.method.name": "lora", "cfg.train.epochs": epochs,
                         "cfg.train.test_every_epoch": every})
            row = {**label, "metric": "accuracy", "split": "test", "unit": "fraction", "higher_is_better": True}
            tested = range(1, epochs + 1) if every else [1 + seed % 2]  # test-once: the selected epoch only
            metrics += [{**row, "stage": "epoch", "epoch": e, "value": 0.6 + 0.05 * e + 0.01 * seed} for e in tested]
            metrics.append({**row, "stage": "zero_shot", "epoch": 0, "value": 0.55})
            metrics.append({**row, "stage": "final", "epoch": max(tested), "value": 0.7 + 0.01 * seed})
    runs, metrics = pd.DataFrame(runs), pd.DataFrame(metrics)
    summary = pd.DataFrame(columns=["family", "variant", "metric", "split", "stage", "mean", "ci_low", "ci_high"])
    claims = instruct_claims(metrics, runs)
    part = instruct_section("ins", {"runs": runs, "summary": summary, "metrics": metrics, "claims": claims})
    listed = {(row["variant"], row["epoch"]) for row in part["epoch_rows"]}
    assert listed == {("epochs3", "0 (zero-shot)"), ("epochs3", "1"), ("epochs3", "2"), ("epochs3", "3")}
    assert all(row["n"] == "3" for row in part["epoch_rows"])
    # Epoch 2 minus epoch 1 is the same in every seed: no interval to show, and no test.
    epochs_claim = next(c for c in part["claims"] if "epoch1" in c["comparison"])
    assert epochs_claim["diff"].endswith("(equal in every pair)") and epochs_claim["verdict"].startswith("not tested")
    figure = figures.plot_instruct(runs, metrics, "ins")
    right = figure.axes[1]
    assert [line.get_label() for line in right.get_lines()] == ["epochs3"]
    figures.plt.close(figure)


def _sgd_claim_tables(effect: float, items_n: int = 400, seeds: int = 3):
    """An instruct family whose SGD-cosine variant is planted ``effect`` (logit) better than SGD-constant on every
    test question: runs, final test accuracy per run, and the per-question predictions behind it."""
    rng = np.random.default_rng(11)
    difficulty = rng.normal(1.0, 1.5, items_n)
    variants = {"lora": ("adamw", "cosine", 0.0), "sgd-constant": ("sgd", "constant", 0.0),
                "sgd-cosine": ("sgd", "cosine", effect)}
    runs, metrics, predictions = [], [], []
    for variant, (optimizer, schedule, shift) in variants.items():
        for seed in range(seeds):
            label = {"family": "ins", "family_kind": "instruct", "variant": variant, "seed": seed,
                     "is_baseline": variant == "lora", "status": "ok"}
            run_id = f"ins/{variant}/{seed}"
            runs.append({**label, "run_id": run_id, "setting": variant, "trained": True,
                         "cfg.method.name": "lora", "cfg.train.optimizer": optimizer, "cfg.train.schedule": schedule,
                         "cfg.train.epochs": 1, "cfg.method.lora.targets": "query+value"})
            correct = rng.random(items_n) < 1 / (1 + np.exp(-(difficulty + shift + rng.normal(0, 1.0, items_n))))
            metrics.append({**label, "metric": "accuracy", "split": "test", "stage": "final", "epoch": 1,
                            "value": float(correct.mean()), "unit": "fraction", "higher_is_better": True})
            predictions.append(pd.DataFrame({
                "run_id": run_id, "family": "ins", "family_kind": "instruct", "variant": variant, "setting": variant,
                "seed": seed, "data_seed": 0, "train_seed": seed, "is_baseline": variant == "lora",
                "data_key": "pang_lee:sentences", "split": "test", "epoch": 1, "example_id": np.arange(items_n),
                "gold": 1, "predicted": correct.astype(int), "correct": correct}))
    return pd.DataFrame(runs), pd.DataFrame(metrics), pd.concat(predictions, ignore_index=True)


def test_claims_between_variants_use_every_question_and_say_when_runs_did_not_converge():
    """With the runs' predictions a claim between two variants is tested on questions x seeds (the questions are a
    sample too), which then carries the verdict; a run that did not converge makes the verdict inconclusive,
    whatever the test said, and the table keeps what the test alone said."""
    from lora_bench.analysis.claims import instruct_claims
    from lora_bench.analysis.items import ITEM_TEST

    runs, metrics, predictions = _sgd_claim_tables(effect=1.0)
    seed_only = instruct_claims(metrics, runs).set_index("claim").loc["cosine_sgd"]
    assert seed_only["verdict_test"] == "paired t" and np.isnan(seed_only["item_p_value"])
    claim = instruct_claims(metrics, runs, predictions).set_index("claim").loc["cosine_sgd"]
    assert claim["verdict_test"] == ITEM_TEST and claim["item_design"] == "3 seeds x 400 items"
    assert claim["item_p_value"] < 0.05 and claim["support"] == "supported" and claim["convergence"] == "trained"
    assert claim["item_diff"] == pytest.approx(claim["diff"])  # same runs, same questions: the same difference
    assert claim["item_diff_ci_low"] < claim["item_diff"] < claim["item_diff_ci_high"]
    assert 0 < claim["item_detectable_diff"] < 0.5

    runs.loc[(runs["variant"] == "sgd-cosine") & (runs["seed"] == 0), "trained"] = False
    claim = instruct_claims(metrics, runs, predictions).set_index("claim").loc["cosine_sgd"]
    assert claim["support"] == "inconclusive" and claim["test_support"] == "supported"
    assert claim["untrained_better"] == 1 and claim["untrained_worse"] == 0

    runs, metrics, predictions = _sgd_claim_tables(effect=0.0)
    assert instruct_claims(metrics, runs, predictions).set_index("claim").loc["cosine_sgd", "support"] == "not shown"


def _epoch_claim_tables(effect: float, items_n: int = 400, seeds: int = 3):
    """An instruct family whose epochs variant answers each test question ``effect`` (logit) better after epoch 1
    than after epoch 2: runs, per-epoch and final test accuracy, and the per-question predictions of both stages."""
    rng = np.random.default_rng(5)
    difficulty = rng.normal(1.0, 1.5, items_n)
    runs, metrics, predictions = [], [], []
    for variant, epochs in (("lora", 1), ("epochs3", 3)):
        for seed in range(seeds):
            label = {"family": "ins", "family_kind": "instruct", "variant": variant, "seed": seed,
                     "is_baseline": variant == "lora", "status": "ok"}
            run_id = f"ins/{variant}/{seed}"
            runs.append({**label, "run_id": run_id, "setting": variant, "trained": True, "cfg.method.name": "lora",
                         "cfg.train.optimizer": "adamw", "cfg.train.schedule": "constant", "cfg.train.epochs": epochs,
                         "cfg.train.test_every_epoch": variant == "epochs3", "cfg.method.lora.targets": "query+value"})
            seed_shift = rng.normal(0, 0.3)
            for epoch in range(1, epochs + 1):
                shift = seed_shift + (effect if epoch == 1 else 0.0)
                correct = rng.random(items_n) < 1 / (1 + np.exp(-(difficulty + shift + rng.normal(0, 1.0, items_n))))
                stages = ["final"] if epochs == 1 else ["epoch"] + (["final"] if epoch == epochs else [])
                for stage in stages:
                    metrics.append({**label, "metric": "accuracy", "split": "test", "stage": stage, "epoch": epoch,
                                    "value": float(correct.mean()), "unit": "fraction", "higher_is_better": True})
                    predictions.append(pd.DataFrame({
                        "run_id": run_id, "family": "ins", "family_kind": "instruct", "variant": variant,
                        "setting": variant, "seed": seed, "data_seed": 0, "train_seed": seed,
                        "is_baseline": variant == "lora", "data_key": "pang_lee:sentences", "split": "test",
                        "epoch": epoch, "stage": stage, "example_id": np.arange(items_n), "gold": 1,
                        "predicted": correct.astype(int), "correct": correct}))
    return pd.DataFrame(runs), pd.DataFrame(metrics), pd.concat(predictions, ignore_index=True)


def test_the_epochs_claim_compares_the_two_epochs_question_by_question():
    """The runs that tested after every epoch kept each epoch's answers, so epoch 1 against epoch 2 is tested on
    questions x seeds like the claims between variants: a planted difference is found, none is not."""
    from lora_bench.analysis.claims import instruct_claims
    from lora_bench.analysis.items import ITEM_TEST

    runs, metrics, predictions = _epoch_claim_tables(effect=0.8)
    claim = instruct_claims(metrics, runs, predictions).set_index("claim").loc["epochs"]
    assert claim["comparison"] == "epochs3@epoch1 vs epochs3@epoch2"
    assert claim["verdict_test"] == ITEM_TEST and claim["item_design"] == "3 seeds x 400 items"
    assert claim["item_diff"] == pytest.approx(claim["diff"]) and claim["item_diff"] > 0
    assert claim["item_p_value"] < 0.05 and claim["support"] == "supported"
    # Without the per-epoch answers (records from before they were kept) it stays the seed-level paired t.
    legacy = predictions[predictions["stage"] == "final"]
    assert instruct_claims(metrics, runs, legacy).set_index("claim").loc["epochs", "verdict_test"] == "paired t"
    runs, metrics, predictions = _epoch_claim_tables(effect=0.0)
    claim = instruct_claims(metrics, runs, predictions).set_index("claim").loc["epochs"]
    assert claim["verdict_test"] == ITEM_TEST and claim["support"] == "not shown"


def test_report_reads_the_claims_table_and_names_its_absence(tmp_path):
    """The report reads the claims from the tables (the stats step writes them); a study with an instruct family
    whose claims table is missing is a named error, not a section that says every claim was untestable."""
    from lora_bench.analysis.claims import run_claims
    from lora_bench.report.render import _read_tables

    runs, metrics, predictions = _sgd_claim_tables(effect=1.0)
    for name, frame in (("runs", runs), ("metrics", metrics), ("predictions", predictions)):
        frame.to_parquet(tmp_path / f"{name}.parquet")
    for name in ("tests", "summary", "seed_consistency"):
        pd.DataFrame({"family": []}).to_parquet(tmp_path / f"{name}.parquet")
    with pytest.raises(FileNotFoundError, match="claims.parquet is missing.*lora_bench stats"):
        _read_tables(tmp_path)
    run_claims(tmp_path, tmp_path)
    claims = _read_tables(tmp_path)["claims"]
    assert claims.set_index("claim").loc["cosine_sgd", "support"] == "supported"
