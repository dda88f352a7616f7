"""Offline methods on a dataset: DPO, IPO and chi-PO on preference pairs, HyPO (the same plus a KL to
the reference on the policy's own fresh samples), SFT on demonstrations, reward models on pairs, and
A-LoL (offline policy gradient on scored replies, its advantages computed once before training).

One iteration, top to bottom:
    rows   -> the iteration's ``update.minibatch_size`` rows of the data: consecutive slices of an
              endless stream of shuffled epochs, this process's share (a resumed run reads the same rows)
    sample -> HyPO only: ``rollout.samples_per_prompt`` replies of the policy to each row's prompt
    update -> ``update.epochs`` passes over the rows in micro-batches: the method's pure loss, exact
              gradient accumulation, clipping, AdamW, one optimizer step a pass
    log    -> metrics.jsonl; every ``eval.every`` iterations the held-out rows (pair accuracy and margin,
              or held-out loss), and when a reward is named, the held-out prompts sampled and judged

What differs between the methods is an ``Objective``: what a micro-batch of rows costs and what the
held-out rows measure. The run directory, checkpoints, resume, evaluation and report are ``Run``'s.
Reference log-probs of the pairs are computed once, before the first step, and kept in the run
directory (``ref_logps.safetensors``), so epochs and resumed runs never compute them again.
"""

from __future__ import annotations

import functools
import hashlib
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from rebelrl.algos.run import Run, _load_models, encode_row
from rebelrl.logprobs import completion_logprobs, packed_logprobs, rollout_logprobs
from rebelrl.losses import alol_loss, bradley_terry_loss, chipo_loss, dpo_loss, hypo_kl_loss, ipo_loss, sft_loss
from rebelrl.rewards.reward_model import RewardModelScorer
from rebelrl.rollout.dialogue import Encoded
from rebelrl.train.checkpoint import TEMP_SUFFIX
from rebelrl.train.config import TrainConfig
from rebelrl.config import ConfigError
from rebelrl.train.run_dir import RunDirError
from rebelrl.envs.tasks import before_last_reply
from rebelrl.rollout.reset import prompt_key
from rebelrl.types import Conversation, PreferencePair

REF_CACHE = "ref_logps.safetensors"


# --- data as tensors -----------------------------------------------------------------------------------


@dataclass
class Split:
    """One split of the data, tokenised: each row's sequences (a pair's chosen and rejected, or one
    demonstration), and for the pair methods the reference's log-probs of each."""

    rows: list  # PreferencePair or Conversation, as read
    encoded: list[tuple[Encoded, ...]]
    ref_logps: torch.Tensor | None = None  # (N, 2) log pi_ref(y|x) of chosen and rejected, summed over the reply
    ref_tokens: torch.Tensor | None = None  # A-LoL: (N, T) log pi_ref of each reply token, right-padded with 0
    advantages: torch.Tensor | None = None  # A-LoL: (N,) A = R(x, y) - V_ref(x)

    def __len__(self) -> int:
        return len(self.rows)

    def sequences(self, rows: torch.Tensor) -> list[Encoded]:
        """The sequences of ``rows``, row-major: a pair's chosen then rejected."""
        return [e for i in rows.tolist() for e in self.encoded[i]]

    @functools.cached_property
    def lengths(self) -> torch.Tensor:
        """(N,) tokens of each row's longest sequence, to group rows of similar length (computed once)."""
        return torch.tensor([max(len(e.prompt) + len(e.completion) for e in enc) for enc in self.encoded])


def batch_tensors(sequences: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Prompts left-padded (n, P), completions right-padded (n, T): ids, masks, and (n, T) targets."""
    P = max(len(e.prompt) for e in sequences)
    T = max(len(e.completion) for e in sequences)
    prompt_ids = torch.full((len(sequences), P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((len(sequences), P), dtype=torch.long)
    completion_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    completion_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    targets = torch.zeros((len(sequences), T), dtype=torch.long)
    for i, e in enumerate(sequences):
        if e.prompt:
            prompt_ids[i, P - len(e.prompt):] = torch.tensor(e.prompt)
            prompt_mask[i, P - len(e.prompt):] = 1
        completion_ids[i, : len(e.completion)] = torch.tensor(e.completion)
        completion_mask[i, : len(e.completion)] = 1
        targets[i, : len(e.targets)] = torch.tensor(e.targets)
    return tuple(t.to(device) for t in (prompt_ids, prompt_mask, completion_ids, completion_mask, targets))


def token_logps(model, sequences: list[Encoded], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, T) log pi(a_t | s_t) at temperature 1 of every completion token, 0 on padding, and (n, T) targets."""
    prompt_ids, prompt_mask, completion_ids, completion_mask, targets = batch_tensors(sequences, pad_id, device)
    return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0), targets


def pair_logps(model, split: Split, rows: torch.Tensor, pad_id: int, device) -> torch.Tensor:
    """(m, 2) log pi(y|x) of chosen and rejected of each of ``rows``, summed over the reply's tokens."""
    logps, targets = token_logps(model, split.sequences(rows), pad_id, device)
    return (logps * targets).sum(1).view(-1, 2)


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Best-fit decreasing: the indices of ``lengths`` in bins whose lengths add up to at most
    ``max_length``, longest first; none is split. Each item goes to the bin it leaves least room in
    (the first such bin on ties), else to a new bin."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > max_length:
            raise ValueError(f"item {i} of length {lengths[i]} does not fit in {max_length}")
        fits = [j for j in range(len(bins)) if room[j] >= lengths[i]]
        if fits:
            j = min(fits, key=lambda j: room[j])
            bins[j].append(i)
            room[j] -= lengths[i]
        else:
            bins.append([i])
            room.append(max_length - lengths[i])
    return bins


@dataclass(frozen=True)
class Packed:
    """A micro-batch of packed sequences: ``packs[i]`` the split's rows laid end to end in sequence i."""

    packs: tuple[tuple[int, ...], ...]

    @property
    def rows(self) -> torch.Tensor:
        return torch.tensor([i for p in self.packs for i in p])


def packed_tensors(split: Split, packed: Packed, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, L) token ids, position ids restarting at 0 where each row begins, and targets, one packed
    sequence a row; the padding after the last row is a sequence of its own, with no target."""
    sequences = [[split.encoded[i][0] for i in p] for p in packed.packs]
    L = max(sum(len(e.prompt) + len(e.completion) for e in seq) for seq in sequences)
    ids = torch.full((len(sequences), L), pad_id, dtype=torch.long)
    positions = torch.zeros((len(sequences), L), dtype=torch.long)
    targets = torch.zeros((len(sequences), L), dtype=torch.long)
    for r, seq in enumerate(sequences):
        at = 0
        for e in seq:
            n = len(e.prompt) + len(e.completion)
            ids[r, at : at + n] = torch.tensor(e.prompt + e.completion)
            positions[r, at : at + n] = torch.arange(n)
            targets[r, at + len(e.prompt) : at + n] = torch.tensor(e.targets)
            targets[r, at] = 0  # nothing before a row's first token predicts it
            at += n
        positions[r, at:] = torch.arange(L - at)
    return ids.to(device), positions.to(device), targets.to(device)


@torch.no_grad()
def reference_logps(run: Run, split: Split, batch_size: int) -> torch.Tensor:
    """(N, 2) log pi_ref of every pair of ``split``, a batch of rows of similar length at a time."""
    device = run.processes.device
    out = torch.zeros(len(split), 2, device=device)
    for rows in split.lengths.argsort(stable=True).split(batch_size):
        out[rows.to(device)] = pair_logps(run.ref, split, rows, run.tokenizer.pad_token_id, device)
    return out


def cached_reference_logps(run: Run, splits: dict[str, Split]) -> None:
    """Fill each split's ``ref_logps``: from the run directory when it holds those of the same data and
    reference, whole, else computed now (once) and saved there."""
    m = run.cfg.model
    key = hashlib.sha256(repr((m.ref_name or m.name, m.dtype, m.lora_r > 0,
                               {name: [[(e.prompt, e.completion) for e in enc] for enc in s.encoded] for name, s in splits.items()})).encode()).hexdigest()
    path = run.run_dir / REF_CACHE
    if path.exists() and not path.is_file():
        raise RunDirError(f"{path}: not a file; rebelrl keeps the reference log-probs there: move it out of the run directory")
    saved, why = _read_reference_cache(path, key, {name: len(s) for name, s in splits.items()}, run.processes.device)
    if saved is not None:
        for name, split in splits.items():
            split.ref_logps = saved[name]
        run.say(f"rebelrl: reference log-probs of {sum(len(s) for s in splits.values())} pairs read from {path}")
        return
    if why:
        run.say(f"rebelrl: {path} {why}; computing the reference log-probs again")
    t0 = time.perf_counter()
    for split in splits.values():
        split.ref_logps = reference_logps(run, split, run.cfg.update.micro_batch_size)
    if run.processes.is_main:
        tensors = {name: s.ref_logps.contiguous().cpu() for name, s in splits.items()}
        tmp = path.with_name(f".{path.name}{TEMP_SUFFIX}")
        save_file(tensors, str(tmp), metadata={"key": key, "digest": _digest(tensors)})
        tmp.replace(path)
    run.processes.wait()
    run.say(f"rebelrl: reference log-probs of {sum(len(s) for s in splits.values())} pairs computed once "
            f"({time.perf_counter() - t0:.1f} s) and kept in {path}")


def _read_reference_cache(path: Path, key: str, rows: dict[str, int], device) -> tuple[dict | None, str]:
    """(the cached tensors, "") where ``path`` holds those of ``key``, whole and unchanged; else (None,
    why not: "" where there is no cache or it is another data's or reference's). A truncated, edited
    or partial file is never read as values: the digest of the tensors is kept beside the key."""
    if not path.exists():
        return None, ""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("key") != key:
                return None, ""
            saved = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as e:
        return None, f"cannot be read ({type(e).__name__}: {e})"
    shapes = {name: tuple(t.shape) for name, t in saved.items()}
    if shapes != {name: (n, 2) for name, n in rows.items()} or any(t.dtype != torch.float32 for t in saved.values()):
        return None, f"holds tensors of other names, shapes or types ({shapes}) than the pairs need"
    if metadata.get("digest") != _digest(saved):
        return None, "holds values that are not the ones saved with its key (edited or damaged)"
    return {name: t.to(device) for name, t in saved.items()}, ""


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --- what each method costs -------------------------------------------------------------------------


@dataclass
class Objective:
    """A method: the loss of a micro-batch of rows, and what the held-out rows measure.

    ``loss(run, split, rows (m,)) -> (loss, metrics)`` is a mean over the micro-batch's units (pairs,
    or target tokens where ``per_token``); ``held_out(run, split) -> metrics`` on the held-out rows."""

    loss: Callable
    held_out: Callable
    per_token: bool = False
    # ``batches(split, rows, micro_batch_size) -> micro-batches``: rows (tensors), or Packed sequences
    batches: Callable | None = None
    # ``prepare(run, train, held_out)``: what the method computes once, before the first step (A-LoL's advantages)
    prepare: Callable | None = None
    # ``rows(run, iteration, n_rows, per_iteration) -> row indices``: how an iteration draws its rows
    # (A-LoL's priority sampling); None: consecutive slices of shuffled epochs (``Run.rows_for``)
    rows: Callable | None = None


def pair_loss(cfg: TrainConfig) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict]]:
    """``(logps (m, 2), ref_logps (m, 2), lengths (m, 2)) -> (loss, metrics)`` for ``dpo.loss``."""
    d = cfg.dpo
    return {
        "sigmoid": lambda logps, ref, lengths: dpo_loss(logps, ref, d.beta),
        "ipo": lambda logps, ref, lengths: ipo_loss(logps, ref, d.beta, lengths),
        "chipo": lambda logps, ref, lengths: chipo_loss(logps, ref, d.beta, d.r_max),
    }[d.loss]


def preference_metrics(logps: torch.Tensor, ref_logps: torch.Tensor, beta: float) -> dict[str, float]:
    """TRL's names for what users read: the implicit rewards beta * log pi/pi_ref of chosen and
    rejected (summed over the reply), their margin, the fraction ranked right, and the log-probs."""
    rewards = beta * (logps.detach() - ref_logps)  # (m, 2)
    return {
        "rewards/chosen": rewards[:, 0].mean().item(),
        "rewards/rejected": rewards[:, 1].mean().item(),
        "rewards/margins": (rewards[:, 0] - rewards[:, 1]).mean().item(),
        "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]).float().mean().item(),
        "logps/chosen": logps[:, 0].detach().mean().item(),
        "logps/rejected": logps[:, 1].detach().mean().item(),
    }


def _lengths(split: Split, rows: torch.Tensor, device) -> torch.Tensor:
    return torch.tensor([[sum(e.targets) for e in split.encoded[i]] for i in rows.tolist()], device=device)  # (m, 2)


def preference_objective(cfg: TrainConfig) -> Objective:
    loss_of = pair_loss(cfg)

    def loss(run: Run, split: Split, rows: torch.Tensor):
        device = run.processes.device
        logps = pair_logps(run.learner, split, rows, run.tokenizer.pad_token_id, device)  # (m, 2)
        ref = split.ref_logps[rows.to(device)]
        value, metrics = loss_of(logps, ref, _lengths(split, rows, device))
        return value, {**metrics, **preference_metrics(logps, ref, cfg.dpo.beta)}

    @torch.no_grad()
    def held_out(run: Run, split: Split):
        device, parts = run.processes.device, []
        for rows in torch.arange(len(split)).split(cfg.update.micro_batch_size):
            logps = pair_logps(run.policy, split, rows, run.tokenizer.pad_token_id, device)
            parts.append((logps, split.ref_logps[rows.to(device)], _lengths(split, rows, device)))
        logps, ref, lengths = (torch.cat(t) for t in zip(*parts))
        value, _ = loss_of(logps, ref, lengths)
        return {"loss": value.item(), **preference_metrics(logps, ref, cfg.dpo.beta), "n_pairs": len(split)}

    def prepare(run: Run, train: Split, held_out: Split) -> None:
        cached_reference_logps(run, {"train": train, "eval": held_out})

    return Objective(loss, held_out, prepare=prepare)


def sft_objective(cfg: TrainConfig) -> Objective:
    checked: set[int] = set()  # runs whose packed log-probs were compared with the unpacked ones

    def forward(run: Run, model, sequences: list[Encoded]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(n, T) log-probs and targets, and the token accuracy, from one forward pass."""
        prompt_ids, prompt_mask, completion_ids, completion_mask, targets = batch_tensors(sequences, run.tokenizer.pad_token_id,
                                                                                            run.processes.device)
        logps, hidden = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, 1.0, return_hidden=True)
        return logps, targets, _token_accuracy(run.policy.get_output_embeddings(), hidden, completion_ids, targets)

    def packed_forward(run: Run, model, split: Split, micro: Packed) -> tuple[torch.Tensor, torch.Tensor, float]:
        ids, positions, targets = packed_tensors(split, micro, run.tokenizer.pad_token_id, run.processes.device)
        logps, hidden = packed_logprobs(model, ids, positions, targets.bool())
        targets = targets[:, 1:]
        return logps, targets, _token_accuracy(run.policy.get_output_embeddings(), hidden, ids[:, 1:], targets)

    def loss(run: Run, split: Split, micro):
        if isinstance(micro, Packed):
            logps, targets, accuracy = packed_forward(run, run.learner, split, micro)
            if id(run) not in checked:
                check_packing(run, split, micro, logps, targets)
                checked.add(id(run))
        else:
            logps, targets, accuracy = forward(run, run.learner, split.sequences(micro))
        value, metrics = sft_loss(logps, targets)
        return value, {**metrics, "mean_token_accuracy": accuracy}

    @torch.no_grad()
    def check_packing(run: Run, split: Split, micro: Packed, packed: torch.Tensor, targets: torch.Tensor) -> None:
        """Packed log-probs must be the unpacked ones: a model whose attention crosses the rows'
        boundaries (one that ignores restarting position ids) would train on the wrong loss."""
        alone, alone_targets, _ = forward(run, run.policy, split.sequences(micro.rows))
        mine, theirs = packed.detach()[targets.bool()], alone[alone_targets.bool()]
        gap = (mine - theirs).abs().max().item() if len(mine) == len(theirs) else math.inf
        tolerance = 1e-3 if run.policy.get_input_embeddings().weight.dtype == torch.float32 else 0.1
        if gap > tolerance:
            raise ConfigError(f"sft.packing: {run.cfg.model.name} does not keep packed rows apart (a packed token's log-prob is "
                              f"{gap:.3g} from the same token's unpacked); its attention ignores restarting position ids: set sft.packing=false")

    @torch.no_grad()
    def held_out(run: Run, split: Split):
        nll, tokens, right = 0.0, 0, 0.0
        for rows in torch.arange(len(split)).split(cfg.update.micro_batch_size):
            logps, targets, accuracy = forward(run, run.policy, split.sequences(rows))
            n = int(targets.sum())
            nll, tokens, right = nll - (logps * targets).sum().item(), tokens + n, right + accuracy * n
        return {"loss": nll / max(tokens, 1), "mean_token_accuracy": right / max(tokens, 1), "num_tokens": tokens}

    def packed_batches(split: Split, rows: torch.Tensor, micro_batch_size: int) -> list[Packed]:
        bins = pack([int(split.lengths[i]) for i in rows.tolist()], cfg.sft.max_length)
        packs = sorted((tuple(int(rows[i]) for i in b) for b in bins), key=lambda p: sum(int(split.lengths[i]) for i in p))
        return [Packed(tuple(packs[i : i + micro_batch_size])) for i in range(0, len(packs), micro_batch_size)]

    return Objective(loss, held_out, per_token=True, batches=packed_batches if cfg.sft.packing else None)


@torch.no_grad()
def _token_accuracy(head: torch.nn.Module, hidden: torch.Tensor, completion_ids: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of target tokens that are the model's most likely next token (TRL's mean_token_accuracy),
    from the final hidden states (n, T, H) of the forward that computed the loss: the output head on the
    target positions only, a chunk of rows at a time, never the (n, T, V) logits."""
    picked = targets.bool()
    if not picked.any():
        return 0.0
    predicted = torch.cat([head(h).argmax(-1) for h in hidden.detach()[picked].split(1024)])
    return (predicted == completion_ids[picked]).float().mean().item()


def reward_model_objective(cfg: TrainConfig) -> Objective:
    scorers: dict[int, RewardModelScorer] = {}

    def scorer(run: Run) -> RewardModelScorer:
        if id(run) not in scorers:
            scorers[id(run)] = RewardModelScorer(run.policy, run.tokenizer, max_length=10**9, device=run.processes.device)
        return scorers[id(run)]

    def scores(run: Run, split: Split, rows: torch.Tensor, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [split.rows[i] for i in rows.tolist()]
        sequences = scorer(run).encode([p.prompt.with_reply(text) for p in pairs for text in (p.chosen, p.rejected)])
        values = scorer(run).scores(sequences, model).view(-1, 2)  # (m, 2)
        margins = torch.tensor([p.margin or 0.0 for p in pairs], device=values.device) if cfg.reward_model.use_margin else None
        return values, margins

    def loss(run: Run, split: Split, rows: torch.Tensor):
        values, margins = scores(run, split, rows, run.learner)
        return bradley_terry_loss(values[:, 0], values[:, 1], margins, cfg.reward_model.center_coef)

    @torch.no_grad()
    def held_out(run: Run, split: Split):
        parts = [scores(run, split, rows) for rows in torch.arange(len(split)).split(cfg.update.micro_batch_size)]
        values = torch.cat([v for v, _ in parts])
        margins = torch.cat([m for _, m in parts]) if cfg.reward_model.use_margin else None
        value, metrics = bradley_terry_loss(values[:, 0], values[:, 1], margins, cfg.reward_model.center_coef)
        return {"loss": value.item(), **metrics, "n_pairs": len(split)}

    return Objective(loss, held_out)


def alol_objective(cfg: TrainConfig) -> Objective:
    """A-LoL: each row's reply is one action with advantage A = R(x, y) - V_ref(x), computed once before
    training (and kept in the checkpoints: a resumed run reads them); rows with A <= 0 are never
    trained on (A+ = 0, and priority sampling never draws them). The reference's token log-probs of
    the rows are computed once too, before the first step."""
    a = cfg.alol

    def prepare(run: Run, train: Split, held_out: Split) -> None:
        for split, name in ((train, "training"), (held_out, "held-out")):
            key = f"alol/advantages/{name}"
            if key in run.computed and len(run.computed[key]) == len(split):
                run.say(f"rebelrl: A-LoL {name} advantages read from the checkpoint")
            else:
                run.computed[key] = alol_advantages(run, split, name)
            split.advantages = run.computed[key]
            split.ref_tokens = reference_token_logps(run, split, cfg.update.micro_batch_size)
        if not (train.advantages > 0).any():
            raise ConfigError("algo=alol: no training row scores above V_ref, the reference's own greedy replies, so every advantage "
                              "is <= 0 and A-LoL has nothing to learn from: check the data and reward.fn")

    def loss_of(model, run: Run, split: Split, rows: torch.Tensor):
        logps, targets = token_logps(model, split.sequences(rows), run.tokenizer.pad_token_id, run.processes.device)
        mine = rows.to(logps.device)
        return alol_loss(logps, split.ref_tokens[mine, : logps.shape[1]], targets, split.advantages[mine], a.variant, a.kl_beta or 0.0,
                         a.weight_min, a.weight_max), logps, targets

    def loss(run: Run, split: Split, rows: torch.Tensor):
        return loss_of(run.learner, run, split, rows)[0]

    @torch.no_grad()
    def held_out(run: Run, split: Split):
        nll, tokens, total = 0.0, 0, 0.0
        for rows in torch.arange(len(split)).split(cfg.update.micro_batch_size):
            (value, _), logps, targets = loss_of(run.policy, run, split, rows)
            nll, tokens, total = nll - (logps * targets).sum().item(), tokens + int(targets.sum()), total + value.item() * len(rows)
        return {"loss": total / max(len(split), 1), "nll_per_token": nll / max(tokens, 1)}

    def rows(run: Run, iteration: int, n_rows: int, per_iteration: int) -> list[int]:
        """``per_iteration`` rows drawn with probability proportional to A+, with replacement, from a
        stream of the run's seed and the iteration alone (a resumed run draws the same rows)."""
        weights = run.computed["alol/advantages/training"].clamp(min=0).double().cpu()
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + iteration)
        return torch.multinomial(weights, per_iteration, replacement=True, generator=generator).tolist()

    return Objective(loss, held_out, prepare=prepare, rows=rows if a.priority else None)


@torch.no_grad()
def reference_token_logps(run: Run, split: Split, batch_size: int) -> torch.Tensor:
    """(N, T) log pi_ref of every reply token of the one-sequence rows of ``split``, right-padded with 0
    (column t is reply token t, as ``token_logps`` lays a micro-batch out), rows of similar length together."""
    device = run.processes.device
    out = torch.zeros(len(split), max(len(e.completion) for enc in split.encoded for e in enc), device=device)
    for rows in split.lengths.argsort(stable=True).split(batch_size):
        logps, _ = token_logps(run.ref, split.sequences(rows), run.tokenizer.pad_token_id, device)
        out[rows.to(device), : logps.shape[1]] = logps
    return out


@torch.no_grad()
def alol_advantages(run: Run, split: Split, name: str) -> torch.Tensor:
    """(N,) A = R(x, y) - V_ref(x) of the split's rows.

    R: the row's ``reward`` column where it has one, else ``reward.fn``. V_ref: a linear head on the
    frozen reference's final hidden state at the prompt's last token, fitted (ridge regression, in
    closed form: the MSE fit's exact minimiser) to the scores of the reference's greedy replies to
    the split's prompts, as the authors fit theirs by MSE."""
    from rebelrl.rollout import HFGenerator, SamplingParams
    from rebelrl.rollout.hf import encode_prompts
    from rebelrl.logprobs import position_ids_from_mask

    t0 = time.perf_counter()
    device = run.processes.device
    rows = split.rows
    if rows and all("reward" in row.meta for row in rows):  # checked before the run began: a finite number on every row
        rewards = torch.tensor([float(row.meta["reward"]) for row in rows], dtype=torch.float32, device=device)
    else:
        rewards = run.score_conversations(list(rows), torch.ones(len(rows), dtype=torch.bool, device=device))
    prompts = [before_last_reply(row) for row in rows]
    by_key: dict[tuple, Conversation] = {}
    for p in prompts:  # each prompt once, in the order of its first row
        by_key.setdefault(prompt_key(p), p)
    keys, unique = list(by_key), list(by_key.values())
    greedy = SamplingParams(temperature=0.0, max_new_tokens=run.cfg.rollout.max_new_tokens)
    replies = HFGenerator(run.ref, run.tokenizer, run.cfg.rollout.batch_size).generate(unique, 1, greedy)
    values = run.score(replies).double()  # (P,) R of the reference's greedy reply to each prompt
    states = []
    for start in range(0, len(unique), run.cfg.rollout.batch_size):
        ids, mask = encode_prompts(run.tokenizer, unique[start : start + run.cfg.rollout.batch_size], device)
        out = run.ref(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), output_hidden_states=True,
                      use_cache=False, logits_to_keep=1)
        states.append(out.hidden_states[-1][:, -1].double())  # left-padded: the last column is the prompt's last token
    X = torch.cat(states).cpu()  # (P, H): a small least-squares problem, solved on the CPU (float64)
    X = torch.cat([X, torch.ones(len(X), 1, dtype=X.dtype)], dim=1)  # with a bias
    H = X.shape[1] - 1
    # Ridge as least squares on rows sqrt(ridge) * I appended (the bias unpenalised); the minimum-norm
    # solution where the prompts are fewer than the hidden units and no ridge is asked for.
    penalty = torch.cat([run.cfg.alol.value_ridge ** 0.5 * torch.eye(H, dtype=X.dtype), torch.zeros(H, 1, dtype=X.dtype)], dim=1)
    target = torch.cat([values.cpu(), torch.zeros(H, dtype=X.dtype)])
    w = torch.linalg.lstsq(torch.cat([X, penalty]), target[:, None], driver="gelsd").solution[:, 0]
    fitted = X @ w  # (P,) V_ref(x)
    values = values.cpu()
    value_of = dict(zip(keys, fitted.tolist()))
    v = torch.tensor([value_of[prompt_key(p)] for p in prompts], dtype=torch.float32, device=device)
    advantages = rewards - v
    explained = 1 - ((fitted - values) ** 2).sum() / ((values - values.mean()) ** 2).sum().clamp(min=1e-12)
    run.say(f"rebelrl: A-LoL {name} rows: V_ref fitted to the reference's greedy replies to {len(unique)} prompts (R^2 {explained.item():.2f}, "
            f"their mean score {values.mean().item():.3f}); rows' mean reward {rewards.mean().item():.3f}; "
            f"{(advantages > 0).float().mean().item():.0%} have A > 0 ({time.perf_counter() - t0:.1f} s)")
    return advantages


OBJECTIVES: dict[str, Callable[[TrainConfig], Objective]] = {
    "dpo": preference_objective,
    "hypo": preference_objective,
    "sft": sft_objective,
    "reward_model": reward_model_objective,
    "alol": alol_objective,
}


# --- HyPO's fresh samples ------------------------------------------------------------------------------


@dataclass
class Samples:
    rollout: object
    old_logps: torch.Tensor  # (B, k) log pi_t(y|x) of each sample
    ref_logps: torch.Tensor  # (B, k) log pi_ref(y|x)
    from_sampler: bool


def sample_replies(run: Run, prompts: list[Conversation]) -> tuple[Samples, dict[str, float]]:
    """k replies of the current policy to each prompt, with log pi_t and log pi_ref of each."""
    k = run.cfg.rollout.samples_per_prompt
    rollout = run.generator.generate(prompts, k, run.sampling)
    mask = rollout.completion_mask
    old_tokens, from_sampler = run.old_token_logps(rollout)
    ref_tokens = rollout_logprobs(run.ref, rollout, run.sampling.logprob_temperature, run.cfg.update.micro_batch_size * 2)
    old, ref = (old_tokens * mask).sum(1).view(-1, k), (ref_tokens * mask).sum(1).view(-1, k)
    metrics = {  # HyPO's samples are not scored: it needs no reward
        "completions": len(rollout), "kl_to_ref": (old - ref).mean().item(),
        "response_length": rollout.completion_lengths.float().mean().item(), "frac_no_eos": (~rollout.finished).float().mean().item(),
    }
    return Samples(rollout, old, ref, from_sampler), metrics


def kl_step(run: Run, samples: Samples, first: bool) -> tuple[float, dict, float | None]:
    """Accumulate the gradient of kl_coef * KL(pi || pi_ref) on the samples, groups of prompts at a
    time, each weighted by its share of the groups; returns the loss, its metrics and, on the ``first``
    pass (theta is still theta_t), the largest gap between pi_theta and pi_t. A gap past
    ``rollout.logprob_tolerance`` on the sampler's record recomputes log pi_t for every sample before
    any of them enters the loss, and from then on, as the online loops do."""
    r, k = samples.rollout, run.cfg.rollout.samples_per_prompt
    groups = torch.arange(samples.old_logps.shape[0])
    per_micro = max(1, run.cfg.update.micro_batch_size // k)
    total, metrics, gap = 0.0, {}, None
    for j, micro in enumerate(groups.split(per_micro)):
        rows = (micro[:, None] * k + torch.arange(k)).reshape(-1).to(r.completion_ids.device)  # (m * k,)
        with run.micro_batch(last=j == math.ceil(len(groups) / per_micro) - 1):
            logps = completion_logprobs(run.learner, r.prompt_ids[rows], r.prompt_mask[rows], r.completion_ids[rows], r.completion_mask[rows],
                                        run.sampling.logprob_temperature).sum(1).view(-1, k)  # (m, k)
            mine = micro.to(logps.device)
            if first:
                here = run.first_step_gap((logps.detach() - samples.old_logps[mine]).abs().max().item())
                if here > run.cfg.rollout.logprob_tolerance and samples.from_sampler:
                    run.stop_trusting_sampler(here)
                    old_tokens, samples.from_sampler = run.old_token_logps(r)
                    samples.old_logps = (old_tokens * r.completion_mask).sum(1).view(-1, k)
                    here = (logps.detach() - samples.old_logps[mine]).abs().max().item()
                gap = max(gap or 0.0, here)
            loss, metrics = hypo_kl_loss(logps, samples.old_logps[mine], samples.ref_logps[mine], run.cfg.hypo.kl_coef)
            run.backward(loss * len(micro) / len(groups))
        total += loss.item() * len(micro) / len(groups)
    return total, metrics, gap


# --- the loop ---------------------------------------------------------------------------------------------


def update(run: Run, objective: Objective, split: Split, rows: torch.Tensor, samples: Samples | None) -> dict:
    """``update.epochs`` optimizer steps on the iteration's rows (and HyPO's samples), each accumulated
    over micro-batches weighted by their share of the rows (or target tokens) of every process."""
    cfg = run.cfg.update
    if objective.batches is not None:
        micros = objective.batches(split, rows, cfg.micro_batch_size)
    else:
        micros = rows[split.lengths[rows].argsort(stable=True)].split(cfg.micro_batch_size)  # rows of similar length together
    if objective.per_token:
        tokens = [sum(sum(e.targets) for e in split.sequences(m.rows if isinstance(m, Packed) else m)) for m in micros]
        total = run.processes.sum(sum(tokens)) / run.processes.count
    else:
        tokens, total = [len(m) for m in micros], len(rows)
    losses, grad_norms, fit, mismatch = [], [], [], None
    for epoch in range(cfg.epochs):
        run.optimizer.zero_grad(set_to_none=True)
        step = 0.0
        for j, micro in enumerate(micros):
            with run.micro_batch(last=samples is None and j == len(micros) - 1):
                loss, metrics = objective.loss(run, split, micro)
                run.backward(loss * tokens[j] / total)
            step += loss.item() * tokens[j] / total
            fit.append(metrics)
        if samples is not None:  # HyPO: the KL to the reference on the policy's own samples
            kl, metrics, gap = kl_step(run, samples, first=epoch == 0)
            step += kl
            fit.append(metrics)
            mismatch = gap if gap is not None else mismatch
        run.stop_if_non_finite("loss", step, "lower optim.lr" + (", or check dpo.beta" if run.cfg.algo in ("dpo", "hypo") else ""))
        grad_norms.append(run.clip_and_step())
        losses.append(step)
    metrics = run.update_summary({}, losses, grad_norms, fit, mismatch, samples.from_sampler if samples is not None else True)
    if samples is None:
        for key in ("logp_mismatch_max", "old_logps_recomputed"):
            metrics.pop(key)
    return metrics


def prepare(run: Run, objective: Objective) -> tuple[Split, Split]:
    """The training and held-out rows, tokenised, with their reference log-probs where a pair method needs them."""
    task = run.task

    def split(rows: list) -> Split:
        if run.cfg.algo == "sft":  # SFT on preference pairs learns their chosen replies
            rows = [row.context.with_reply(row.chosen) if isinstance(row, PreferencePair) else row for row in rows]
        if run.cfg.algo == "alol":  # A-LoL on preference pairs: each reply is a row, scored on its own
            rows = [c for row in rows for c in ((row.context.with_reply(row.chosen), row.context.with_reply(row.rejected))
                                                 if isinstance(row, PreferencePair) else (row,))]
        return Split(rows, [encode_row(run.tokenizer, row) for row in rows])

    train, held_out = split(task.train_data), split(task.eval_data)
    if objective.prepare is not None:
        objective.prepare(run, train, held_out)
    return train, held_out


def train(cfg: TrainConfig) -> dict[str, float]:
    """Run DPO / IPO / chi-PO, HyPO, SFT or a reward model on the configured data; returns the summary."""
    objective = OBJECTIVES[cfg.algo](cfg)
    run = Run.start(cfg, steps_per_iteration=cfg.update.epochs, load_models=_loader(cfg))
    train_rows, held_out_rows = prepare(run, objective)
    run.held_out = lambda r: objective.held_out(r, held_out_rows)
    draw = objective.rows or (lambda r, *args: r.rows_for(*args))
    for iteration in run.progress():
        t0 = time.perf_counter()
        rows = torch.tensor(draw(run, iteration, len(train_rows), cfg.update.minibatch_size))
        samples, metrics = None, {}
        if cfg.algo == "hypo":
            samples, metrics = sample_replies(run, [train_rows.rows[i].prompt for i in rows.tolist()])
        t1 = time.perf_counter()
        trained = update(run, objective, train_rows, rows, samples)
        metrics.update(trained)
        metrics.update({"rows": len(rows), "tokens": sum(len(e.completion) for e in train_rows.sequences(rows)),
                        "time/rollout": t1 - t0, "time/train": time.perf_counter() - t1, "time/total": time.perf_counter() - t0})
        run.end_iteration(iteration, metrics, samples.rollout if samples is not None else None)
    if cfg.algo == "reward_model" and run.processes.is_main:
        _save_reward_model(run)
    return run.finish()


def _save_reward_model(run: Run) -> None:
    """The trained reward model as a folder ``reward.kwargs.name_or_path`` can name (``RewardModelScorer``):
    written beside the checkpoints, which a comparison deletes once its runs are done."""
    final = run.run_dir / "reward_model"
    tmp = run.run_dir / f".reward_model{TEMP_SUFFIX}"
    shutil.rmtree(tmp, ignore_errors=True)
    run.policy.save_pretrained(tmp, safe_serialization=True)
    run.tokenizer.save_pretrained(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.replace(final)
    run.say(f"rebelrl: reward model saved in {final} (reward.fn=rebelrl.rewards.reward_model:RewardModelScorer.from_pretrained "
            f"reward.kwargs.name_or_path={final})")


def _loader(cfg: TrainConfig) -> Callable | None:
    """How the run loads its models: a reward model alone; SFT without a reward names no reference (it
    never compares with one, so no second copy of the network is held); the others, Run's own."""
    if cfg.algo == "reward_model":
        return _reward_model
    if cfg.algo == "sft" and cfg.reward.fn is None:
        return partial(_load_models, with_ref=False)
    return None


def _reward_model(cfg: TrainConfig, checkpoint: Path | None):
    from rebelrl.models import load_reward_model

    model = load_reward_model(str(checkpoint / "model") if checkpoint else cfg.model.name, cfg.model.dtype, cfg.seed)
    return model, None


__all__ = ["train", "OBJECTIVES", "Split", "cached_reference_logps", "reference_logps", "update"]
