"""The trained policy as a plain Hugging Face folder: ``rebelrl export RUN_DIR`` and the end of every run.

The folder loads with ``transformers`` (``AutoModelForCausalLM.from_pretrained``) and vLLM as it is:
safetensors weights, the tokenizer with the chat template the run rendered prompts with, a
``generation_config.json`` that samples as the run trained (its temperature, top-p, top-k, stop
tokens; not the base checkpoint's defaults), and a model card (``README.md``) saying how it was made.
A LoRA run's adapter is merged into the base weights unless ``adapter_only``; PPO's value head and
the optimizer state stay in the checkpoint. ``push_to_hub`` uploads the folder with huggingface_hub.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import yaml

from rebelrl.errors import UserError
from rebelrl.eval import read_jsonl
from rebelrl.train import run_dir as run_dirs
from rebelrl.train.checkpoint import checkpoint_root, latest_checkpoint

EXPORT_DIR = "model"
MARKER = "rebelrl_export.json"  # what the export came from; a folder holding it may be replaced by a later export
PAPERS = {
    "rebel": "REBEL: Reinforcement Learning via Regressing Relative Rewards (Gao et al., 2024), https://arxiv.org/abs/2404.16767",
    "refuel": "Regressing the Relative Future: Efficient Policy Optimization for Multi-turn RLHF (Gao et al., 2024), https://arxiv.org/abs/2410.04612",
    "online_dpo": "Direct Language Model Alignment from Online AI Feedback (Guo et al., 2024), https://arxiv.org/abs/2402.04792",
    "rloo": "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback (Ahmadian et al., 2024), https://arxiv.org/abs/2402.14740",
    "grpo": "DeepSeekMath (Shao et al., 2024), https://arxiv.org/abs/2402.03300",
    "ppo": "Proximal Policy Optimization Algorithms (Schulman et al., 2017), https://arxiv.org/abs/1707.06347",
    "astar_po": "Accelerating RL for LLM Reasoning with Optimal Advantage Regression (Brantley et al., 2025), https://arxiv.org/abs/2505.20686",
    "dpo": "Direct Preference Optimization (Rafailov et al., 2023), https://arxiv.org/abs/2305.18290",
    "hypo": "Understanding Preference Fine-Tuning Through the Lens of Coverage (Song et al., 2024), https://arxiv.org/abs/2406.01462",
    "sft": "supervised fine-tuning on demonstrations",
    "alol": "Leftover Lunch: Advantage-based Offline Reinforcement Learning for Language Models (Baheti et al., 2024), https://arxiv.org/abs/2305.14718",
}


class ExportError(UserError, RuntimeError):
    pass


def find_checkpoint(run_dir: Path, iteration: int | None) -> Path:
    """The run's checkpoint at ``iteration`` (None: its latest), or a one-line error listing what there is."""
    root = checkpoint_root(run_dir)
    have = sorted(p.name for p in root.glob("iter-*")) if root.is_dir() else []
    if iteration is None:
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ExportError(f"{run_dir}: no checkpoint to export (a finished comparison drops its runs' checkpoints unless keep_checkpoints: true)")
        return found
    found = root / f"iter-{iteration:06d}"
    if not found.is_dir():
        raise ExportError(f"{run_dir}: no checkpoint of iteration {iteration}; it has {', '.join(have) or 'none'}")
    return found


def export_model(run_dir: str | Path, iteration: int | None = None, output: str | Path | None = None, adapter_only: bool = False) -> Path:
    """Write the policy of ``run_dir``'s checkpoint as a Hugging Face folder (default ``run_dir/model``); returns it."""
    from rebelrl.train.config import TrainConfig
    from rebelrl.config import from_dict

    run_dir = Path(run_dir)
    if not (run_dir / run_dirs.CONFIG).is_file():
        raise ExportError(f"{run_dir}: not a rebelrl run directory (no {run_dirs.CONFIG})")
    cfg = from_dict(TrainConfig, yaml.safe_load((run_dir / run_dirs.CONFIG).read_text()))
    if cfg.algo == "reward_model":
        raise ExportError(f"{run_dir}: a reward model run; its model is {run_dir / 'reward_model'} (a folder RewardModelScorer loads)")
    checkpoint = find_checkpoint(run_dir, iteration)
    source = checkpoint / "model"
    adapter = (source / "adapter_config.json").is_file()
    if adapter_only and not adapter:
        raise ExportError(f"{run_dir}: --adapter-only: the run trained every weight (model.lora_r=0), there is no adapter")
    out = Path(output) if output is not None else run_dir / EXPORT_DIR
    if out.exists() and not (out / MARKER).is_file() and any(out.iterdir()):
        raise ExportError(f"{out} exists and holds files that are not a rebelrl export: choose another --output")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if adapter and not adapter_only:
        _merged(cfg, source).save_pretrained(tmp, safe_serialization=True)
    else:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns("generation_config.json"))
    _copy_tokenizer(source, tmp)
    generation = _generation_config(cfg, source)
    generation.save_pretrained(tmp)
    done = int(checkpoint.name.removeprefix("iter-"))
    evals = [r for r in read_jsonl(run_dir / "eval.jsonl") if r["iteration"] <= done] if (run_dir / "eval.jsonl").exists() else []
    (tmp / "README.md").write_text(model_card(cfg, done, evals, adapter and adapter_only, generation))
    (tmp / MARKER).write_text(json.dumps({"run_dir": str(run_dir.resolve()), "checkpoint": checkpoint.name, "adapter_only": adapter and adapter_only}) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def _merged(cfg, source: Path):
    """The base model with the adapter's weights folded in: a plain transformers model."""
    from peft import PeftModel

    from rebelrl.models import load_causal_lm, peft_quietly

    base = load_causal_lm(cfg.model.name, cfg.model.dtype, cfg.seed)
    with peft_quietly():
        return PeftModel.from_pretrained(base, str(source)).merge_and_unload()


def _copy_tokenizer(source: Path, target: Path) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(source)).save_pretrained(target)


def _generation_config(cfg, source: Path):
    """Sampling as the run trained: its temperature, top-p, top-k, repetition penalty and budget, and
    the tokens that ended its replies (the turn terminator and EOS)."""
    from transformers import AutoTokenizer, GenerationConfig

    from rebelrl.rollout.chat import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(str(source))
    r = cfg.rollout
    stops = stop_token_ids(tokenizer)
    return GenerationConfig(
        do_sample=r.temperature > 0, temperature=r.temperature if r.temperature > 0 else None,
        top_p=r.top_p if r.top_p < 1 else None, top_k=r.top_k if r.top_k > 0 else 0,
        repetition_penalty=r.repetition_penalty if r.repetition_penalty != 1 else None,
        max_new_tokens=r.max_new_tokens, eos_token_id=stops if len(stops) > 1 else stops[0],
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )


def model_card(cfg, iteration: int, evals: list[dict], adapter_only: bool, generation) -> str:
    """The model card: base model, method and paper, reward and data, sampling, held-out results, versions."""
    from huggingface_hub import ModelCard, ModelCardData

    import rebelrl

    base = cfg.model.name if not cfg.model.name.startswith(("/", ".", "~")) else None
    data = ModelCardData(library_name="peft" if adapter_only else "transformers", base_model=base,
                         tags=["rebelrl", cfg.algo.replace("_", "-"), "reinforcement-learning"], pipeline_tag="text-generation")
    task = cfg.task
    source = {"reasoning-gym": f"reasoning-gym `{task.dataset}` {task.dataset_kwargs or ''}", "prompts": f"prompts from `{task.prompts}`",
              "preferences": f"preference pairs from `{task.data}`", "demonstrations": f"demonstrations from `{task.data}`",
              "env": f"the environment `{task.env}`", "openenv": f"the OpenEnv environment `{task.env}`"}.get(task.name, f"the built-in task `{task.name}`")
    lines = [f"# {cfg.algo.upper()} on {task.name}, from {cfg.model.name}", "",
             f"Trained with [rebelrl](https://pypi.org/project/rebelrl/) {rebelrl.__version__}: `algo={cfg.algo}` "
             f"({PAPERS.get(cfg.algo, cfg.algo)}), {iteration} of {cfg.iterations} iterations, seed {cfg.seed}.", "",
             "## How it was trained", "",
             f"- Base model: `{cfg.model.name}` ({cfg.model.dtype}){f', LoRA r={cfg.model.lora_r}' if cfg.model.lora_r else ''}"
             f"{' (this folder: the adapter alone)' if adapter_only else (' (merged into these weights)' if cfg.model.lora_r else '')}",
             f"- Data: {source}",
             f"- Reward: `{cfg.reward.fn or 'the task default'}`" + (f" with dataset reset to `{cfg.reset.data}`" if cfg.reset.data else "")
             + (f"; guide `{cfg.guide.model or 'the reference'}` ({cfg.guide.mode})" if cfg.guide.mode != "none" else ""),
             f"- Sampling during training: temperature {cfg.rollout.temperature}, top-p {cfg.rollout.top_p}, top-k {cfg.rollout.top_k}, "
             f"at most {cfg.rollout.max_new_tokens} new tokens (`generation_config.json` samples the same way)",
             f"- Optimizer: AdamW, lr {cfg.optim.lr:g}, {cfg.optim.schedule} schedule", ""]
    if evals:
        first, last = evals[0], evals[-1]
        keys = [k for k in ("reward_mean", "win_rate_vs_initial", "kl_to_ref", "rewards/accuracies", "mean_token_accuracy", "loss") if k in last]
        lines += ["## Held-out results", "", f"{last.get('n_prompts', '')} held-out prompts, initial policy (iteration 0) and this one "
                  f"(iteration {last['iteration']}):", "", "| metric | initial | this model |", "|---|---|---|"]
        lines += [f"| {k} | {first.get(k, float('nan')):.4f} | {last[k]:.4f} |" for k in keys]
        lines.append("")
    lines += ["## Use", "", "`PATH` is this folder, or the Hub repository it was uploaded to.", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH")' if not adapter_only else
              'from peft import AutoPeftModelForCausalLM\nmodel = AutoPeftModelForCausalLM.from_pretrained("PATH")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH")', "```", "",
              "## Versions", "", f"rebelrl {rebelrl.__version__}, {_versions()}, Python {platform.python_version()}", ""]
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n" + "\n".join(lines)))


def _versions() -> str:
    import importlib.metadata as md

    return ", ".join(f"{name} {md.version(name)}" for name in ("torch", "transformers", "peft", "accelerate"))


def push_to_hub(folder: Path, repo_id: str, private: bool = False, api=None) -> str:
    """Upload ``folder`` to the Hub repository ``repo_id`` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload a rebelrl model",
                               ignore_patterns=[MARKER])
    return str(getattr(commit, "commit_url", commit))
