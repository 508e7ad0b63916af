"""Stages through papermill: manifests last, keyed reuse, upstream checks."""
import json

import pytest

from udasa_lib import pipeline

from conftest import SMOKE_CONFIG


def test_stage_chain_writes_manifests_and_reuses_done_stages(smoke_data):
    data = smoke_data
    first = pipeline.run_stage("01_sample", SMOKE_CONFIG)
    manifest = json.loads((first.run_dir / "01_sample" / "manifest.json").read_text())
    assert manifest["key"] == first.key and manifest["params"]["sample"]["k"] == 3
    assert "samples.jsonl" in manifest["outputs"] and "01_sample.ipynb" in manifest["outputs"]
    assert manifest["upstream"]["00_data"]["key"] == data.key
    data_manifest = json.loads((data.dir / "manifest.json").read_text())
    assert data_manifest["extra"]["harm_probe"]["accuracy"] > 0.5
    assert 0.5 < data_manifest["extra"]["sentiment_reward"]["accuracy"] <= 1
    assert {"commit", "dirty"} <= set(manifest["git"]) and manifest["packages"]["torch"] != "absent"
    assert (first.run_dir / "config.json").exists()

    again = pipeline.run_stage("01_sample", SMOKE_CONFIG)  # nothing changed: no rerun
    assert json.loads((again.dir / "manifest.json").read_text())["finished_at"] == manifest["finished_at"]

    changed = pipeline.run_stage("01_sample", SMOKE_CONFIG, {"sample.k": 2})
    assert changed.run_id != first.run_id and changed.key != first.key
    assert changed.upstream["00_data"] == first.upstream["00_data"], "00_data must be shared, not recomputed"
    assert (changed.run_dir / "00_data").resolve() == (first.run_dir / "00_data").resolve()


def test_stage_refuses_to_run_before_its_upstream(results_root):
    with pytest.raises(pipeline.StageError, match="upstream stage 00_data has not finished"):
        pipeline.open_stage("01_sample", SMOKE_CONFIG)


def test_failed_stage_writes_no_manifest(smoke_data):
    overrides = {"model.name_or_path": "./no/such/model"}
    with pytest.raises(pipeline.StageError, match="01_sample failed"):
        pipeline.run_stage("01_sample", SMOKE_CONFIG, overrides)
    run = pipeline.open_stage("01_sample", SMOKE_CONFIG, overrides)
    assert not (run.dir / "manifest.json").exists()


def test_committed_notebooks_have_no_outputs_and_no_definitions():
    for spec in pipeline.STAGES.values():
        notebook = json.loads(spec.notebook.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert "parameters" in code[0]["metadata"].get("tags", []), spec.name
        for cell in code:
            assert not cell.get("outputs") and cell.get("execution_count") is None, spec.name
            source = "".join(cell["source"])
            assert "\ndef " not in f"\n{source}" and "\nclass " not in f"\n{source}", spec.name


DISPLAY_CALLS = {"display", "print", "Image", "Markdown"}


def test_committed_notebooks_orchestrate_and_the_library_computes():
    """House shape (00-07 alike): <= 8 code cells, ~25 code lines, loops only to display, no file
    writes, no raise, no private names: the logic lives in the stage's module."""
    import ast

    import nbformat

    for spec in pipeline.STAGES.values():
        cells = [c.source for c in nbformat.read(spec.notebook, as_version=4).cells if c.cell_type == "code"]
        assert len(cells) <= 8, f"{spec.name}: {len(cells)} code cells"
        lines = [l for c in cells for l in c.splitlines() if l.strip() and not l.strip().startswith("#")]
        assert len(lines) <= 27, f"{spec.name}: {len(lines)} code lines"
        for source in cells:
            tree = ast.parse(source)
            for node in ast.walk(tree):
                where = f"{spec.name}: {ast.unparse(node)[:60]!r}"
                assert not isinstance(node, (ast.Raise, ast.FunctionDef, ast.ClassDef, ast.While)), where
                if isinstance(node, ast.For):
                    calls = {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
                    assert calls and calls <= DISPLAY_CALLS, f"{where}: a loop that does more than display"
                if isinstance(node, ast.Attribute):
                    assert not node.attr.startswith("_"), f"{where}: private name"
                    assert node.attr not in ("write_text", "write_bytes", "savefig", "to_csv"), f"{where}: a write"
                if isinstance(node, ast.Name):
                    assert not node.id.startswith("atomic_") and node.id != "open", f"{where}: a write"


def test_cli_reports_config_errors(capsys):
    assert pipeline.main(["run-dir", "--config", str(SMOKE_CONFIG), "--set", "sample.kk=1"]) == 2
    assert "unknown key 'kk'" in capsys.readouterr().err


def test_makefile_rules_match_the_stage_registry():
    from udasa_lib import REPO_ROOT

    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    for spec in pipeline.STAGES.values():
        target = f"$(RUN_DIR)/{spec.name}/%/manifest.json:" if spec.variants else f"$(RUN_DIR)/{spec.name}/manifest.json:"
        rule = next((l for l in lines if l.startswith(target)), None)
        assert rule is not None, f"Makefile has no rule for {spec.name}"
        deps = set(rule.split(":", 1)[1].split())
        assert set(spec.code) | set(spec.inputs) <= deps, spec.name
        # make must also wait for every direct upstream stage (its manifest, or the variables that
        # list all its manifests), or `make -j` starts a stage before what it reads exists
        direct = [u for u in spec.upstream if not any(u in pipeline.STAGES[v].upstream for v in spec.upstream)]
        for upstream in direct:
            accepted = {f"$(RUN_DIR)/{upstream}/manifest.json"}
            accepted |= {"$(TRAINED)"} if pipeline.STAGES[upstream].variants else set()
            accepted |= {"$(EVALUATED)"} if upstream.startswith("05_eval_") else set()
            assert accepted & deps, f"Makefile rule of {spec.name} does not wait for {upstream}"


RUNNER = {"udasa_lib/pipeline.py", "udasa_lib/config.py"}  # the machinery that computes keys, not stage code


def _notebook_modules(path) -> set[str]:
    import re

    import nbformat

    names = set()
    for cell in nbformat.read(path, as_version=4).cells:
        if cell.cell_type == "code":
            for group in re.findall(r"from udasa_lib import ([\w, ]+)", cell.source):
                # `pairs as pairing` imports pairs: the alias must not hide the module from the key
                names |= {name.split(" as ")[0].strip() for name in group.split(",")}
            names |= set(re.findall(r"from udasa_lib\.(\w+) import", cell.source))
    return names


def test_stage_keys_cover_every_module_their_notebook_reaches():
    """A stage's key hashes the code it runs: the notebook's udasa_lib imports, followed transitively."""
    for spec in pipeline.STAGES.values():
        reached = set(pipeline.module_closure(*_notebook_modules(spec.notebook))) - RUNNER
        assert reached <= set(spec.code), f"{spec.name}: its key misses {sorted(reached - set(spec.code))}"


def test_no_stage_module_imports_a_downstream_stage_module_and_no_cycles():
    import ast

    from udasa_lib import REPO_ROOT

    package = REPO_ROOT / "udasa_lib"
    modules = {path.stem for path in package.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((package / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("udasa_lib"):
                parts = node.module.split(".")
                deps |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
        graph[name] = (deps & modules) - {name}
    # the stage each module belongs to: the first stage whose notebook reaches it directly
    order = list(pipeline.STAGES)
    owner = {}
    for index, spec in enumerate(pipeline.STAGES.values()):
        for module in _notebook_modules(spec.notebook) - {"pipeline", "io"}:
            owner.setdefault(module, index)
    for module, deps in graph.items():
        for dep in deps:
            if module in owner and dep in owner:
                assert owner[dep] <= owner[module], (f"{module} ({order[owner[module]]}) imports {dep} "
                                                     f"({order[owner[dep]]}), a downstream stage")
    # no cycles among module-level imports either (depth-first search on the whole graph)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            if state.get(dep) == 1:
                raise AssertionError(f"import cycle: {' -> '.join(path + [node, dep])}")
            if dep not in state:
                visit(dep, path + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_score_and_stage_through_papermill(smoke_data):
    pipeline.run_stage("01_sample", SMOKE_CONFIG)
    scored = pipeline.run_stage("02_score", SMOKE_CONFIG)
    staged = pipeline.run_stage("03_pairs", SMOKE_CONFIG)
    score_manifest = json.loads((scored.dir / "manifest.json").read_text())
    assert set(score_manifest["extra"]["seconds"]) >= {"semantic_factual", "value_alignment", "value_sentiment"}
    from udasa_lib.pairs import PAIR_SCHEMA, STAGE_NAMES
    from udasa_lib.io import read_jsonl

    pairs = read_jsonl(staged.dir / "pairs.jsonl", PAIR_SCHEMA)
    assert pairs and {p["task"] for p in pairs} == {"alignment", "sentiment"}
    assert {p["stage"] for p in pairs} <= set(STAGE_NAMES)
    for dimension in ("semantic", "factual", "value"):
        assert (staged.dir / f"pairs_{dimension}.jsonl").exists()
    manifest = json.loads((staged.dir / "manifest.json").read_text())
    assert manifest["extra"]["pair_sets"]["combined"]["pairs"] == len(pairs)
    assert "spearman_u_vs_reward" in manifest["extra"]["preliminary_study"]


def test_training_variants_come_from_the_config_and_do_not_enter_the_key():
    from udasa_lib import config as config_mod

    cfg = config_mod.resolve(SMOKE_CONFIG)
    assert pipeline.variants(cfg, "04_train") == [f"{t}/{m}" for t, ms in cfg.train.methods.items() for m in ms]
    assert pipeline.variants(cfg, "03_pairs") == [""]
    more = config_mod.resolve(SMOKE_CONFIG, {"train.methods": {**cfg.train.methods, "sentiment": ["udasa_value"]}})
    assert pipeline.variants(more, "04_train")[-1] == "sentiment/udasa_value"
    # adding a method must not retrain the others: the lists are not among the hashed params
    assert pipeline._stage_params(cfg, "04_train") == pipeline._stage_params(more, "04_train")
    assert "methods" not in pipeline._stage_params(cfg, "04_train")["train"]


def test_training_order_starts_dpo_variants_of_different_tasks_together():
    names = ["alignment/sft", "alignment/dpo", "alignment/udasa", "sentiment/sft", "sentiment/dpo",
             "sentiment/udasa_value"]
    order = pipeline.training_order(names)
    assert sorted(order) == sorted(names)
    assert order == ["alignment/dpo", "sentiment/dpo", "alignment/udasa", "sentiment/udasa_value",
                     "alignment/sft", "sentiment/sft"]
