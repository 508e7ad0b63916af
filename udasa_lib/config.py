"""Strict configuration: YAML -> frozen dataclasses, and the deterministic run id.

A config file has one section per stage (house style: one stage, one name, four places).
`inherit: other.yaml` deep-merges this file over another, so configs/smoke.yaml and
configs/paper.yaml only state what differs from configs/default.yaml.
Every key is required, unknown keys and wrong types are errors naming the dotted key.
The `runtime` section says where and how fast to run, not what to compute, so it is left
out of the run id and of every stage key.
"""
from __future__ import annotations

import dataclasses
import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import yaml

from udasa_lib.io import sha256_json
from udasa_lib.methods import GROUND_TRUTH_TASKS, METHODS


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the file and the dotted key."""


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric key, checked when the config is resolved (before any stage runs)."""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"

    def check(self, value: float, key: str) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high or value != value:  # value != value: NaN
            raise ConfigError(f"{key}: {value!r} is out of range; must be {self.describe()}")


# The value ranges, one rule each, shared by every key of that kind.
Positive = Annotated[int, Range(low=1)]  # sizes, counts, lengths
NonNegative = Annotated[int, Range(low=0)]
PositiveFloat = Annotated[float, Range(low=0, low_open=True)]
NonNegativeFloat = Annotated[float, Range(low=0)]
Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]  # a share strictly between 0 and 1
UnitInterval = Annotated[float, Range(0, 1)]
# 0 means greedy decoding at every stage that samples (generation.sampling_kwargs)
Temperature = Annotated[float, Range(low=0)]
TopP = Annotated[float, Range(0, 1, low_open=True)]


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str  # hub id or local folder; relative paths resolve against the repo root
    dtype: Literal["auto", "float32", "bfloat16", "float16"]  # auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16


@dataclass(frozen=True)
class RuntimeConfig:
    threads: NonNegative  # torch CPU threads; 0 = torch's default. UDASA_THREADS overrides it
    device: str  # auto | cpu | cuda | cuda:N
    num_processes: Positive  # >1 runs the stage's heavy part under `accelerate launch` (one per GPU)
    accelerate_config: str  # configs/accelerate/*.yaml for `accelerate launch`; empty = accelerate's defaults
    # loop = generation._decode_loop (prompt read once per prompt, preallocated KV cache); hf =
    # transformers' generate, the reference. Both draw the same ids from the same seed.
    generation_engine: Literal["loop", "hf"]
    # processes that share the CPU: `make reproduce` runs this many independent stages at once
    # (04_train variants, 05 evaluations, 06) and 01_sample splits its batches across this many
    # processes, each with threads // workers torch threads. On 2 cores two 1-thread processes
    # beat one 2-thread one: decode-shaped matmuls (1.3x from a second thread), the sampler's
    # exponential draws and Python do not scale with threads. Not part of any key.
    workers: Positive


@dataclass(frozen=True)
class DataConfig:
    split_seed: int  # seeds every train/test split
    harmful_test_fraction: Fraction  # of AdvBench + Do-Not-Answer prompts held out
    benign_test_fraction: Fraction  # of the project's benign instructions held out
    truthful_max_choices: Annotated[int, Range(low=2)]  # options per multiple-choice question
    sentiment_prefix_min_tokens: Positive  # IMDb prompt prefix length range (DPO paper: 2-8)
    sentiment_prefix_max_tokens: Positive
    sentiment_train_prompts: Positive
    sentiment_test_prompts: Positive
    sentiment_classifier_reviews: Positive  # reviews reserved for the ground-truth classifier
    probe_embedder: str  # sentence-transformers id or folder for the harm probe
    probe_seed: int  # seeds the harm probe's train/held-out split


@dataclass(frozen=True)
class SampleTask:
    sources: dict[str, Positive]  # data split name -> number of prompts taken from it
    max_new_tokens: Positive
    chat_template: bool  # wrap the prompt as a user turn (instruction tasks) or continue raw text
    # of the K responses per prompt, the share drawn with the task's principle (score.value.principles) as a
    # system message and trained on without it (context distillation); round(share * K) half up, chat tasks only
    principle_share: UnitInterval


@dataclass(frozen=True)
class SampleConfig:
    k: Annotated[int, Range(low=2)]  # responses per prompt (uncertainty needs at least two)
    temperature: Temperature  # 0 = greedy (then the K responses are identical and give no pairs)
    top_p: TopP
    top_k: NonNegative  # 0 disables top-k (transformers' own default is 50, which is not plain sampling)
    batch_prompts: Positive  # prompts per generate call; each expands to k sequences
    tasks: dict[str, SampleTask]


@dataclass(frozen=True)
class SemanticConfig:
    equivalence: Literal["embedding", "nli"]  # embedding (cosine >= threshold) | nli (bidirectional entailment)
    threshold: Annotated[float, Range(-1, 1)]  # cosine similarity at which two responses count as the same meaning
    probability: Literal["discrete", "weighted"]  # discrete (|c|/K) | weighted (length-normalised sequence likelihoods)


@dataclass(frozen=True)
class FactualConfig:
    method: Literal["selfcheck", "token_nll"]  # selfcheck (agreement with the other K-1 samples) | token_nll (white-box)
    agreement: Literal["embedding", "nli"]  # embedding | nli: how a sentence is checked against another sample
    aggregate: Literal["mean", "max"]  # mean | max over the other K-1 samples


@dataclass(frozen=True)
class ValueConfig:
    scorers: dict[str, Literal["self_judge", "harm_probe", "vader"]]  # task -> self_judge | harm_probe | vader
    judge: str  # judge LM for self_judge; empty = the policy itself
    principles: str  # YAML file: task -> the principle the judge checks
    batch_size: Positive


@dataclass(frozen=True)
class ScoreConfig:
    embedder: str  # sentence-transformers id or folder
    nli_model: str  # NLI sequence-classification id or folder; empty = none
    semantic: SemanticConfig
    factual: FactualConfig
    value: ValueConfig


@dataclass(frozen=True)
class PairsConfig:
    weights: dict[str, NonNegativeFloat]  # semantic/factual/value; normalised to sum to 1
    rejected_strategy: Literal["max", "second", "random"]  # max | second | random
    tie_epsilon: NonNegativeFloat  # pairs with delta u below this are dropped as ties
    cut_points: tuple[UnitInterval, ...]  # empty: delta-u tertiles per task (the three stages); [low, high]: fixed
    # task -> keep | drop: may a response cut at max_new_tokens enter a pair? Either way it is
    # trained without an EOS; a task not listed keeps them
    truncated: dict[str, Literal["keep", "drop"]]


TrainMethod = Literal[tuple(METHODS)]  # the names of udasa_lib.methods, the one method list


@dataclass(frozen=True)
class LoraSettings:
    r: Positive
    alpha: Positive
    dropout: Annotated[float, Range(0, 1, high_open=True)]
    targets: tuple[str, ...]  # module names LoRA wraps, e.g. q_proj, v_proj


@dataclass(frozen=True)
class UALSettings:
    mean_epsilon: Annotated[float, Range(0, 0.5, high_open=True)]  # the intercept is solved so the training set's mean epsilon is this
    slope: NonNegativeFloat  # epsilon_i = clip(a + slope * u_i, min, max); slope >= 0
    min_epsilon: Annotated[float, Range(0, 0.5, high_open=True)]  # label smoothing of 0.5 or more inverts the labels
    max_epsilon: Annotated[float, Range(0, 0.5, high_open=True)]
    direction: Literal["uncertain_smoother", "certain_smoother"]  # which samples get more smoothing


@dataclass(frozen=True)
class TrainConfig:
    methods: dict[str, tuple[TrainMethod, ...]]  # task -> methods; one LoRA policy per (task, method)
    seed: NonNegative  # LoRA init, data order, on-policy sampling; sampling and pairs do not read it (seeds sweep)
    beta: dict[str, PositiveFloat]  # per stage (conservative, moderate, exploratory) and `unstaged` (dpo, ual_dpo)
    # task -> optimizer steps of every policy of that task, whatever its method: staged methods split
    # them across stages in proportion to the stages' pairs (train.stage_steps)
    steps: dict[str, Positive]
    learning_rate: PositiveFloat
    lr_scheduler: str  # transformers scheduler name, restarted at every stage
    batch_size: Positive  # pairs (or SFT examples) per device per step
    gradient_accumulation_steps: Positive
    max_length: Annotated[int, Range(low=2)]  # prompt + completion tokens
    stage_order: tuple[Literal["conservative", "moderate", "exploratory"], ...]  # training order of the stages
    reference: Literal["initial", "previous"]  # DPO reference per stage: pi_0, or the policy at stage start
    # staged methods: re-sample, re-score and re-pair each later stage's prompts with the current
    # policy. true = every staged method, a list = those methods only (TrainConfig.on_policy_for)
    on_policy: bool | tuple[TrainMethod, ...]
    gradient_checkpointing: bool
    lora: LoraSettings
    ual: UALSettings

    def on_policy_for(self, method: str) -> bool:
        """Whether `method` (a staged one) runs on-policy rounds: train.on_policy is true, or lists it."""
        return self.on_policy if isinstance(self.on_policy, bool) else method in self.on_policy


@dataclass(frozen=True)
class EvalHarmlessConfig:
    harmful_prompts: Positive  # held-out harmful prompts (first n of harmful_test)
    benign_prompts: Positive  # held-out benign instructions: over-refusal here, win rate in 05_eval_winrate
    max_new_tokens: Positive
    temperature: Temperature  # 0 = greedy (default); > 0 samples (the tiny test model only emits text when sampled)
    batch_size: Positive  # prompts per generate call
    judge: str  # causal LM answering the judge roles (udasa_lib/judges.py); empty = the base policy
    judge_dtype: Literal["auto", "float32", "bfloat16", "float16"]  # auto = float32 on CPU, bfloat16 on CUDA
    judge_batch_size: Positive  # judge texts per forward pass
    judge_max_response_tokens: Positive  # an answer's first n tokens are judged


@dataclass(frozen=True)
class EvalWinrateConfig:
    judge: str  # causal LM that judges the pairs; empty = the base policy (model.name_or_path)
    judge_dtype: Literal["auto", "float32", "bfloat16", "float16"]  # auto = float32 on CPU, bfloat16 on CUDA
    max_length: Positive  # judge prompt tokens; each output is cut to fit
    batch_size: Positive


@dataclass(frozen=True)
class EvalLmevalConfig:
    tasks: tuple[str, ...]  # repo task names (udasa_lib/lm_eval_tasks/*.yaml) or lm-eval built-ins (need the hub)
    limit: NonNegative  # questions per task; 0 = all
    batch_size: Positive


@dataclass(frozen=True)
class EvalSentimentConfig:
    prompts: Positive  # held-out IMDb prefixes (first n of sentiment_test)
    samples_per_prompt: Positive
    max_new_tokens: Positive
    temperature: Temperature  # of the evaluated policy (DPO App. C samples at 1.0); 0 = greedy
    batch_size: Positive


@dataclass(frozen=True)
class SilhouetteConfig:
    responses: Annotated[int, Range(low=2)]  # base responses of 05_eval_harmless (harmful + benign), teacher-forced through every policy
    top_tokens: Annotated[int, Range(low=2)]  # token view: labels = ids of the n most frequent response tokens (UAL's token clustering)
    max_points: Annotated[int, Range(low=4)]  # tokens per silhouette computation (deterministic subsample)
    bootstrap: NonNegative  # resamples of responses for the last layer's CI (0 = none)
    compare: tuple[str, ...]  # two policies whose last-layer projections are drawn side by side


@dataclass(frozen=True)
class ValidityConfig:
    # 05_validity: every judge and cheap instrument against human labels (udasa_lib/validity.py)
    harm_examples: Annotated[int, Range(low=4)]  # of the harm probe's held-out human-graded responses (seeded, stratified)
    refusal_examples: Annotated[int, Range(low=4)]  # of pyrit's refusal-labelled responses (seeded, stratified)
    pairs_per_kind: Annotated[int, Range(low=2)]  # known-direction pairs of each kind for the pairwise judges
    seed: NonNegative  # which examples are drawn


@dataclass(frozen=True)
class ReportConfig:
    alpha: Fraction  # family-wise error rate of each table of paired claims (Holm)
    power: Fraction  # power of the minimum detectable effect and of the n each claim needs
    # metric -> the smallest difference worth detecting (metric units; win rate in points): the
    # "n needed" column is the units a paired test needs to see it
    effects: dict[str, PositiveFloat]


@dataclass(frozen=True)
class Config:
    seed: NonNegative
    model: ModelConfig
    runtime: RuntimeConfig
    data: DataConfig
    sample: SampleConfig
    score: ScoreConfig
    pairs: PairsConfig
    train: TrainConfig
    eval_harmless: EvalHarmlessConfig
    eval_winrate: EvalWinrateConfig
    eval_lmeval: EvalLmevalConfig
    eval_sentiment: EvalSentimentConfig
    silhouette: SilhouetteConfig
    validity: ValidityConfig
    report: ReportConfig
    bootstrap_samples: Positive  # resamples of prompts for every 95 % confidence interval

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def section(self, name: str) -> Any:
        """A section, top-level key, or dotted key within one (`score.value.principles`)."""
        node = self
        for part in name.split("."):
            node = getattr(node, part)
        return node


HASH_EXCLUDED_SECTIONS = ("runtime",)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping (section {tp.__name__}), got {value!r}")
        return build_dataclass(tp, value, key)
    if origin in (dict, Mapping):
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {
            _coerce(k, key_type, f"{key}.{k}"): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()
        }
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Annotated:
        inner, *rules = typing.get_args(tp)
        value = _coerce(value, inner, key)
        for rule in rules:
            rule.check(value, key)
        return value
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        reasons = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                reasons.append(str(error))
        raise ConfigError(f"{key}: {value!r} matches none of {[_type_name(o) for o in options]} ({'; '.join(reasons)})")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def build_dataclass(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    names = [f.name for f in dataclasses.fields(cls)]
    dotted = (lambda k: f"{prefix}.{k}") if prefix else (lambda k: k)
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown key {dotted(unknown[0])!r} (allowed here: {', '.join(names)})")
    missing = [n for n in names if n not in data]
    if missing:
        raise ConfigError(f"missing key {dotted(missing[0])!r}")
    return cls(**{n: _coerce(data[n], hints[n], dotted(n)) for n in names})


def _deep_merge(base: dict, over: Mapping) -> dict:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


# Keys renamed when "stage" came to mean only the paper's curriculum stages: old configs and
# overrides fail with the new name instead of "unknown key".
RENAMED_KEYS = {"stage.order": "train.stage_order", "stage": "pairs"}


def renamed_key_error(dotted: str) -> ConfigError | None:
    """The error for a key that was renamed, naming its new name; None for any other key."""
    for old, new in RENAMED_KEYS.items():
        if dotted == old or dotted.startswith(old + "."):
            return ConfigError(f"{dotted!r} was renamed: use {new + dotted[len(old):]!r} "
                               f"(the 03_stage step is now 03_pairs; stage.order is train.stage_order)")
    return None


def _check_renamed(data: Mapping, path: Path) -> None:
    section = data.get("stage")
    if isinstance(section, Mapping):
        key = "stage.order" if "order" in section else f"stage.{next(iter(section), '')}".rstrip(".")
        raise ConfigError(f"{path}: {renamed_key_error(key)}")


def load_raw(path: Path | str) -> dict:
    """Read a config YAML with its `inherit` chain merged, before validation."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    _check_renamed(data, path)
    parent = data.pop("inherit", None)
    if parent is not None:
        data = _deep_merge(load_raw(path.parent / parent), data)
    return data


# One part of a dotted key: config keys are identifiers; '-' is allowed for names a user chooses.
_KEY_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")


def parse_override(text: str) -> tuple[str, Any]:
    """`sample.k=8` -> ("sample.k", 8); the value is read as YAML so types survive.

    Raises ConfigError naming the override text when it has no '=', its key is empty or not a
    dotted key (an empty part as in `a..b`, whitespace inside), it has '==' (`seed==1` would
    otherwise set seed to the string "=1"), or its value is not valid YAML. Whether the key
    exists is checked later, against the config (apply_overrides)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key; expected dotted.key=value")
    if not all(_KEY_PART.fullmatch(part) for part in key.split(".")):
        raise ConfigError(f"override {text!r}: key {key!r} is not a dotted key (letters, digits, '_' or '-' "
                          f"joined by single dots)")
    if raw.startswith("="):
        raise ConfigError(f"override {text!r}: '==' after the key; write {key}=value")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({error})") from None


def dotted_get(node: Any, dotted: str) -> Any:
    """The value at `a.b.c` in a Config (attributes) or in its plain-dict form (keys).
    Raises KeyError naming the first missing part."""
    for part in dotted.split("."):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif not isinstance(node, Mapping) and hasattr(node, part):
            node = getattr(node, part)
        else:
            raise KeyError(f"{dotted}: no key {part!r}")
    return node


def apply_overrides(data: dict, overrides: Mapping[str, Any]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy of plain YAML types
    for dotted, value in overrides.items():
        renamed = renamed_key_error(dotted)
        if renamed is not None:
            raise renamed
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"override {dotted!r}: unknown key {part!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"override {dotted!r}: unknown key {parts[-1]!r}")
        node[parts[-1]] = value
    return data


def principle_count(share: float, k: int) -> int:
    """Responses per prompt that 01_sample draws with the principle (sample.tasks.<task>.principle_share):
    share * k rounded half up, on the share as written (Decimal of its repr): 0.5 * 3 -> 2,
    0.5 * 5 -> 3, and 0.58 * 25 -> 15 where the float product 14.499999999999998 would give 14.
    Here, not in sample.py, because check_relations refuses a share strictly between 0 and 1 that
    gives 0 or k, and config must not import a stage module."""
    from decimal import ROUND_HALF_UP, Decimal

    return int((Decimal(repr(float(share))) * k).to_integral_value(rounding=ROUND_HALF_UP))


# Names that become folder or file names (tasks, data splits, run names): no `/`, no leading dot,
# so none can write outside results/ or hide itself
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
SAFE_NAME_RULE = "must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit"


def check_names(config: Config) -> None:
    """Raise ConfigError naming the key of any task or split name that is not a SAFE_NAME."""
    named = {"sample.tasks": config.sample.tasks, "train.methods": config.train.methods,
             "train.steps": config.train.steps, "score.value.scorers": config.score.value.scorers,
             "pairs.truncated": config.pairs.truncated}
    named.update({f"sample.tasks.{task}.sources": spec.sources for task, spec in config.sample.tasks.items()})
    for where, mapping in named.items():
        for name in mapping:
            if not SAFE_NAME.fullmatch(name):
                raise ConfigError(f"{where}: name {name!r} {SAFE_NAME_RULE}")


def check_relations(config: Config) -> None:
    """Constraints between keys that no single key's range can state."""
    check_names(config)
    data = config.data
    if data.sentiment_prefix_min_tokens > data.sentiment_prefix_max_tokens:
        raise ConfigError(f"data.sentiment_prefix_min_tokens: {data.sentiment_prefix_min_tokens} exceeds "
                          f"data.sentiment_prefix_max_tokens ({data.sentiment_prefix_max_tokens})")
    ual = config.train.ual
    if not ual.min_epsilon <= ual.mean_epsilon <= ual.max_epsilon:
        raise ConfigError(f"train.ual.mean_epsilon: {ual.mean_epsilon} is outside "
                          f"[train.ual.min_epsilon, train.ual.max_epsilon] = [{ual.min_epsilon}, {ual.max_epsilon}]")
    unknown = sorted(set(config.pairs.truncated) - set(config.sample.tasks))
    if unknown:
        raise ConfigError(f"pairs.truncated.{unknown[0]}: not a task of sample.tasks ({', '.join(config.sample.tasks)})")
    if not config.sample.tasks:
        raise ConfigError("sample.tasks: at least one task is needed")
    k = config.sample.k
    for task, task_cfg in config.sample.tasks.items():
        share, key = task_cfg.principle_share, f"sample.tasks.{task}.principle_share"
        if share and not task_cfg.chat_template:
            raise ConfigError(f"{key}: {share} needs sample.tasks.{task}.chat_template: true (the principle is a "
                              f"system message of the chat template); a raw-text task takes 0")
        n = principle_count(share, k)
        if 0 < share < 1 and not 0 < n < k:
            raise ConfigError(f"{key}: {share} x sample.k ({k}) rounds to {n} of {k} responses per prompt; a share "
                              f"strictly between 0 and 1 must give 1 to {k - 1} (0 and 1 mean none and all)")
    for task, methods in config.train.methods.items():
        if methods and task not in config.train.steps:
            raise ConfigError(f"train.steps.{task}: missing; every task with methods needs its optimizer-step budget")
        for method in methods:
            if METHODS[method].needs_ground_truth and task not in GROUND_TRUTH_TASKS:
                raise ConfigError(f"train.methods.{task}: {method} learns from ground-truth-labelled pairs, which only "
                                  f"{', '.join(GROUND_TRUTH_TASKS)} has")
    if not isinstance(config.train.on_policy, bool):
        unstaged = [m for m in config.train.on_policy if not METHODS[m].staged]
        if unstaged:
            raise ConfigError(f"train.on_policy: {unstaged[0]} is not a staged method; on-policy rounds re-sample "
                              f"before each later curriculum stage, so only staged methods take them")


def resolve(path: Path | str, overrides: Mapping[str, Any] | None = None) -> Config:
    raw = apply_overrides(load_raw(path), overrides or {})
    try:
        config = build_dataclass(Config, raw)
        check_relations(config)
        return config
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None


def hashed_params(config: Config) -> dict[str, Any]:
    return {k: v for k, v in config.to_dict().items() if k not in HASH_EXCLUDED_SECTIONS}


def run_id(config: Config, name: str) -> str:
    """Config name + the first 8 hex digits of the hash of its resolved parameters."""
    return f"{name}-{sha256_json(hashed_params(config))[:8]}"
