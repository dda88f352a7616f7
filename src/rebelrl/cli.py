"""``rebelrl train|eval|generate|compare|pairs CONFIG.yaml key.sub=value ...``, ``rebelrl export RUN_DIR``

Each command reads one YAML file (optional for eval, generate and pairs) plus dotted overrides, prints the
resolved config and refuses unknown keys, wrong types and meaningless values before any model is
loaded. A mistake in what the user gave (``UserError``: config, data, reward, env, run directory)
ends the command with one line and exit code 2; Ctrl-C with what was saved and exit code 130.

``rebelrl train --num_processes N ...`` runs the same command in N local processes (data parallel,
through torch's launcher); ``accelerate launch [--config_file F] -m rebelrl.cli train ...`` does the
same with any accelerate config.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import traceback

from rebelrl.compare import CompareConfig
from rebelrl.config import ConfigError, describe, load_config, to_yaml
from rebelrl.errors import UserError
from rebelrl.imports import user_code_context
from rebelrl.train.config import EvalCommandConfig, GenerateConfig, PairsConfig, TrainConfig

COMMANDS = {"train": TrainConfig, "eval": EvalCommandConfig, "generate": GenerateConfig, "compare": CompareConfig, "pairs": PairsConfig}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rebelrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, cls in COMMANDS.items():
        p = sub.add_parser(name, help=f"{name} (config: {cls.__name__})")
        p.add_argument("args", nargs="*", help="[CONFIG.yaml] key.sub=value ...")
        p.add_argument("--fields", action="store_true", help="list every config field with its default and help")
        if name == "train":
            p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in run_dir")
            p.add_argument("--allow-config-change", action="store_true", help="with --resume: apply a config that differs from the run's")
            p.add_argument("--num_processes", "--num-processes", type=int, default=1,
                           help="train data-parallel in this many local processes (one per GPU; on the CPU, gloo)")
        if name == "compare":
            p.add_argument("--quick", action="store_true", help="one seed per method")
    p = sub.add_parser("export", help="a run's policy as a plain Hugging Face folder with a model card (and to the Hub)")
    p.add_argument("run_dir", help="the run directory")
    p.add_argument("--iteration", type=int, default=None, help="the checkpoint of this iteration (default: the latest)")
    p.add_argument("--output", default=None, help="the folder to write (default: RUN_DIR/model)")
    p.add_argument("--adapter-only", action="store_true", help="a LoRA run: the adapter alone, not merged into the base weights")
    p.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="upload the folder to this Hub model repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    ns = parser.parse_args(argv)
    cls = COMMANDS.get(ns.command)
    if cls is not None and ns.fields:
        for key, tp, default, help_ in describe(cls):
            print(f"{key:32s} {tp:18s} {default:22s} {help_}")
        return 0
    cfg = None
    try:
        if ns.command == "export":
            return _export(ns)
        path = ns.args[0] if ns.args and "=" not in ns.args[0] else None
        overrides = ns.args[1:] if path else ns.args
        flags = [f"{key}=true" for key in ("resume", "allow_config_change") if getattr(ns, key, False)]
        if ns.command == "train" and ns.num_processes < 1:
            raise ConfigError(f"--num_processes={ns.num_processes}: expected >= 1 (the number of local processes to train in)")
        cfg = load_config(cls, path, [*overrides, *flags])
        if ns.command == "train" and ns.num_processes > 1:
            return _launch(cfg, ns.num_processes, sys.argv[1:] if argv is None else argv)
        _quiet_libraries()
        if ns.command == "compare":
            from rebelrl.compare import run_all

            run_all(cfg, quick=ns.quick)
            return 0
        return {"train": _train, "eval": _eval, "generate": _generate, "pairs": _pairs}[ns.command](cfg)
    except ConfigError as e:
        print(f"rebelrl {ns.command}: config error: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"rebelrl {ns.command}: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        context = user_code_context(e)
        if context is None:
            raise  # a bug in rebelrl: the traceback is the report
        # A bug in the user's own code: say whose, then its traceback (without the same line as a note).
        print(f"rebelrl {ns.command}: {context}; its traceback follows", file=sys.stderr)
        e.__notes__ = [n for n in getattr(e, "__notes__", []) if not n.startswith("(raised in ")]
        traceback.print_exception(e)
        return 1
    except KeyboardInterrupt:
        print(f"\nrebelrl {ns.command}: interrupted" + (_resume_hint(cfg, ns.args) if ns.command == "train" and cfg else ""), file=sys.stderr)
        return 130


def _resume_hint(cfg: TrainConfig, args: list[str]) -> str:
    """What an interrupted run saved, and the exact command that continues it."""
    from pathlib import Path

    from rebelrl.train.checkpoint import latest_checkpoint
    from rebelrl.train.run_dir import checkpoint_iteration

    kept = [a for a in args if not a.startswith(("resume=", "allow_config_change="))]
    command = shlex.join(["rebelrl", "train", *kept, "--resume"])
    checkpoint = latest_checkpoint(Path(cfg.run_dir)) if Path(cfg.run_dir).is_dir() else None
    if checkpoint is None:
        return f"; no complete checkpoint was saved, so resuming starts it again from iteration 0: {command}"
    return f"; the last complete checkpoint is {checkpoint} (iteration {checkpoint_iteration(checkpoint)}); resume with: {command}"


def _launch(cfg: TrainConfig, num_processes: int, argv: list[str]) -> int:
    """Check that the processes get equal shares, then run this command again in ``num_processes``."""
    from rebelrl.train.distributed import check_shares, launch, launched_processes

    if launched_processes() > 1:
        raise ConfigError("--num_processes inside a launched run: launch with one of accelerate launch, torchrun or --num_processes")
    check_shares(cfg, num_processes)
    return launch(num_processes, _without_num_processes(argv))


def _without_num_processes(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--num_processes", "--num-processes"):
            skip = True
        elif not arg.startswith(("--num_processes=", "--num-processes=")):
            out.append(arg)
    return out


def _check_hub_ids(names: dict[str, str | None]) -> None:
    """A model name that is neither an alias nor a folder is a hub id: it must be in the local cache or
    the hub must answer for it, checked in seconds; loading it would retry for a minute and end in a traceback."""
    import os
    from pathlib import Path

    from huggingface_hub import constants, model_info, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    from rebelrl.models import DEFAULT_MODEL, TINY_MODEL

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    for key, name in names.items():
        if name is None or name in (DEFAULT_MODEL, TINY_MODEL) or Path(name).expanduser().is_dir():
            continue
        try:
            if isinstance(try_to_load_from_cache(name, "config.json"), str):
                continue
            if offline:
                raise ConfigError(f"{key}={name!r} is not a local folder nor in the hub cache, and HF_HUB_OFFLINE is set")
            model_info(name, timeout=10)
        except HFValidationError:
            raise ConfigError(f"{key}={name!r} is neither a local folder nor a valid hub id (owner/name)") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"{key}={name!r} is neither a local folder nor a model on the hub") from None
        except HfHubHTTPError:
            continue  # the hub answered (a gated or private model): loading says what it needs
        except Exception as e:  # no network, no name resolution, a timeout: whatever the HTTP client raises
            raise ConfigError(f"{key}={name!r} is neither a local folder nor reachable: the hub did not answer "
                              f"({type(e).__name__}); download it to a folder and give that") from None


def _train(cfg: TrainConfig) -> int:
    from rebelrl.algos import offline, pg, rebel, refuel

    user_model = cfg.task.user_model if cfg.task.name == "chitchat-dialogue" and cfg.task.user is None else None
    _check_hub_ids({"model.name": cfg.model.name, "model.ref_name": cfg.model.ref_name, "task.user_model": user_model,
                    "guide.model": cfg.guide.model})

    from rebelrl.train.config import OFFLINE_ALGOS

    loops = {"rebel": rebel, "online_dpo": rebel, "refuel": refuel, "rloo": pg, "grpo": pg, "ppo": pg, "astar_po": pg,
             **{algo: offline for algo in OFFLINE_ALGOS}}
    if cfg.rollout.backend != "vllm":
        loops[cfg.algo].train(cfg)
        return 0
    from rebelrl.rollout.vllm_engine import engines_of_this_block

    with engines_of_this_block():  # the run's engine never outlives it, whether it ended, failed or was interrupted
        loops[cfg.algo].train(cfg)
    return 0


def _eval(cfg: EvalCommandConfig) -> int:
    from rebelrl.envs import build_task, task_reward
    from rebelrl.eval import evaluate, save_samples
    from rebelrl.eval.dialogue import evaluate_dialogues, per_turn_table, save_dialogues
    from rebelrl.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
    from rebelrl.rewards import checked_reward
    from rebelrl.rollout import HFGenerator, SamplingParams
    from rebelrl.train.threads import pin_threads

    print(to_yaml(cfg), file=sys.stderr)
    _check_hub_ids({"model": cfg.model, "baseline": cfg.baseline})
    pin_threads()
    task = build_task(cfg.task)
    reward_name, reward_fn = task_reward(task, cfg.reward)
    reward_fn = checked_reward(reward_fn, reward_name, lambda i: task.where("eval", i))
    baseline_name = cfg.baseline or DEFAULT_MODEL
    tokenizer = load_tokenizer(baseline_name, cfg.task.prompt_format)
    baseline = load_causal_lm(baseline_name, cfg.dtype)
    model = load_causal_lm(cfg.model, cfg.dtype)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.repetition_penalty)
    exact = cfg.dtype == "float32"  # elsewhere the sampler's log-probs are not the forward's: recompute them
    if task.env is None:
        def run(m, base_scores):
            return evaluate(HFGenerator(m, tokenizer, cfg.batch_size), baseline, task.eval, reward_fn, params, cfg.seed,
                            cfg.reward.no_eos_penalty, baseline_scores=base_scores, recompute_policy_logps=not exact)
    else:  # dialogues: play task.horizon turns with the simulated user and judge every turn
        def run(m, base_scores):
            return evaluate_dialogues(HFGenerator(m, tokenizer, cfg.batch_size), m, baseline, tokenizer, task.env, task.eval,
                                      reward_fn, params, cfg.seed, cfg.task.horizon, base_scores, cfg.reward.no_eos_penalty)
    base_metrics, _, base_scores = run(baseline, None)
    metrics, samples, scores = run(model, base_scores)
    if cfg.output:
        (save_samples if task.env is None else save_dialogues)(cfg.output, samples, scores)
    result = {"model": cfg.model, "baseline": baseline_name, "baseline_reward_mean": base_metrics["reward_mean"]}
    for key, value in metrics.items():
        key = key.replace("_to_ref", "_to_baseline").replace("win_rate_vs_initial", "win_rate_vs_baseline")
        result[key.replace("win_rate_turn_", "win_rate_vs_baseline_turn_")] = value
    print(json.dumps(result, indent=2))
    if task.env is not None:
        row = {"iteration": cfg.model, **{k: v for k, v in metrics.items() if k.startswith("win_rate_turn_")}}
        print(f"\nwin rate vs baseline by turn h:\n{per_turn_table([row], cfg.task.horizon)}")
    return 0


def _generate(cfg: GenerateConfig) -> int:
    import torch

    from rebelrl.data import load_prompts
    from rebelrl.models import load_causal_lm, load_tokenizer
    from rebelrl.rollout import HFGenerator, SamplingParams
    from rebelrl.train.threads import pin_threads
    from rebelrl.types import Conversation

    _check_hub_ids({"model": cfg.model})
    pin_threads()
    prompts = (
        load_prompts(cfg.prompts, system_prompt=cfg.system_prompt)
        if cfg.prompts
        else [Conversation.from_prompt(cfg.prompt, system=cfg.system_prompt)]
    )
    tokenizer = load_tokenizer(cfg.model, cfg.prompt_format)
    model = load_causal_lm(cfg.model, cfg.dtype)
    torch.manual_seed(cfg.seed)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.repetition_penalty)
    rollout = HFGenerator(model, tokenizer, cfg.batch_size).generate(prompts, cfg.n, params)
    rows = [
        {"prompt": conv.messages[-2].content, "completion": conv.last_assistant, "finished": done}
        for conv, done in zip(rollout.conversations, rollout.finished.tolist())
    ]
    out = open(cfg.output, "w") if cfg.output else sys.stdout
    try:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    finally:
        if cfg.output:
            out.close()
    return 0


def _pairs(cfg: PairsConfig) -> int:
    from rebelrl.data.make_pairs import make_pairs, summary_line

    print(to_yaml(cfg), file=sys.stderr)
    _check_hub_ids({"model": cfg.model})
    print(summary_line(make_pairs(cfg)))
    return 0


def _export(ns: argparse.Namespace) -> int:
    from rebelrl.export import export_model, push_to_hub

    if ns.private and not ns.push_to_hub:
        raise ConfigError("--private is read only with --push-to-hub: it would be ignored")
    _quiet_libraries()
    folder = export_model(ns.run_dir, ns.iteration, ns.output, ns.adapter_only)
    print(f"rebelrl export: {folder}")
    if ns.push_to_hub:
        print(f"rebelrl export: uploaded to {push_to_hub(folder, ns.push_to_hub, ns.private)}")
    return 0


def _quiet_libraries() -> None:
    """Weight-loading bars from transformers would bury the training progress bar."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
