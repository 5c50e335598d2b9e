"""General-ability retention through lm-evaluation-harness (``--general``): the bundled suite runs offline, what is
scored is the method as it serves (routing active), rows are stored per stage and the delta is read from them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import run_cli, tiny_run
from torch import nn

from clbench.config import ConfigError
from clbench.method import CLMethod, MethodConfig
from clbench.models import tiny_model


def _requests(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _hflm(pretrained: nn.Module, tokenizer) -> object:
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=pretrained, tokenizer=tokenizer, batch_size=1, backend="causal")


def test_stored_stages_resume_and_delta_from_rows(tmp_path, trace_dir):
    """`clbench run --general general-mini`: the bundled suite runs offline through lm-eval before the first and after
    the last task into general.csv; a LoRA whose adapter stays zero (lr 0) has a general delta of exactly 0 on every
    column (brier scores included, which accuracy cannot hide); a resumed run does not re-evaluate a stored stage
    and metrics.json's delta comes from the stored rows (an edited stored 'before' value shows up in it)."""
    from clbench.harness import Harness

    cfg = tiny_run(tmp_path, trace_dir, general="general-mini", stop_after=1)
    Harness(cfg, {"lr": 0.0}).run()
    assert os.environ.get("HF_DATASETS_OFFLINE") == "1"
    run = tmp_path / "run"
    rows = json.loads((run / "general.json").read_text())["rows"]
    assert list(rows) == ["0"]  # before only: the last task has not been trained yet
    before = dict(rows["0"]["benchmarks"])
    assert set(before) == {"gmini_piqa", "gmini_boolq", "gmini_arith", "gmini_tydiqa_de"}
    rows["0"]["benchmarks"]["gmini_piqa"] = before["gmini_piqa"] - 0.125  # a stored value only the store knows
    (run / "general.json").write_text(json.dumps({"rows": rows}))

    Harness(tiny_run(tmp_path, trace_dir, general="general-mini"), {"lr": 0.0}).run()
    stored = json.loads((run / "general.json").read_text())["rows"]
    assert stored["0"]["benchmarks"]["gmini_piqa"] == before["gmini_piqa"] - 0.125  # not re-evaluated on resume
    assert list(stored) == ["0", "2"]
    frame = pd.read_csv(run / "general.csv", index_col=0)
    assert list(frame.index) == ["before", "after-2:FOMC"]
    assert "gmini_piqa/brier_score" in frame.columns and "gmini_arith/exact_match:number" in frame.columns
    assert stored["2"]["scores"] == stored["0"]["scores"]  # zero adapter: every lm-eval number unchanged
    # lm-eval's per-example scores are kept (the general delta's interval resamples them) and add up to each value
    from clbench.general import examples_value

    for name, value in stored["2"]["benchmarks"].items():
        assert examples_value(stored["2"]["examples"][name]) == pytest.approx(value, abs=1e-9)
    general = json.loads((run / "metrics.json").read_text())["general"]
    assert general["delta"]["gmini_piqa"] == pytest.approx(0.125)  # from the edited stored row
    assert {k: v for k, v in general["delta"].items() if k != "gmini_piqa"} == dict.fromkeys(
        ["gmini_boolq", "gmini_arith", "gmini_tydiqa_de"], 0.0)
    assert general["delta_mean"] == pytest.approx(0.125 / 4)

    # the comparison: leaderboard columns and the report's general-delta-vs-OP figure
    from clbench.leaderboard import build_leaderboard
    from clbench.report import write_report

    table = build_leaderboard([run])
    assert table.loc[0, "general_delta"] == pytest.approx(0.125 / 4)
    assert table.loc[0, "general_delta[gmini_piqa]"] == pytest.approx(0.125)
    report = write_report([run], tmp_path / "report")
    assert "general_vs_op.png" in report.read_text() and "### General-ability retention" in report.read_text()
    assert list((tmp_path / "report" / "figures").rglob("general_vs_op.png"))


class _KeyRouted(CLMethod):
    """A constructed task-agnostic routing method: examples whose first token id is even get a bias on the
    logits of token 'x' (its 'expert'); the routing is only in forward/generate, as real methods do it."""

    name = "key-routed-test"

    def __init__(self, model, tokenizer):
        super().__init__(model, tokenizer, MethodConfig(lr=1e-3, weight_decay=0.0, warmup_steps=0), num_tasks=1)
        self.bias = nn.Parameter(torch.zeros(model.config.vocab_size))
        with torch.no_grad():
            self.bias[tokenizer.convert_tokens_to_ids("x")] = 8.0

    def _route(self, input_ids: torch.Tensor) -> torch.Tensor:
        return (input_ids[:, :1] % 2 == 0).float()[:, :, None]  # (batch, 1, 1): 1 = routed to the expert

    def forward(self, batch):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        out["logits"] = out.logits + self._route(batch["input_ids"]) * self.bias
        return out


def test_served_lm_scores_the_routed_model():
    """lm-eval scores a method through `served_lm()` with its routing active: the loglikelihood of a continuation
    on a routed input changes (and equals the method's own forward), on an unrouted input it is the base model's.
    A method that served the bare model would lose its routing in the general-ability numbers."""
    loaded = tiny_model()
    method = _KeyRouted(loaded.model, loaded.tokenizer)
    tok = loaded.tokenizer
    routed_ctx = next(c for c in "abcdefgh" if tok.convert_tokens_to_ids(c) % 2 == 0)
    plain_ctx = next(c for c in "abcdefgh" if tok.convert_tokens_to_ids(c) % 2 == 1)
    reqs = [(routed_ctx + " q", "x"), (plain_ctx + " q", "x")]
    served = [ll for ll, _ in _hflm(method.served_lm(), tok).loglikelihood(_requests("loglikelihood", reqs))]
    base = [ll for ll, _ in _hflm(loaded.model, tok).loglikelihood(_requests("loglikelihood", reqs))]
    assert served[0] > base[0] + 1.0  # routing moved the routed example's loglikelihood
    assert served[1] == pytest.approx(base[1], abs=1e-5)  # and left the other one alone
    ids = torch.tensor([tok(reqs[0][0] + reqs[0][1], add_special_tokens=False)["input_ids"]])
    own = method({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": None}).logits
    expected = torch.log_softmax(own[0, -2], -1)[ids[0, -1]].item()
    assert served[0] == pytest.approx(expected, abs=1e-4)


def test_moses_is_scored_with_its_key_routing():
    """MoSEs under --general: after a task with non-zero experts, lm-eval's loglikelihood comes from the key-routed
    model (the method's eval forward, no task id), not from the base model."""
    from clbench import registry
    from clbench.benchmark import Task, TaskSpec
    from clbench.config import build
    from clbench.configs_dir import method_defaults

    loaded = tiny_model()
    cls = registry.get_method("moses")
    cfg = build(cls.config_class, method_defaults("moses"))
    method = cls(loaded.model, loaded.tokenizer, cfg, num_tasks=2)
    task = Task(TaskSpec("A", "accuracy"), [], [], [])
    method.begin_task(0, task)
    with torch.no_grad():  # a trained task: every parameter task 0 trains is non-zero
        for p in method.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    method.end_task(0, task)
    method.eval()
    tok = loaded.tokenizer
    reqs = [("Question: one plus one\nAnswer:", " two")]
    served = _hflm(method.served_lm(), tok).loglikelihood(_requests("loglikelihood", reqs))[0][0]
    base_model = tiny_model().model
    base = _hflm(base_model, tok).loglikelihood(_requests("loglikelihood", reqs))[0][0]
    assert abs(served - base) > 1e-3


def test_general_mini_yamls_point_into_this_checkout(tmp_path, monkeypatch):
    """A second clone, or a deleted one, must not leave this one reading general-mini YAMLs whose data paths point
    into the other checkout (a FileNotFoundError from datasets in every --general run): the cached folder is per
    suite location."""
    import shutil

    import yaml

    import clbench.benchmarks.general_mini as mini
    from clbench.general import mini_include_dir

    monkeypatch.setenv("CLBENCH_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other-clone"
    shutil.copytree(mini.SUITE_DIR, other)
    data_in_other = other / mini.DATA_DIR.relative_to(mini.SUITE_DIR)
    with monkeypatch.context() as patch:
        patch.setattr(mini, "SUITE_DIR", other)
        patch.setattr(mini, "DATA_DIR", data_in_other)
        mini_include_dir()
    shutil.rmtree(other)
    for path in mini_include_dir().glob("*.yaml"):
        for data in yaml.safe_load(path.read_text())["dataset_kwargs"]["data_files"].values():
            assert Path(data).is_file() and Path(data).is_relative_to(mini.SUITE_DIR), data


def test_no_progress_hides_lm_evals_progress_bars(capfd):
    """`--no-progress` (a log file, a SLURM job) must not fill with lm-eval's bars ('Building contexts', 'Running
    loglikelihood requests'); with progress on they are shown. The scores are the same either way."""
    from clbench.general import evaluate_general

    loaded = tiny_model()
    method = _KeyRouted(loaded.model, loaded.tokenizer)
    shown = evaluate_general(method, loaded.tokenizer, "gmini_piqa", limit=2, progress=True)
    assert "it/s]" in capfd.readouterr().err
    hidden = evaluate_general(method, loaded.tokenizer, "gmini_piqa", limit=2, progress=False)
    assert "it/s]" not in capfd.readouterr().err
    assert hidden.scores == shown.scores


def test_served_generation_uses_the_method_generate():
    """generate-until requests (GSM8K/TydiQA-like) go through the method's own generate (the path R is scored
    with): the served text equals decoding `method.generate` and lm-eval's stop sequence cuts it."""
    loaded = tiny_model()
    method = _KeyRouted(loaded.model, loaded.tokenizer)
    calls = []
    original = method.generate

    def spy(batch, max_new_tokens):
        calls.append(max_new_tokens)
        return original(batch, max_new_tokens)

    method.generate = spy
    tok = loaded.tokenizer
    lm = _hflm(method.served_lm(), tok)
    text = lm.generate_until(_requests("generate_until", [("b q", {"until": ["\n"], "max_gen_toks": 6})]))[0]
    assert calls == [6]
    ids = torch.tensor([tok("b q", add_special_tokens=False)["input_ids"]])
    new = original({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 6)
    assert text == tok.decode(new[0], skip_special_tokens=True).split("\n")[0]


def test_unknown_task_is_one_line_naming_the_sources():
    """`--general mmlu,nosuchtask`: one line saying the name is unknown and where task names come from."""
    from clbench.general import check_suite

    with pytest.raises(ConfigError) as err:
        check_suite("general-mini,nosuchtask")
    message = str(err.value)
    assert "\n" not in message and "'nosuchtask'" in message
    assert "lm_eval ls tasks" in message and "general-mini" in message and "trace-general" in message


def test_every_task_needs_a_suite_and_cli_passes_options(tmp_path, trace_dir):
    """`clbench run --general-every-task` without `--general` is a one-line error (exit 2), as is an unknown task."""
    result = run_cli("run", "--model", "tiny", "--data-dir", str(trace_dir), "--general-every-task",
                     "--out", str(tmp_path / "r"), timeout=120)
    assert result.returncode == 2 and "general_every_task needs general" in result.stderr
    result = run_cli("run", "--model", "tiny", "--data-dir", str(trace_dir), "--general", "nosuchtask",
                     "--out", str(tmp_path / "r2"), timeout=180)
    assert result.returncode == 2 and "unknown lm-eval task 'nosuchtask'" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_identity_unchanged_without_general(tmp_path, trace_dir):
    """Runs without --general keep their run identity (committed run folders still resume): neither new option
    appears in the resolved identity while unset."""
    from clbench.harness import Harness

    run = Harness(tiny_run(tmp_path, trace_dir)).resolved["identity"]["run"]
    assert "general" not in run and "general_every_task" not in run
    with_general = Harness(tiny_run(tmp_path, trace_dir, general="general-mini")).resolved["identity"]["run"]
    assert with_general["general"] == "general-mini"


def test_generator_is_deterministic_and_matches_the_shipped_data():
    """The shipped general-mini JSON is what the generator writes (regenerating changes nothing); test and few-shot
    prompts never overlap."""
    from clbench.benchmarks.general_mini import DATA_DIR
    from clbench.benchmarks.general_mini.generate import generate

    data = generate()
    assert data == generate()
    for task, splits in data.items():
        for split, records in splits.items():
            assert json.loads((DATA_DIR / f"{task}.{split}.json").read_text(encoding="utf-8")) == records
        keys = [json.dumps(r, sort_keys=True) for r in splits["test"]]
        assert not set(keys) & {json.dumps(r, sort_keys=True) for r in splits["train"]}


def test_non_zero_rank_evaluates_and_writes_nothing(tmp_path, trace_dir, monkeypatch):
    """Under DDP only rank 0 runs lm-eval and writes general.csv: the same run as rank 1 writes no general rows."""
    from lightning.pytorch.utilities import rank_zero_only

    import clbench.general
    from clbench.harness import Harness

    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setattr(clbench.general, "evaluate_general", lambda *a, **k: pytest.fail("rank 1 ran lm-eval"))
    Harness(tiny_run(tmp_path, trace_dir, num_tasks=1, general="general-mini")).run()
    assert not (tmp_path / "run" / "general.csv").exists()


def test_ddp_rank_zero_writes_general_csv(tmp_path, trace_dir):
    """`clbench run --devices 2 --strategy ddp --general general-mini`: one general.csv with both stages, written by
    rank 0, and the run finishes (rank 1 does not wait forever while rank 0 scores)."""
    out = tmp_path / "ddp"
    result = run_cli("run", "--method", "lora", "--model", "tiny", "--num-tasks", "1", "--max-steps-per-task", "2",
                     "--precision", "32-true", "--no-progress", "--max-new-tokens", "2", "--accelerator", "cpu",
                     "--data-dir", str(trace_dir), "--batch-size", "2", "--devices", "2", "--strategy", "ddp",
                     "--general", "general-mini", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    frame = pd.read_csv(out / "general.csv", index_col=0)
    assert list(frame.index) == ["before", "after-1:C-STANCE"]
    assert "general" in json.loads((out / "metrics.json").read_text())


def test_per_task_lora_is_served_with_its_newest_adapter_instead_of_crashing():
    """If this fails, `clbench run --method per-task-lora --general ...` (a cell of the committed grid) crashes at
    the general-ability stage, because lm-eval's queries carry no task id and this reference cannot answer without
    one; or it answers them with another task's adapter than the newest."""
    from clbench.benchmark import Task, TaskSpec
    from clbench.configs_dir import method_defaults
    from clbench.registry import get_method

    loaded = tiny_model()
    cls = get_method("per-task-lora")
    torch.manual_seed(0)
    method = cls(loaded.model, loaded.tokenizer, cls.config_class(**method_defaults("per-task-lora")), num_tasks=2)
    task = Task(TaskSpec("t", "accuracy"), train=[], eval=[], test=[])
    for t in range(2):
        method.begin_task(t, task)
        with torch.no_grad():  # stand-in for training: each task's adapter moves away from zero differently
            for p in method.parameters():
                if p.requires_grad:
                    p.add_(0.05 * (t + 1) * torch.randn_like(p))
    method.eval()
    tok = loaded.tokenizer
    lm = _hflm(method.served_lm(), tok)
    text = lm.generate_until(_requests("generate_until", [("b q", {"until": ["\n"], "max_gen_toks": 5})]))[0]
    lm.loglikelihood(_requests("loglikelihood", [("b q", " a")]))
    ids = torch.tensor([tok("b q", add_special_tokens=False)["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    newest = method.generate({**batch, "task_id": torch.tensor([1])}, 5)
    first = method.generate({**batch, "task_id": torch.tensor([0])}, 5)
    assert text == tok.decode(newest[0], skip_special_tokens=True).split("\n")[0]
    assert not torch.equal(newest, first)  # not vacuous: the two adapters answer differently
