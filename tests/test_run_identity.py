"""Every committed run folder keeps its identity: the code that names run folders rebuilds, from what a folder's
config.yaml stores, exactly that file and exactly that folder name. No model is loaded.

A run's identity is ``run_plan.run_identity(run config, method identity, task specs, data manifest)``. The first two
tests feed it the inputs each folder stored, so they check the identity and naming code itself (a change there would
orphan every committed folder: a rerun would no longer find, resume or skip it). The last test goes through
``RunPlan.build`` with today's benchmark and method defaults; it can only say something where today's data is the data
the folder was made on, and skips, naming the reason, where it is not.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import yaml

from clbench import registry
from clbench.benchmark import TaskSpec
from clbench.config import build
from clbench.run_config import RunConfig
from clbench.run_plan import RunPlan, data_manifest, default_run_dir, folder_digest, run_identity

REPO = Path(__file__).resolve().parents[1]
COMMITTED = sorted(p.parent for root in ("results/runs", "results/ablations")
                   for p in (REPO / root).rglob("config.yaml"))
HASH = re.compile(r"-([0-9a-f]{8})$")
# folders named by the harness (…-<8 hex>); the others were written with --out
HASHED = [f for f in COMMITTED if HASH.search(f.name)]


def _id(folder: Path) -> str:
    return folder.relative_to(REPO).as_posix()


def _stored(folder: Path) -> dict:
    return yaml.safe_load((folder / "config.yaml").read_text())


def _run_config(identity: dict, **overrides) -> RunConfig:
    """The stored run settings as a RunConfig (the non-identity fields, e.g. ``out``, at their defaults)."""
    return build(RunConfig, {**identity["run"], **overrides}, where="stored run config")


def test_there_are_committed_folders_to_check():
    assert len(COMMITTED) >= 20 and len(HASHED) >= 15


@pytest.mark.parametrize("folder", HASHED, ids=_id)
def test_folder_name_is_the_digest_of_its_stored_identity(folder: Path):
    """If this fails, the folder hash is computed differently from when the folder was made: `clbench run` and
    `clbench sweep` would no longer find the committed run under its name."""
    identity = _stored(folder)["identity"]
    assert folder_digest(identity) == HASH.search(folder.name).group(1)
    if folder.is_relative_to(REPO / "results" / "runs"):  # ablations were moved there by hand
        cfg = _run_config(identity, results_dir="results/runs")
        assert default_run_dir(cfg, identity) == folder.relative_to(REPO)


@pytest.mark.parametrize("folder", COMMITTED, ids=_id)
def test_stored_config_is_rebuilt_byte_for_byte_from_its_inputs(folder: Path):
    """If this fails, the identity a run computes from its settings changed (a key added, renamed or resolved
    differently): resume would refuse the committed folder as "a different config"."""
    text = (folder / "config.yaml").read_text()
    stored = yaml.safe_load(text)
    identity = stored["identity"]
    run = identity["run"]
    # the lengths unset, resolved through the defaults as a run that did not set them resolves them
    cfg = _run_config(identity, max_prompt_len=None, max_answer_len=None)
    rebuilt = run_identity(cfg, identity["method"], [TaskSpec(**t) for t in identity["tasks"]],
                           stored["data_manifest"], (run["max_prompt_len"], run["max_answer_len"]))
    resolved = {"identity": rebuilt, "data_manifest": stored["data_manifest"]}
    assert yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True) == text  # as RunStore.claim writes it
    assert folder_digest(rebuilt) == folder_digest(identity)


@functools.cache
def _todays_manifest(benchmark: str, data_dir: str | None, limit_train: int | None, limit_eval: int | None,
                     limit_test: int | None, score_split: str | None) -> dict:
    """The data manifest today's benchmark gives (read once per setting: most folders share one)."""
    factory = registry.get_benchmark(benchmark)
    loaded = factory(data_dir=data_dir, limit_train=limit_train, limit_eval=limit_eval, limit_test=limit_test)
    return data_manifest(loaded, score_split)


@pytest.mark.parametrize("folder", COMMITTED, ids=_id)
def test_todays_plan_gives_the_stored_identity_where_the_data_is_unchanged(folder: Path):
    """If this fails on a folder whose data is today's, the same command no longer resolves to the committed run
    (a benchmark's task settings or a method's defaults changed its identity)."""
    stored = _stored(folder)
    identity = stored["identity"]
    cfg = _run_config(identity, results_dir=str(folder.parents[3]))
    if _todays_manifest(cfg.benchmark, cfg.data_dir, cfg.limit_train, cfg.limit_eval, cfg.limit_test,
                        cfg.score_split) != stored["data_manifest"]:
        pytest.skip(f"made on other {cfg.benchmark} data (digest {identity['data_manifest_digest']}): "
                    "regenerate it with today's data to check it")
    plan = RunPlan.build(cfg, identity["method"])
    assert plan.resolved == stored
    if HASH.search(folder.name) and folder.is_relative_to(REPO / "results" / "runs"):
        assert plan.run_dir == folder
