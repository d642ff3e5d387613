"""Instruction data for causal LMs: records -> chat turns -> token ids with response-only labels, cached.

Formats form a registry (``INSTRUCTION_FORMATS``), one loader each:

- ``labelled``: the classification sources of ``data.py`` (text + label; the offline default is the Pang &
  Lee review sentences) turned into closed-answer questions, "Is this review positive or negative?" ->
  "positive" / "negative". The split is ``data.split_indices``, the very one the classification families use,
  so one study compares an encoder and a causal LM on the same examples.
- ``alpaca``: records with ``instruction``, optional ``input`` and ``output`` (tatsu-lab/alpaca).
- ``conversation``: a list of turns (LIMA: strings alternating user / assistant; ShareGPT: ``{from, value}``;
  chat: ``{role, content}``), from the field ``instruct.conversation_field`` (GAIR/lima: ``conversations``).
- ``auto``: alpaca or conversation, decided per record from its fields.

Records come from the Hub (``data.source: hub``, its ``train`` split: LIMA's test split has no answers) or a
local JSON / JSONL / Parquet file, and are split by a seeded shuffle with ``data.split`` and capped by
``data.max_examples``. A record that is empty, missing a field or longer than ``data.max_length`` tokens is
named by file and row and skipped (and listed in the run record) or rejected, as ``instruct.bad_records`` says.

Prompts use the tokenizer's chat template where it has one, else a plain Alpaca-style template. The text is
tokenized segment by segment (prompt, response, prompt, ...), so the boundary between what the model is told
and what it must say is exact: labels are -100 on every prompt token and the loss covers only responses
(``instruct.response_only_loss``). A closed answer set also stores, per example, the token ids of every
candidate answer after the same prompt, for log-likelihood scoring.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_bench.atomic import atomic_folder
from lora_bench.config import DataConfig, InstructConfig
from lora_bench.run.data import SPLITS, DataError, load_examples, split_indices

PLAIN_HEADERS = {"system": "", "user": "### Instruction:\n", "assistant": "### Response:\n"}
# ShareGPT and similar dumps name the speakers differently; all map onto user / assistant / system.
ROLE_NAMES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
              "chatgpt": "assistant", "model": "assistant", "system": "system"}
LOCAL_INSTRUCTION_FILES = (".json", ".jsonl", ".parquet")


@dataclass
class Record:
    """One instruction example as chat turns; the last turn is the assistant's response."""

    messages: list[dict]
    origin: str
    row: int
    answer: int | None = None  # class index when the answers form a closed set
    # labelled records: where the review text starts in the first turn; a long text is cut to fit
    # data.max_length (as classification truncates it) instead of dropping the example
    text_start: int | None = None


@dataclass
class BadRecord(Exception):
    origin: str
    row: int
    reason: str

    def __str__(self) -> str:
        return f"{self.origin}, row {self.row}: {self.reason}"


@dataclass
class RecordPool:
    """Records of each split, the closed answer set (or None) and what was skipped."""

    splits: dict[str, list[Record]]
    origin: str
    answers: list[str] | None = None
    skipped: list[BadRecord] = field(default_factory=list)


def _handle_bad(bad: BadRecord, icfg: InstructConfig, skipped: list[BadRecord]) -> None:
    if icfg.bad_records == "error":
        raise DataError(f"{bad} (instruct.bad_records: error; set it to skip to leave such records out)")
    skipped.append(bad)


def _text(value, name: str, origin: str, row: int, required: bool = True) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        if required:
            raise BadRecord(origin, row, f"missing field {name!r}")
        return ""
    if not isinstance(value, str):
        raise BadRecord(origin, row, f"field {name!r} is {type(value).__name__}, not text")
    if required and not value.strip():
        raise BadRecord(origin, row, f"field {name!r} is empty")
    return value


def alpaca_messages(row: dict, origin: str, number: int) -> list[dict]:
    if not isinstance(row, dict):
        raise BadRecord(origin, number, f"is {type(row).__name__}, not a record with instruction/output")
    for name in ("instruction", "output"):
        if name not in row:
            raise BadRecord(origin, number, f"missing field {name!r}")
    instruction = _text(row["instruction"], "instruction", origin, number)
    extra = _text(row.get("input"), "input", origin, number, required=False)
    output = _text(row["output"], "output", origin, number)
    prompt = f"{instruction.strip()}\n\n{extra.strip()}" if extra.strip() else instruction.strip()
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output.strip()}]


def conversation_messages(row: dict, origin: str, number: int, key: str = "conversations") -> list[dict]:
    if not isinstance(row, dict) or key not in row:
        raise BadRecord(origin, number, f"missing field {key!r} (instruct.conversation_field)")
    turns = row[key]
    if isinstance(turns, np.ndarray):
        turns = turns.tolist()
    if not isinstance(turns, list) or not turns:
        raise BadRecord(origin, number, f"field {key!r} is empty or not a list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if isinstance(turn, str):
            role, content = ("user", "assistant")[i % 2], turn
        elif isinstance(turn, dict):
            speaker = turn.get("role", turn.get("from"))
            content = turn.get("content", turn.get("value"))
            if speaker is None or str(speaker).lower() not in ROLE_NAMES:
                raise BadRecord(origin, number, f"turn {i} has speaker {speaker!r}; expected one of "
                                f"{sorted(ROLE_NAMES)}")
            role = ROLE_NAMES[str(speaker).lower()]
        else:
            raise BadRecord(origin, number, f"turn {i} is {type(turn).__name__}, not text or a dict")
        messages.append({"role": role, "content": _text(content, f"{key}[{i}]", origin, number).strip()})
    # A conversation that ends on a question has nothing to learn after it.
    while messages and messages[-1]["role"] != "assistant":
        messages.pop()
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord(origin, number, "has no assistant turn to learn")
    return messages


def auto_messages(row: dict, origin: str, number: int, key: str = "conversations") -> list[dict]:
    if isinstance(row, dict) and key in row:
        return conversation_messages(row, origin, number, key)
    return alpaca_messages(row, origin, number)


def _read_local_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_INSTRUCTION_FILES:
        raise DataError(f"{path}: unsupported instruction file type {suffix!r}; use one of "
                        f"{list(LOCAL_INSTRUCTION_FILES)}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises several types for a broken file
            raise DataError(f"could not read {path} as Parquet: {type(exc).__name__}: {exc}") from exc
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"data file {path} is empty")
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: not valid JSON ({exc.msg})") from exc
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows


def _read_rows(spec: DataConfig) -> tuple[list[dict], str]:
    if spec.source == "local":
        path = Path(spec.name).expanduser()
        return _read_local_rows(path), str(path)
    if spec.source == "hub":
        import datasets

        try:
            table = datasets.load_dataset(spec.name, split="train")
        except Exception as exc:
            raise DataError(f"could not load Hub dataset {spec.name!r}: {exc}. Without Hub access use a local "
                            "file or instruct.format: labelled on data.source: pang_lee") from exc
        return table.to_list(), f"hub:{spec.name}[train]"
    raise DataError(f"instruction records come from data.source local or hub, not {spec.source!r}; "
                    "data.source pang_lee needs instruct.format: labelled")


def _seeded_split(n: int, spec: DataConfig) -> dict[str, np.ndarray]:
    order = np.random.default_rng(spec.split_seed).permutation(n)
    n_train = int(round(spec.split["train"] * n))
    n_val = int(round(spec.split["validation"] * n))
    parts = {"train": order[:n_train], "validation": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    for name in SPLITS:
        if len(parts[name]) == 0:
            raise DataError(f"{spec.name}: {n} usable record(s) leave the {name} split empty with data.split "
                            f"{spec.split}; add records or change the split")
        limit = spec.max_examples[name]
        if limit is not None:
            parts[name] = parts[name][:limit]
    return parts


def _load_records(spec: DataConfig, icfg: InstructConfig, convert: Callable) -> RecordPool:
    rows, origin = _read_rows(spec)
    if not rows:
        raise DataError(f"{origin} has no records")
    records, skipped = [], []
    for number, row in enumerate(rows, start=1):
        try:
            records.append(Record(convert(row, origin, number), origin, number))
        except BadRecord as bad:
            _handle_bad(bad, icfg, skipped)
    if not records:
        raise DataError(f"{origin}: none of its {len(rows)} records is usable; first problem: {skipped[0]}")
    parts = _seeded_split(len(records), spec)
    return RecordPool({name: [records[i] for i in parts[name]] for name in SPLITS}, origin, None, skipped)


def _labelled(spec: DataConfig, icfg: InstructConfig) -> RecordPool:
    examples = load_examples(spec)
    answers = [str(a) for a in (icfg.answers or examples.label_names)]
    if len(answers) != len(examples.label_names):
        raise DataError(f"instruct.answers has {len(answers)} answers but {examples.origin} has "
                        f"{len(examples.label_names)} classes {examples.label_names}")
    chosen = split_indices(spec, examples)
    question = icfg.question.strip()
    splits = {}
    for name in SPLITS:
        splits[name] = [
            Record([{"role": "user", "content": f"{question}\n\n{examples.texts[i].strip()}"},
                    {"role": "assistant", "content": answers[examples.labels[i]]}],
                   examples.origin, int(i) + 1, examples.labels[i], len(question) + 2)
            for i in chosen[name]
        ]
    return RecordPool(splits, examples.origin, answers)


INSTRUCTION_FORMATS: dict[str, Callable[[DataConfig, InstructConfig], RecordPool]] = {
    "labelled": _labelled,
    "alpaca": lambda spec, icfg: _load_records(spec, icfg, alpaca_messages),
    "conversation": lambda spec, icfg: _load_records(
        spec, icfg, lambda row, origin, n: conversation_messages(row, origin, n, icfg.conversation_field)),
    "auto": lambda spec, icfg: _load_records(
        spec, icfg, lambda row, origin, n: auto_messages(row, origin, n, icfg.conversation_field)),
}


def load_records(spec: DataConfig, icfg: InstructConfig) -> RecordPool:
    if spec.source == "synthetic":
        raise DataError("data.source synthetic has no instruction records (its token sequences are made by "
                        "synthetic_instruct_splits)")
    return INSTRUCTION_FORMATS[icfg.format](spec, icfg)


def synthetic_instruct_splits(spec: DataConfig, tokenizer):
    """Random token sequences of exactly ``data.max_length`` tokens, every token a target (seeded by
    ``split_seed``): a causal-LM step of a memory/time run, vocabulary logits and loss at every position.

    Why every token: peer measurements (the QLoRA write-up's, transformers + peft with labels = input ids)
    compute the logits of the whole sequence, and the vocabulary projection is a large share of a 7B model's
    activation memory; a half-prompt sequence would make our numbers look smaller than a like-for-like step.
    Validation and test get 16 sequences each (memory runs do not evaluate).
    """
    import datasets

    rng = np.random.default_rng(spec.split_seed)
    low = len(getattr(tokenizer, "all_special_ids", [])) or 1
    sizes = {"train": spec.synthetic_examples, "validation": 16, "test": 16}
    columns = {}
    for name, n in sizes.items():
        ids = rng.integers(low, len(tokenizer), size=(n, spec.max_length)).tolist()
        columns[name] = {"input_ids": ids, "labels": ids, **({} if name == "train" else {"prompt_len": [0] * n})}
    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict(columns[name]) for name in SPLITS})
    info = {"origin": f"synthetic:{spec.max_length} tokens", "format": "synthetic", "template": None,
            "answers": None, "label_names": [], "examples": dict(sizes), "noisy_train_records": 0, "truncated": 0,
            "packed": False, "skipped": 0, "skipped_records": [], "cache": None, "cached": False}
    return splits, info


def add_noise(records: list[Record], fraction: float, seed: int, answers: list[str] | None) -> int:
    """Give ``fraction`` of ``records`` a wrong answer, in place; returns how many changed.

    Closed answer sets get another class's answer; free-text records the response of another record.
    """
    n = int(round(fraction * len(records)))
    if n == 0:
        return 0
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(records), size=n, replace=False)
    if answers is not None:
        for i in chosen:
            record = records[i]
            wrong = [k for k in range(len(answers)) if k != record.answer]
            record.answer = int(rng.choice(wrong))
            record.messages = [*record.messages[:-1], {"role": "assistant", "content": answers[record.answer]}]
        return n
    responses = [records[i].messages[-1]["content"] for i in chosen]
    for offset, i in enumerate(chosen):
        # Each chosen record takes the next one's response (a cycle); one record alone takes a random one.
        other = responses[(offset + 1) % n] if n > 1 else records[(i + 1) % len(records)].messages[-1]["content"]
        records[i].messages = [*records[i].messages[:-1], {"role": "assistant", "content": other}]
    return n


# ----------------------------------------------------------------------------------------------------
# Prompts and tokens


def uses_chat_template(tokenizer, template: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if template == "chat" and not has:
        raise DataError("instruct.template is chat but the tokenizer has no chat template; use auto or plain")
    return has if template == "auto" else template == "chat"


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces whose concatenation is the chat-templated conversation."""
    def render(upto: int, prompt: bool) -> str:
        return tokenizer.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=prompt)

    segments, done = [], ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, after = render(k, True), render(k + 1, False)
        if not (before.startswith(done) and after.startswith(before)):
            raise DataError("the tokenizer's chat template does not render a conversation as a prefix of its "
                            "continuation, so the response tokens cannot be located; set instruct.template: plain")
        segments += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    return [(text, response) for text, response in segments if text]


def _plain_segments(messages: list[dict]) -> list[tuple[str, bool]]:
    segments, prompt = [], ""
    for message in messages:
        if message["role"] == "assistant":
            segments += [(prompt + PLAIN_HEADERS["assistant"], False), (message["content"], True)]
            prompt = "\n\n"
        else:
            prompt += PLAIN_HEADERS[message["role"]] + message["content"] + "\n\n"
    return segments


def encode(tokenizer, messages: list[dict], chat: bool, response_only_loss: bool = True) -> dict:
    """Token ids of a conversation, labels (-100 on prompt tokens), and the length of the prompt before the
    last response (what log-likelihood scoring conditions on)."""
    segments = _chat_segments(tokenizer, messages) if chat else _plain_segments(messages)
    eos = tokenizer.eos_token_id
    input_ids: list[int] = []
    labels: list[int] = []
    prompt_len = 0
    for text, response in segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if response and not chat and eos is not None:
            ids = ids + [eos]  # the plain template ends a response with EOS, so the model learns to stop
        if response:
            prompt_len = len(input_ids)
        input_ids += ids
        labels += ids if (response or not response_only_loss) else [-100] * len(ids)
    return {"input_ids": input_ids, "labels": labels, "prompt_len": prompt_len}


def _truncate_text(record: Record, tokenizer, chat: bool, icfg: InstructConfig, max_length: int,
                   encoded: dict) -> dict:
    """Cut the end of a labelled record's text until the whole conversation fits ``max_length`` tokens."""
    user = record.messages[0]["content"]
    text = user[record.text_start:]
    for _ in range(30):
        if len(encoded["input_ids"]) <= max_length or not text:
            break
        keep = int(len(text) * max_length / len(encoded["input_ids"])) - 1
        text = text[:max(0, min(keep, len(text) - 1))]
        record.messages = [{"role": "user", "content": user[:record.text_start] + text}, *record.messages[1:]]
        encoded = encode(tokenizer, record.messages, chat, icfg.response_only_loss)
    record.truncated = True
    return encoded


def _encode_split(records: list[Record], tokenizer, chat: bool, icfg: InstructConfig, max_length: int,
                  answers: list[str] | None, skipped: list[BadRecord]) -> dict[str, list]:
    columns: dict[str, list] = {"input_ids": [], "labels": [], "prompt_len": [], "example_id": []}
    if answers is not None:
        columns.update(answer=[], candidates=[])
    for record in records:
        encoded = encode(tokenizer, record.messages, chat, icfg.response_only_loss)
        if len(encoded["input_ids"]) > max_length and record.text_start is not None:
            encoded = _truncate_text(record, tokenizer, chat, icfg, max_length, encoded)
        if len(encoded["input_ids"]) > max_length:
            _handle_bad(BadRecord(record.origin, record.row, f"is {len(encoded['input_ids'])} tokens long, longer "
                                  f"than data.max_length {max_length}"), icfg, skipped)
            continue
        if not any(label != -100 for label in encoded["labels"]):
            _handle_bad(BadRecord(record.origin, record.row, "has no response token to learn"), icfg, skipped)
            continue
        for key in ("input_ids", "labels", "prompt_len"):
            columns[key].append(encoded[key])
        # The record's row in its source, from 0: for labelled data the very id a classification run gives the
        # same sentence (data.split_indices), so encoder and causal LM runs pair on it (lora_bench.run.predictions).
        columns["example_id"].append(record.row - 1)
        if answers is not None:
            candidates = []
            for answer in answers:
                ids = encode(tokenizer, [*record.messages[:-1], {"role": "assistant", "content": answer}], chat)
                candidates.append(ids["input_ids"][ids["prompt_len"]:])
            columns["answer"].append(record.answer)
            columns["candidates"].append(candidates)
    return columns


def pack(columns: dict[str, list], max_length: int) -> dict[str, list]:
    """Concatenate examples end to end into rows of at most ``max_length`` tokens (whole examples only).

    Attention crosses example boundaries inside a row (the usual cheap packing); labels stay per token.
    """
    rows: dict[str, list] = {"input_ids": [], "labels": []}
    ids: list[int] = []
    labels: list[int] = []
    for example_ids, example_labels in zip(columns["input_ids"], columns["labels"]):
        if ids and len(ids) + len(example_ids) > max_length:
            rows["input_ids"].append(ids)
            rows["labels"].append(labels)
            ids, labels = [], []
        ids = ids + example_ids
        labels = labels + example_labels
    if ids:
        rows["input_ids"].append(ids)
        rows["labels"].append(labels)
    return rows


def _cache_key(spec: DataConfig, icfg: InstructConfig, pool: RecordPool, tokenizer_id: str, chat: bool) -> str:
    digest = hashlib.sha256()
    settings = {"data": spec.__dict__, "instruct": {k: v for k, v in icfg.__dict__.items() if k != "lm_eval"},
                "tokenizer": tokenizer_id, "chat": chat, "answers": pool.answers, "version": 2}
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name in SPLITS:
        for record in pool.splits[name]:
            digest.update(json.dumps([name, record.messages, record.answer], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def prepare_instruct_splits(spec: DataConfig, icfg: InstructConfig, tokenizer, tokenizer_id: str):
    """Load, split, add noise, tokenize and (optionally) pack; returns (``datasets.DatasetDict``, info).

    Tokenized splits are cached under ``<data.cache_dir>/instruct/<key>`` like the classification data.
    """
    import datasets

    if spec.source == "synthetic":
        return synthetic_instruct_splits(spec, tokenizer)
    pool = load_records(spec, icfg)
    noisy = add_noise(pool.splits["train"], icfg.noise_fraction, spec.split_seed + 7919, pool.answers)
    chat = uses_chat_template(tokenizer, icfg.template)
    key = _cache_key(spec, icfg, pool, tokenizer_id, chat)
    cache = Path(spec.cache_dir) / "instruct" / key
    skipped = list(pool.skipped)
    info_file = cache / "lora_bench_info.json"
    if (cache / "dataset_dict.json").is_file() and info_file.is_file():
        splits = datasets.load_from_disk(str(cache))
        info = json.loads(info_file.read_text())
        info["cached"] = True
        return splits, info
    columns = {name: _encode_split(pool.splits[name], tokenizer, chat, icfg, spec.max_length, pool.answers,
                                   skipped)
               for name in SPLITS}
    for name in SPLITS:
        if not columns[name]["input_ids"]:
            raise DataError(f"{pool.origin}: no usable record is left in the {name} split "
                            f"({len(skipped)} skipped, first: {skipped[0] if skipped else '-'})")
    if skipped:
        print(f"instruction data: skipped {len(skipped)} record(s) (instruct.bad_records: skip); first: {skipped[0]}",
              file=sys.stderr)
    train_examples = len(columns["train"]["input_ids"])
    if icfg.packing:
        columns["train"] = pack(columns["train"], spec.max_length)
    else:
        columns["train"] = {k: columns["train"][k] for k in ("input_ids", "labels")}
    splits = datasets.DatasetDict({name: datasets.Dataset.from_dict(columns[name]) for name in SPLITS})
    info = {
        "origin": pool.origin,
        "format": icfg.format,
        "template": "chat" if chat else "plain",
        "answers": pool.answers,
        "label_names": pool.answers or [],
        "examples": {"train": train_examples, **{n: len(columns[n]["input_ids"]) for n in ("validation", "test")}},
        "noisy_train_records": noisy,
        "truncated": sum(getattr(r, "truncated", False) for name in SPLITS for r in pool.splits[name]),
        "packed": icfg.packing,
        "skipped": len(skipped),
        "skipped_records": [str(bad) for bad in skipped[:20]],
        "cache": str(cache),
    }
    with atomic_folder(cache) as tmp:  # parallel jobs never see half a cache
        splits.save_to_disk(str(tmp))
        (tmp / "lora_bench_info.json").write_text(json.dumps(info, indent=1))
    info["cached"] = False
    return splits, info


def describe_instruct_splits(splits, info: dict) -> dict:
    info = dict(info)
    info["sizes"] = {name: len(splits[name]) for name in SPLITS}
    info["mean_tokens"] = {name: float(np.mean([len(x) for x in splits[name]["input_ids"]])) for name in SPLITS}
    info["response_tokens"] = {name: int(sum(sum(1 for t in row if t != -100) for row in splits[name]["labels"]))
                               for name in SPLITS}
    return info
