"""``rebelrl pairs``: preference pairs from prompts and a reward, for the offline methods.

Each prompt gets ``k`` replies from the model (the exact sampler, one seed a prompt, so a prompt's
replies do not depend on the batch it was sampled in), scored by the task's reward. The best and the
worst reply make the pair: chosen is the best, or with ``bt_beta`` a Bradley-Terry draw (Bradley and
Terry 1952; the preference model of RLHF and DPO, Rafailov et al. 2023, eq. 1) in which the best is
chosen with probability sigmoid(bt_beta * (s_best - s_worst)), as a rater whose judgement is noisy
would. A prompt whose k scores are all equal gives no preference and is skipped.

The file is written whole or not at all (a temporary file renamed into place), and it loads with
``load_preference_rows``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from rebelrl.config import ConfigError
from rebelrl.types import Conversation


def bradley_terry_probability(gap: float, bt_beta: float) -> float:
    """P(the better reply is preferred) = sigmoid(bt_beta * gap), gap = s_best - s_worst >= 0.

    >>> round(bradley_terry_probability(math.log(3), 1.0), 6)  # e^ln3 / (1 + e^ln3) = 3/4
    0.75
    """
    z = bt_beta * gap
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def best_and_worst(scores: Sequence[float], usable: Sequence[bool]) -> tuple[int, int] | None:
    """Indices of the highest- and the lowest-scored usable replies of a prompt (the first of equal
    ones); None where fewer than two usable replies differ in score."""
    candidates = [i for i, ok in enumerate(usable) if ok]
    if len(candidates) < 2:
        return None
    best = max(candidates, key=lambda i: scores[i])
    worst = min(candidates, key=lambda i: scores[i])
    return None if scores[best] == scores[worst] else (best, worst)


def label_pair(best: int, worst: int, gap: float, bt_beta: float | None, u: float) -> tuple[int, int]:
    """(chosen, rejected): by score where ``bt_beta`` is None, else the best chosen where the uniform
    draw ``u`` in [0, 1) falls below ``bradley_terry_probability(gap, bt_beta)``, the two swapped otherwise."""
    if bt_beta is None or u < bradley_terry_probability(gap, bt_beta):
        return best, worst
    return worst, best


def make_pairs(cfg) -> dict:
    """Sample, score, label and write the pairs of ``cfg`` (a ``PairsConfig``). -> the summary."""
    import torch
    from tqdm.auto import tqdm

    from rebelrl.algos.run import check_prompt_lengths
    from rebelrl.envs import build_task, task_reward
    from rebelrl.eval.evaluate import score_conversations
    from rebelrl.models import context_length, load_causal_lm, load_tokenizer
    from rebelrl.rewards import checked_reward
    from rebelrl.rollout import HFGenerator, SamplingParams
    from rebelrl.train.threads import pin_threads

    output = _output_path(cfg)
    pin_threads()
    task = build_task(cfg.task)
    splits = ("train", "eval") if cfg.split == "all" else (cfg.split,)
    prompts = [p for s in splits for p in (task.train if s == "train" else task.eval)]
    wheres = [task.where(s, i) for s in splits for i in range(len(task.train if s == "train" else task.eval))]
    reward_name, reward_fn = task_reward(task, cfg.reward)
    tokenizer = load_tokenizer(cfg.model, cfg.task.prompt_format)
    model = load_causal_lm(cfg.model, cfg.dtype)
    check_prompt_lengths(task, tokenizer, context_length(model.config), cfg.max_new_tokens, "max_new_tokens")
    generator = HFGenerator(model, tokenizer, cfg.batch_size)
    params = SamplingParams(cfg.temperature, cfg.top_p, cfg.top_k, cfg.max_new_tokens, cfg.repetition_penalty)
    k = cfg.samples_per_prompt
    # One sampling seed and one label draw a prompt, both fixed by cfg.seed alone.
    seeds = torch.randint(0, 2**62, (len(prompts),), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    rng = random.Random(cfg.seed)
    uniforms = [rng.random() for _ in prompts]
    rows, skipped_equal, skipped_unusable = [], 0, 0
    with tqdm(total=len(prompts), desc="rebelrl pairs", unit="prompt", file=sys.stderr, dynamic_ncols=True) as bar:
        for start in range(0, len(prompts), cfg.batch_size):
            batch = prompts[start : start + cfg.batch_size]
            rollout = generator.generate(batch, k, params, seeds=seeds[start : start + cfg.batch_size])
            scored = checked_reward(reward_fn, reward_name, lambda i, start=start: f"{wheres[start + i // k]}, reply {i % k}")
            scores = score_conversations(scored, rollout.conversations, rollout.finished, cfg.reward.no_eos_penalty, reward_name)
            scores = scores.view(len(batch), k).tolist()  # (B, k)
            for b, prompt in enumerate(batch):
                replies = [c.last_assistant for c in rollout.conversations[b * k : (b + 1) * k]]  # (k,)
                row = _pair_row(prompt, replies, scores[b], cfg.bt_beta, uniforms[start + b])
                if row is not None:
                    rows.append(row)
                elif max(scores[b]) == min(scores[b]):
                    skipped_equal += 1
                else:
                    skipped_unusable += 1
            bar.update(len(batch))
    if not rows:
        raise ConfigError(f"no pairs: of {len(prompts)} prompts, {skipped_equal} had {k} equal scores and {skipped_unusable} "
                          f"fewer than two different non-empty replies; nothing was written to {output}")
    write_jsonl_atomically(output, rows, cfg.overwrite)
    return {"output": str(output), "pairs": len(rows), "prompts": len(prompts), "skipped_equal": skipped_equal,
            "skipped_unusable": skipped_unusable, "label": "score" if cfg.bt_beta is None else "bradley_terry", "k": k}


def _pair_row(prompt: Conversation, replies: list[str], scores: list[float], bt_beta: float | None, u: float) -> dict | None:
    """The row of one prompt, or None where its replies give no pair. Empty replies are left out (a
    pair file refuses them), and so is a best reply whose text is the worst's (a finished and a cut
    copy of one text can score differently)."""
    picked = best_and_worst(scores, [bool(r.strip()) for r in replies])
    if picked is None or replies[picked[0]] == replies[picked[1]]:
        return None
    best, worst = picked
    chosen, rejected = label_pair(best, worst, scores[best] - scores[worst], bt_beta, u)
    single = len(prompt.messages) == 1 and prompt.messages[0].role == "user"
    return {
        "prompt": prompt.messages[0].content if single else prompt.to_chat(),
        "chosen": replies[chosen],
        "rejected": replies[rejected],
        "chosen_score": scores[chosen],
        "rejected_score": scores[rejected],
        "scores": scores,
        "label": "score" if bt_beta is None else "bradley_terry",
    }


def summary_line(summary: dict) -> str:
    skipped = f"{summary['skipped_equal']} prompts skipped (all {summary['k']} scores equal)"
    if summary["skipped_unusable"]:
        skipped += f", {summary['skipped_unusable']} skipped (fewer than two different non-empty replies)"
    return (f"wrote {summary['pairs']} pairs from {summary['prompts']} prompts to {summary['output']} "
            f"(labels: {summary['label']}); {skipped}")


def _output_path(cfg) -> Path:
    """``cfg.output``, refused before any work where it exists and ``overwrite`` is off."""
    path = Path(cfg.output).expanduser()
    if path.is_dir():
        raise ConfigError(f"output={cfg.output}: is a folder; give the path of a .jsonl file")
    if path.exists() and not cfg.overwrite:
        raise ConfigError(f"output={cfg.output}: the file exists; set overwrite=true to replace it, or give another path")
    return path


def write_jsonl_atomically(path: Path, rows: list[dict], overwrite: bool) -> None:
    """``rows`` as JSON lines at ``path``, whole or not at all: written to a temporary file beside it and
    renamed into place. Without ``overwrite`` a file that appeared at ``path`` meanwhile is kept."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)  # fails where path exists, where a rename would replace it
        except FileExistsError:
            raise ConfigError(f"output={path}: the file appeared while the pairs were made; set overwrite=true to replace it") from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise ConfigError(f"output={path}: the file exists; set overwrite=true to replace it") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
