"""What every online training loop shares: the run directory, models, data order, evaluation,
checkpoints and resume. An algorithm's loop owns only collect -> loss -> step; it calls into ``Run``
for the rest, so the loop itself stays readable top to bottom.

With several processes (``rebelrl.train.distributed``) the loop is the same in each: ``prompts_for``
hands a process its share of the iteration's prompts, ``learner`` is the policy whose backward
averages gradients, ``end_iteration`` combines the processes' metrics, evaluation shares the held-out
prompts and gathers the samples, and the main process alone writes the run directory.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from rebelrl.config import ConfigError, to_dict, to_yaml
from rebelrl.data import PromptDataError, check_demonstration_lengths, check_pair_lengths
from rebelrl.envs import Task, build_task, task_reward
from rebelrl.errors import NonFiniteError
from rebelrl.eval import evaluate, load_sample_scores, read_jsonl, save_samples, score_conversations, score_rollout, write_report
from rebelrl.eval.dialogue import (
    dialogue_metrics,
    evaluate_dialogue_rows,
    evaluate_dialogues,
    load_turn_scores,
    per_turn_table,
    plot_per_turn,
    save_dialogue_rows,
    save_dialogues,
)
from rebelrl.eval.evaluate import eval_metrics, eval_rows, save_sample_rows
from rebelrl.fused import fuse_layers
from rebelrl.logprobs import rollout_logprobs
from rebelrl.models import (
    AdapterDisabled,
    Critic,
    apply_lora,
    context_length,
    load_causal_lm,
    load_tokenizer,
    model_context,
    peft_quietly,
    resolve_model_path,
)
from rebelrl.rewards import RewardFn, checked_reward
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.rollout.chat import ChatTemplateError, encode_prompt, stop_token_ids
from rebelrl.rollout.guide import Guide, guided_rollout
from rebelrl.rollout.reset import ResetStates
from rebelrl.rollout.vllm_engine import VLLMGenerator, VLLMServer, find_vllm_python
from rebelrl.rollout.dialogue import encode_demonstration, encode_reply
from rebelrl.seeding import rng_state, seed_everything, set_rng_state
from rebelrl.train import run_dir as run_dirs
from rebelrl.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint, write_atomic
from rebelrl.train.config import OptimConfig, TrainConfig
from rebelrl.train.distributed import ONE_PROCESS, GatheringGenerator, Processes, check_shares
from rebelrl.train.metrics import JsonlLogger
from rebelrl.train.optim import make_optimizer, make_schedule
from rebelrl.train.run_dir import RunDirError  # noqa: F401  (raised through here since the first version)
from rebelrl.train.memory import free_at_once, release_free_memory
from rebelrl.train.threads import pin_threads
from rebelrl.train.trackers import SAMPLES_DIR, Trackers, sample_table, write_sample_table
from rebelrl.types import Conversation, PreferencePair, Rollout

INITIAL_SAMPLES = "eval_initial.jsonl"


@dataclass
class Run:
    cfg: TrainConfig
    run_dir: Path
    task: Task
    reward_fn: RewardFn
    reward_name: str
    tokenizer: object
    policy: torch.nn.Module
    ref: torch.nn.Module
    generator: HFGenerator  # or VLLMGenerator (rollout.backend=vllm)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    sampling: SamplingParams
    eval_sampling: SamplingParams
    eval_reward_fn: RewardFn = None  # reward_fn, its errors naming the held-out prompt
    start_iteration: int = 0
    recompute_old: bool = False  # log pi_t from a forward pass after sampling, not the sampler's record
    critic: Critic | None = None  # PPO's value function
    processes: Processes = ONE_PROCESS  # this process among the run's (one, unless launched with several)
    wrapped_policy: torch.nn.Module | None = None  # accelerate's wrapper of the policy (DDP, FSDP, DeepSpeed); None: not wrapped
    wrapped_critic: torch.nn.Module | None = None
    astar_values: dict[str, float] = field(default_factory=dict)  # A*-PO: V*(x) by prompt, estimated once
    # What a method computes once before its first step (A-LoL's advantages), kept in checkpoints so that
    # a resumed run reads it rather than computing it again.
    computed: dict[str, torch.Tensor] = field(default_factory=dict)
    iteration: int = 0  # the iteration being trained (0 before the first)
    metrics_log: JsonlLogger = None
    eval_log: JsonlLogger = None
    baseline_scores: torch.Tensor | None = None
    evals: list[dict] = field(default_factory=list)
    # Held-out metrics the loop measures itself (offline methods: pair accuracy, held-out loss), merged
    # into every evaluation record: ``held_out(run) -> metrics``.
    held_out: Callable[[Run], dict] | None = None
    gold_reward_fn: RewardFn | None = None  # eval.gold_fn: a second judge of the held-out samples
    reset: ResetStates | None = None  # reset.data: the replies rollouts are reset to (dataset reset)
    guide: Guide | None = None  # guide.mode: the model that writes part of each training reply
    trackers: Trackers | None = None  # log.report_to, on the main process
    # rollout.backend=vllm: how far the engine's log-probs of the last rollout were from the trainer's
    engine_gap: dict[str, float] = field(default_factory=dict)
    _bar: object = None

    # --- set-up --------------------------------------------------------------------------------

    @classmethod
    def start(cls, cfg: TrainConfig, steps_per_iteration: int, load_models: Callable | None = None) -> Run:
        """Validate everything cheap first (process shares, run dir, prompts, reward), then load models and resume.

        ``load_models(cfg, checkpoint) -> (policy, ref)`` replaces the causal-LM policy and reference
        (a reward model is a policy with no reference: the run then samples nothing). The initial
        evaluation waits for ``progress()``, so that a loop can set ``held_out`` first."""
        processes = Processes.start()
        check_shares(cfg, processes.count, processes.steps_in_backward)
        if cfg.rollout.backend == "vllm" and not processes.on_one_machine:
            raise ConfigError("rollout.backend=vllm: the engine serves the processes of one machine (it listens on loopback and "
                              "takes its weights through a file); launch on one machine, or keep rollout.backend=hf")
        if cfg.rollout.backend == "vllm" and processes.shards_weights and cfg.model.lora_r > 0:
            raise ConfigError("rollout.backend=vllm with model.lora_r > 0 and sharded weights (FSDP, ZeRO-3): the adapter cannot yet be "
                              "gathered for the engine; train the LoRA with DDP (--num_processes N) or with rollout.backend=hf")
        threads = pin_threads(cfg.threads)
        if cfg.free_memory == "at_once" and not free_at_once():
            print("rebelrl: free_memory=at_once needs glibc's malloc; freed memory is returned between phases only", flush=True)
        run_dir = Path(cfg.run_dir)
        checkpoint = processes.on_main(lambda: run_dirs.prepare(cfg))
        task = build_task(cfg.task)
        # A task that carries data (pairs, demonstrations) trains without a reward; one, if named, judges generations.
        needs_reward = task.train_data is None or cfg.reward.fn is not None
        reward_name, reward_fn = task_reward(task, cfg.reward) if needs_reward else (None, None)
        # Every process samples its own completions: its random streams start from seed + rank.
        seed_everything(cfg.seed + processes.rank)
        # The data's rows, the reset states and the guide are checked before the run directory is claimed,
        # so a corrected command runs where the failed one would have.
        tokenizer = load_tokenizer(cfg.model.name, cfg.task.prompt_format)
        reset = ResetStates.load(cfg, tokenizer, stop_token_ids(tokenizer), task.train) if cfg.reset.data is not None else None
        _check_guide(cfg, tokenizer)
        vllm_python = find_vllm_python(cfg.rollout.vllm_python) if cfg.rollout.backend == "vllm" else None
        if task.train_data is not None:  # every row fits the model's context, checked before any model loads
            check_data_lengths(task, tokenizer, model_context(cfg.model.name), cfg.sft.max_length if cfg.sft.packing else None)
            if cfg.algo == "alol":
                check_row_rewards(task)

        if processes.is_main:
            run_dirs.mark(run_dir)
            if checkpoint is None:  # a resumed run keeps the config it started with; changes are in config_changes.jsonl
                write_atomic(run_dir / run_dirs.CONFIG, to_yaml(cfg))
            print(f"rebelrl: resolved config ({run_dir / run_dirs.CONFIG})\n{to_yaml(cfg)}", file=sys.stderr)
            print(f"rebelrl: {threads} CPU threads, pinned for the whole run", file=sys.stderr)
            if processes.count > 1:
                print(f"rebelrl: {processes.count} processes ({processes.accelerator.distributed_type}), each sampling "
                      f"{cfg.rollout.prompts_per_iter // processes.count} prompts an iteration with seed {cfg.seed} + its rank", file=sys.stderr)

        r = cfg.rollout
        # The engine starts (about 100 s on a CPU) while the models load; it serves the policy's own weights from the first sample on.
        # Several processes share the main process's engine.
        engine = VLLMServer.start(vllm_python, resolve_model_path(cfg.model.name), cfg.model.dtype if r.vllm_dtype == "auto" else r.vllm_dtype,
                                  cfg.seed, run_dir / "vllm.log", r.vllm_start_timeout, memory=r.vllm_memory,
                                  max_lora_rank=cfg.model.lora_r if r.vllm_lora == "adapter" else 0,
                                  eager=r.vllm_eager) if vllm_python is not None and processes.is_main else None
        if vllm_python is not None and processes.count > 1:
            port = processes.on_main(lambda: engine.port)
            engine = engine or VLLMServer.attach(port, run_dir / "vllm.log", r.vllm_start_timeout)
        policy, ref = (load_models or _load_models)(cfg, checkpoint)
        eval_budget = cfg.eval.max_new_tokens or r.max_new_tokens
        budget_key = "eval.max_new_tokens" if eval_budget > r.max_new_tokens else "rollout.max_new_tokens"
        if ref is not None:
            check_prompt_lengths(task, tokenizer, context_length(policy.config), max(r.max_new_tokens, eval_budget), budget_key)
            ref.to(processes.device)
        policy.to(processes.device)
        guide = _load_guide(cfg, tokenizer, ref, processes.device)
        critic = _load_critic(cfg, policy, checkpoint)
        trainable = list(policy.parameters()) + (list(critic.parameters()) if critic is not None else [])
        optimizer = make_optimizer(trainable, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.betas)
        wrapped, optimizer = processes.prepare(policy, optimizer)
        # The schedule steps the optimizer itself, once per step (accelerate's scheduler wrapper would step it once per process).
        scheduler = make_schedule(getattr(optimizer, "optimizer", optimizer), cfg.optim.schedule, cfg.iterations * steps_per_iteration,
                                  cfg.optim.warmup_steps)
        sampling = SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens, r.repetition_penalty, r.min_new_tokens)
        # Evaluation samples as training does, at its own temperature and budget if set.
        eval_temperature = cfg.eval.temperature if cfg.eval.temperature is not None else r.temperature
        eval_sampling = SamplingParams(eval_temperature, r.top_p, r.top_k, eval_budget, r.repetition_penalty, min(r.min_new_tokens, eval_budget))
        generator = HFGenerator(policy, tokenizer, r.batch_size) if ref is not None else None
        if engine is not None:
            generator = VLLMGenerator(engine, policy, tokenizer, r.batch_size, lora=r.vllm_lora if cfg.model.lora_r > 0 else "merged",
                                      loads=processes.is_main)
        # An engine samples without the local weights and, under FSDP2, is loaded from what full_state gathers:
        # gathering them around its generate too would all-gather every weight twice. ZeRO-3 and FSDP1 still need it.
        if processes.shards_weights and generator is not None and not (engine is not None and processes.accelerator.is_fsdp2):
            generator = GatheringGenerator(generator, lambda: processes.full_weights(wrapped))
        run = cls(
            cfg=cfg, run_dir=run_dir, task=task, reward_fn=reward_fn, reward_name=reward_name, tokenizer=tokenizer,
            policy=policy, ref=ref, generator=generator, optimizer=optimizer,
            scheduler=scheduler, sampling=sampling, eval_sampling=eval_sampling,
            eval_reward_fn=checked_reward(reward_fn, reward_name, lambda i: task.where("eval", i)) if reward_fn is not None else None,
            gold_reward_fn=_gold_reward(cfg, task),
            metrics_log=JsonlLogger(run_dir / "metrics.jsonl"), eval_log=JsonlLogger(run_dir / "eval.jsonl"),
            recompute_old=_recompute_old(cfg, policy), critic=critic, processes=processes, reset=reset, guide=guide,
            wrapped_policy=wrapped if wrapped is not policy else None,
            wrapped_critic=processes.prepare_module(critic) if critic is not None and processes.distributed else None,
        )
        if generator is not None:
            stops = ", ".join(f"{i} {tokenizer.convert_ids_to_tokens(i)!r}" for i in run.generator.stop_ids)
            source = "a forward pass after sampling" if run.recompute_old else "the sampler's record (checked every iteration)"
            run.say(f"rebelrl: replies end at token {stops}; log pi_t from {source}")
            if engine is not None:
                info = engine.wait()
                mode = "eager" if info["eager"] else "compiled"
                run.say(f"rebelrl: sampling with vLLM ({info['dtype']}, {mode}, log: {engine.log}); "
                        "the policy's weights are loaded into it after every update")
            if not sampling.exact:
                run.say("rebelrl: top-p, top-k, repetition penalty or min_new_tokens make the sampler differ from pi_t, "
                        "the softmax the log-probs describe (sampler_dropped_mass in metrics.jsonl)")
        if reset is not None:
            run.say(f"rebelrl: dataset reset: {reset.coverage(task.train, cfg.rollout.max_new_tokens)} of {len(task.train)} training prompts "
                    f"have a reply of 2 tokens or more in {cfg.reset.data} ({cfg.reset.field}); each is reset with probability {cfg.reset.prob:g}")
        if checkpoint is not None:
            run._restore(checkpoint)
        if cfg.log.report_to and processes.is_main:
            run.trackers = Trackers(cfg.log.report_to, run_dir, cfg.log.project, cfg.log.name or run_dir.resolve().name, cfg.log.group, to_dict(cfg))
        return run

    def _restore(self, checkpoint: Path) -> None:
        state = load_trainer_state(checkpoint)
        self.processes.load_optimizer_state(self.learner, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optim_config(self.optimizer, self.scheduler, self.cfg.optim)
        rng = _process_rng(state, self.processes.rank)
        if rng is not None:
            set_rng_state(rng)
        self.start_iteration = state["iteration"]
        # Once the sampler's record was found off, it stays distrusted; what the config rules out stays ruled out.
        self.recompute_old = self.recompute_old or state.get("recompute_old", False)
        self.astar_values = dict(state.get("astar_values", {}))
        self.computed = {k: v.to(self.processes.device) for k, v in state.get("computed", {}).items()}
        if self.processes.is_main:
            self.metrics_log.rewind(self.start_iteration)
            self.eval_log.rewind(self.start_iteration)
        self.processes.wait()  # the logs are rewound before any process reads them
        initial = self.run_dir / INITIAL_SAMPLES
        if initial.exists():  # a run that generates: later evaluations are compared with these samples
            self.baseline_scores = load_turn_scores(initial) if self.task.env is not None else load_sample_scores(initial)
        self.evals = read_jsonl(self.eval_log.path)
        self.say(f"rebelrl: resumed from {checkpoint} (iteration {self.start_iteration})")

    def sample(self, prompts: list, n: int) -> tuple[Rollout, dict[str, float]]:
        """``n`` replies of the current policy to each prompt, a training rollout: dataset reset
        (``reset.data``) may start them from a prefix of the data's reply, a guide (``guide.mode``) may
        write part of them; evaluation never calls this. Returns the rollout and what the guide did
        (``guide/completions``: the replies the guide wrote, which count against a budget)."""
        if self.guide is not None:
            return guided_rollout(self.guide, self.generator, prompts, n, self.sampling, self.iteration, self.policy_logps)
        if self.reset is None:
            return self.generator.generate(prompts, n, self.sampling), {}
        return self.generator.generate(prompts, n, self.sampling, prefixes=self.reset.prefixes(prompts, self.sampling.max_new_tokens)), {}

    def policy_logps(self, rollout: Rollout) -> torch.Tensor:
        """(N, T) log pi_t of every completion token of ``rollout`` by a forward pass of the current policy."""
        with self.processes.full_weights(self.learner):
            return rollout_logprobs(self.policy, rollout, self.sampling.logprob_temperature, self.cfg.update.micro_batch_size * 2)

    @property
    def learner(self) -> torch.nn.Module:
        """The policy as it is trained: with several processes, the wrapper whose backward averages gradients."""
        return self.wrapped_policy if self.wrapped_policy is not None else self.policy

    @property
    def critic_learner(self) -> Critic | None:
        return self.wrapped_critic if self.wrapped_critic is not None else self.critic

    def say(self, message: str) -> None:
        """A line on stderr from the main process (the others would repeat it)."""
        if self.processes.is_main:
            print(message, file=sys.stderr)

    def note(self, message: str) -> None:
        """A line beside the progress bar, from the main process."""
        if self.processes.is_main:
            (self._bar.write if self._bar is not None else print)(message)

    # --- per iteration -------------------------------------------------------------------------

    def progress(self):
        """Iterations still to run, with a progress bar (iterations, ETA, last reward and KL); a run
        that starts from scratch first evaluates the initial policy."""
        if self.start_iteration == 0:
            self.initial_eval()
        self._bar = tqdm(
            range(self.start_iteration + 1, self.cfg.iterations + 1),
            initial=self.start_iteration, total=self.cfg.iterations, desc="rebelrl", unit="it", dynamic_ncols=True,
            disable=not self.processes.is_main,
        )
        for iteration in self._bar:
            self.iteration = iteration
            release_free_memory()  # what the last evaluation and checkpoint left
            yield iteration

    def prompts_for(self, iteration: int):
        """This process's share of the prompts of ``iteration`` (1-based; one process: all of them).

        An iteration's prompts are consecutive slices of an endless stream of epochs, each epoch a
        permutation seeded by (seed, epoch), and process r of N takes the r-th of N equal, contiguous
        parts. A function of the iteration and the process alone, so a resumed run reads exactly the
        prompts the uninterrupted one would have, whatever the number of processes."""
        train = self.task.train
        return [train[i] for i in self.rows_for(iteration, len(train), self.cfg.rollout.prompts_per_iter)]

    def rows_for(self, iteration: int, rows: int, per_iteration: int) -> list[int]:
        """This process's share of the indices, among ``rows``, of iteration ``iteration``'s
        ``per_iteration`` rows, cut from the same endless stream of seeded epochs as ``prompts_for``."""
        out = []
        for pos in range((iteration - 1) * per_iteration, iteration * per_iteration):
            epoch, i = divmod(pos, rows)
            out.append(_epoch_order(rows, self.cfg.seed, epoch)[i])
        return self.processes.share(out)

    def old_token_logps(self, rollout) -> tuple[torch.Tensor, bool]:
        """(N, T) log pi_t of every completion token, and whether it is the sampler's record.

        The sampler's values are reused only where they are this training forward's (float32, checked
        on the first minibatch of every iteration); otherwise a no-grad forward of the policy that
        sampled, in the layout training uses, gives them exactly.
        """
        if self.recompute_old:
            with self.processes.full_weights(self.learner):
                logps = rollout_logprobs(self.policy, rollout, self.sampling.logprob_temperature, self.cfg.update.micro_batch_size * 2)
            if self.cfg.rollout.backend == "vllm":  # how off-policy the engine's samples are, a reply at a time
                gap = ((rollout.sample_logps - logps) * rollout.policy_mask).sum(dim=1).abs()  # (N,)
                self.engine_gap = {"vllm/logp_gap_mean": gap.mean().item(), "vllm/logp_gap_max": gap.max().item()}
            return logps, False
        return rollout.sample_logps, True

    def stop_trusting_sampler(self, gap: float) -> None:
        self.recompute_old = True
        self.note(f"rebelrl: the sampler's log-probs differ from the training forward by {gap:.2g} nats a reply "
                  f"(> rollout.logprob_tolerance={self.cfg.rollout.logprob_tolerance:g}): log pi_t is recomputed from now on")

    def first_step_gap(self, gap: float) -> float:
        """The largest gap between log pi_t and the training forward over all processes, so that all of
        them decide alike whether to stop trusting the sampler."""
        return self.processes.max(gap)

    def micro_batch(self, last: bool):
        """Context of one micro-batch's forward and backward; gradients are averaged across processes
        on the ``last`` one of a minibatch only."""
        models = [self.learner] + ([self.wrapped_critic] if self.wrapped_critic is not None else [])
        return self.processes.micro_batch(models, last)

    def backward(self, loss: torch.Tensor) -> None:
        self.processes.backward(loss)

    def score(self, rollout) -> torch.Tensor:
        return score_rollout(self.reward_fn, rollout, self.cfg.reward.no_eos_penalty, self.reward_name)

    def score_conversations(self, conversations, finished: torch.Tensor) -> torch.Tensor:
        """(N,) scores of whole conversations; ``finished`` (N,) flags the reply the penalty looks at."""
        return score_conversations(self.reward_fn, conversations, finished, self.cfg.reward.no_eos_penalty, self.reward_name)

    def clip_and_step(self) -> float:
        """Clip, step the optimizer and the schedule; returns the pre-clip gradient norm.

        A non-finite norm stops the run before the step, so no weights it would have made are saved."""
        params = [p for p in self.learner.parameters() if p.requires_grad]
        params += list(self.critic.parameters()) if self.critic is not None else []
        max_norm = self.cfg.optim.max_grad_norm or float("inf")
        norm = self.processes.clip_grad_norm(params, max_norm)
        self.stop_if_non_finite("gradient norm", norm, "lower optim.lr, or check the reward's scale")
        self.optimizer.step()
        self.scheduler.step()
        if self.generator is not None:
            self.generator.mark_stale()  # an engine serving the policy loads the new weights before it samples again
        return norm

    def stop_if_non_finite(self, what: str, value: float, advice: str, before: str = "the optimizer step") -> None:
        """Raise ``NonFiniteError`` naming the iteration, ``what`` and the last checkpoint if ``value`` is
        NaN or inf in any process (every process checks at the same point, and all of them stop)."""
        value = self.processes.worst(value)
        if not math.isfinite(value):
            self._stop(f"the {what} is {value}", advice, before)

    def _stop(self, problem: str, advice: str, before: str) -> None:
        checkpoint = latest_checkpoint(self.run_dir)
        saved = f"iteration {run_dirs.checkpoint_iteration(checkpoint)}" if checkpoint else "none yet"
        raise NonFiniteError(
            f"iteration {self.iteration}: {problem}; stopped before {before}, so no checkpoint "
            f"holds these weights (last complete checkpoint: {saved}); {advice}"
        )

    def update_summary(self, batch_metrics: dict, losses: list[float], grad_norms: list[float], fit: list[dict],
                       mismatch: float | None, old_from_sampler: bool) -> dict[str, float]:
        """An iteration's metrics: its samples', the mean loss, gradient norm and loss metrics over its
        optimizer steps, the learning rate, and how exact log pi_t was."""
        return {
            **batch_metrics,
            "loss": sum(losses) / len(losses),
            "grad_norm": sum(grad_norms) / len(grad_norms),
            **{key: sum(m[key] for m in fit if key in m) / sum(key in m for m in fit) for key in {k for m in fit for k in m}},
            "lr": self.scheduler.get_last_lr()[0],
            "logp_mismatch_max": mismatch,
            "old_logps_recomputed": float(not old_from_sampler),
            **self.engine_gap,
            **({"time/vllm_sync": self.generator.take_sync_seconds()} if self.cfg.rollout.backend == "vllm" else {}),
        }

    def end_iteration(self, iteration: int, metrics: dict, rollout=None) -> None:
        """Check, log, evaluate and save; ``metrics`` are this process's, of its share ``rollout``,
        and are first combined with the other processes' into the whole batch's."""
        if rollout is not None:
            metrics = self.processes.combine(metrics, len(rollout), int(rollout.completion_mask.sum()))
        # Whatever a loop checked on the way, nothing non-finite is logged, evaluated or saved.
        before = "logging, evaluating or saving this iteration"
        first = ("loss", "grad_norm", "reward_mean", "score_mean")  # the likeliest causes are named first
        for key in [*first, *(k for k in metrics if k not in first)]:
            if isinstance(metrics.get(key), (int, float)):  # every quantity, e.g. grpo/kl, which a NaN would log as null
                self.stop_if_non_finite(key, metrics[key], "lower optim.lr, or check the reward's scale", before)
        if not all(torch.isfinite(p).all() for p in self.policy.parameters() if p.requires_grad):
            self._stop("some weights are NaN or infinite", "lower optim.lr", before)
        record = {"iteration": iteration, **metrics}
        if self.processes.is_main:
            self.metrics_log.log(record)
            if self.trackers is not None:
                self.trackers.log("train", record)
        if self._bar is not None:
            shown = {name: metrics[key] for name, key in _PROGRESS_KEYS if key in metrics}
            self._bar.set_postfix({name: f"{value:.3f}" for name, value in shown.items()}, refresh=False)
        last = iteration == self.cfg.iterations
        if last or (self.cfg.eval.every and iteration % self.cfg.eval.every == 0):
            self.run_eval(iteration)
        if last or (self.cfg.checkpoint.every and iteration % self.cfg.checkpoint.every == 0):
            self.save(iteration)

    def initial_eval(self) -> None:
        """Evaluate the initial policy, or reuse the evaluation of a run that measured the same thing
        (``eval.initial_from``: same model, task, reward and sampling, so the same samples)."""
        source = self.cfg.eval.initial_from
        if source is None:
            self.run_eval(0)
            return
        source = Path(source)
        record = next((r for r in read_jsonl(source / "eval.jsonl") if r["iteration"] == 0), None) if (source / "eval.jsonl").exists() else None
        if record is None or not (source / INITIAL_SAMPLES).exists():
            raise RunDirError(f"eval.initial_from={source}: no iteration-0 evaluation there")
        theirs = _with_defaults(yaml.safe_load((source / run_dirs.CONFIG).read_text()), to_dict(TrainConfig()))
        mismatch = _measurement_diff(theirs, to_dict(self.cfg))
        if mismatch:
            raise RunDirError(f"eval.initial_from={source} measured something else: {'; '.join(mismatch)}")
        if self.processes.is_main:
            for name in (INITIAL_SAMPLES, "eval_samples_latest.jsonl"):
                shutil.copyfile(source / name, self.run_dir / name)
        initial = source / INITIAL_SAMPLES
        self.baseline_scores = load_turn_scores(initial) if self.task.env is not None else load_sample_scores(initial)
        record = {**record, **(self.held_out(self) if self.held_out is not None else {}), "reused_from": str(source)}
        if self.processes.is_main:
            self.eval_log.log(record)
            self._publish_eval(record)
        self.evals.append(record)

    def run_eval(self, iteration: int) -> dict:
        t0 = time.perf_counter()
        metrics = {}
        with self.processes.full_weights(self.learner):
            if self.generator is not None and self.reward_fn is not None:  # sample the held-out prompts and judge them
                metrics = self._eval_dialogues() if self.task.env is not None else self._eval_single_turn()
            if self.held_out is not None:
                metrics.update(self.held_out(self))
        record = {"iteration": iteration, **metrics, "time/eval": self.processes.max(time.perf_counter() - t0)}
        if self.processes.is_main:
            self.eval_log.log(record)
            self._publish_eval(record)
        self.evals.append(record)
        shown = [f"{name} {metrics[key]:.3f}" for name, key in _EVAL_KEYS if key in metrics]
        self.note(f"eval @ {iteration}: {'  '.join(shown)}")
        return record

    def _shared_eval(self, evaluate_part) -> list[dict]:
        """Held-out records of every prompt, in order, with the prompts shared among processes.

        The prompts are cut into consecutive parts of at most ``rollout.batch_size`` (one generate call
        each; as many parts as processes where the prompts allow), part c is sampled under the seed
        ``eval.seed + c`` by process c mod N, and every process gets every record. The samples depend
        on the parts alone, not on which process drew them: one process evaluating the same parts
        gives the same numbers. ``evaluate_part(prompts, seed) -> records``."""
        prompts, n = self.task.eval, self.processes.count
        size = min(self.cfg.rollout.batch_size, math.ceil(len(prompts) / n))
        parts = range(math.ceil(len(prompts) / size))
        mine = [(c, i, row) for c in parts if c % n == self.processes.rank
                for i, row in enumerate(evaluate_part(prompts[c * size : (c + 1) * size], self.cfg.eval.seed + c))]
        return [row for _, _, row in sorted(self.processes.gather(mine), key=lambda x: x[:2])]

    def _eval_dialogues(self) -> dict:
        args = (self.generator, self.policy, self.ref, self.tokenizer, self.task.env)
        tail = (self.eval_reward_fn, self.eval_sampling)
        H, penalty = self.cfg.task.horizon, self.cfg.reward.no_eos_penalty
        if self.processes.distributed:
            rows = self._shared_eval(lambda starts, seed: evaluate_dialogue_rows(*args, starts, *tail, seed, H, penalty))
            metrics = dialogue_metrics(rows, self.eval_sampling, H, self.baseline_scores)
            scores = torch.tensor([r["turn_scores"] for r in rows], dtype=torch.float32)  # (N, H)
            save = partial(save_dialogue_rows, rows=rows)
        else:
            metrics, dialogues, scores = evaluate_dialogues(*args, self.task.eval, *tail, self.cfg.eval.seed, H, self.baseline_scores, penalty)
            save = partial(save_dialogues, dialogues=dialogues, scores=scores)
        if self.baseline_scores is None:
            self.baseline_scores = scores
            metrics.update({f"win_rate_turn_{h}": 0.5 for h in range(1, H + 1)}, win_rate_vs_initial=0.5)
            self._save_samples(save, INITIAL_SAMPLES)
        self._save_samples(save, "eval_samples_latest.jsonl")
        return metrics

    def _eval_single_turn(self) -> dict:
        args = (self.generator, self.ref)
        tail = (self.eval_reward_fn, self.eval_sampling)
        options = dict(batch_size=self.cfg.update.micro_batch_size * 2, recompute_policy_logps=self.recompute_old)
        penalty = self.cfg.reward.no_eos_penalty
        if self.processes.distributed:
            rows = self._shared_eval(lambda prompts, seed: eval_rows(*args, prompts, *tail, seed, penalty, **options))
            metrics = eval_metrics(rows, self.eval_sampling, self.baseline_scores)
            scores = torch.tensor([r["score"] for r in rows], dtype=torch.float32)  # (N,)
            save = partial(save_sample_rows, rows=rows)
        else:
            metrics, rollout, scores = evaluate(*args, self.task.eval, *tail, self.cfg.eval.seed, penalty, self.baseline_scores, **options)
            save = partial(save_samples, rollout=rollout, scores=scores)
            if self.gold_reward_fn is not None:  # the same samples, judged by the reward training never sees
                gold = score_conversations(self.gold_reward_fn, rollout.conversations, rollout.finished, penalty, self.cfg.eval.gold_fn)
                metrics["gold_reward_mean"] = gold.mean().item()
        if self.baseline_scores is None:  # the initial policy: every later evaluation is compared with it
            self.baseline_scores = scores
            metrics["win_rate_vs_initial"] = 0.5
            self._save_samples(save, INITIAL_SAMPLES)
        self._save_samples(save, "eval_samples_latest.jsonl")
        return metrics

    def _publish_eval(self, record: dict) -> None:
        """After an evaluation (main process): its sample table, initial and current reply side by side, as
        Parquet in samples/ (where the run samples held-out replies), and the record and table to the trackers."""
        iteration = record["iteration"]
        latest = self.run_dir / "eval_samples_latest.jsonl"
        table = None
        if latest.exists() and (self.run_dir / INITIAL_SAMPLES).exists():
            table = sample_table(read_jsonl(self.run_dir / INITIAL_SAMPLES), read_jsonl(latest))
            write_sample_table(self.run_dir / SAMPLES_DIR / f"iter-{iteration:06d}.parquet", *table[:2], iteration)
        if self.trackers is not None:
            self.trackers.log("eval", record)
            if table is not None and self.cfg.log.sample_rows:
                columns, rows, histograms = table
                self.trackers.samples(iteration, columns, rows[: self.cfg.log.sample_rows], histograms)

    def _save_samples(self, save, name: str) -> None:
        if self.processes.is_main:
            save(self.run_dir / name)

    def save(self, iteration: int) -> None:
        """The main process writes the checkpoint (atomically) while the others wait for it to be whole."""
        state = {"optimizer": self.processes.optimizer_state(self.learner, self.optimizer), "scheduler": self.scheduler.state_dict(), "recompute_old": self.recompute_old,
                 "astar_values": self.astar_values, "computed": {k: v.cpu() for k, v in self.computed.items()}}
        if self.processes.distributed:  # each process's random streams, so that each resumes its own
            state["rng_by_process"] = self.processes.gather([rng_state()])
            state["astar_values"] = {k: v for values in self.processes.gather([self.astar_values]) for k, v in values.items()}
        weights = self.processes.state_dict(self.learner)
        extra = {CRITIC_FILE: self.critic} if self.critic is not None else {}
        if self.processes.is_main:
            save_checkpoint(self.run_dir, iteration, self.policy, self.tokenizer, state, self.cfg.checkpoint.keep_last, extra, weights)
        self.processes.wait()

    def finish(self) -> dict:
        if self._bar is not None:
            self._bar.close()
        first, last = self.evals[0], self.evals[-1]
        if not self.processes.is_main:
            return _summary(first, last, self.cfg.iterations)
        if self.trackers is not None:
            self.trackers.close()
        if self.cfg.export.at_end and self.cfg.algo != "reward_model":
            from rebelrl.export import export_model

            self.say(f"rebelrl: the trained policy, ready for transformers and vLLM: {export_model(self.run_dir, adapter_only=self.cfg.export.adapter_only)}")
        report = write_report(self.run_dir, title=f"{self.cfg.algo.upper()} on {self.task.name} ({self.cfg.model.name})")
        if self.task.env is not None:
            self._per_turn_report(report)
        summary = _summary(first, last, self.cfg.iterations)
        lines = []
        if "reward_mean" in last:
            lines += [f"held-out reward ({self.reward_name}, {first['n_prompts']} prompts): {summary['initial_reward']:.3f} -> "
                      f"{summary['final_reward']:.3f} ({summary['final_reward'] - summary['initial_reward']:+.3f})",
                      f"win rate vs initial policy: {summary['final_win_rate_vs_initial']:.3f}   "
                      f"KL to reference: {summary['final_kl_to_ref']:.3f} nats"]
        lines += [f"held-out {key}: {first[key]:.3f} -> {last[key]:.3f}" for key in HELD_OUT_KEYS if key in last and key in first]
        print("\n" + "\n".join(lines) + f"\nreport: {report}")
        return summary


    def _per_turn_report(self, report: Path) -> None:
        H = self.cfg.task.horizon
        plot_per_turn(self.evals, H, self.run_dir / "plots" / "win_rate_per_turn.png")
        table = per_turn_table(self.evals, H)
        section = f"\n## Win rate vs initial policy at each turn h\n\n![per turn](plots/win_rate_per_turn.png)\n\n{table}\n"
        write_atomic(report, report.read_text() + section)
        print(f"\nwin rate vs initial policy by turn h:\n{table}")


# What the progress bar and the evaluation line show, where a run measures it: (label, metric).
_PROGRESS_KEYS = (("reward", "score_mean"), ("kl", "kl_to_ref"), ("loss", "loss"), ("acc", "rewards/accuracies"))
_EVAL_KEYS = (("reward", "reward_mean"), ("win rate vs initial", "win_rate_vs_initial"), ("KL", "kl_to_ref"),
              ("pair accuracy", "rewards/accuracies"), ("margin", "rewards/margins"), ("loss", "loss"), ("token accuracy", "mean_token_accuracy"))
# Held-out metrics of the offline methods that a run's summary reports, first evaluation -> last.
HELD_OUT_KEYS = ("rewards/accuracies", "rewards/margins", "loss", "mean_token_accuracy")


def _summary(first: dict, last: dict, iterations: int) -> dict:
    summary = {"iterations": iterations}
    if "reward_mean" in last:
        summary.update(initial_reward=first["reward_mean"], final_reward=last["reward_mean"],
                       final_win_rate_vs_initial=last["win_rate_vs_initial"], final_kl_to_ref=last["kl_to_ref"])
    for key in HELD_OUT_KEYS:
        if key in last and key in first:
            summary[f"initial_{key}"], summary[f"final_{key}"] = first[key], last[key]
    return summary


def _gold_reward(cfg: TrainConfig, task: Task) -> RewardFn | None:
    if cfg.eval.gold_fn is None:
        return None
    from rebelrl.rewards import load_reward
    from rebelrl.rewards.registry import user_reward

    name = cfg.eval.gold_fn
    return checked_reward(user_reward(load_reward(name, cfg.eval.gold_kwargs), name), name, lambda i: task.where("eval", i))


def _process_rng(state: dict, rank: int) -> dict | None:
    """The random streams process ``rank`` resumes with: its own where the checkpoint has them; a
    one-process checkpoint's for process 0; None (keep seed + rank) for a process the saving run lacked."""
    by_process = state.get("rng_by_process")
    if by_process is not None:
        return by_process[rank] if rank < len(by_process) else None
    return state["rng"] if rank == 0 else None


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler, optim: OptimConfig) -> None:
    """Put the config's lr, betas and weight decay in force after loading a saved optimizer state.

    The saved state carries the values it was made with (lr in every group and in the schedule's
    ``base_lrs``); without this, a resume that changes ``optim.lr`` would record the change and keep
    training at the old rate. With unchanged values it recomputes exactly the lr that was saved.
    """
    scheduler.base_lrs = [optim.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=optim.lr, lr=optim.lr * factor(scheduler.last_epoch), betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def check_prompt_lengths(task: Task, tokenizer, context: int | None, max_new_tokens: int,
                         budget_key: str = "rollout.max_new_tokens") -> None:
    """Refuse prompts that leave no room for a completion in the model's context, naming the row,
    before any compute: the model would otherwise fail (or silently degrade) mid-run. A budget that
    alone fills the context is the budget's fault, named by ``budget_key``."""
    if not context:
        return
    if max_new_tokens >= context:
        raise ConfigError(f"{budget_key}={max_new_tokens} leaves no room for a prompt in the model's context of {context} "
                          f"tokens: set it below {context}")
    limit = context - max_new_tokens
    too_long = []
    for split, prompts in (("train", task.train), ("eval", task.eval)):
        lengths = []
        for i, p in enumerate(prompts):
            try:
                lengths.append(len(encode_prompt(tokenizer, p)))
            except ChatTemplateError as e:
                raise PromptDataError(f"{task.where(split, i)}: {e}") from None
        too_long += [(split, i, n) for i, n in enumerate(lengths) if n > limit]
    if too_long:
        split, i, n = too_long[0]
        more = f" (and {len(too_long) - 1} more prompts)" if len(too_long) > 1 else ""
        raise PromptDataError(
            f"{task.where(split, i)}: {n} tokens with the chat template{more}; the model's context of {context} tokens "
            f"minus the completion budget of {max_new_tokens} leaves {limit}: shorten or drop the prompt, or lower {budget_key}"
        )


def encode_row(tokenizer, row):
    """An offline row's tokens: a preference pair's (chosen, rejected), or a demonstration's one."""
    if isinstance(row, PreferencePair):
        return encode_reply(tokenizer, row.prompt, row.chosen), encode_reply(tokenizer, row.prompt, row.rejected)
    return (encode_demonstration(tokenizer, row),)


def check_data_lengths(task: Task, tokenizer, context: int | None, packed: int | None = None) -> None:
    """Refuse offline rows longer than the model's context (a pair's prompt and longer reply, a
    demonstration's whole chat), naming them, before any model loads. ``packed``: SFT packs its
    demonstrations (a preference row's chosen reply) into sequences of that many tokens, and each must fit."""
    rows = task.train_data + task.eval_data
    wheres = task.train_rows + task.eval_rows
    if packed is not None and (context is None or packed < context):
        demonstrations = [r.prompt.with_reply(r.chosen) if isinstance(r, PreferencePair) else r for r in rows]
        check_demonstration_lengths(demonstrations, wheres, tokenizer, packed, "sft.max_length (a packed sequence)")
    elif rows and isinstance(rows[0], PreferencePair):
        check_pair_lengths(rows, wheres, tokenizer, context)
    else:
        check_demonstration_lengths(rows, wheres, tokenizer, context)


def _load_models(cfg: TrainConfig, checkpoint: Path | None, with_ref: bool = True):
    """(policy, reference); ``with_ref=False``: no reference (a run that never compares with it), None."""
    m = cfg.model
    if m.lora_r > 0:
        base = load_causal_lm(m.name, m.dtype, cfg.seed)
        if checkpoint is not None:
            from peft import PeftModel

            with peft_quietly():
                policy = PeftModel.from_pretrained(base, checkpoint / "model", is_trainable=True)
        else:
            policy = _apply_lora(base, m)
        ref = load_causal_lm(m.ref_name, m.dtype, cfg.seed) if m.ref_name else AdapterDisabled(policy)
    else:
        policy = load_causal_lm(str(checkpoint / "model") if checkpoint else m.name, m.dtype, cfg.seed)
        ref = load_causal_lm(m.ref_name or m.name, m.dtype, cfg.seed) if with_ref else None
    if m.activation_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (LoRA freezes the embeddings).
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    fuse_layers(policy)  # Llama-style MLPs and norms keep less for the backward pass
    # Dropout stays off while training too: the policy that is regressed must be the one that sampled.
    policy.eval()
    if not with_ref:
        return policy, None
    ref.eval()
    ref.requires_grad_(False)
    return policy, ref


def _apply_lora(base: torch.nn.Module, m) -> torch.nn.Module:
    """LoRA on ``base``; a target spec that matches none of its modules is named with the ones there are."""
    try:
        return apply_lora(base, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules)
    except ValueError as e:
        if "not found in the base model" not in str(e):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in base.named_modules() if isinstance(module, torch.nn.Linear)})
        raise ConfigError(f"model.lora_target_modules={m.lora_target_modules!r} matches no module of {m.name}; its linear "
                          f"layers are {', '.join(linear)} (or use all-linear)") from None


CRITIC_FILE = "critic.safetensors"


def sample_metrics(rollout, scores: torch.Tensor) -> dict[str, float]:
    """What every loop logs about an iteration's samples; scores: (N,) task scores."""
    mask = rollout.completion_mask.float()
    return {
        "score_mean": scores.mean().item(),
        "score_std": scores.std().item() if len(scores) > 1 else 0.0,
        "response_length": rollout.completion_lengths.float().mean().item(),
        "frac_no_eos": (~rollout.finished).float().mean().item(),
        # Probability mass of pi_t the sampler's truncation removed, per token: 0 when sampling is exact (a vLLM engine does not say).
        **({"sampler_dropped_mass": ((rollout.dropped_mass * mask).sum() / mask.sum().clamp(min=1)).item()} if rollout.dropped_mass is not None else {}),
        # Dataset reset: the share of replies started from the data, and the tokens forced a reply.
        **({"reset/frac": rollout.forced.any(dim=1).float().mean().item(), "reset/forced_tokens": rollout.forced.sum(dim=1).float().mean().item()}
           if rollout.forced is not None else {}),
    }


# What decides the samples and scores of an evaluation of the initial policy.
_MEASUREMENT_KEYS = ("model", "task", "reward", "eval.temperature", "eval.max_new_tokens", "eval.seed", "eval.gold_fn", "eval.gold_kwargs",
                     "rollout.temperature",
                     "rollout.top_p", "rollout.top_k", "rollout.max_new_tokens", "rollout.repetition_penalty", "rollout.min_new_tokens")


def _measurement_diff(theirs: dict, ours: dict) -> list[str]:
    """``key: theirs -> ours`` for every setting that would make an initial evaluation differ."""
    def get(config, dotted):
        for part in dotted.split("."):
            config = config.get(part) if isinstance(config, dict) else None
        return config

    return [f"{key}: {get(theirs, key)!r} -> {get(ours, key)!r}" for key in _MEASUREMENT_KEYS if get(theirs, key) != get(ours, key)]


def _with_defaults(config: dict, defaults: dict) -> dict:
    """``config`` with the fields it predates filled in at their defaults (a newer version's new
    settings, at their defaults, do not change what an older run measured)."""
    out = dict(defaults)
    for key, value in config.items():
        both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
        out[key] = _with_defaults(value, defaults[key]) if both_dicts else value
    return out


def _check_guide(cfg: TrainConfig, tokenizer) -> None:
    """A guide named by ``guide.model`` is a causal LM whose tokenizer is the policy's (it writes tokens
    the policy reads), checked before any model loads."""
    g = cfg.guide
    if g.mode == "none" or g.model is None:
        return
    try:
        theirs = load_tokenizer(g.model, cfg.task.prompt_format)
    except (OSError, ValueError) as e:
        raise ConfigError(f"guide.model={g.model!r}: its tokenizer cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if theirs.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"guide.model={g.model!r} has another tokenizer than model.name={cfg.model.name!r}; a guide writes "
                          "tokens the policy reads: give one of the same family")


def check_row_rewards(task: Task) -> None:
    """A-LoL's ``reward`` column: on every demonstration row, a finite number, or on none (``reward.fn``
    then scores them); preference rows have no such column (both replies are scored by ``reward.fn``)."""
    rows, wheres = task.train_data + task.eval_data, task.train_rows + task.eval_rows
    has = [isinstance(r, Conversation) and "reward" in r.meta for r in rows]
    pair_with = next((w for r, w in zip(rows, wheres) if isinstance(r, PreferencePair) and "reward" in r.meta), None)
    if pair_with is not None:
        raise ConfigError(f"{pair_with}, field 'reward': A-LoL scores both replies of a pair with reward.fn, so this column would be "
                          "ignored; remove it, or write each reply as a demonstration row with its own reward")
    if not any(has):
        return
    for row, where, here in zip(rows, wheres, has):
        value = row.meta.get("reward") if here else None
        if not here or isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            what = "missing, while other rows have one" if not here else f"{value!r} is not a finite number"
            raise ConfigError(f"{where}, field 'reward': {what}; every row needs a number, or no row has the column (reward.fn scores them)")


def _load_guide(cfg: TrainConfig, tokenizer, ref: torch.nn.Module | None, device) -> Guide | None:
    """``guide.mode``'s model: the reference policy, or ``guide.model``. It never trains, so it is never
    checkpointed: a resumed run loads it again as it was."""
    g = cfg.guide
    if g.mode == "none":
        return None
    model = ref if g.model is None else load_causal_lm(g.model, cfg.model.dtype, cfg.seed).to(device)
    params = SamplingParams(cfg.rollout.temperature, g.top_p, 0, cfg.rollout.max_new_tokens)
    switch = 0.8 if g.mode == "lols" and g.switch is None else g.switch
    return Guide(HFGenerator(model, tokenizer, cfg.rollout.batch_size), params, g.mode, g.prob, switch, cfg.seed)


def _load_critic(cfg: TrainConfig, policy: torch.nn.Module, checkpoint: Path | None) -> Critic | None:
    """PPO's critic: a value head on the policy's network or on a copy of the starting network; on
    resume its weights come from the checkpoint."""
    if cfg.algo != "ppo":
        return None
    hidden = policy.config.get_text_config().hidden_size
    backbone = load_causal_lm(cfg.model.name, cfg.model.dtype, cfg.seed) if cfg.ppo.critic == "separate" else None
    critic = Critic(hidden, backbone)
    if checkpoint is not None:
        from safetensors.torch import load_model

        load_model(critic, str(checkpoint / CRITIC_FILE))
    return critic.to(next(policy.parameters()).device)


def _recompute_old(cfg: TrainConfig, policy: torch.nn.Module) -> bool:
    """``rollout.old_logprobs=auto``: the sampler's record is trusted only in float32, where it matches
    the training forward to ~1e-4 nats a reply; in bfloat16/float16 it is off by ~0.2 nats a reply.
    A vLLM engine's log-probs are never the trainer's: they are only compared with it."""
    if cfg.rollout.backend == "vllm":
        return True
    if cfg.rollout.old_logprobs != "auto":
        return cfg.rollout.old_logprobs == "recompute"
    return next(policy.parameters()).dtype != torch.float32


_ORDERS: dict[tuple[int, int, int], list[int]] = {}


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    key = (n, seed, epoch)
    if key not in _ORDERS:
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        _ORDERS[key] = order
    return _ORDERS[key]
