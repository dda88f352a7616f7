"""Multi-turn evaluation: play H turns with the simulated user, judge the dialogue after every turn h.

The per-turn win rate against the initial policy (the REFUEL paper's table) compares, for each h,
the reward of the dialogue cut after its h-th assistant turn with the initial policy's on the same
opening and the same sampling seed. Ties count half.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from rebelrl.eval.evaluate import kl_key, win_rate
from rebelrl.logprobs import token_logprobs
from rebelrl.models import model_device
from rebelrl.rewards import RewardFn, apply_no_eos_penalty, check_scores
from rebelrl.rollout import Generator, SamplingParams
from rebelrl.rollout.dialogue import encode_dialogue, play, truncate_turns
from rebelrl.seeding import seeded
from rebelrl.types import Conversation


def turn_scores(reward_fn: RewardFn, conversations: list[Conversation], horizon: int, no_eos_penalty: float | None = None) -> torch.Tensor:
    """(N, H): the reward of each dialogue cut after assistant turn h = 1..H (a dialogue that ended
    earlier is judged whole). As in training, where the turn's reply never ended (cut at the token
    budget) the score is ``no_eos_penalty`` instead."""
    columns = []
    for h in range(1, horizon + 1):
        cut = [truncate_turns(c, h) for c in conversations]
        scores = check_scores(reward_fn(cut), len(cut), "reward")
        ended = [_last_reply_finished(c) for c in cut]
        columns.append(torch.tensor(apply_no_eos_penalty(scores, ended, no_eos_penalty), dtype=torch.float32))
    return torch.stack(columns, dim=1)


def _last_reply_finished(conversation: Conversation) -> bool:
    replies = [m for m in conversation.messages if m.role == "assistant"]
    return not replies or replies[-1].finished


@torch.no_grad()
def dialogue_logprobs(model, tokenizer, conversations: list[Conversation], temperature: float, batch_size: int = 8) -> torch.Tensor:
    """(N,) log pi(all assistant turns | the rest of the dialogue), summed over the assistant tokens."""
    out = []
    device = model_device(model)
    for i in range(0, len(conversations), batch_size):
        encoded = [encode_dialogue(tokenizer, c) for c in conversations[i : i + batch_size]]
        L = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), L), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(encoded), L, dtype=torch.long)
        targets = torch.zeros(len(encoded), L, dtype=torch.long)  # 1 on assistant tokens
        for row, (seq, spans) in enumerate(encoded):
            ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            for start, end in spans:
                targets[row, start:end] = 1
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=False).logits[:, :-1]
        logps = token_logprobs(logits, ids[:, 1:].to(device), temperature)  # (b, L-1): token t+1 given its past
        out.append((logps * targets[:, 1:].to(logps.device)).sum(dim=1).cpu())
    return torch.cat(out)


def evaluate_dialogues(
    generator: Generator,
    policy_model,
    ref_model,
    tokenizer,
    env,
    starts: list[Conversation],
    reward_fn: RewardFn,
    params: SamplingParams,
    seed: int,
    horizon: int,
    baseline_turn_scores: torch.Tensor | None = None,
    no_eos_penalty: float | None = None,
) -> tuple[dict, list[Conversation], torch.Tensor]:
    """Play ``horizon`` turns from each opening and judge every turn.

    Returns metrics (``reward_mean`` and ``win_rate_vs_initial`` at turn H, plus ``reward_turn_h``,
    ``win_rate_turn_h`` for every h, ``kl_to_ref`` over all assistant tokens), the dialogues, and the
    (N, H) turn scores that serve as the baseline of later evaluations.
    """
    dialogues, scores, logratio = _play(generator, policy_model, ref_model, tokenizer, env, starts, reward_fn, params, seed, horizon, no_eos_penalty)
    rows = dialogue_rows(dialogues, scores, logratio)
    return dialogue_metrics(rows, params, horizon, baseline_turn_scores), dialogues, scores


def evaluate_dialogue_rows(generator: Generator, policy_model, ref_model, tokenizer, env, starts: list[Conversation], reward_fn: RewardFn,
                           params: SamplingParams, seed: int, horizon: int, no_eos_penalty: float | None = None) -> list[dict]:
    """``evaluate_dialogues``'s dialogues, one record per opening (``dialogue_rows``): for an
    evaluation whose openings are shared among processes, gathered, then summed up by ``dialogue_metrics``."""
    return dialogue_rows(*_play(generator, policy_model, ref_model, tokenizer, env, starts, reward_fn, params, seed, horizon, no_eos_penalty))


def _play(generator, policy_model, ref_model, tokenizer, env, starts, reward_fn, params, seed, horizon, no_eos_penalty):
    """The dialogues, their (N, H) turn scores and (N,) log pi - log pi_ref over all assistant tokens."""
    with seeded(seed):
        dialogues = play(generator, env, starts, [horizon] * len(starts), params).conversations
    scores = turn_scores(reward_fn, dialogues, horizon, no_eos_penalty)  # (N, H)
    # Both sides on the re-rendered dialogue, not the sampler's log-probs: earlier turns are context
    # re-tokenized from text, and the KL must compare the two models on the same tokens.
    policy = dialogue_logprobs(policy_model, tokenizer, dialogues, params.logprob_temperature)
    ref = dialogue_logprobs(ref_model, tokenizer, dialogues, params.logprob_temperature)
    return dialogues, scores, policy - ref


def dialogue_rows(dialogues: list[Conversation], scores: torch.Tensor, logratio: torch.Tensor) -> list[dict]:
    """One record per dialogue: what ``save_dialogues`` writes (messages, turn scores, final score) and
    what the metrics need. scores: (N, H); logratio: (N,)."""
    return [
        {"messages": d.to_chat(), "turn_scores": row, "score": row[-1], "logratio": ratio, "turns": sum(m.role == "assistant" for m in d.messages)}
        for d, row, ratio in zip(dialogues, scores.tolist(), logratio.tolist())
    ]


def dialogue_metrics(rows: list[dict], params: SamplingParams, horizon: int, baseline_turn_scores: torch.Tensor | None = None) -> dict:
    """Held-out metrics of ``dialogue_rows`` records, in opening order (to meet the baseline's (N, H))."""
    scores = torch.tensor([r["turn_scores"] for r in rows], dtype=torch.float32)  # (N, H)
    turns = [r["turns"] for r in rows]
    metrics = {
        "reward_mean": scores[:, -1].mean().item(),
        "reward_std": scores[:, -1].std().item() if len(rows) > 1 else 0.0,
        kl_key(params): torch.tensor([r["logratio"] for r in rows], dtype=torch.float32).mean().item(),
        "turns_mean": sum(turns) / len(turns),
        "n_prompts": len(rows),
    }
    for h in range(1, horizon + 1):
        metrics[f"reward_turn_{h}"] = scores[:, h - 1].mean().item()
    if baseline_turn_scores is not None:
        for h in range(1, horizon + 1):
            metrics[f"win_rate_turn_{h}"] = win_rate(scores[:, h - 1], baseline_turn_scores[:, h - 1])
        metrics["win_rate_vs_initial"] = metrics[f"win_rate_turn_{horizon}"]
    return metrics


def save_dialogues(path: Path, dialogues: list[Conversation], scores: torch.Tensor) -> None:
    """Dialogues with their per-turn scores, written whole or not at all (as ``save_samples``)."""
    save_dialogue_rows(path, [{"messages": d.to_chat(), "turn_scores": row, "score": row[-1]} for d, row in zip(dialogues, scores.tolist())])


def save_dialogue_rows(path: Path, rows: list[dict]) -> None:
    """``save_dialogues`` from ``dialogue_rows`` records."""
    from rebelrl.train.checkpoint import write_atomic

    write_atomic(path, "".join(json.dumps({key: r[key] for key in ("messages", "turn_scores", "score")}) + "\n" for r in rows))


def load_turn_scores(path: Path) -> torch.Tensor:
    rows = [json.loads(line)["turn_scores"] for line in Path(path).read_text().splitlines() if line.strip()]
    return torch.tensor(rows, dtype=torch.float32)


def per_turn_table(evals: list[dict], horizon: int) -> str:
    """Markdown: one row per evaluation, win rate against the initial policy at each turn h."""
    head = "| iteration | " + " | ".join(f"h={h}" for h in range(1, horizon + 1)) + " |"
    lines = [head, "|---" * (horizon + 1) + "|"]
    for e in evals:
        cells = [f"{e[f'win_rate_turn_{h}']:.3f}" if f"win_rate_turn_{h}" in e else "-" for h in range(1, horizon + 1)]
        lines.append(f"| {e['iteration']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_per_turn(evals: list[dict], horizon: int, path: Path) -> None:
    """Win rate against the initial policy by turn, one line per evaluation after the first."""
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    turns = list(range(1, horizon + 1))
    for e in evals[1:]:
        ax.plot(turns, [e.get(f"win_rate_turn_{h}", float("nan")) for h in turns], marker="o", label=f"iteration {e['iteration']}")
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("turn h")
    ax.set_ylabel("win rate vs initial policy")
    ax.set_xticks(turns)
    ax.set_ylim(0, 1)
    ax.set_title("Per-turn win rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
