import pytest

from rebelrl.cli import main
from rebelrl.config import ConfigError, describe, load_config, to_yaml
from rebelrl.train.config import GenerateConfig, TrainConfig


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_resolve(tmp_path):
    path = write(tmp_path, "iterations: 3\nrebel:\n  eta: 2\noptim:\n  lr: 3e-6\n")
    cfg = load_config(TrainConfig, path, ["rebel.kl_coef=0.1", "model.name=tiny-random", "eval.temperature=null"])
    assert cfg.iterations == 3
    assert cfg.rebel.eta == 2.0 and isinstance(cfg.rebel.eta, float)
    assert cfg.optim.lr == 3e-6  # YAML reads "3e-6" as a string: still a number here
    assert cfg.rebel.kl_coef == 0.1
    assert cfg.model.name == "tiny-random"
    assert cfg.eval.temperature is None
    # defaults are per instance, not shared
    assert load_config(TrainConfig, None).optim.betas is not cfg.optim.betas


def test_round_trip_through_resolved_yaml(tmp_path):
    cfg = load_config(TrainConfig, None, ["rebel.eta=5", "reward.kwargs={a: 1}"])
    again = load_config(TrainConfig, write(tmp_path, to_yaml(cfg)))
    assert again == cfg


@pytest.mark.parametrize(
    "override, message",
    [
        ("rebel.etta=1", "unknown config key 'rebel.etta'"),
        ("iterationz=1", "unknown config key 'iterationz'"),
        ("iterations=1.5", "iterations: expected an integer"),
        ("rebel.eta=fast", "rebel.eta: expected a number"),
        ("resume=maybe", "resume: expected true or false"),
        ("rollout.pairing=random", "rollout.pairing: expected one of"),
        ("optim.betas=0.9", "optim.betas: expected a list"),
        ("rebel=3", "rebel: expected a mapping"),
        ("noequals", "must look like key.sub=value"),
        ("rollout.samples_per_prompt=1", "rollout.samples_per_prompt=1: expected >= 2"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config(TrainConfig, None, [override])


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(TrainConfig, write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, write(tmp_path, "a: [1,\n"))


def test_every_field_is_documented():
    for cls in (TrainConfig, GenerateConfig):
        for key, _, _, help_ in describe(cls):
            assert help_, f"{cls.__name__}.{key} has no help text"


def test_cli_reports_config_errors_before_loading_anything(capsys):
    assert main(["train", "rebel.etta=1"]) == 2
    assert "unknown config key 'rebel.etta'" in capsys.readouterr().err


def test_cli_lists_fields(capsys):
    assert main(["train", "--fields"]) == 0
    out = capsys.readouterr().out
    assert "rebel.eta" in out and "REBEL step size" in out
