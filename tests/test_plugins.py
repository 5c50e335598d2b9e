"""Adding a method needs no change to clbench: a separate package registers it through the ``clbench.methods``
entry-point group and the harness, the CLI and the config checks pick it up like a built-in."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_run

PLUGIN = "toy_clbench_plugin"
METHOD = "toy-norm"

PLUGIN_SOURCE = '''
"""A third-party CL method: fine-tunes only the base model's final norm weight."""

from dataclasses import dataclass

from clbench.method import CLMethod, MethodConfig


@dataclass
class ToyNormConfig(MethodConfig):
    """Toy knobs; it ships no YAML, so its dataclass gives every default."""

    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    norm_only: bool = True


class ToyNorm(CLMethod):
    """Toy plugin: trains the final RMSNorm weight of the base model, nothing else."""

    config_class = ToyNormConfig

    def begin_task(self, t, task):
        super().begin_task(t, task)
        for name, param in self.model.named_parameters():
            param.requires_grad_(name == "model.norm.weight" or not self.cfg.norm_only)
'''


def _install_plugin(site: Path, name: str = METHOD) -> None:
    """What ``pip install`` of a package declaring the entry point leaves on sys.path: the module + a dist-info."""
    (site / PLUGIN).mkdir(parents=True)
    (site / PLUGIN / "__init__.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    dist = site / "toy_clbench_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-clbench-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[clbench.methods]\n{name} = {PLUGIN}:ToyNorm\n")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """The toy plugin installed for one test; the registry forgets it afterwards."""
    from clbench import registry

    _install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    yield
    registry.reset()
    sys.modules.pop(PLUGIN, None)


def test_entry_point_method_runs_through_the_harness_without_core_changes(plugin, tmp_path, trace_dir):
    """If this fails, third-party methods cannot be added as a package: the core would need editing per method."""
    import json

    from clbench import registry
    from clbench.harness import Harness

    cls = registry.get_method(METHOD)
    assert cls.name == METHOD and METHOD in registry.methods()
    assert "lora" in registry.methods()  # built-ins survive the reset
    run_dir = Harness(tiny_run(tmp_path, trace_dir, method=METHOD), method_overrides={"lr": 0.01}).run()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / "DONE").is_file() and metrics["method"] == METHOD
    assert metrics["params"][-1]["trainable"] == 64  # the norm weight of the width-64 tiny model
    assert metrics["method_config"]["lr"] == 0.01 and metrics["method_config"]["norm_only"] is True
    core = Path(registry.__file__).parent
    assert not any(METHOD in p.read_text() or PLUGIN in p.read_text() for p in core.glob("*.py"))


def test_plugin_knob_typo_names_the_nearest_key_and_list_shows_it(plugin, tmp_path, trace_dir):
    """If this fails, a plugin's config typo runs silently with defaults, or `clbench list` hides plugins."""
    from typer.testing import CliRunner

    from clbench.cli import app
    from clbench.config import ConfigError
    from clbench.harness import Harness

    with pytest.raises(ConfigError, match="did you mean 'norm_only'"):
        Harness(tiny_run(tmp_path, trace_dir, method=METHOD), method_overrides={"norm_onyl": False})
    result = CliRunner().invoke(app, ["list"], terminal_width=200)
    assert result.exit_code == 0 and METHOD in result.output


def test_reset_forgets_an_uninstalled_plugin(tmp_path, monkeypatch):
    """If this fails, a removed plugin stays registered for the rest of the process (stale entry points)."""
    from clbench import registry

    _install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    assert METHOD in registry.methods()
    monkeypatch.undo()  # "uninstall": the folder leaves sys.path
    registry.reset()
    sys.modules.pop(PLUGIN, None)
    assert METHOD not in registry.methods() and "lora" in registry.methods()


def test_a_plugin_taking_a_built_in_name_is_an_error_naming_both(tmp_path, monkeypatch):
    """If this fails, installing a plugin whose method is called `lora` silently replaces (or is silently shadowed
    by) the built-in, and runs named `lora` compute something else."""
    from clbench import registry

    _install_plugin(tmp_path / "site", name="lora")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    registry.reset()
    try:
        with pytest.raises(registry.RegistryError, match=r"'lora' is registered twice.*clbench\.methods\.lora\.LoRA"
                                                         rf".*{PLUGIN}\.ToyNorm"):
            registry.methods()
    finally:
        monkeypatch.undo()
        registry.reset()
        sys.modules.pop(PLUGIN, None)
    assert registry.get_method("lora").__module__ == "clbench.methods.lora"


def test_two_built_in_classes_under_one_name_is_an_error(monkeypatch):
    """If this fails, a second module decorated with an existing name (a copy-pasted method) silently wins."""
    from clbench import registry
    from clbench.method import CLMethod

    registry.load_all()
    monkeypatch.setattr(registry, "_METHODS", dict(registry._METHODS))
    with pytest.raises(registry.RegistryError, match="'seqft' is registered twice"):
        @registry.register_method("seqft")
        class Copy(CLMethod):
            """A second method under a taken name."""


def test_each_method_file_has_exactly_one_module_name():
    """If this fails, a method imports both as `methods.x` and `clbench.methods.x` (and registers twice)."""
    import importlib.util

    from clbench import registry

    assert importlib.util.find_spec("methods") is None and importlib.util.find_spec("benchmarks") is None
    assert all(cls.__module__.startswith("clbench.methods.") for cls in registry.methods().values()
               if cls.__module__ != PLUGIN)
