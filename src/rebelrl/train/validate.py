"""What config values mean: ranges, finiteness and relations, checked in one place before anything loads.

``rebelrl.config`` checks types while it reads a config; this module checks that each value means
something: every float is finite, every number lies in its range (``FIELD_RULES``, a table keyed by
config class and field), and fields that depend on each other agree (``RELATIONS``, one function per
command). Each config class calls ``validate`` from ``__post_init__``, so a bad value is refused
whether it came from YAML, an override or Python, and the error names the dotted key and the range.

To add a rule for a new field, add one line to ``FIELD_RULES`` under its class; a rule between
fields goes in that command's relation function.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from rebelrl.config import ConfigError


@dataclass(frozen=True)
class Range:
    """An interval of allowed numbers; ``why`` says what the bounds mean to the user."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    why: str = ""

    def __contains__(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.high is None:
            text = f"{'>' if self.low_open else '>='} {_number(self.low)}"
        else:
            text = f"in {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}{')' if self.high_open else ']'}"
        return f"{text} ({self.why})" if self.why else text


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"


@dataclass(frozen=True)
class Items:
    """A list of exactly ``count`` numbers, each in ``each``."""

    count: int
    each: Range

    def __str__(self) -> str:
        return f"a list of {self.count} numbers, each {self.each}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
AT_LEAST_ONE = Range(1)
# numpy takes seeds in [0, 2**32); a run adds its process number (and evaluation its part number) to
# the seed, so the range stops well below that.
SEED = Range(0, 2**31 - 1, why="numpy's seeds are below 2**32, and processes and evaluation parts add their number")
# Below this the sampler is greedy in practice: the 0.1-nat gap between two likely tokens becomes 10
# nats at T = 0.01 (odds of 22000 to 1), so both completions of a pair are the same reply, their reward
# difference and the loss are 0, and every log-prob's gradient is scaled by 1/T.
MIN_TRAINING_TEMPERATURE = 0.01

# The sampler's settings mean the same wherever they are set (training, eval, generate).
SAMPLER = {
    "top_p": Range(0, 1, low_open=True, why="1 disables"),
    "top_k": Range(0, why="0 disables"),
    "repetition_penalty": Range(0, low_open=True, why="1 disables"),
    "max_new_tokens": AT_LEAST_ONE,
    "batch_size": AT_LEAST_ONE,
}

# Per config class (by name: the classes import this module), per field: the allowed values.
# None is allowed wherever the field's type allows it; its meaning is in the field's help.
FIELD_RULES: dict[str, dict[str, Range | Items]] = {
    "TrainConfig": {"iterations": AT_LEAST_ONE, "threads": AT_LEAST_ONE, "seed": SEED},
    "ModelConfig": {"lora_r": Range(0, why="0 trains all weights"), "lora_alpha": POSITIVE, "lora_dropout": Range(0, 1, high_open=True)},
    "TaskConfig": {
        "n_train": AT_LEAST_ONE,
        "n_eval": AT_LEAST_ONE,
        "horizon": AT_LEAST_ONE,
        "max_number": Range(2, why="guess-number needs at least two numbers to guess from"),
        "rounds": AT_LEAST_ONE,
    },
    "RolloutConfig": {
        **SAMPLER,
        "prompts_per_iter": AT_LEAST_ONE,
        "samples_per_prompt": Range(2, why="pairs and groups need two or more; astar_po samples one and ignores it"),
        "temperature": Range(0, low_open=True, why="training samples; greedy decoding would make both completions of a pair the same"),
        "min_new_tokens": Range(0, why="0 disables"),
        "logprob_tolerance": POSITIVE,
        "vllm_memory": POSITIVE,
        "vllm_start_timeout": POSITIVE,
    },
    "UpdateConfig": {"epochs": AT_LEAST_ONE, "minibatch_size": AT_LEAST_ONE, "micro_batch_size": AT_LEAST_ONE},
    "RebelConfig": {
        "eta": POSITIVE,
        "kl_coef": Range(0, why="0 turns the KL penalty off"),
    },
    "RefuelConfig": {"beta": POSITIVE},
    "OnlineDpoConfig": {"beta": POSITIVE, "r_max": POSITIVE},
    "DpoConfig": {"beta": POSITIVE, "r_max": POSITIVE},
    "HypoConfig": {"kl_coef": NON_NEGATIVE},
    "GuideConfig": {"prob": Range(0, 1, low_open=True, why="guide.mode=none for no guide"), "switch": NON_NEGATIVE,
                    "top_p": Range(0, 1, low_open=True, why="1 disables")},
    "ResetConfig": {"prob": Range(0, 1, low_open=True, why="leave reset.data unset for no reset")},
    "SftConfig": {"max_length": AT_LEAST_ONE},
    "AlolConfig": {"kl_beta": NON_NEGATIVE, "weight_min": POSITIVE, "weight_max": POSITIVE, "value_ridge": NON_NEGATIVE},
    "RewardModelConfig": {"center_coef": NON_NEGATIVE},
    "RlooConfig": {"kl_coef": NON_NEGATIVE, "clip_eps": Range(0, 1, low_open=True, high_open=True)},
    "GrpoConfig": {"beta": NON_NEGATIVE, "clip_eps": Range(0, 1, low_open=True, high_open=True), "clip_eps_high": POSITIVE},
    "PpoConfig": {"kl_coef": NON_NEGATIVE, "clip_eps": Range(0, 1, low_open=True, high_open=True), "value_clip": POSITIVE,
                  "vf_coef": NON_NEGATIVE, "gamma": Range(0, 1), "gae_lambda": Range(0, 1)},
    "AstarConfig": {"ref_samples": AT_LEAST_ONE, "beta1": POSITIVE, "beta2": POSITIVE},
    "OptimConfig": {
        "lr": POSITIVE,
        "weight_decay": NON_NEGATIVE,
        "betas": Items(2, Range(0, 1, high_open=True)),
        "warmup_steps": NON_NEGATIVE,
        "max_grad_norm": Range(0, why="0 disables clipping; a negative norm would flip the gradient"),
    },
    "EvalConfig": {
        "every": Range(0, why="0 evaluates only before and after training"),
        "temperature": Range(0, low_open=True, why="the held-out KL to the reference is an expectation over samples; a greedy "
                             "reply's log-ratio is not a KL (rebelrl eval temperature=0 scores greedy replies); null takes the rollout temperature"),
        "max_new_tokens": Range(1, why="null takes the rollout budget"),
        "seed": SEED,
    },
    "CheckpointConfig": {"every": Range(0, why="0 saves only at the end"), "keep_last": Range(0, why="0 keeps every checkpoint")},
    "LogConfig": {"sample_rows": Range(0, why="0 sends no sample table (the Parquet table is still written)")},
    "EvalCommandConfig": {**SAMPLER, "temperature": Range(0, why="0 is greedy"), "seed": SEED},
    "GenerateConfig": {**SAMPLER, "n": AT_LEAST_ONE, "temperature": Range(0, why="0 is greedy"), "seed": SEED},
    "CompareConfig": {"budget": AT_LEAST_ONE, "rows_budget": AT_LEAST_ONE, "threads": Range(1, why="null leaves each run's own default")},
    "PairsConfig": {**SAMPLER, "samples_per_prompt": Range(2, why="a pair needs two replies"), "seed": SEED,
                    "temperature": Range(0, low_open=True, why="greedy decoding would make the replies of a prompt one reply"),
                    "bt_beta": Range(0, why="0 labels by a coin flip; null labels by score")},
}


def validate(config: Any) -> None:
    """Raise ``ConfigError`` listing every value of ``config`` (a command's config) outside its range,
    or else the first broken relation between fields."""
    errors = field_errors(config)
    if errors:
        raise ConfigError("; ".join(errors))
    relation = RELATIONS.get(type(config).__name__)
    if relation is not None:
        relation(config)


def field_errors(config: Any, prefix: str = "") -> list[str]:
    """``key=value: expected ...`` for every non-finite float and every value outside its rule."""
    errors = []
    rules = FIELD_RULES.get(type(config).__name__, {})
    for f in dataclasses.fields(config):
        key, value = prefix + f.name, getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            errors += field_errors(value, key + ".")
            continue
        problem = _non_finite(value) or _outside(value, rules.get(f.name))
        if problem:
            errors.append(f"{key}={value!r}: {problem}")
    return errors


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _non_finite(value: Any) -> str | None:
    values = value if isinstance(value, list) else [value]
    if any(_is_number(v) and not math.isfinite(v) for v in values):
        return "expected finite numbers" if isinstance(value, list) else "expected a finite number"
    return None


def _outside(value: Any, rule: Range | Items | None) -> str | None:
    if rule is None or value is None:
        return None
    if isinstance(rule, Items):
        ok = isinstance(value, list) and len(value) == rule.count and all(_is_number(v) and v in rule.each for v in value)
    else:
        ok = value in rule
    return None if ok else f"expected {rule}"


# --- relations between fields, one function per command -------------------------------------------


def _export_relations(cfg) -> None:
    from rebelrl.train.trackers import check_trackers

    check_trackers(cfg.log.report_to)
    if cfg.export.adapter_only and cfg.model.lora_r == 0:
        raise ConfigError("export.adapter_only exports a LoRA adapter: with model.lora_r=0 there is none, so it would be ignored")
    if cfg.export.adapter_only and not cfg.export.at_end:
        raise ConfigError("export.adapter_only shapes the export at the end of the run: with export.at_end=false it would be ignored "
                          "(rebelrl export RUN_DIR --adapter-only exports a finished run)")


def _train_relations(cfg) -> None:
    from rebelrl.models import check_model_path

    r, m = cfg.rollout, cfg.model
    if r.min_new_tokens > r.max_new_tokens:
        raise ConfigError(f"rollout.min_new_tokens={r.min_new_tokens} must be <= rollout.max_new_tokens={r.max_new_tokens}")
    if r.pairing == "adjacent" and r.samples_per_prompt % 2:
        raise ConfigError(f"rollout.pairing=adjacent pairs completions two by two: rollout.samples_per_prompt={r.samples_per_prompt} must be even")
    if cfg.update.minibatch_size % cfg.update.micro_batch_size:
        raise ConfigError(
            f"update.minibatch_size={cfg.update.minibatch_size} must be a multiple of update.micro_batch_size={cfg.update.micro_batch_size}"
        )
    _offline_relations(cfg)
    _export_relations(cfg)
    _reset_relations(cfg)
    _guide_relations(cfg)
    _backend_relations(cfg)
    multi_turn = cfg.task.name in ("chitchat-dialogue", "secret", "guess-number", "env", "openenv")
    if (cfg.algo == "refuel") != multi_turn and cfg.task.name not in DATA_TASKS:
        raise ConfigError(
            f"algo={cfg.algo} with task.name={cfg.task.name}: algo=refuel trains on multi-turn tasks "
            f"(task.name=chitchat-dialogue, secret, guess-number or env), algo={cfg.algo} on single-turn ones"
        )
    if cfg.algo in ("astar_po", "ppo") and m.lora_r > 0 and (cfg.algo == "astar_po" or cfg.ppo.critic == "separate"):
        raise ConfigError(f"algo={cfg.algo} needs a separate reference (A*-PO samples from it) or critic network: set model.lora_r=0")
    if cfg.algo == "refuel" and r.samples_per_prompt != 2:
        raise ConfigError("algo=refuel branches exactly two continuations: rollout.samples_per_prompt must be 2")
    if cfg.algo == "refuel" and cfg.refuel.rollin == "reference" and m.lora_r > 0:
        raise ConfigError("refuel.rollin=reference needs a separate reference model: set model.lora_r=0")
    if m.dtype == "float16":
        raise ConfigError(
            "model.dtype=float16 cannot train: AdamW's epsilon (1e-8) underflows to 0 in float16 and the first "
            "step turns the weights into NaN; use model.dtype=bfloat16 (same memory) or float32"
        )
    _train_settings_that_would_be_ignored(cfg)
    for key, temperature in (("rollout.temperature", r.temperature), ("eval.temperature", cfg.eval.temperature)):
        if temperature is not None and temperature < MIN_TRAINING_TEMPERATURE:
            raise ConfigError(
                f"{key}={temperature:g}: expected >= {MIN_TRAINING_TEMPERATURE:g}: below it sampling is greedy in practice "
                "(a 0.1-nat gap between two tokens becomes 10 nats at 0.01), so the samples of a prompt are the same reply, "
                "their reward difference and the loss are 0, and log-prob gradients grow as 1/temperature"
            )
    cores = _usable_cores()
    if cfg.threads is not None and cores and cfg.threads > cores:
        raise ConfigError(
            f"threads={cfg.threads}: this machine gives the run {cores} CPU cores; more threads than cores only wait on "
            f"each other (an OpenMP team waits for its slowest thread), so the run would be slower, never faster: "
            f"set threads <= {cores}, or null"
        )
    _task_relations(cfg.task)
    _check_models(check_model_path, {"model.name": m.name, "model.ref_name": m.ref_name, "guide.model": cfg.guide.model})
    if cfg.task.name == "chitchat-dialogue" and cfg.task.user is None:
        _check_models(check_model_path, {"task.user_model": cfg.task.user_model})


# The data each offline method trains on; the online methods train on prompts and never read task.data.
DATA_TASKS = {"preferences": ("dpo", "hypo", "reward_model", "sft", "alol"), "demonstrations": ("sft", "alol")}


# The online methods whose rollouts dataset reset can start from a reply's prefix.
RESET_ALGOS = ("rebel", "online_dpo", "rloo", "grpo", "ppo")


def _reset_relations(cfg) -> None:
    x, default = cfg.reset, type(cfg.reset)()
    if x.data is None:
        changed = [f"reset.{k}={getattr(x, k)}" for k in ("prob", "field") if getattr(x, k) != getattr(default, k)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} is read only with reset.data (the file of replies to reset to): it would be ignored")
        return
    if cfg.algo not in RESET_ALGOS:
        why = {"astar_po": "its V*(x) is estimated from the prompt alone, not from a reset state",
               "refuel": "it branches multi-turn dialogues; reset one turn's reply with a single-turn method"}.get(
            cfg.algo, "it samples no rollouts of its own to reset")
        raise ConfigError(f"reset.data: dataset reset starts rollouts of {', '.join(RESET_ALGOS)}; algo={cfg.algo} cannot use it: {why}")
    if x.field == "completion" and cfg.task.name == "preferences" and x.data == cfg.task.data:
        raise ConfigError("reset.field=completion reads a demonstration file; reset.data is task.data, a preference file: "
                          "set reset.field=chosen or rejected")


def _guide_relations(cfg) -> None:
    g, default = cfg.guide, type(cfg.guide)()
    if g.mode == "none":
        changed = [f"guide.{k}={getattr(g, k)}" for k in ("model", "prob", "switch", "top_p") if getattr(g, k) != getattr(default, k)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} is read only with a guide (guide.mode=rollin, rollout, lols or d2lols): it would be ignored")
        return
    if cfg.algo not in RESET_ALGOS:
        raise ConfigError(f"guide.mode={g.mode}: a guide writes part of the rollouts of {', '.join(RESET_ALGOS)}; algo={cfg.algo} cannot use one")
    if cfg.reset.data is not None:
        raise ConfigError("guide.mode and reset.data both choose where a reply starts: use one of them")
    if g.mode == "d2lols" and (g.switch is None or g.switch != int(g.switch) or g.switch < 1):
        raise ConfigError(f"guide.mode=d2lols needs guide.switch, the iteration (>= 1) from which roll-in replaces roll-out; got {g.switch}")
    if g.mode == "lols" and g.switch is not None and not 0 <= g.switch <= 1:
        raise ConfigError(f"guide.switch={g.switch:g}: with guide.mode=lols it is the chance of roll-in each iteration, in [0, 1]")
    if cfg.rollout.max_new_tokens < 2:
        raise ConfigError(f"guide.mode={g.mode}: rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no k in 1..L-1 to cut a reply "
                          "at, so the guide would write for nothing: raise it to 2 or more")
    if g.mode in ("rollin", "rollout") and g.switch is not None:
        raise ConfigError(f"guide.switch={g.switch:g} is read only by guide.mode=lols or d2lols: with {g.mode} it would be ignored")


def _backend_relations(cfg) -> None:
    r, default = cfg.rollout, type(cfg.rollout)()
    if r.logprob_tolerance != default.logprob_tolerance and (r.backend == "vllm" or r.old_logprobs == "recompute"):
        why = "rollout.backend=vllm" if r.backend == "vllm" else "rollout.old_logprobs=recompute"
        raise ConfigError(f"rollout.logprob_tolerance={r.logprob_tolerance:g} decides when the sampler's log-probs stop being trusted: "
                          f"with {why} they never are (log pi_t is always recomputed), so it would be ignored")
    if r.backend == "hf":
        changed = [f"rollout.{k}={getattr(r, k)}" for k in ("vllm_python", "vllm_dtype", "vllm_memory", "vllm_lora", "vllm_start_timeout",
                                                          "vllm_eager")
                   if getattr(r, k) != getattr(default, k)]
        if changed:
            raise ConfigError(f"{', '.join(changed)} is read only with rollout.backend=vllm: it would be ignored")
        return
    from rebelrl.models import TINY_MODEL

    if cfg.model.name == TINY_MODEL:
        raise ConfigError(f"rollout.backend=vllm: model.name={TINY_MODEL} is built in this process, so there is no folder for the engine to "
                          "load (and its head size of 16 is below the 32 vLLM's CPU attention takes): save a model and name its folder")
    if r.old_logprobs == "sampler":
        raise ConfigError("rollout.old_logprobs=sampler with rollout.backend=vllm: the engine's log-probs are never the trainer's "
                          "(other kernels), so log pi_t is always recomputed; use auto or recompute")
    import torch

    if torch.cuda.is_available() and r.vllm_memory is not None and r.vllm_memory > 1:
        raise ConfigError(f"rollout.vllm_memory={r.vllm_memory:g}: on a GPU it is the share of its memory the engine may take, in (0, 1]")
    if r.vllm_lora == "adapter" and cfg.model.lora_r == 0:
        raise ConfigError("rollout.vllm_lora=adapter loads a LoRA adapter into the engine: with model.lora_r=0 there is none, so it would be ignored")
    if any(cfg.algo in algos for algos in DATA_TASKS.values()):
        raise ConfigError(f"rollout.backend=vllm samples the replies of the online methods; algo={cfg.algo} trains on its data and samples "
                          "only to evaluate: keep rollout.backend=hf")


def _offline_relations(cfg) -> None:
    offline = any(cfg.algo in algos for algos in DATA_TASKS.values())
    if offline and cfg.task.name not in DATA_TASKS:
        which = "demonstrations (or preferences: their chosen replies)" if cfg.algo == "sft" else "preferences"
        raise ConfigError(f"algo={cfg.algo} trains on a data file: set task.name={which} and task.data=FILE (task.name={cfg.task.name} has none)")
    if offline and cfg.algo not in DATA_TASKS.get(cfg.task.name, (cfg.algo,)):
        raise ConfigError(f"algo={cfg.algo} trains on preference pairs: task.name={cfg.task.name} holds single replies; set task.name=preferences")
    if cfg.task.name in DATA_TASKS and not offline:
        if cfg.algo == "refuel":
            raise ConfigError(f"task.name={cfg.task.name} holds single-turn rows; algo=refuel plays multi-turn dialogues")
        if cfg.reward.fn is None:
            raise ConfigError(f"task.name={cfg.task.name} is data for algo={' or '.join(DATA_TASKS[cfg.task.name])}; algo={cfg.algo} samples "
                              "replies to the rows' prompts, which needs a reward to judge them: set reward.fn")
    if cfg.task.name in DATA_TASKS and not cfg.task.data:
        raise ConfigError(f"task.name={cfg.task.name} needs task.data: a .jsonl/.parquet file, a datasets folder or hf:NAME[:SPLIT]")
    if cfg.algo == "reward_model" and cfg.model.lora_r > 0:
        raise ConfigError("algo=reward_model trains the whole network and its score head: set model.lora_r=0")
    if cfg.algo == "reward_model" and cfg.model.activation_checkpointing:
        raise ConfigError("model.activation_checkpointing is not applied to a reward model's forward yet, so it would be ignored: "
                          "set it to false for algo=reward_model")
    if cfg.model.ref_name and (cfg.algo == "reward_model" or (cfg.algo == "sft" and cfg.reward.fn is None)):
        raise ConfigError(f"model.ref_name={cfg.model.ref_name!r}: algo={cfg.algo}{'' if cfg.algo == 'reward_model' else ' without a reward'} "
                          "never compares with a reference, so it would be ignored; remove it")
    if cfg.eval.gold_fn is not None and (cfg.algo in ("refuel", "reward_model") or (cfg.algo in DATA_TASKS["preferences"] and cfg.reward.fn is None)):
        raise ConfigError(f"eval.gold_fn judges the held-out samples of a single-turn run that samples them (a reward named): with "
                          f"algo={cfg.algo}{'' if cfg.algo in ('refuel', 'reward_model') else ' and no reward.fn'} it would be ignored")
    if cfg.eval.gold_fn is None and cfg.eval.gold_kwargs:
        raise ConfigError("eval.gold_kwargs is read only with eval.gold_fn: it would be ignored")
    if cfg.algo == "alol" and cfg.reward.fn is None:
        raise ConfigError("algo=alol needs reward.fn: it scores the rows (where they carry no 'reward' column) and the reference's own "
                          "replies that V_ref is fitted to")
    if cfg.algo == "alol" and cfg.alol.variant == "kl" and cfg.alol.kl_beta is None:
        raise ConfigError("alol.variant=kl needs alol.kl_beta (the weight of log pi/pi_ref; it has no usable default)")
    if cfg.alol.kl_beta is not None and (cfg.algo != "alol" or cfg.alol.variant != "kl"):
        raise ConfigError(f"alol.kl_beta={cfg.alol.kl_beta:g} is read only by algo=alol with alol.variant=kl: it would be ignored")
    a, alol_default = cfg.alol, type(cfg.alol)()
    if cfg.algo == "alol" and a.variant in ("ref_free", "kl") and (a.weight_min, a.weight_max) != (alol_default.weight_min, alol_default.weight_max):
        raise ConfigError(f"alol.weight_min / weight_max clip the importance weight of variants alol and seq: alol.variant={a.variant} "
                          "has none, so they would be ignored")
    if cfg.algo == "alol" and a.variant == "ref_free" and not a.priority:
        raise ConfigError("alol.variant=ref_free trains on A x NLL, which for A < 0 grows without bound; it relies on priority sampling "
                          "to never draw those rows: keep alol.priority=true")
    if cfg.alol.weight_min > cfg.alol.weight_max:
        raise ConfigError(f"alol.weight_min={cfg.alol.weight_min:g} must be <= alol.weight_max={cfg.alol.weight_max:g}")
    if cfg.sft.packing and cfg.algo != "sft":
        raise ConfigError(f"sft.packing packs demonstrations for algo=sft: with algo={cfg.algo} it would be ignored; set it to false")
    if cfg.sft.max_length != type(cfg.sft)().max_length and not cfg.sft.packing:
        raise ConfigError(f"sft.max_length={cfg.sft.max_length} is the length of a packed sequence: without sft.packing=true it would be "
                          "ignored; set sft.packing=true or remove it")
    if cfg.dpo.r_max is not None and cfg.dpo.loss != "chipo":
        raise ConfigError(f"dpo.r_max={cfg.dpo.r_max:g} clips chi-PO's margin only: with dpo.loss={cfg.dpo.loss} it would be ignored; "
                          "set dpo.loss=chipo or r_max=null")


def _train_settings_that_would_be_ignored(cfg) -> None:
    """Values the run would accept and never use: refused, so that no one reads results as theirs."""
    m = cfg.model
    if m.lora_dropout > 0:
        raise ConfigError(
            f"model.lora_dropout={m.lora_dropout:g}: dropout is off while training, because the policy that is regressed "
            "must be the one that sampled (log pi_t is the sampler's), so the setting would be ignored: keep 0"
        )
    if cfg.online_dpo.r_max is not None and cfg.online_dpo.loss != "chipo":
        raise ConfigError(
            f"online_dpo.r_max={cfg.online_dpo.r_max:g} clips chi-PO's margin only: with online_dpo.loss={cfg.online_dpo.loss} "
            "it would be ignored; set online_dpo.loss=chipo or r_max=null"
        )


# Task settings and the tasks that read them; set for any other task they would be ignored.
_TASK_FIELDS = {
    "prompts": ("prompts",), "eval_prompts": ("prompts",),
    "env": ("env", "openenv"), "env_kwargs": ("env", "openenv"), "observation_field": ("openenv",), "action_class": ("openenv",),
    "user": ("chitchat-dialogue",), "user_kwargs": ("chitchat-dialogue",),
    "dataset_kwargs": ("reasoning-gym",), "instruction": ("reasoning-gym",),
    "items": ("secret",),
    "data": ("preferences", "demonstrations"), "eval_data": ("preferences", "demonstrations"),
}


def _task_relations(task) -> None:
    if task.name != "openenv" and task.action_field != "message":
        raise ConfigError(f"task.action_field={task.action_field!r} is read only with task.name=openenv; with task.name={task.name} "
                          "it would be ignored: remove it, or set task.name")
    if task.name == "openenv" and not task.env:
        raise ConfigError("task.name=openenv needs task.env: the environment's class (module:Class) or the URL it is served at")
    for key, readers in _TASK_FIELDS.items():
        value = getattr(task, key)
        if value not in (None, {}, []) and task.name not in readers:
            raise ConfigError(
                f"task.{key}={value!r} is read only with task.name={' or '.join(readers)}; with task.name={task.name} "
                "it would be ignored: remove it, or set task.name"
            )


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count()


def _eval_command_relations(cfg) -> None:
    from rebelrl.models import check_model_path

    _task_relations(cfg.task)
    _check_models(check_model_path, {"model": cfg.model, "baseline": cfg.baseline})


def _generate_relations(cfg) -> None:
    from rebelrl.models import check_model_path

    if (cfg.prompts is None) == (cfg.prompt is None):
        raise ConfigError("give exactly one of prompts=FILE or prompt='text'")
    _check_models(check_model_path, {"model": cfg.model})


def _check_models(check: Callable[[str], None], names: dict[str, str | None]) -> None:
    """A model name that looks like a folder must be one, or the hub's 'repo id' error would hide the typo."""
    for key, name in names.items():
        if name is None:
            continue
        if not name.strip():
            raise ConfigError(f"{key}={name!r}: expected a model: a built-in alias (smollm2-135m-instruct, tiny-random), a local folder or a hub id")
        try:
            check(name)
        except FileNotFoundError as e:
            raise ConfigError(f"{key}: {e}") from None


def _compare_relations(cfg) -> None:
    if not cfg.tasks:
        raise ConfigError("tasks=[]: list at least one {name, overrides} (a task with no overrides runs the base config): "
                          "with none, nothing would be compared")


def _pairs_relations(cfg) -> None:
    from rebelrl.models import check_model_path

    if not cfg.output or not cfg.output.endswith(".jsonl"):
        raise ConfigError(f"output={cfg.output!r}: expected the path of the pairs file to write, ending in .jsonl")
    if cfg.task.name not in ("chitchat-warm", "reasoning-gym", "prompts"):
        raise ConfigError(f"task.name={cfg.task.name}: pairs are made from single-turn prompts (task.name=chitchat-warm, "
                          "reasoning-gym or prompts)")
    _task_relations(cfg.task)
    _check_models(check_model_path, {"model": cfg.model})


RELATIONS: dict[str, Callable[[Any], None]] = {
    "PairsConfig": _pairs_relations,
    "TrainConfig": _train_relations,
    "CompareConfig": _compare_relations,
    "EvalCommandConfig": _eval_command_relations,
    "GenerateConfig": _generate_relations,
}
