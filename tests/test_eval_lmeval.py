"""lm-eval on the repo's udasa_truthful_mc task, offline, on the tiny random model.

Each lm-eval run costs ~3 s here (plus ~10 s of imports once), so the base run is shared.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from udasa_lib import eval_lmeval as lmeval
from udasa_lib.io import read_jsonl

TASK = lmeval.REPO_TASK
QUESTIONS = [
    {"question": "What colour is the sky on a clear day?", "choices": ["Green", "Blue", "Red"], "gold": 1},
    {"question": "How many legs does a spider have?", "choices": ["Eight", "Six", "Ten", "Four"], "gold": 0},
    {"question": "Which planet is closest to the Sun?", "choices": ["Venus", "Mars", "Mercury"], "gold": 2},
    {"question": "What is frozen water called?", "choices": ["Steam", "Ice"], "gold": 1},
    {"question": "Which is a mammal?", "choices": ["Shark", "Trout", "Whale", "Eel"], "gold": 2},
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin"], "gold": 0},
]


def write_questions(path: Path, questions: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [{**q, "id": f"t-{i}", "source": "test", "text": q["question"]} for i, q in enumerate(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, tiny_model_path):
    """The repo task run from a cwd that is neither the repo nor the data file's folder,
    with the data file given relative to that cwd."""
    root = tmp_path_factory.mktemp("lmeval")
    data = write_questions(root / "data" / "q.jsonl", QUESTIONS)
    (root / "elsewhere").mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root / "elsewhere")
        result = lmeval.run_truthful(str(tiny_model_path), Path("../data/q.jsonl"), batch_size=4)
    return data, result


def test_repo_task_runs_offline_from_other_cwd(base_run, tmp_path):
    data, result = base_run
    lm = result["lm_eval"]
    scores = lm["results"][TASK]
    assert 0.0 <= scores["acc,none"] <= 1.0 and 0.0 <= scores["acc_norm,none"] <= 1.0
    assert lm["n-samples"][TASK] == {"original": 6, "effective": 6}
    assert lm["versions"][TASK] == 1.0
    assert lm["configs"][TASK]["dataset_kwargs"]["data_files"] == str(data.resolve())
    assert "peft" not in lm["config"]["model_args"]
    json.dumps(result)  # callers write it as is

    results_file, samples_file = lmeval.write_results(result, tmp_path / "out")
    assert json.loads(results_file.read_text())["results"][TASK] == scores
    rows = read_jsonl(samples_file)
    assert [r["id"] for r in rows] == [f"t-{i}" for i in range(6)]
    assert all(r["acc"] in (0.0, 1.0) and r["acc_norm"] in (0.0, 1.0) for r in rows)


def test_per_question_mean_equals_reported_acc(base_run):
    _, result = base_run
    rows = result["per_question"]
    assert len(rows) == 6 and [r["target"] for r in rows] == [q["gold"] for q in QUESTIONS]
    for metric in ("acc", "acc_norm"):
        mean = sum(r[metric] for r in rows) / len(rows)
        assert mean == pytest.approx(result["lm_eval"]["results"][TASK][f"{metric},none"], abs=1e-12)
    # acc is the argmax of the raw per-choice log-likelihoods
    for r in rows:
        lls = r["loglikelihoods"]
        assert r["acc"] == float(lls.index(max(lls)) == r["target"])


def choice_logliks(model, tok, question: str, choices: list[str]) -> list[float]:
    """log p(" " + choice | "Question: q\\nAnswer:"), tokenised the way lm-eval does:
    the whole string at once, the continuation being the tokens after the context's."""
    import torch

    context = f"Question: {question}\nAnswer:"
    out = []
    for choice in choices:
        whole, ctx = tok.encode(context + " " + choice), tok.encode(context)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).logits[0].float(), -1)
        out.append(sum(logp[i - 1, whole[i]].item() for i in range(len(ctx), len(whole))))
    return out


def test_prompt_and_leading_space(base_run, tiny_model):
    model, tok = tiny_model
    _, result = base_run
    for q, row in zip(QUESTIONS[:2], result["per_question"]):
        ours = choice_logliks(model, tok, q["question"], q["choices"])
        assert row["loglikelihoods"] == pytest.approx(ours, abs=1e-3)


def test_lora_adapter_evaluated_unmerged(base_run, tiny_model_path, tiny_model, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    data, base = base_run
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_path), dtype=torch.float32)
    # init_lora_weights=False gives B != 0, so the adapter changes the outputs
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config).eval()
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(str(adapter))

    result = lmeval.run_truthful(str(tiny_model_path), data, adapter_dir=adapter, batch_size=4)
    assert result["lm_eval"]["config"]["model_args"]["peft"] == str(adapter.resolve())
    assert result["lm_eval"]["n-samples"][TASK]["effective"] == 6
    flat = lambda res: [x for r in res["per_question"] for x in r["loglikelihoods"]]  # noqa: E731
    assert flat(result) != pytest.approx(flat(base), abs=1e-3)
    q, row = QUESTIONS[0], result["per_question"][0]
    assert row["loglikelihoods"] == pytest.approx(
        choice_logliks(peft_model, tiny_model[1], q["question"], q["choices"]), abs=1e-3)


def test_rewritten_data_file_is_not_served_from_stale_cache(tiny_model_path, tmp_path):
    """datasets keys its cache on path + mtime: rewrite the file keeping its mtime."""
    path = write_questions(tmp_path / "q.jsonl", QUESTIONS[:2])
    first = lmeval.run_truthful(str(tiny_model_path), path, limit=2)
    stat = os.stat(path)
    swapped = [{**q, "choices": q["choices"][::-1], "gold": len(q["choices"]) - 1 - q["gold"]}
               for q in QUESTIONS[:2]]
    write_questions(path, swapped)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = lmeval.run_truthful(str(tiny_model_path), path, limit=2)
    assert [r["target"] for r in first["per_question"]] == [1, 0]
    assert [r["target"] for r in second["per_question"]] == [1, 3]
    for a, b in zip(first["per_question"], second["per_question"]):
        assert b["loglikelihoods"] == pytest.approx(a["loglikelihoods"][::-1], abs=1e-4)


def test_task_config_checks(tmp_path):
    with pytest.raises(FileNotFoundError):
        lmeval.task_config(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.yaml"
    bad.write_text(lmeval.TASK_FILE.read_text().replace(lmeval.DATA_PLACEHOLDER, "x.jsonl"))
    with pytest.raises(ValueError, match="data_files"):
        lmeval.task_config(write_questions(tmp_path / "q.jsonl", QUESTIONS), bad)


def test_builtin_truthfulqa_tasks_exist():
    import lm_eval.tasks

    folder = Path(lm_eval.tasks.__file__).parent / "truthfulqa"
    assert all((folder / f"{name}.yaml").is_file() for name in lmeval.BUILTIN_TRUTHFUL_TASKS)
