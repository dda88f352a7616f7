"""Config values are checked for meaning before anything loads; each error names the key and the range."""

import pytest

from rebelrl.cli import main
from rebelrl.config import ConfigError, load_config
from rebelrl.train.config import EvalCommandConfig, GenerateConfig, TrainConfig
from rebelrl.train.validate import FIELD_RULES, Range


@pytest.mark.parametrize(
    "override, message",
    [
        # accepted today with another meaning
        ("optim.max_grad_norm=-1", "optim.max_grad_norm=-1.0: expected >= 0 (0 disables clipping"),
        ("task.n_eval=-2", "task.n_eval=-2: expected >= 1"),
        ("rebel.eta=-5", "rebel.eta=-5.0: expected > 0"),
        ("rebel.eta=0", "rebel.eta=0.0: expected > 0"),
        ("rebel.kl_coef=-1", "rebel.kl_coef=-1.0: expected >= 0"),
        ("eval.every=-1", "eval.every=-1: expected >= 0"),
        ("checkpoint.every=-1", "checkpoint.every=-1: expected >= 0"),
        ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1: expected >= 0 (0 keeps every checkpoint)"),
        ("optim.warmup_steps=-5", "optim.warmup_steps=-5: expected >= 0"),
        ("eval.max_new_tokens=0", "eval.max_new_tokens=0: expected >= 1 (null takes the rollout budget)"),
        # non-finite floats
        ("reward.no_eos_penalty=.nan", "reward.no_eos_penalty=nan: expected a finite number"),
        ("rebel.eta=.nan", "rebel.eta=nan: expected a finite number"),
        ("rebel.kl_coef=.inf", "rebel.kl_coef=inf: expected a finite number"),
        ("optim.betas=[0.9, .nan]", "optim.betas=[0.9, nan]: expected finite numbers"),
        # died later with library errors naming no key
        ("rollout.prompts_per_iter=0", "rollout.prompts_per_iter=0: expected >= 1"),
        ("update.micro_batch_size=0", "update.micro_batch_size=0: expected >= 1"),
        ("rollout.batch_size=0", "rollout.batch_size=0: expected >= 1"),
        ("task.n_eval=0", "task.n_eval=0: expected >= 1"),
        ("task.n_train=0", "task.n_train=0: expected >= 1"),
        ("optim.betas=[0.9]", "optim.betas=[0.9]: expected a list of 2 numbers, each in [0, 1)"),
        ("optim.betas=[0.9, 1.0]", "optim.betas=[0.9, 1.0]: expected a list of 2 numbers, each in [0, 1)"),
        # rejected only after the model loaded
        ("rloo.clip_eps=1", "rloo.clip_eps=1.0: expected in (0, 1)"),
        ("rloo.clip_eps=1.5", "rloo.clip_eps=1.5: expected in (0, 1)"),
        ("optim.lr=-1e-3", "optim.lr=-0.001: expected > 0"),
        ("rollout.temperature=-0.5", "rollout.temperature=-0.5: expected > 0"),
        ("rollout.temperature=0", "rollout.temperature=0.0: expected > 0 (training samples"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0: expected >= 1"),
        ("rollout.top_p=0", "rollout.top_p=0.0: expected in (0, 1]"),
        ("rollout.top_k=-1", "rollout.top_k=-1: expected >= 0 (0 disables)"),
        ("optim.weight_decay=-1", "optim.weight_decay=-1.0: expected >= 0"),
        # relations and dtypes
        ("update.minibatch_size=6", "update.minibatch_size=6 must be a multiple of update.micro_batch_size=8"),
        ("model.dtype=float16", "model.dtype=float16 cannot train: AdamW's epsilon (1e-8) underflows to 0 in float16"),
        ("model.name=/nonexistent/model", "model.name: model folder not found: /nonexistent/model"),
        ("model.ref_name=./no/such/folder", "model.ref_name: model folder not found: ./no/such/folder"),
    ],
)
def test_train_config_values_are_checked_for_meaning(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, [override])
    assert message in str(err.value)


def test_every_range_problem_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, None, ["rebel.eta=0", "optim.lr=-1", "update.micro_batch_size=0"])
    assert str(err.value) == (
        "update.micro_batch_size=0: expected >= 1; rebel.eta=0.0: expected > 0; optim.lr=-1.0: expected > 0"
    )


@pytest.mark.parametrize(
    "cls, overrides, message",
    [
        (EvalCommandConfig, ["temperature=-1"], "temperature=-1.0: expected >= 0 (0 is greedy)"),
        (EvalCommandConfig, ["max_new_tokens=0"], "max_new_tokens=0: expected >= 1"),
        (EvalCommandConfig, ["task.n_eval=0"], "task.n_eval=0: expected >= 1"),
        (EvalCommandConfig, ["baseline=~/no-such-model-folder"], "baseline: model folder not found"),
        (GenerateConfig, ["prompt=hi", "n=0"], "n=0: expected >= 1"),
        (GenerateConfig, ["prompt=hi", "top_p=1.5"], "top_p=1.5: expected in (0, 1]"),
        (GenerateConfig, ["prompt=hi", "temperature=.nan"], "temperature=nan: expected a finite number"),
        (GenerateConfig, [], "give exactly one of prompts=FILE or prompt='text'"),
    ],
)
def test_eval_and_generate_configs_are_checked_the_same_way(cls, overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(cls, None, overrides)
    assert message in str(err.value)


def test_what_the_commands_may_still_do():
    """Greedy evaluation and generation, float16 outside training, and a hub id that is no folder."""
    assert load_config(EvalCommandConfig, None, ["temperature=0", "dtype=float16"]).temperature == 0
    assert load_config(GenerateConfig, None, ["prompt=hi", "temperature=0", "dtype=float16"]).dtype == "float16"
    cfg = load_config(TrainConfig, None, ["model.name=SomeOrg/some-model", "checkpoint.keep_last=0"])
    assert cfg.model.name == "SomeOrg/some-model"


def test_a_rule_is_one_line_in_the_table():
    assert "lr" in FIELD_RULES["OptimConfig"] and 0.0 not in FIELD_RULES["OptimConfig"]["lr"]
    assert str(Range(0, 1, low_open=True, why="1 disables")) == "in (0, 1] (1 disables)"
    assert 1e-9 in Range(0, low_open=True) and -1 not in Range(0)


def test_duplicate_yaml_keys_are_an_error_naming_key_and_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("iterations: 3\nrebel:\n  eta: 2\noptim:\n  lr: 1e-5\nrebel:\n  kl_coef: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(TrainConfig, path)
    assert str(err.value) == f"{path}, line 6: duplicate key 'rebel' (first on line 2): merge the two into one"
    path.write_text("rebel:\n  eta: 2\n  eta: 3\n")
    with pytest.raises(ConfigError, match="line 3: duplicate key 'eta' \\(first on line 2\\)"):
        load_config(TrainConfig, path)
    with pytest.raises(ConfigError, match="override 'reward.kwargs={a: 1, a: 2}': line 1: duplicate key 'a'"):
        load_config(TrainConfig, None, ["reward.kwargs={a: 1, a: 2}"])


def test_invalid_utf8_in_a_config_file_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(b"iterations: 3\nrun_dir: caf\xe9\n")
    with pytest.raises(ConfigError, match="c.yaml: not valid UTF-8 \\(byte 0xe9"):
        load_config(TrainConfig, path)


@pytest.mark.parametrize("command", ["train", "eval", "generate"])
def test_cli_prints_one_line_and_exits_2(command, capsys):
    assert main([command, "model.name=/nonexistent/model" if command == "train" else "model=/nonexistent/model", "prompt=hi" if command == "generate" else "seed=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith(f"rebelrl {command}: config error: ") and "model folder not found: /nonexistent/model" in err[0]


def test_epochs_default_to_the_methods_own():
    """A*-PO makes one pass over each batch (its authors' code and TRL); the others four; a value the
    user sets is kept, and the resolved number is what the run's config records."""
    assert load_config(TrainConfig, None, ["algo=astar_po"]).update.epochs == 1
    assert load_config(TrainConfig, None, ["algo=rebel"]).update.epochs == 4
    assert load_config(TrainConfig, None, ["algo=astar_po", "update.epochs=3"]).update.epochs == 3
