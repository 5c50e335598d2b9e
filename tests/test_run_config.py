"""Where a run's settings come from: built-in defaults < hardware profile < run YAML < command-line flags.

Pure: builds RunConfigs only, no model is loaded.
"""

from __future__ import annotations

import pytest
import yaml

from clbench.config import ConfigError
from clbench.configs_dir import configs_root
from clbench.harness import RunConfig, load_run_config

NO_FLAGS: dict = {"method": None, "benchmark": None, "seed": None, "precision": None, "batch_size": None}


def write(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_built_in_defaults_when_nothing_is_given():
    """If this fails, a bare `clbench run` no longer means lora on trace-mini, into the user's own runs/ folder."""
    cfg, method_cfg = load_run_config(None, dict(NO_FLAGS))
    assert (cfg.method, cfg.benchmark, cfg.results_dir, cfg.precision) == ("lora", "trace-mini", "runs", "32-true")
    assert method_cfg == {}


def test_the_run_yaml_chooses_method_and_benchmark(tmp_path):
    """If this fails, `--config run.yaml` with `method: moses` silently runs lora (the CLI's defaults won)."""
    path = write(tmp_path / "run.yaml", {"method": "moses", "benchmark": "trace", "seed": 4,
                                         "method_config": {"top_k": 2}})
    cfg, method_cfg = load_run_config(path, dict(NO_FLAGS))
    assert (cfg.method, cfg.benchmark, cfg.seed) == ("moses", "trace", 4)
    assert method_cfg == {"top_k": 2}


def test_flags_beat_the_yaml_which_beats_the_hardware_profile(tmp_path):
    """If this fails, a hardware profile overrides what the user wrote in their YAML, or a flag is ignored."""
    path = write(tmp_path / "run.yaml", {"batch_size": 3, "precision": "32-true"})
    cfg, _ = load_run_config(path, dict(NO_FLAGS), hardware="8xgpu-node")
    assert cfg.batch_size == 3 and cfg.precision == "32-true"  # the YAML beats the profile's 4 and bf16-mixed
    assert cfg.devices == 8 and cfg.accumulate_grad_batches == 4  # what the YAML leaves unsaid comes from the profile
    cfg, _ = load_run_config(path, {**NO_FLAGS, "batch_size": 5}, hardware="8xgpu-node")
    assert cfg.batch_size == 5 and cfg.precision == "32-true"  # the flag beats both


def test_the_yaml_may_name_its_hardware_profile_and_the_flag_overrides_it(tmp_path):
    """If this fails, a run YAML cannot carry its hardware profile, or `--hardware` cannot replace it."""
    path = write(tmp_path / "run.yaml", {"hardware": "1xgpu"})
    cfg, _ = load_run_config(path, dict(NO_FLAGS))
    assert cfg.accelerator == "gpu" and cfg.devices == 1
    cfg, _ = load_run_config(path, dict(NO_FLAGS), hardware="8xgpu-node")
    assert cfg.devices == 8


@pytest.mark.parametrize("profile", sorted(p.stem for p in (configs_root() / "hardware").glob("*.yaml")))
def test_every_shipped_hardware_profile_builds_a_run_config(profile):
    """If this fails, `--hardware NAME` for a shipped profile stops with a config error (a key RunConfig lacks)."""
    cfg, _ = load_run_config(None, dict(NO_FLAGS), hardware=profile)
    assert isinstance(cfg, RunConfig)
    profile_keys = yaml.safe_load((configs_root() / "hardware" / f"{profile}.yaml").read_text())
    assert all(getattr(cfg, k) == v for k, v in profile_keys.items()), profile


@pytest.mark.parametrize("key, value", [("max_steps_per_task", -3), ("batch_size", 0), ("num_tasks", 0),
                                        ("epochs", -1), ("order", 0), ("stop_after", -1)])
def test_out_of_range_numbers_are_one_config_error(tmp_path, key, value):
    """If this fails, `--max-steps-per-task -3` ends in Lightning's MisconfigurationException traceback."""
    with pytest.raises(ConfigError, match=key):
        load_run_config(None, {**NO_FLAGS, key: value})


def test_identity_roles_are_read_from_the_fields():
    """If this fails, which RunConfig fields make a run's identity changed (every published run folder's hash and
    leaderboard grouping with it), or it is said somewhere other than each field's ``setting(identity=, scores=)``."""
    from clbench.config import config_identity
    from clbench.run_config import IDENTITY_IF_SET, NOT_IDENTITY, NOT_SCORES

    assert NOT_IDENTITY == {"out", "results_dir", "progress", "stop_after"}
    assert NOT_SCORES == {"eval_rows", "general", "general_every_task"}
    assert IDENTITY_IF_SET == {"frozen_dtype", "score_split", "eval_rows", "general", "general_every_task"}
    assert not hasattr(RunConfig, "identity_if_set")  # no second list beside the fields' metadata
    assert IDENTITY_IF_SET.isdisjoint(config_identity(RunConfig()))
    assert config_identity(RunConfig(eval_rows="needed"))["eval_rows"] == "needed"
