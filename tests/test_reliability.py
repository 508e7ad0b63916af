"""The runner under crashes, concurrent runs, tampering and hostile input: one group per kind.

Stage lock (two processes, one stage), checked manifests (a changed product or a broken manifest
is named, never trusted), `--force` (recomputes from nothing; a failed one loses nothing), safe
names, CONFIG/SET quoting in the Makefile, and the runner's offline switch.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from udasa_lib import REPO_ROOT, pipeline
from udasa_lib.config import ConfigError

from conftest import SMOKE_CONFIG

# ---- the stage lock ------------------------------------------------------------------------------


def _cli(*args, env_extra=None):
    env = {**os.environ, "UDASA_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "udasa_lib.pipeline", *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_running_one_stage_one_waits_and_the_manifest_matches(smoke_data):
    overrides = ["--set", "sample.k=4"]  # a key of its own: other tests share this results folder
    run = pipeline.open_stage("01_sample", SMOKE_CONFIG, {"sample.k": 4})
    holder = run.dir.with_name(f".{run.key}.lock.holder")
    first = _cli("run", "01_sample", "--config", str(SMOKE_CONFIG), *overrides)
    deadline = time.time() + 120
    while not holder.exists():
        assert first.poll() is None and time.time() < deadline, first.stdout.read() if first.poll() is not None else "no lock"
        time.sleep(0.05)
    second = _cli("run", "01_sample", "--config", str(SMOKE_CONFIG), *overrides)
    out_first, _ = first.communicate(timeout=600)
    out_second, _ = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, out_first + out_second
    assert "running" in out_first and "done in" in out_first
    assert f"waiting for process {first.pid}" in out_second and "up to date" in out_second, out_second
    assert "running" not in out_second
    pipeline.verified_products(run.dir, "01_sample")  # the end state's manifest matches its files
    manifest = json.loads((run.dir / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {p.relative_to(run.dir).as_posix() for p in run.dir.rglob("*")
                                        if p.is_file() and not p.name.startswith(".")
                                        and p.name not in ("manifest.json", "manifest_extra.json")
                                        and not p.relative_to(run.dir).as_posix().startswith("shards/")}


def test_a_held_lock_is_named_and_dies_with_its_process(tmp_path):
    folder = tmp_path / ".stages" / "01_sample" / "0123456789abcdef"
    code = ("import sys, time; from pathlib import Path; from udasa_lib import pipeline\n"
            f"with pipeline.stage_lock(Path({str(folder)!r}), '01_sample'):\n"
            "    print('held', flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(pipeline.StageError, match=rf"locked by process {holder.pid} on "):
            with pipeline.stage_lock(folder, "01_sample", wait=False):
                pass
    finally:
        holder.kill()  # SIGKILL: no cleanup runs
        holder.wait()
    with pipeline.stage_lock(folder, "01_sample", wait=False):  # the OS dropped the lock with the process
        pass


# ---- checked manifests ---------------------------------------------------------------------------


@pytest.fixture
def sampled(smoke_data):
    """01_sample of the smoke config (shared); each test restores what it breaks."""
    return pipeline.run_stage("01_sample", SMOKE_CONFIG)


def test_a_changed_upstream_product_is_named_not_trusted(sampled):
    path = sampled.dir / "samples.jsonl"
    original = path.read_bytes()
    try:
        path.write_bytes(original.replace(b'"text": "', b'"text": "X', 1))
        with pytest.raises(pipeline.StageError, match=r"samples.jsonl: content differs from its manifest"):
            pipeline.open_stage("02_score", SMOKE_CONFIG)
        with pytest.raises(pipeline.StageError, match=r"samples.jsonl: content differs .*--force"):
            pipeline.run_stage("01_sample", SMOKE_CONFIG)  # reuse is refused too
    finally:
        path.write_bytes(original)
    pipeline.open_stage("02_score", SMOKE_CONFIG)  # same bytes, new mtime: the full hash accepts it


def test_a_missing_product_is_named(sampled):
    path = sampled.dir / "samples.jsonl"
    moved = path.with_name("moved.jsonl")
    path.rename(moved)
    try:
        with pytest.raises(pipeline.StageError, match=r"samples.jsonl: listed in .*manifest.json but missing"):
            pipeline.open_stage("02_score", SMOKE_CONFIG)
    finally:
        moved.rename(path)


@pytest.mark.parametrize("broken", [b"", b'{"stage": "01_sa', b"[]"])
def test_an_unreadable_manifest_is_a_clear_error_everywhere(sampled, broken, capsys):
    manifest = sampled.dir / "manifest.json"
    original = manifest.read_bytes()
    try:
        manifest.write_bytes(broken)
        with pytest.raises(pipeline.StageError, match=r"01_sample/\w+/manifest.json: (unreadable|not a stage) manifest"):
            pipeline.run_stage("01_sample", SMOKE_CONFIG)
        with pytest.raises(pipeline.StageError, match=r"manifest.json: (unreadable|not a stage) manifest"):
            pipeline.open_stage("02_score", SMOKE_CONFIG)
        assert pipeline.main(["status", "--config", str(SMOKE_CONFIG)]) == 0
        out = capsys.readouterr().out
        assert "01_sample" in out and "broken:" in out and "upstream broken:" in out
        assert pipeline.main(["verify", "--config", str(SMOKE_CONFIG)]) == 2
        assert "manifest.json: " in capsys.readouterr().err
    finally:
        manifest.write_bytes(original)
    assert pipeline.main(["verify", "--config", str(SMOKE_CONFIG)]) == 0


# ---- --force -------------------------------------------------------------------------------------


def test_force_recomputes_from_nothing_and_recovers_a_broken_manifest(smoke_data):
    overrides = {"sample.k": 5}
    run = pipeline.run_stage("01_sample", SMOKE_CONFIG, overrides)
    before = json.loads((run.dir / "manifest.json").read_text())
    # leftovers a resume would pick up: a stale shard and an extra file must not survive --force
    (run.dir / "shards").mkdir(exist_ok=True)
    (run.dir / "shards" / "stale.jsonl").write_text('{"from": "an older run"}\n')
    (run.dir / "left_over.txt").write_text("x")
    (run.dir / "manifest.json").write_text('{"trunc')
    forced = pipeline.run_stage("01_sample", SMOKE_CONFIG, overrides, force=True)
    after = json.loads((forced.dir / "manifest.json").read_text())
    assert forced.dir == run.dir and after["key"] == before["key"]
    assert not (run.dir / "left_over.txt").exists() and not (run.dir / "shards" / "stale.jsonl").exists()
    assert after["finished_at"] >= before["finished_at"] and "left_over.txt" not in after["outputs"]
    products = {k: v for k, v in after["outputs"].items() if k.endswith(".jsonl")}
    assert products == {k: v for k, v in before["outputs"].items() if k.endswith(".jsonl")}  # same seed, same bytes
    assert not list(run.dir.parent.glob(f".{run.key}.*")) or all(
        p.name.endswith((".lock", ".lock.holder")) for p in run.dir.parent.glob(f".{run.key}.*"))


def test_a_failed_force_leaves_the_previous_result_and_manifest_intact(sampled, monkeypatch):
    import papermill

    manifest_before = (sampled.dir / "manifest.json").read_bytes()
    products_before = pipeline.verified_products(sampled.dir, "01_sample")

    def crash(notebook, output, **kwargs):
        staging = pipeline.open_stage("01_sample", SMOKE_CONFIG).dir  # where the notebook would write
        assert staging != sampled.dir and staging.name.startswith(f".{sampled.key}.force-")
        assert not any(staging.iterdir()), "a forced run starts from an empty folder: nothing to resume"
        (staging / "samples.jsonl").write_text("half a file")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(papermill, "execute_notebook", crash)
    with pytest.raises(pipeline.StageError, match="killed halfway"):
        pipeline.run_stage("01_sample", SMOKE_CONFIG, force=True)
    assert (sampled.dir / "manifest.json").read_bytes() == manifest_before
    assert pipeline.verified_products(sampled.dir, "01_sample") == products_before
    assert pipeline.is_done(pipeline.open_stage("01_sample", SMOKE_CONFIG))
    assert os.environ.get(pipeline.STAGING_ENV) is None


def test_a_swap_interrupted_between_its_renames_is_undone(tmp_path):
    target = tmp_path / "0123456789abcdef"
    previous = tmp_path / ".0123456789abcdef.previous"
    previous.mkdir()
    (previous / "manifest.json").write_text("{}")
    pipeline._recover_swap(target)
    assert (target / "manifest.json").exists() and not previous.exists()


# ---- names, quoting, offline ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside", "a/b", ".hidden", "", "x" * 101, "semi;colon"])
def test_run_names_outside_the_safe_set_are_refused(name):
    with pytest.raises(pipeline.StageError, match="run name"):
        pipeline.run_name_for(SMOKE_CONFIG, name or ".")


@pytest.mark.parametrize("where", ["sample.tasks", "sources"])
def test_task_and_split_names_that_would_leave_results_are_refused(tmp_path, where):
    from udasa_lib import config as config_mod

    if where == "sample.tasks":
        text = ("inherit: " + str(SMOKE_CONFIG) + "\nsample:\n  tasks:\n    ../evil:\n      sources: {harmful_train: 2}\n"
                "      max_new_tokens: 4\n      chat_template: true\n      principle_share: 0\n")
        match = r"sample.tasks: name '../evil'"
    else:
        text = ("inherit: " + str(SMOKE_CONFIG) + "\nsample:\n  tasks:\n    alignment:\n"
                "      sources: {../../etc/passwd: 2}\n")
        match = r"sample.tasks.alignment.sources: name '../../etc/passwd'"
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        config_mod.resolve(path)


def test_makefile_passes_config_and_set_as_data_never_as_shell(tmp_path):
    # (`$(shell ...)` inside a make variable is make's own syntax: make expands every command-line
    # variable it exports to recipes, Makefile or not; that is make code typed by the user, not data)
    marker = tmp_path / "pwned"
    hostile = [f"SET=seed=0;touch$${{IFS}}{marker};true", f"SET=seed=0;touch {marker}",
               f"CONFIG=configs/smoke.yaml;touch {marker}",
               f"CONFIG=x' ; touch {marker} ; '"]
    for assignment in hostile:
        subprocess.run(["make", "--no-print-directory", "-C", str(REPO_ROOT), "help", assignment],
                       capture_output=True, text=True, timeout=120)
        assert not marker.exists(), f"`make help {assignment}` ran a command"


def test_every_entry_point_is_offline_unless_asked(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    code = ("import udasa_lib, os; import huggingface_hub.constants as c; "
            "print(c.HF_HUB_OFFLINE, os.environ['HF_DATASETS_OFFLINE'], c.HF_HUB_DISABLE_TELEMETRY)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["True", "1", "True"]
    asked = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**env, "HF_HUB_OFFLINE": "0"},
                           capture_output=True, text=True, check=True).stdout.split()
    assert asked[0] == "False"  # the user's explicit choice wins
