"""Per-example results of a run: what it predicted for every validation and test example, kept in its record.

A run's accuracy is the mean of one 0/1 outcome per example; keeping the outcomes lets two methods be compared
on the *same* examples (``lora_bench.analysis.items``), which needs far fewer seeds than comparing their means alone.

Each example carries an ``example_id``: its row in the pooled source (``data.load_examples``: the file's or
dataset's own row order), not its position in a batch or a split. The same sentence therefore has the same id
in every run, family and task (a classification run and an instruct run on the same data and ``split_seed``
score the same ids), and the analysis pairs runs on it.

Why a block inside the JSON record, not a sidecar file: a run stays one file (what ``label_record`` copies,
``collect`` reads and Snakemake tracks), written atomically with the rest of the record, so a record can never
disagree with its predictions. The columns are base64 of little-endian arrays (12 bytes per example for
classification, 16 for closed-answer instruct runs; about 16 / 21 characters) because the record is
pretty-printed JSON, which would put every number of a list on its own line (about 4x the size). The
``predictions`` table (``tables.py``) is the readable form.
"""

from __future__ import annotations

import base64

import numpy as np

# The key an evaluation adds to its metrics (the training loop stores it as ``<split>_items`` per epoch).
ITEMS_KEY = "items"
ITEMS_SUFFIX = f"_{ITEMS_KEY}"
ENCODING = "base64 little-endian"
KEPT_SPLITS = ("validation", "test")
# The split kept after every epoch (``predictions.epochs``) by runs that test after every epoch.
EPOCH_SPLIT = "test"
# Column -> dtype. ``gold_logp``: log-probability of the gold label among the label set (classification: the
# softmax of the head; closed-answer instruct: the candidates' log-likelihoods normalised over the answer set).
# ``gold_loglik``: instruct only, the summed token log-likelihood of the gold answer after the prompt.
COLUMNS = {"example_id": "<i4", "gold": "<i2", "predicted": "<i2", "gold_logp": "<f4", "gold_loglik": "<f4"}


def item_block(example_id, gold, predicted, gold_logp, gold_loglik=None) -> dict:
    """One split's per-example results as a compact columnar block, sorted by ``example_id``."""
    example_id = np.asarray(example_id, dtype=np.int64)
    if len(example_id) and (example_id.min() < 0 or example_id.max() >= 2**31):
        raise ValueError("example ids must be source row numbers in [0, 2**31)")
    if len(np.unique(example_id)) != len(example_id):
        raise ValueError("example ids of a split must be unique")
    order = np.argsort(example_id, kind="stable")
    values = {"example_id": example_id, "gold": gold, "predicted": predicted, "gold_logp": gold_logp}
    if gold_loglik is not None:
        values["gold_loglik"] = gold_loglik
    block = {"n": len(example_id)}
    for name, array in values.items():
        array = np.asarray(array)[order].astype(COLUMNS[name])
        block[name] = base64.b64encode(array.tobytes()).decode("ascii")
    return block


def decode_block(block: dict) -> dict[str, np.ndarray]:
    """The columns of a block as arrays (``correct`` added: predicted == gold)."""
    out = {name: np.frombuffer(base64.b64decode(block[name]), dtype=dtype)
           for name, dtype in COLUMNS.items() if name in block}
    if any(len(column) != block["n"] for column in out.values()):
        raise ValueError(f"a predictions block says n = {block['n']} but its columns have other lengths")
    out["correct"] = out["predicted"] == out["gold"]
    return out


def take_items(epoch_record: dict) -> dict[str, dict]:
    """Remove the ``<split>_items`` blocks from one epoch's record and return them by split.

    The training loop keeps each epoch's blocks until it knows which epoch is selected; the record keeps only
    the selected epoch's (``predictions_section``), so per-epoch metrics stay small.
    """
    keys = [key for key in epoch_record if key.endswith(ITEMS_SUFFIX)]
    return {key[: -len(ITEMS_SUFFIX)]: epoch_record.pop(key) for key in keys}


def predictions_section(epoch: int, splits: dict[str, dict], by_epoch: dict[int, dict[str, dict]] | None = None
                        ) -> dict:
    """The record's ``predictions``: the selected epoch's blocks (empty when the task kept none), and under
    ``epochs`` the test block of every epoch that evaluated test, when two or more did (``train.test_every_epoch``):
    so two epochs of one run can be compared question by question, not only by their accuracies."""
    splits = {name: splits[name] for name in KEPT_SPLITS if name in splits}  # not train (eval_train)
    if not splits:
        return {}
    section = {"epoch": epoch, "encoding": ENCODING, "dtypes": dict(COLUMNS), "splits": splits}
    tested = {str(e): {EPOCH_SPLIT: blocks[EPOCH_SPLIT]} for e, blocks in sorted((by_epoch or {}).items())
              if EPOCH_SPLIT in blocks}
    if len(tested) >= 2:
        section["epochs"] = tested
    return section


def dataset_example_ids(dataset) -> np.ndarray | None:
    """The ``example_id`` column of a (datasets) split, in its row order, or None when it has none."""
    names = getattr(dataset, "column_names", None) or []
    return np.asarray(dataset["example_id"], dtype=np.int64) if "example_id" in names else None
