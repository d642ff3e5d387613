"""Configuration: YAML files validated against JSON schemas, with defaults filled in.

Why a schema and not ad-hoc ``dict.get``: a benchmark whose typo'd key silently falls back to a
default produces a wrong result that looks right. Every object in the schemas forbids unknown keys,
and every error names the file and the dotted key. Cross-field rules that a schema cannot express
(split fractions summing to one, fp16 needing a GPU) are checked in ``RunConfig.__post_init__``.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_DIR = Path(__file__).parent / "schemas"


class YamlLoader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3`` and would give a string) and
    refuses a key given twice in one mapping: PyYAML keeps the last silently, so two variants with one
    name would quietly become one."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key; the base class raises its own error for it
                    continue
                if first is not key_node:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r} (first at line {first.start_mark.line + 1})",
                        key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    return yaml.load(text, Loader=YamlLoader)


class ConfigError(ValueError):
    """A configuration problem, with the file and key it concerns in the message."""


@cache
def load_schema(name: str) -> dict:
    return parse_yaml((SCHEMA_DIR / f"{name}.schema.yaml").read_text())


def load_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        return parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text: {exc}") from exc


def _fill_defaults(schema: dict, instance: Any) -> Any:
    """Recursively insert schema defaults for missing object properties (validation comes after)."""
    if not isinstance(instance, dict):
        return instance
    properties = schema.get("properties", {})
    for key, sub in properties.items():
        if key not in instance and "default" in sub:
            instance[key] = copy.deepcopy(sub["default"])
        if key in instance:
            instance[key] = _fill_defaults(sub, instance[key])
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        for key in instance:
            if key not in properties:
                instance[key] = _fill_defaults(extra, instance[key])
    return instance


def _describe(error: jsonschema.ValidationError) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        # Keys may be numbers or booleans in YAML (1: x, yes: y); sort them as text.
        extra = sorted(set(error.instance) - set(allowed), key=repr)
        return f"unknown key(s) {extra} under {where}; allowed: {allowed}"
    return f"{where}: {error.message}"


def validate(instance: Any, schema_name: str, source: str) -> dict:
    """Fill defaults into a deep copy of ``instance`` and validate it; raise ``ConfigError`` naming ``source``."""
    if instance is None:
        instance = {}
    if not isinstance(instance, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(instance).__name__}")
    schema = load_schema(schema_name)
    problems = list(_non_finite_or_odd_keys(instance))
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(problems))
    filled = _fill_defaults(schema, copy.deepcopy(instance))
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(filled), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError(f"{source}: invalid configuration:\n  " + "\n  ".join(_describe(e) for e in errors))
    return filled


def _non_finite_or_odd_keys(value: Any, where: str = "") -> Any:
    """What a JSON schema does not catch: NaN/infinite numbers (.nan and .inf are valid YAML and pass
    ``minimum``) and keys that are not text (YAML reads ``1:`` or ``yes:`` as a number or a boolean)."""
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{where or '<top level>'}: {value} is not a finite number"
    elif isinstance(value, dict):
        for key, sub in value.items():
            if not isinstance(key, str):
                yield f"{where or '<top level>'}: key {key!r} is a {type(key).__name__}, not text"
                continue
            yield from _non_finite_or_odd_keys(sub, f"{where}.{key}" if where else key)
    elif isinstance(value, list):
        for i, sub in enumerate(value):
            yield from _non_finite_or_odd_keys(sub, f"{where}.{i}" if where else str(i))


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in (override or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists of scalars are joined with ``+`` for tidy tables."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        elif isinstance(value, (list, tuple)):
            flat[name] = "+".join(str(v) for v in value)
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class ModelConfig:
    source: str
    name: str
    dtype: str
    gguf_file: str | None = None


@dataclass(frozen=True)
class DataConfig:
    source: str
    name: str
    text_column: str
    label_column: str
    text_pair_column: str | None
    split_column: str | None
    labels: list | None
    split: dict
    split_seed: int
    max_examples: dict
    synthetic_examples: int
    max_length: int
    cache_dir: str


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    dropout: float
    scaling: str
    targets: list
    layers: list | None
    target_patterns: list | None
    init: str = "tutorial"
    dora: bool = False


# LoRA keys added after runs existed: left out of a resolved config at their defaults (see RunConfig.to_dict).
LORA_KEYS_OMITTED_AT_DEFAULT = {"init": "tutorial", "dora": False}


@dataclass(frozen=True)
class QuantConfig:
    backend: str
    block_size: int
    double_quant: bool


@dataclass(frozen=True)
class MethodConfig:
    name: str
    train_classifier: bool
    quant: QuantConfig
    lora: LoRAConfig
    head_patterns: list | None = None
    # What train_classifier trains: peft = the whole head module peft's SEQ_CLS trains; last_linear = its output layer.
    head: str = "peft"
    # Whose LoRA / QLoRA layers: ours (lora_bench/adapters/lora.py, quant.py) or Hugging Face peft's (+ bitsandbytes).
    impl: str = "ours"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int
    max_steps: int | None
    evaluate: bool
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    optimizer: str
    momentum: float
    schedule: str
    warmup_ratio: float
    max_grad_norm: float | None
    precision: str
    device: str
    threads: int | None
    eval_train: bool
    eval_batch_size: int
    progress: str
    checkpoint: str = "none"
    length_grouping: bool = False
    test_every_epoch: bool = True
    evaluate_test: bool = True
    # How the frozen layers below the first trainable block run: train (dropout), eval, or cache (run/frozen.py).
    frozen_prefix: str = "train"
    lora_plus_ratio: float | None = None


METHOD_KEYS_OMITTED_AT_DEFAULT = {"impl": "ours"}
# Methods that method.impl peft can run: peft has LoRA layers (and, with bitsandbytes, 4-bit ones).
PEFT_METHODS = ("lora", "qlora")
TRAIN_KEYS_OMITTED_AT_DEFAULT = {"checkpoint": "none", "length_grouping": False, "test_every_epoch": True,
                                 "evaluate_test": True, "frozen_prefix": "train",
                                 "lora_plus_ratio": None}


@dataclass(frozen=True)
class LMEvalConfig:
    tasks: list
    limit: int | None
    batch_size: int


@dataclass(frozen=True)
class InstructConfig:
    """Instruction finetuning of a causal LM (``task: instruct``); see run.schema.yaml for each field."""

    format: str = "labelled"
    question: str = "Is this review positive or negative?"
    answers: list | None = None
    conversation_field: str = "conversations"
    template: str = "auto"
    response_only_loss: bool = True
    bad_records: str = "skip"
    noise_fraction: float = 0.0
    packing: bool = False
    zero_shot: bool = True
    lm_eval: LMEvalConfig = field(default_factory=lambda: LMEvalConfig([], None, 8))


@dataclass(frozen=True)
class RunConfig:
    """One fully resolved run. Build with ``RunConfig.from_dict`` or ``load_run_config``."""

    seed: int
    model: ModelConfig
    data: DataConfig
    method: MethodConfig
    train: TrainConfig
    source: str = field(default="<dict>", compare=False)
    task: str = "classification"
    instruct: InstructConfig = field(default_factory=InstructConfig)

    def __post_init__(self) -> None:
        fractions = self.data.split
        total = fractions["train"] + fractions["validation"] + fractions["test"]
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(
                f"{self.source}: data.split fractions must sum to 1, got {total:g} ({fractions})"
            )
        if self.train.precision == "fp16" and self.train.device == "cpu":
            raise ConfigError(f"{self.source}: train.precision fp16 needs a GPU; use fp32 or bf16 on CPU")
        patterns = {"method.lora.target_patterns": self.method.lora.target_patterns,
                    "method.head_patterns": self.method.head_patterns}
        for key, values in patterns.items():
            for pattern in values or ():
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ConfigError(f"{self.source}: {key}: {pattern!r} is not a regular expression ({exc})") from exc
        columns = {key: getattr(self.data, key) for key in ("text_column", "label_column", "text_pair_column",
                                                             "split_column") if getattr(self.data, key) is not None}
        if len(set(columns.values())) != len(columns):
            raise ConfigError(f"{self.source}: data columns must differ, got {columns}")
        labels = self.data.labels
        if labels is not None and len({str(label) for label in labels}) != len(labels):
            raise ConfigError(f"{self.source}: data.labels lists a label twice: {labels}")
        answers = self.instruct.answers
        if answers is not None and len(set(answers)) != len(answers):
            raise ConfigError(f"{self.source}: instruct.answers lists an answer twice: {answers}")
        self._check_impl()
        if self.task == "instruct" and self.instruct.packing and self.instruct.format == "labelled" \
                and not self.instruct.response_only_loss:
            raise ConfigError(f"{self.source}: instruct.packing with response_only_loss false would train on the "
                              "questions of the closed-answer task; keep response_only_loss true")

    def _check_impl(self) -> None:
        """method.impl peft: only for LoRA and QLoRA, and QLoRA only where bitsandbytes' 4-bit layers run (CUDA)."""
        method = self.method
        if method.impl != "peft":
            return
        if method.name not in PEFT_METHODS:
            raise ConfigError(f"{self.source}: method.impl peft is for methods {list(PEFT_METHODS)}, not "
                              f"{method.name!r}; use impl ours")
        if method.name == "qlora" and self.train.device == "cpu":
            raise ConfigError(f"{self.source}: method qlora with impl peft needs bitsandbytes' 4-bit layers, which "
                              "run on CUDA only; set train.device: cuda, or impl: ours (lora_bench's own NF4 runs "
                              "on the CPU)")
        if method.name == "qlora" and method.quant.backend == "torch":
            raise ConfigError(f"{self.source}: method.impl peft quantizes with bitsandbytes; quant.backend torch "
                              "is lora_bench's own NF4 (impl ours)")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> RunConfig:
        cfg = validate(raw, "run", source)
        method = dict(cfg["method"])
        method["lora"] = LoRAConfig(**method["lora"])
        method["quant"] = QuantConfig(**method["quant"])
        instruct = dict(cfg["instruct"])
        instruct["lm_eval"] = LMEvalConfig(**instruct["lm_eval"])
        return cls(
            seed=cfg["seed"],
            model=ModelConfig(**cfg["model"]),
            data=DataConfig(**cfg["data"]),
            method=MethodConfig(**method),
            train=TrainConfig(**cfg["train"]),
            source=source,
            task=cfg["task"],
            instruct=InstructConfig(**instruct),
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("source")
        # Classification configs stay exactly as they were before tasks existed, so the resolved config of a
        # finished run (a Snakemake params value) does not change and nothing re-trains.
        if self.task == "classification":
            out.pop("task")
            out.pop("instruct")
        if out["model"]["gguf_file"] is None:
            out["model"].pop("gguf_file")
        for key, default in METHOD_KEYS_OMITTED_AT_DEFAULT.items():
            if out["method"][key] == default:
                out["method"].pop(key)
        # Keys added after runs existed are left out at their defaults, so those runs' resolved configs (their
        # Snakemake params) stay as they were and nothing re-trains.
        for key, default in TRAIN_KEYS_OMITTED_AT_DEFAULT.items():
            if out["train"][key] == default:
                out["train"].pop(key)
        for key, default in LORA_KEYS_OMITTED_AT_DEFAULT.items():
            if out["method"]["lora"][key] == default:
                out["method"]["lora"].pop(key)
        return out


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    raw = load_yaml(path)
    if overrides:
        raw = deep_merge(raw or {}, overrides)
    return RunConfig.from_dict(raw, source=str(path))
