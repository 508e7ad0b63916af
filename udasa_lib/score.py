"""Stage 02: per-response uncertainty on three dimensions (UDASA step 2).

For each prompt's K responses y_1..y_K, three scores in [0, 1], higher = less reliable:

  semantic  u_sem(y_i) = -log p(C(y_i)) / log K, where the responses are clustered by meaning
            (Kuhn et al. 2023, Alg. 1: bidirectional entailment with an NLI model, or cosine
            similarity of sentence embeddings above a threshold) and p(c) is |c|/K (discrete)
            or the normalised sum of length-normalised sequence likelihoods (weighted).
            The prompt-level semantic entropy SE = -sum_c p(c) log p(c) is kept too.
  factual   SelfCheck style: u_fact(y_i) = 1 - mean over sentences s of y_i of support(s),
            support(s) = aggregate over the other K-1 responses y_j of agreement(s, y_j);
            or the white-box alternative, mean token NLL of y_i under the policy.
  value     u_val(y_i) = 1 - p(aligned | x, y_i) from the task's value scorer: `self_judge`
            (a judge LM's P(Yes) over {Yes, No}), `harm_probe` (udasa_lib.value_probe) or
            `vader` (lexicon sentiment, for the sentiment task).

The sentiment task's ground-truth reward (udasa_lib.sentiment_reward) is the evaluator and is
deliberately not imported here: nothing that selects training data may see it.
"""
from __future__ import annotations

import json
import math
import re
import time
from typing import Callable, Sequence

import numpy as np

# the principles file is read first by 01_sample (principle_share), the upstream stage
from udasa_lib.sample import load_principles  # noqa: F401  (score_with_config, bench)

DIMENSIONS = ("semantic", "factual", "value")
SCORE_SCHEMA = {"prompt_id": str, "task": str, "sample_ids": list, "semantic": dict, "factual": dict, "value": dict}
SCORES_FILE = "scores.jsonl"


# ----------------------------------------------------------------------------- semantic

def cluster_by_equivalence(n: int, equivalent: Callable[[int, int], bool]) -> list[int]:
    """Kuhn et al. (2023) Alg. 1: each response joins the first existing cluster whose first
    member it is equivalent to, else opens a new one. Returns a cluster id per response."""
    representatives: list[int] = []
    cluster_ids: list[int] = []
    for i in range(n):
        for c, rep in enumerate(representatives):
            if equivalent(rep, i):
                cluster_ids.append(c)
                break
        else:
            representatives.append(i)
            cluster_ids.append(len(representatives) - 1)
    return cluster_ids


def bidirectional(entails: Callable[[int, int], bool]) -> Callable[[int, int], bool]:
    """Two responses mean the same iff each entails the other (the strict rule of Kuhn et al.)."""
    return lambda a, b: entails(a, b) and entails(b, a)


def cluster_probabilities(cluster_ids: Sequence[int], weights: Sequence[float] | None = None) -> np.ndarray:
    """p(c) for c = 0..max(cluster_ids): |c|/K when weights is None, else sum of member weights,
    normalised (all-zero weights fall back to counts). Shape [n_clusters]."""
    ids = np.asarray(cluster_ids)
    w = np.ones(len(ids)) if weights is None else np.asarray(weights, dtype=float)
    if w.sum() <= 0:
        w = np.ones(len(ids))
    mass = np.bincount(ids, weights=w, minlength=ids.max() + 1)
    return mass / mass.sum()


def semantic_entropy(probabilities: np.ndarray) -> float:
    """SE = -sum_c p(c) log p(c) (natural log); empty clusters contribute nothing."""
    p = probabilities[probabilities > 0]
    return float(-(p * np.log(p)).sum())


def semantic_uncertainty(cluster_ids: Sequence[int], probabilities: np.ndarray) -> list[float]:
    """u_sem(y_i) = -log p(C(y_i)) / log K, clipped to [0, 1] (weighted p can fall below 1/K)."""
    k = len(cluster_ids)
    if k < 2:
        raise ValueError("semantic uncertainty needs K >= 2 responses per prompt")
    # a cluster of empty responses has no likelihood mass under the weighted rule: maximally uncertain
    return [float(min(1.0, max(0.0, -math.log(probabilities[c]) / math.log(k)))) if probabilities[c] > 0 else 1.0
            for c in cluster_ids]


def length_normalised_likelihood(token_logprobs: Sequence[float]) -> float:
    """exp(mean token log-prob); 0 for an empty response (it carries no likelihood mass)."""
    return math.exp(sum(token_logprobs) / len(token_logprobs)) if token_logprobs else 0.0


def cosine_matrix(embeddings: np.ndarray) -> np.ndarray:
    unit = embeddings / np.clip(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12, None)
    return unit @ unit.T


# ----------------------------------------------------------------------------- factual

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 1]


def selfcheck_uncertainty(sentence_embeddings: Sequence[np.ndarray], aggregate: str = "mean") -> list[float]:
    """SelfCheck-style u_fact with embedding agreement.

    sentence_embeddings[i]: [S_i, D] unit-norm embeddings of y_i's sentences (S_i may be 0).
    agreement(s, y_j) = max(0, max_t cos(s, t)) over sentences t of y_j (0 if y_j is empty);
    support(s) = mean (or max) over j != i; u_fact(y_i) = 1 - mean_s support(s), and 1 when
    y_i has no sentence (an empty answer asserts nothing checkable).
    """
    reducer = {"mean": np.mean, "max": np.max}[aggregate]
    k = len(sentence_embeddings)
    scores = []
    for i in range(k):
        own = sentence_embeddings[i]
        if len(own) == 0:
            scores.append(1.0)
            continue
        per_other = []
        for j in range(k):
            if j == i:
                continue
            other = sentence_embeddings[j]
            per_other.append(np.zeros(len(own)) if len(other) == 0 else np.clip((own @ other.T).max(axis=1), 0, 1))
        support = reducer(np.stack(per_other), axis=0) if per_other else np.zeros(len(own))
        scores.append(float(1.0 - support.mean()))
    return scores


def token_nll(token_logprobs: Sequence[float]) -> float:
    """Mean token negative log-likelihood; an empty response gets 0 (min-max within the prompt follows)."""
    return float(-sum(token_logprobs) / len(token_logprobs)) if token_logprobs else 0.0


# ----------------------------------------------------------------------------- value

def yes_no_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First-token ids of the answer words with and without a leading space, deduplicated."""
    def first_ids(words):
        ids = {tokenizer.encode(w, add_special_tokens=False)[0] for w in words}
        return sorted(ids)
    yes, no = first_ids(["Yes", " Yes", "yes", " yes"]), first_ids(["No", " No", "no", " no"])
    if set(yes) & set(no):
        raise ValueError("the tokenizer maps Yes and No to a shared first token; self_judge cannot read them")
    return yes, no


def judge_text(tokenizer, principle: str, prompt: str, response: str) -> str:
    question = (f"{principle.strip()}\n\nRequest: {prompt}\nResponse: {response or '(empty)'}\n\n"
                "Does the response follow the principle? Answer Yes or No.")
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
    return question + "\nAnswer:"


def p_yes(model, tokenizer, texts: Sequence[str], batch_size: int = 16) -> np.ndarray:
    """P(Yes) / (P(Yes) + P(No)) from the next-token distribution after each text. Shape [N].
    Batches are left-padded with position ids (`generation.SharedPrefix`, which also reads the
    texts' common opening once), so a text gets the same P(Yes) in any batch, also from a judge
    with learned absolute positions."""
    import torch

    from udasa_lib.generation import SharedPrefix, common_prefix_length, encode_prompt, pad_id_of

    yes_ids, no_ids = yes_no_token_ids(tokenizer)
    rows = [encode_prompt(tokenizer, text) for text in texts]
    # every text opens with the same principle: its KV cache is computed once (SharedPrefix)
    shared = SharedPrefix(model, rows[0][:common_prefix_length(rows)]) if rows else None
    out = []
    for i in range(0, len(rows), batch_size):
        with torch.inference_mode():
            logits = shared.forward(rows[i: i + batch_size], pad_id_of(tokenizer), logits_to_keep=1).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        yes, no = probs[:, yes_ids].sum(-1), probs[:, no_ids].sum(-1)
        out.append((yes / (yes + no).clamp_min(1e-12)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def vader_p_aligned(texts: Sequence[str]) -> np.ndarray:
    """The sentiment task's value: VADER compound score mapped from [-1, 1] to [0, 1] (1 = positive)."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return np.array([(analyzer.polarity_scores(t)["compound"] + 1) / 2 for t in texts])


# ----------------------------------------------------------------------------- the stage

class Embedder:
    """sentence-transformers model, unit-norm embeddings, with a cache keyed by text."""

    def __init__(self, name_or_path: str):
        from sentence_transformers import SentenceTransformer

        from udasa_lib.models import load_pretrained

        self.model = load_pretrained(lambda source: SentenceTransformer(source, device="cpu"), name_or_path,
                                     "sentence-transformers embedder")
        self.max_seq_length = self.model.max_seq_length  # the harm probe may share the model and change it
        self.cache: dict[str, np.ndarray] = {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self.cache})
        if missing:
            self.model.max_seq_length = self.max_seq_length
            vectors = self.model.encode(missing, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
            self.cache.update(zip(missing, vectors))
        dim = self.model.get_embedding_dimension()
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, dim))


class NLIEntailment:
    """Entailment judgements from any sequence-classification NLI model (transformers'
    AutoModelForSequenceClassification) whose config names an 'entail*' label in id2label.

    The label order is read from the model's config, never assumed: microsoft/deberta-large-mnli
    puts ENTAILMENT at index 2, other MNLI models at 0. A pair is (premise, hypothesis), encoded as
    the tokenizer's own text pair: an encoder's tokenizer adds its separators ([CLS] p [SEP] h
    [SEP]); a decoder-style classifier's (the tiny test model's) joins the texts as they are, so a
    real decoder NLI model would need its own template. Weights in float32 on any device, as
    Kuhn et al. ran it: argmax decisions near a tie could flip in bf16. An empty text is decided
    without the model (empty entails empty and nothing else). Raises ModelLoadError
    (models.load_pretrained) when the model cannot be loaded and ValueError when no label starts
    with 'entail'."""

    batch_size = 64  # pairs per forward pass

    def __init__(self, name_or_path: str, device: str = "cpu"):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from udasa_lib.models import load_pretrained, resolve_device

        torch_device = resolve_device(device)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, name_or_path, "NLI tokenizer")
        self.model = load_pretrained(
            lambda source: AutoModelForSequenceClassification.from_pretrained(source, dtype=torch.float32),
            name_or_path, "NLI classifier").to(torch_device).eval()
        config = self.model.config
        # a classifier that pools the last non-pad token must pad with the id its config names
        if config.pad_token_id is not None:
            self.tokenizer.pad_token_id = config.pad_token_id
        elif self.tokenizer.pad_token is not None:
            config.pad_token_id = self.tokenizer.pad_token_id
        else:
            self.tokenizer.pad_token = self.tokenizer.eos_token
            config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = min(self.tokenizer.model_max_length, getattr(config, "max_position_embeddings", None)
                              or self.tokenizer.model_max_length)
        self.labels = {int(i): str(label).lower() for i, label in config.id2label.items()}
        entail = [i for i, label in sorted(self.labels.items()) if label.startswith("entail")]
        if not entail:
            raise ValueError(f"NLI model {name_or_path}: no entailment label among {self.labels} (config id2label)")
        self.entail_index = entail[0]

    def probabilities(self, premises: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
        """Class probabilities, shape [n_pairs, n_labels] in the config's label order. A pair with
        an empty side gets probability 1 on entailment if both sides are empty, else 0 on it
        (spread over the other labels)."""
        import torch

        if len(premises) != len(hypotheses):
            raise ValueError(f"NLI: {len(premises)} premises for {len(hypotheses)} hypotheses")
        n_labels = len(self.labels)
        probs = np.zeros((len(premises), n_labels))
        empty = [i for i, (p, h) in enumerate(zip(premises, hypotheses)) if not p.strip() or not h.strip()]
        for i in empty:
            if not premises[i].strip() and not hypotheses[i].strip():
                probs[i, self.entail_index] = 1.0
            else:
                probs[i] = 1.0 / (n_labels - 1)
                probs[i, self.entail_index] = 0.0
        skipped = set(empty)
        todo = [i for i in range(len(premises)) if i not in skipped]
        for start in range(0, len(todo), self.batch_size):
            rows = todo[start:start + self.batch_size]
            encoded = self.tokenizer([premises[i] for i in rows], [hypotheses[i] for i in rows], return_tensors="pt",
                                     padding=True, truncation=True, max_length=self.max_length).to(self.model.device)
            with torch.inference_mode():
                probs[rows] = torch.softmax(self.model(**encoded).logits.float(), dim=-1).cpu().numpy()
        return probs

    def entailment_probability(self, premises: Sequence[str], hypotheses: Sequence[str]) -> np.ndarray:
        """P(entailment | premise, hypothesis) per pair, shape [n_pairs]."""
        return self.probabilities(premises, hypotheses)[:, self.entail_index]

    def entails(self, premise: str, hypothesis: str) -> bool:
        """Whether entailment is the most probable class (Kuhn et al. 2023's rule)."""
        return bool(self._is_entailment(self.probabilities([premise], [hypothesis]))[0])

    def entailment_matrix(self, texts: Sequence[str]) -> np.ndarray:
        """entails[i, j]: text i (premise) entails text j (hypothesis) by `entails`' rule; every
        ordered pair in one batched pass, the diagonal True. Shape [K, K], bool."""
        k = len(texts)
        ordered = [(i, j) for i in range(k) for j in range(k) if i != j]
        matrix = np.eye(k, dtype=bool)
        if ordered:
            rows, cols = zip(*ordered)
            matrix[list(rows), list(cols)] = self._is_entailment(
                self.probabilities([texts[i] for i in rows], [texts[j] for j in cols]))
        return matrix

    def _is_entailment(self, probabilities: np.ndarray) -> np.ndarray:
        return probabilities.argmax(axis=1) == self.entail_index


def score_prompt(record: dict, cfg, embedder: Embedder, nli: NLIEntailment | None) -> dict:
    """Semantic and factual scores of one samples.jsonl record (value scores are batched separately)."""
    responses = record["responses"]
    texts = [r["text"] for r in responses]
    k = len(texts)
    if k < 2:
        raise ValueError(f"prompt {record['prompt_id']}: {k} response(s); scoring needs K >= 2")

    sem = cfg.semantic
    if sem.equivalence == "nli":
        if nli is None:
            raise ValueError("score.semantic.equivalence is nli but score.nli_model is empty")
        entails = nli.entailment_matrix(texts)
        equivalent = bidirectional(lambda a, b: bool(entails[a, b]))
    else:
        similarity = cosine_matrix(embedder(texts))
        equivalent = lambda a, b: similarity[a, b] >= sem.threshold  # noqa: E731
    cluster_ids = cluster_by_equivalence(k, equivalent)
    likelihoods = [length_normalised_likelihood(r["token_logprobs"]) for r in responses]
    p_discrete = cluster_probabilities(cluster_ids)
    p_weighted = cluster_probabilities(cluster_ids, likelihoods)
    p_used = p_weighted if sem.probability == "weighted" else p_discrete

    fac = cfg.factual
    if fac.method == "token_nll":
        u_fact = [token_nll(r["token_logprobs"]) for r in responses]
    else:
        sentences = [split_sentences(t) for t in texts]
        if fac.agreement == "nli":
            if nli is None:
                raise ValueError("score.factual.agreement is nli but score.nli_model is empty")
            u_fact = _selfcheck_nli(sentences, texts, nli, fac.aggregate)
        else:
            u_fact = selfcheck_uncertainty([embedder(s) for s in sentences], fac.aggregate)
    return {
        "prompt_id": record["prompt_id"], "task": record["task"], "sample_ids": [r["sample_id"] for r in responses],
        "semantic": {"cluster_ids": cluster_ids, "n_clusters": int(max(cluster_ids) + 1),
                     "entropy_discrete": semantic_entropy(p_discrete), "entropy_weighted": semantic_entropy(p_weighted),
                     "u": semantic_uncertainty(cluster_ids, p_used)},
        "factual": {"u": u_fact, "method": fac.method},
        "empty": [not t for t in texts],
    }


def _selfcheck_nli(sentences: list[list[str]], texts: list[str], nli: NLIEntailment, aggregate: str) -> list[float]:
    """SelfCheckGPT-NLI (Manakul et al. 2023, Sec. 5.4) in this project's form: agreement(s, y_j)
    = P(entailment | premise y_j, hypothesis s); support(s) = mean (or max) over the other K-1
    samples, an empty one giving 0; u_fact(y_i) = 1 - mean_s support(s), 1 when y_i has no
    sentence. Every (sample, sentence) pair of the prompt goes through the classifier in one
    batched pass."""
    reducer = {"mean": np.mean, "max": np.max}[aggregate]
    queries = [(j, s) for i, own in enumerate(sentences) for s in own for j in range(len(texts)) if j != i and texts[j]]
    probability = dict(zip(queries, nli.entailment_probability([texts[j] for j, _ in queries], [s for _, s in queries])))
    scores = []
    for i, own in enumerate(sentences):
        if not own:
            scores.append(1.0)
            continue
        support = np.array([[probability.get((j, s), 0.0) for s in own] for j in range(len(texts)) if j != i])
        scores.append(float(1.0 - reducer(support, axis=0).mean()))
    return scores


def value_scores(records: list[dict], scorer: str, cfg, model_cfg, principles: dict, runtime,
                 harm_probe=None) -> np.ndarray:
    """p(aligned) for every response of `records` (all of one task), flattened in record order."""
    prompts = [r["prompt"] for r in records for _ in r["responses"]]
    texts = [x["text"] for r in records for x in r["responses"]]
    if scorer == "vader":
        return vader_p_aligned(texts)
    if scorer == "harm_probe":
        return harm_probe.score(prompts, texts)
    if scorer == "self_judge":
        from udasa_lib.models import load_causal_lm

        task = records[0]["task"]
        if task not in principles:
            raise ValueError(f"score.value.principles has no principle for task {task!r}")
        judge = cfg.judge or model_cfg.name_or_path
        model, tokenizer = load_causal_lm(judge, model_cfg.dtype, runtime.device, shard=True)
        return p_yes(model, tokenizer, [judge_text(tokenizer, principles[task], p, t) for p, t in zip(prompts, texts)],
                     cfg.batch_size)
    raise ValueError(f"score.value.scorers: unknown scorer {scorer!r} (self_judge, harm_probe, vader)")


def score_samples(records: list[dict], score_cfg, model_cfg, runtime, principles: dict, harm_probe=None,
                  progress: bool = True) -> tuple[list[dict], dict]:
    """Score every record; returns (per-prompt score records, scorer report with timings and accuracies)."""
    from tqdm.auto import tqdm

    started = time.time()
    # the sentence embedder is loaded only when a rule reads it (paper.yaml's NLI rules do not)
    uses_embedder = ("embedding" in (score_cfg.semantic.equivalence, score_cfg.factual.agreement)
                     or harm_probe is not None)
    embedder = Embedder(score_cfg.embedder) if uses_embedder else None
    nli = NLIEntailment(score_cfg.nli_model, runtime.device) if score_cfg.nli_model else None
    if embedder is not None:
        # One encode call over every response and sentence: per-prompt calls of a few texts each
        # spend most of their time in call overhead, not in the model.
        texts = [response["text"] for r in records for response in r["responses"]]
        embedder([*texts, *(s for t in texts for s in split_sentences(t))])
    if harm_probe is not None:
        harm_probe.share_embedder(embedder.model, score_cfg.embedder, embedder.cache, embedder.max_seq_length)
    scored = [score_prompt(r, score_cfg, embedder, nli) for r in tqdm(records, desc="semantic+factual",
                                                                        disable=not progress)]
    report: dict = {"seconds": {"semantic_factual": round(time.time() - started, 2)}, "scorers": {}}
    by_task: dict[str, list[int]] = {}
    for index, record in enumerate(records):
        by_task.setdefault(record["task"], []).append(index)
    for task, indices in by_task.items():
        scorer = score_cfg.value.scorers.get(task)
        if scorer is None:
            raise ValueError(f"score.value.scorers has no scorer for task {task!r}")
        begin = time.time()
        if scorer == "harm_probe" and harm_probe is None:
            raise ValueError("score.value.scorers asks for harm_probe but no fitted probe was given")
        p_aligned = value_scores([records[i] for i in indices], scorer, score_cfg.value, model_cfg, principles,
                                 runtime, harm_probe)
        report["seconds"][f"value_{task}"] = round(time.time() - begin, 2)
        cursor = 0
        for i in indices:
            k = len(records[i]["responses"])
            p = p_aligned[cursor: cursor + k]
            cursor += k
            scored[i]["value"] = {"scorer": scorer, "p_aligned": [float(v) for v in p],
                                  "u": [float(1 - v) for v in p]}
    report["seconds"]["total"] = round(time.time() - started, 2)
    return scored, report


def score_with_config(records: list[dict], run, progress: bool = True) -> tuple[list[dict], dict]:
    """score_samples with the scorers `run.config.score` names: the harm probe fitted by the run's
    00_data when a task uses it, the principles file for self_judge. 02_score and the on-policy
    rounds of 04_train both score this way."""
    from udasa_lib.value_probe import HARM_PROBE_FILE, HARM_PROBE_METRICS
    from udasa_lib.value_probe import HarmProbe

    cfg = run.config
    uses_probe = "harm_probe" in cfg.score.value.scorers.values()
    harm_probe = HarmProbe.load(run.upstream["00_data"] / HARM_PROBE_FILE) if uses_probe else None
    scored, report = score_samples(records, cfg.score, cfg.model, cfg.runtime,
                                   load_principles(cfg.score.value.principles, "judge"), harm_probe, progress=progress)
    if uses_probe:
        report["scorers"]["harm_probe"] = json.loads((run.upstream["00_data"] / HARM_PROBE_METRICS).read_text())
    return scored, report


def run_scoring(run) -> dict:
    """02_score: score every response of 01_sample, write scores.jsonl and scorers.json."""
    from udasa_lib.io import atomic_write_json, atomic_write_jsonl
    from udasa_lib.models import configure_threads
    from udasa_lib.sample import SAMPLES_FILE, load_samples

    configure_threads(run.config.runtime.threads)
    records = load_samples(run.upstream["01_sample"] / SAMPLES_FILE)
    scored, report = score_with_config(records, run)
    atomic_write_jsonl(run.dir / SCORES_FILE, scored)
    # the file: what scored the responses; the wall times: the manifest only (files are the same
    # bytes on every rerun)
    atomic_write_json(run.dir / "scorers.json", {k: v for k, v in report.items() if k != "seconds"})
    run.add_to_manifest(scorers=report["scorers"], seconds=report["seconds"])
    return report


def load_scores(path) -> list[dict]:
    from udasa_lib.io import SchemaError, read_jsonl

    records = read_jsonl(path, SCORE_SCHEMA)
    for line, record in enumerate(records, start=1):
        for d in DIMENSIONS:
            if len(record[d].get("u", [])) != len(record["sample_ids"]):
                raise SchemaError(f"{path} line {line} (prompt {record['prompt_id']}): {d}.u has "
                                  f"{len(record[d].get('u', []))} scores for {len(record['sample_ids'])} samples")
    return records
