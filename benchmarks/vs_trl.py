"""rebelrl's REBEL against TRL's GRPOTrainer and RLOOTrainer on the same workload, with a floor report.

The workload, equal on every side: SmolLM2-135M-Instruct in float32 on 2 CPU threads (the same local
folder: rebelrl's alias resolves it and TRL loads that folder), the chitchat-warm prompts with
rebelrl's system prompt (TRL gets the same chat messages, in the same order: iteration i sees the
same 16 prompts on every side, and the chat template gives the same token ids), 2 replies a prompt,
at most 48 new tokens, temperature 0.7 from the full softmax (no top-k, no top-p), the same VADER
reward (rebelrl's, with its no-EOS penalty of -1), a KL coefficient of 0.05 (so every side runs the
reference model), one AdamW step an iteration (lr 1e-6, constant, clip 1.0) on all 32 replies in one
forward/backward (rebelrl: one micro-batch of 16 pairs; TRL: per-device batch 32, num_generations 2,
no gradient accumulation), no gradient checkpointing (TRL's default turns it on), no mixed precision.
``rebelrl-lean`` is rebelrl in its lean mode: the same run with ``model.activation_checkpointing=true``
and ``free_memory=at_once`` (its update floor below still counts 3 forwards; checkpointing spends a
fourth on purpose, and returning memory at once costs page faults). ``rebelrl-vllm`` and
``rebelrl-vllm-bf16`` are rebelrl with ``rollout.backend=vllm`` (the engine of scripts/setup_vllm.sh, in
float32 or bfloat16; the trainer stays in float32; ``rebelrl-vllm-eager``: float32, the engine not compiled): their rollout holds loading the policy's weights into
the engine and its sampling, their log-probs the recomputed log pi_t, and the engine's memory and start
are reported beside the trainer's. ``rebelrl-lora``, ``rebelrl-vllm-lora`` and
``rebelrl-vllm-lora-adapter`` train a LoRA of rank 16 on every linear layer (lr 1e-4), sampled by
rebelrl's loop, by the engine with the adapter merged into its weights, or by the engine applying the
adapter.

    python benchmarks/vs_trl.py                    # rebelrl, rebelrl-lean, trl-grpo, trl-rloo alternating; 3 repeats x 6 iterations
    python benchmarks/vs_trl.py --full-length      # every reply forced to 48 tokens: identical token counts
    python benchmarks/vs_trl.py --methods rebelrl  # without TRL
    python benchmarks/vs_trl.py --methods rebelrl rebelrl-vllm rebelrl-vllm-bf16   # rebelrl's decoding loop against vLLM
    python benchmarks/vs_trl.py --iterations 2 --prompts 2 --max-new-tokens 8 --repeats 1   # smoke test

TRL comes with the extra: pip install -e ".[bench]". Run it alone: two jobs on 2 cores distort every
timing. Each measured run is its own child process on the CPU (GPUs hidden, OpenMP and MKL at
--threads), so its peak RSS is its own (ru_maxrss from wait4); the methods alternate within each
repeat, so a slow spell of the machine hits all of them. The median per-iteration time is taken over
all repeats' iterations after the first --warmup ones. rebelrl's run also evaluates 2 held-out
prompts before and after training and saves a final checkpoint: outside the timed iterations, inside
its peak RSS. "kernel" is a child's system CPU time (ru_stime, loading included) divided by its
iterations: mostly page faults, which can cost microseconds each on a virtual machine. Results: a
table on stdout, everything measured in --out (JSON).

What each phase holds:
    rebelrl (its own timers, metrics.jsonl)
        rollout   render and tokenize the prompts, generate (prefill + decode of 32 replies, the
                  sampler recording log pi_t of each token), decode to text          time/rollout
        score     VADER on the 32 replies, no-EOS penalty                            time/score
        logprobs  log pi_t: the sampler's record (float32), so no forward; the reference's
                  no-grad forward over the 32 sequences; KL-penalised rewards        time/logprobs
        update    the rest of the iteration: pairs, forward + backward of the 16 pairs,
                  gradient clipping, AdamW step                                      time/total - the above
    TRL (timers wrapped around its methods; the iteration from on_step_begin to on_step_end)
        rollout   ``_generate``: chat template and tokenize, ``model.generate`` of 32 replies,
                  decode, length metrics
        score     ``_calculate_rewards``
        logprobs  every no-grad ``_get_per_token_logps_and_entropies`` call: the reference
                  model's (GRPO and RLOO) and the policy's old log-probs (RLOO always; GRPO only
                  when generation and optimizer steps are misaligned, never here)
        update    the rest: padding, advantages and metrics in ``_generate_and_score_completions``,
                  the loss forward (with entropies) + backward, clipping, AdamW, scheduler, zero_grad

Floor report. A child measures the machine first: the fp32 GEMM rate R (torch.matmul on the model's
shapes, best of them) and the memory bandwidth B (a 512 MiB tensor copy, read + write bytes); and,
for reading the rollout's multiple, the rate of a decoding step's products (one row per reply, x W^T
as nn.Linear runs them). From the token counts each run measured (prompt P_i and reply C_i tokens of
each sequence, the reply counting its stop token) and the model's dimensions (N_body = weights of the
decoder layers' matrix products, N_head = V x d, L layers, d_attn = heads x head_dim, d_kv =
kv_heads x head_dim):

    forward(n tokens, logits at c) = 2 N_body n + 2 L d_attn n (n + 1) + 2 N_head c   FLOPs
        (matrix products of the layers, causal attention QK^T and AV, the output head)
    rollout  prefill: max(sum over distinct prompts of forward(P, 1) / R, W / B); then each decode step s:
             max(sum over replies still going of (2 N_body + 4 L d_attn (P_i + s) + 2 N_head) / R,
                 (W + KV cache bytes of those replies) / B), W = every weight's bytes read once
    logprobs one reference forward: sum_i forward(P_i + C_i, C_i) / R (old log-probs are not needed
             for one on-policy step: they equal the training forward's)
    update   3 x that forward (backward ~ 2 x forward) / R + AdamW's 7 x W / B (read parameter,
             gradient and two moments; write parameter and two moments)

and prints each phase's median time as a multiple of its floor (scoring has none: it is Python).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

METHODS = ("rebelrl", "rebelrl-lean", "rebelrl-vllm", "rebelrl-vllm-bf16", "rebelrl-vllm-eager", "rebelrl-lora", "rebelrl-vllm-lora",
           "rebelrl-vllm-lora-adapter", "trl-grpo", "trl-rloo")
DEFAULT_METHODS = ("rebelrl", "rebelrl-lean", "trl-grpo", "trl-rloo")  # the vLLM and LoRA rows are asked for by name
# rollout.backend=vllm (the engine in .venv-vllm, scripts/setup_vllm.sh): its dtype, the trainer's stays float32
VLLM_METHODS = {"rebelrl-vllm": "float32", "rebelrl-vllm-bf16": "bfloat16", "rebelrl-vllm-eager": "float32", "rebelrl-vllm-lora": "float32", "rebelrl-vllm-lora-adapter": "float32"}
# LoRA of rank 16 on every linear layer (model.lora_r=16); the vLLM engine gets it merged or as an adapter
EAGER_METHODS = {"rebelrl-vllm-eager"}  # rollout.vllm_eager: the engine uncompiled
LORA_METHODS = {"rebelrl-lora": None, "rebelrl-vllm-lora": "merged", "rebelrl-vllm-lora-adapter": "adapter"}
PHASES = ("rollout", "score", "logprobs", "update")
TRL_TESTED = "1.16"  # the release whose private methods the phase timers wrap
TRL_HOOKS = ("_generate", "_calculate_rewards", "_get_per_token_logps_and_entropies")
NO_EOS_PENALTY = -1.0
COPY_BYTES = 512 * 2**20


# --- the shared workload ---------------------------------------------------------------------


def rebel_overrides(args, run_dir: str, seed: int, lean: bool = False, vllm: str | None = None, lora: str | None = "",
                    eager: bool = False) -> list[str]:
    """rebelrl's config for the workload, as ``rebelrl train`` overrides; ``lean``: the lean mode
    (activation checkpointing, freed memory returned at once, the same micro-batch of 16 pairs);
    ``vllm``: sampling by a vLLM engine in this dtype (``eager``: uncompiled)."""
    p, budget = args.prompts, args.max_new_tokens
    return [*(["model.activation_checkpointing=true", "free_memory=at_once"] if lean else []),
        *(["rollout.backend=vllm", f"rollout.vllm_dtype={vllm}"] if vllm else []), *(["rollout.vllm_eager=true"] if eager else []),
        *(["model.lora_r=16", "model.lora_target_modules=all-linear", "optim.lr=1e-4"] if lora != "" else []),
        *([f"rollout.vllm_lora={lora}"] if lora else []),
        "algo=rebel", f"run_dir={run_dir}", f"iterations={args.iterations}", f"seed={seed}", f"threads={args.threads}",
        f"model.name={args.model}", "model.dtype=float32",
        # Two held-out prompts: the initial and final evaluations rebelrl always runs stay small
        # (they fall outside the timed iterations).
        "task.name=chitchat-warm", "task.n_eval=2",
        f"reward.no_eos_penalty={NO_EOS_PENALTY}",
        f"rollout.prompts_per_iter={p}", "rollout.samples_per_prompt=2", "rollout.temperature=0.7",
        "rollout.top_p=1.0", "rollout.top_k=0", f"rollout.max_new_tokens={budget}",
        f"rollout.min_new_tokens={budget if args.full_length else 0}", f"rollout.batch_size={p}",
        "update.epochs=1", f"update.minibatch_size={p}", f"update.micro_batch_size={p}",
        "rebel.eta=1.0", f"rebel.kl_coef={args.kl_coef}",
        f"optim.lr={args.lr}", "optim.schedule=constant", "optim.max_grad_norm=1.0", "optim.weight_decay=0.0",
        "eval.every=0", "checkpoint.every=0", "checkpoint.keep_last=1",
    ]


def train_config(args, run_dir: str, seed: int, lean: bool = False, vllm: str | None = None, lora: str | None = "", eager: bool = False):
    from rebelrl.config import load_config
    from rebelrl.train.config import TrainConfig

    return load_config(TrainConfig, None, rebel_overrides(args, run_dir, seed, lean, vllm, lora, eager))


def iteration_prompts(cfg) -> list[list]:
    """The prompts rebelrl trains on at iterations 1..N, in its order, so TRL can be fed exactly the
    same batches: ``Run.prompts_for`` reads only the config, the task and the process (one here).
    ``check_same_prompts`` confirms it on the token counts every run records."""
    from rebelrl.algos.run import Run
    from rebelrl.envs import build_task
    from rebelrl.train.distributed import ONE_PROCESS

    view = SimpleNamespace(cfg=cfg, task=build_task(cfg.task), processes=ONE_PROCESS)
    view.rows_for = lambda *a: Run.rows_for(view, *a)
    return [Run.prompts_for(view, i) for i in range(1, cfg.iterations + 1)]


# --- what a child records ----------------------------------------------------------------------


class IterationClock:
    """Per-iteration phase times and token counts, filled by wrappers around each framework's methods."""

    def __init__(self):
        self.records: list[dict] = []
        self.current: dict | None = None

    def begin(self) -> None:
        self.current = {"t0": time.perf_counter(), "generations": [], **{p: 0.0 for p in PHASES}, "logprobs_ref": 0.0, "logprobs_old": 0.0}

    def end(self) -> None:
        record, self.current = self.current, None
        record["iteration"] = time.perf_counter() - record.pop("t0")
        record["update"] = record["iteration"] - sum(record[p] for p in ("rollout", "score", "logprobs"))
        self.records.append(record)

    @contextlib.contextmanager
    def phase(self, *names: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.current is not None:
                for name in names:
                    self.current[name] += time.perf_counter() - t0

    def tokens(self, prompt_lengths: list[int], completion_lengths: list[int]) -> None:
        if self.current is not None:
            self.current["generations"].append({"prompt": prompt_lengths, "completion": completion_lengths})


def timed(clock: IterationClock, fn, *names: str):
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        with clock.phase(*names):
            return fn(*a, **kw)

    return wrapper


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "accelerate", "trl", "rebelrl"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


# --- the measured children -----------------------------------------------------------------------


def child_rebelrl(args, seed: int, workdir: Path, lean: bool = False, vllm: str | None = None, lora: str | None = "",
                  eager: bool = False) -> dict:
    """One REBEL run through rebelrl's own training loop; phases from its metrics.jsonl. The token
    counts come from an observer around ``collect`` (it returns the batch unchanged). With ``vllm``,
    the engine's own peak memory and start time are read once training is over, before the engine is
    stopped (the child's peak RSS is the trainer's)."""
    from rebelrl.algos import rebel
    from rebelrl.rollout.vllm_engine import engines_of_this_block

    run_dir = workdir / f"rebelrl-{seed}"
    cfg = train_config(args, str(run_dir), seed, lean, vllm, lora, eager)
    rollouts, seen, engine = [], {}, {}
    collect = rebel.collect

    def observed(run, prompts):
        batch = collect(run, prompts)
        r = batch.rollout
        rollouts.append({"prompt": r.prompt_mask.sum(1).tolist(), "completion": r.completion_mask.sum(1).tolist()})
        seen["generator"] = run.generator
        return batch

    rebel.collect = observed
    with engines_of_this_block():
        rebel.train(cfg)
        if vllm:
            server = seen["generator"].server
            engine.update(peak_rss_mb=server.peak_rss_mb(), start_s=server.start_seconds)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = []
    for line, generation in zip(lines, rollouts, strict=True):
        m = json.loads(line)
        phases = {p: m[f"time/{p}"] for p in ("rollout", "score", "logprobs")}
        # log pi_t is the sampler's record in float32, so no old-policy forward, unless rebelrl found the
        # record off and recomputed it (inside time/logprobs then, and flagged).
        records.append({**phases, "iteration": m["time/total"], "update": m["time/total"] - sum(phases.values()),
                        "logprobs_ref": None, "logprobs_old": 0.0, "old_recomputed": bool(m.get("old_logps_recomputed")),
                        "vllm_sync": m.get("time/vllm_sync"),
                        "generations": [generation]})
    shutil.rmtree(run_dir, ignore_errors=True)  # the final checkpoint is ~2 GB
    return {"iterations": records, **({"engine": engine} if vllm else {})}


def child_trl(method: str, args, seed: int, workdir: Path) -> dict:
    """One TRL run (GRPOTrainer or RLOOTrainer) on the same prompts, model folder, reward and settings."""
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    from rebelrl.models import resolve_model_path
    from rebelrl.train.threads import pin_threads

    trainer_cls, config_cls = {"trl-grpo": (trl.GRPOTrainer, trl.GRPOConfig), "trl-rloo": (trl.RLOOTrainer, trl.RLOOConfig)}[method]
    missing = [name for name in TRL_HOOKS if not hasattr(trainer_cls, name)]
    if missing:
        raise SystemExit(f"TRL {trl.__version__}: {trainer_cls.__name__} has no {', '.join(missing)}, which the phase timers "
                         f"wrap; this benchmark was written against TRL {TRL_TESTED}: pip install -e '.[bench]'")
    pin_threads(args.threads)
    batches = iteration_prompts(train_config(args, str(workdir / "unused"), seed))  # rebelrl's config, for its prompt order
    dataset = Dataset.from_list([{"prompt": c.to_chat()} for batch in batches for c in batch])
    path = resolve_model_path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    clock = IterationClock()

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **kw):
            clock.begin()

        def on_step_end(self, *a, **kw):
            clock.end()

    config = config_cls(**trl_settings(args, seed, str(workdir / f"{method}-{seed}")))
    trainer = trainer_cls(model=path, reward_funcs=trl_reward(tokenizer), args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    instrument(trainer, clock)
    trainer.train()
    return {"iterations": clock.records}


def trl_settings(args, seed: int, output_dir: str) -> dict:
    """GRPOConfig / RLOOConfig fields that make TRL's run the workload rebelrl runs."""
    n = 2 * args.prompts
    return dict(
        output_dir=output_dir, seed=seed, max_steps=args.iterations, use_cpu=True,
        model_init_kwargs={"dtype": "float32"}, bf16=False, fp16=False,
        activation_checkpointing=False,  # TRL turns it on by default: the backward would recompute the forward
        per_device_train_batch_size=n, gradient_accumulation_steps=1, num_generations=2, num_iterations=1,
        shuffle_dataset=False,  # the dataset is already in rebelrl's per-iteration order
        max_completion_length=args.max_new_tokens, temperature=0.7, top_p=1.0, top_k=0,
        generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.full_length else None,
        beta=args.kl_coef, disable_dropout=True,
        optim="adamw_torch",  # torch.optim.AdamW as rebelrl uses it (TRL's default is the fused kernel)
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, log_completions=False,
    )


def trl_reward(tokenizer):
    """rebelrl's VADER score with its no-EOS penalty, in TRL's reward signature."""
    import torch

    from rebelrl.eval.evaluate import score_conversations
    from rebelrl.rewards import load_reward
    from rebelrl.types import Conversation

    vader = load_reward("vader")
    stops = {tokenizer.eos_token_id}

    def vader_reward(prompts, completions, completion_ids, **kwargs):
        chats = [Conversation.from_chat(p).with_reply(c[0]["content"]) for p, c in zip(prompts, completions, strict=True)]
        finished = torch.tensor([bool(ids) and ids[-1] in stops for ids in completion_ids])
        return score_conversations(vader, chats, finished, NO_EOS_PENALTY, "vader").tolist()

    return vader_reward


def instrument(trainer, clock: IterationClock) -> None:
    """Timers and token counters around TRL's generation, reward and no-grad log-prob passes."""
    import torch

    generate = trainer._generate

    def counted_generate(prompts):
        with clock.phase("rollout"):
            out = generate(prompts)
        prompt_ids, completion_ids = out[0], out[1]
        clock.tokens([len(ids) for ids in prompt_ids], [len(ids) for ids in completion_ids])
        return out

    logps = trainer._get_per_token_logps_and_entropies

    def timed_logps(model, *a, **kw):
        if torch.is_grad_enabled():  # the loss forward: part of the update
            return logps(model, *a, **kw)
        which = "logprobs_ref" if model is trainer.ref_model else "logprobs_old"
        with clock.phase("logprobs", which):
            return logps(model, *a, **kw)

    trainer._generate = counted_generate
    trainer._calculate_rewards = timed(clock, trainer._calculate_rewards, "score")
    trainer._get_per_token_logps_and_entropies = timed_logps


def child_floor(args) -> dict:
    """The machine's fp32 GEMM rate and copy bandwidth, and the model's dimensions for the FLOP count."""
    import torch

    from rebelrl.models import load_causal_lm
    from rebelrl.train.threads import pin_threads

    pin_threads(args.threads)
    model = load_causal_lm(args.model)
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    layers = model.get_decoder().layers
    dims = {
        "n_body": sum(p.numel() for p in layers.parameters() if p.dim() == 2),
        "n_head": model.get_output_embeddings().weight.numel(),
        "layers": c.num_hidden_layers,
        "d_attn": c.num_attention_heads * head_dim,
        "d_kv": c.num_key_value_heads * head_dim,
        "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),  # tied weights once
        "element_bytes": next(model.parameters()).element_size(),
    }
    tokens, replies = 2 * args.prompts * 128, 2 * args.prompts * args.max_new_tokens
    shapes = {
        f"layer ({tokens} x {c.hidden_size} x {c.intermediate_size})": (tokens, c.hidden_size, c.intermediate_size),
        f"layer ({tokens} x {c.intermediate_size} x {c.hidden_size})": (tokens, c.intermediate_size, c.hidden_size),
        f"head ({replies} x {c.hidden_size} x {c.vocab_size})": (replies, c.hidden_size, c.vocab_size),
    }
    gemm = {name: gemm_gflops(*shape, args.floor_seconds) for name, shape in shapes.items()}
    # What a decoding step's products get: one new token a row, every row of an iteration at once,
    # through nn.Linear as the model runs them.
    # Not part of the floor, which takes the best rate; it says how far a step can get to it.
    rows = 2 * args.prompts
    decode_shapes = {
        f"layer ({rows} x {c.hidden_size} x {c.intermediate_size})": (rows, c.hidden_size, c.intermediate_size),
        f"head ({rows} x {c.hidden_size} x {c.vocab_size})": (rows, c.hidden_size, c.vocab_size),
    }
    decode = {name: gemm_gflops(*shape, args.floor_seconds, as_linear=True) for name, shape in decode_shapes.items()}
    src = torch.rand(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    copy_s = best_seconds(lambda: dst.copy_(src), args.floor_seconds)
    return {"dims": dims, "gemm_gflops": gemm, "gflops": max(gemm.values()), "decode_gemm_gflops": decode,
            "copy_gbps": 2 * COPY_BYTES / copy_s / 1e9, "cpu": cpu_name()}


def cpu_name() -> str:
    """The processor's model name (Linux), else what the platform module knows; results differ by CPU."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def gemm_gflops(m: int, k: int, n: int, budget: float, as_linear: bool = False) -> float:
    """The best rate of an (m, k) x (k, n) product; ``as_linear``: as ``nn.Linear`` runs it, x W^T with
    W stored (n, k) (the BLAS call differs, and at few rows so can its speed)."""
    import torch

    a = torch.randn(m, k)
    if as_linear:
        w = torch.randn(n, k)
        return 2 * m * k * n / best_seconds(lambda: torch.nn.functional.linear(a, w), budget) / 1e9
    b, out = torch.randn(k, n), torch.empty(m, n)
    return 2 * m * k * n / best_seconds(lambda: torch.matmul(a, b, out=out), budget) / 1e9


def best_seconds(fn, budget: float, at_least: int = 3) -> float:
    """Fastest of repeated calls (after one warm-up), running for about ``budget`` seconds."""
    fn()
    best, start, n = float("inf"), time.perf_counter(), 0
    while n < at_least or time.perf_counter() - start < budget:
        t0 = time.perf_counter()
        fn()
        best, n = min(best, time.perf_counter() - t0), n + 1
    return best


def run_child(args) -> None:
    workdir = Path(args.workdir)
    seed = args.seed + args.repeat
    if args.child == "floor":
        result = child_floor(args)
    elif args.child.startswith("rebelrl"):
        result = child_rebelrl(args, seed, workdir, lean=args.child == "rebelrl-lean", vllm=VLLM_METHODS.get(args.child),
                               lora=LORA_METHODS.get(args.child, ""), eager=args.child in EAGER_METHODS)
    else:
        result = child_trl(args.child, args, seed, workdir)
    Path(args.child_out).write_text(json.dumps({**result, "versions": versions()}))


# --- the parent: launch, summarise, print ----------------------------------------------------------


def launch(kind: str, repeat: int, args, workdir: Path) -> dict:
    """Run one child to completion; its result with its own peak RSS, or exit with its log's tail."""
    out, log = workdir / f"{kind}-{repeat}.json", workdir / f"{kind}-{repeat}.log"
    cmd = [sys.executable, __file__, *sys.argv[1:], "--child", kind, "--repeat", str(repeat),
           "--child-out", str(out), "--workdir", str(workdir)]
    threads = str(args.threads)
    # CPU only, the same thread count for every library in every child.
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CUDA_VISIBLE_DEVICES": "",
           "TOKENIZERS_PARALLELISM": "false"}
    print(f"[{time.strftime('%H:%M:%S')}] {kind} (repeat {repeat + 1}/{args.repeats}) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        child = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        sys.exit(f"{kind} failed (exit code {code}); the end of {log}:\n{tail}")
    result = json.loads(out.read_text())
    if args.full_length and kind != "floor":
        check_forced(kind, result, args.max_new_tokens)
    return {**result, "method": kind, "repeat": repeat, "wall_s": time.perf_counter() - t0,
            "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux reports KiB
            "kernel_s": usage.ru_stime, "page_faults": usage.ru_minflt}


def check_forced(kind: str, result: dict, budget: int) -> None:
    """--full-length compares equal token counts only if every reply really ran to the budget."""
    lengths = {c for rec in result["iterations"] for g in rec["generations"] for c in g["completion"]}
    if lengths != {budget}:
        sys.exit(f"{kind}: --full-length asked for {budget} tokens a reply, but replies were {sorted(lengths)} tokens long")


def check_same_prompts(runs: list[dict]) -> None:
    """Every method of a repeat must have seen the same prompts at every iteration (same token counts)."""
    for repeat in dict.fromkeys(r["repeat"] for r in runs):
        seen = {r["method"]: [g["prompt"] for rec in r["iterations"] for g in rec["generations"]] for r in runs if r["repeat"] == repeat}
        if len({json.dumps(v) for v in seen.values()}) > 1:
            sys.exit(f"vs_trl: in repeat {repeat + 1} the methods were fed different prompts ({', '.join(seen)}): "
                     "rebelrl's prompt order has changed; update iteration_prompts")


def forward_flops(d: dict, n: int, c: int) -> float:
    return 2 * d["n_body"] * n + 2 * d["layers"] * d["d_attn"] * n * (n + 1) + 2 * d["n_head"] * c


def rollout_floor(d: dict, rate: float, bandwidth: float, prompts: list[int], replies: list[int]) -> float:
    """Seconds the prefill and decode of one generate call need at best (see the docstring). Rows
    come in pairs of one prompt, which needs one prefill."""
    seconds = max(sum(forward_flops(d, p, 1) for p in prompts[::2]) / rate, d["weight_bytes"] / bandwidth)
    kv_per_token = 2 * d["layers"] * d["d_kv"] * d["element_bytes"]
    for s in range(1, max(replies)):
        going = [p for p, c in zip(prompts, replies) if c > s]
        flops = sum(2 * d["n_body"] + 4 * d["layers"] * d["d_attn"] * (p + s) + 2 * d["n_head"] for p in going)
        memory = d["weight_bytes"] + kv_per_token * sum(p + s for p in going)
        seconds += max(flops / rate, memory / bandwidth)
    return seconds


def iteration_floors(machine: dict, record: dict) -> dict:
    d, rate, bandwidth = machine["dims"], machine["gflops"] * 1e9, machine["copy_gbps"] * 1e9
    gens = record["generations"]
    forward = sum(forward_flops(d, p + c, c) for g in gens for p, c in zip(g["prompt"], g["completion"]))
    floors = {
        "rollout": sum(rollout_floor(d, rate, bandwidth, g["prompt"], g["completion"]) for g in gens),
        "logprobs": max(forward / rate, d["weight_bytes"] / bandwidth),
        "update": 3 * forward / rate + 7 * d["weight_bytes"] / bandwidth,
    }
    return {**floors, "iteration": sum(floors.values())}


def mean_reply(record: dict) -> float:
    lengths = [c for g in record["generations"] for c in g["completion"]]
    return sum(lengths) / len(lengths)


def summarise(runs: list[dict], machine: dict | None, warmup: int) -> dict:
    """Per method: medians over every repeat's iterations after the warm-up, the largest peak RSS."""
    summary = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        kept = [rec for r in mine for rec in r["iterations"][warmup:]]
        row = {key: statistics.median(rec[key] for rec in kept) for key in ("iteration", *PHASES)}
        row["logprobs_old"] = statistics.median(rec["logprobs_old"] for rec in kept)
        row["reply_tokens"] = statistics.mean(mean_reply(rec) for rec in kept)
        row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in mine)
        if all("engine" in r for r in mine):  # a vLLM engine beside the trainer: its memory counts too
            row["engine"] = {key: max(r["engine"][key] for r in mine) for key in ("peak_rss_mb", "start_s")}
            row["engine"]["sync_s"] = statistics.median(rec["vllm_sync"] for rec in kept)
        row["kernel_s"] = statistics.median(r["kernel_s"] / len(r["iterations"]) for r in mine)
        row["iterations_measured"] = len(kept)
        row["old_recomputed_iterations"] = sum(bool(rec.get("old_recomputed")) for rec in kept)
        if machine:
            floors = [iteration_floors(machine, rec) for rec in kept]
            row["floor_s"] = {k: statistics.median(f[k] for f in floors) for k in floors[0]}
            row["x_floor"] = {k: row[k] / v for k, v in row["floor_s"].items()}
        summary[method] = row
    return summary


def print_tables(summary: dict, machine: dict | None, args) -> None:
    mode = f"every reply forced to {args.max_new_tokens} tokens" if args.full_length else f"replies of at most {args.max_new_tokens} tokens"
    print(f"\n{args.model}, float32, {args.threads} threads: {args.prompts} prompts x 2 replies, {mode}; "
          f"medians over {args.repeats} repeat(s) x {args.iterations - args.warmup} iterations after {args.warmup} of warm-up\n")
    print_times(summary)
    if "trl-grpo" in summary:
        print_ratios(summary, summary["trl-grpo"])
    if machine:
        print_floors(summary, machine)


def print_times(summary: dict) -> None:
    print("| method | iteration (s) | rollout (s) | score (s) | ref + old log-probs (s) | of which old (s) | update (s) "
          "| mean reply (tokens) | peak RSS (GB) | kernel (s) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, r in summary.items():
        print(f"| {method} | {r['iteration']:.2f} | {r['rollout']:.2f} | {r['score']:.3f} | {r['logprobs']:.2f} | {r['logprobs_old']:.2f} | "
              f"{r['update']:.2f} | {r['reply_tokens']:.1f} | {r['peak_rss_mb'] / 1024:.2f} | {r['kernel_s']:.1f} |")
    for method, r in summary.items():
        if "engine" in r:
            e = r["engine"]
            print(f"\n{method}: the vLLM engine took {e['start_s']:.0f} s to start (outside the timed iterations) and "
                  f"{e['peak_rss_mb'] / 1024:.2f} GB at its peak, beside the trainer's {r['peak_rss_mb'] / 1024:.2f} GB "
                  f"(together {(e['peak_rss_mb'] + r['peak_rss_mb']) / 1024:.2f} GB); loading the policy's weights into it "
                  f"took {e['sync_s']:.2f} s an iteration (inside the rollout)")
    for method, r in summary.items():
        if r["old_recomputed_iterations"]:
            print(f"\n{method}: log pi_t was recomputed by a forward in {r['old_recomputed_iterations']} measured iterations "
                  "(inside its log-probs time, not in the 'of which old' column)")


def print_ratios(summary: dict, base: dict) -> None:
    print("\nratio to TRL GRPO (below 1: faster or smaller)\n")
    print("| method | iteration | rollout | log-probs | update | peak RSS |")
    print("|---|---|---|---|---|---|")
    for method, r in summary.items():
        cells = [r[k] / base[k] if base[k] else float("nan") for k in ("iteration", "rollout", "logprobs", "update", "peak_rss_mb")]
        print(f"| {method} | " + " | ".join(f"{x:.2f}" for x in cells) + " |")


def print_floors(summary: dict, machine: dict) -> None:
    gemm = ", ".join(f"{name} {rate:.1f}" for name, rate in machine["gemm_gflops"].items())
    decode = ", ".join(f"{name} {rate:.1f}" for name, rate in machine["decode_gemm_gflops"].items())
    print(f"\nmachine: {machine['cpu']}")
    print(f"floors: fp32 GEMM {machine['gflops']:.1f} GFLOP/s (best of {gemm}), copy {machine['copy_gbps']:.1f} GB/s "
          "(formulas in the docstring); time as a multiple of its floor (floor in seconds)")
    print(f"a decoding step's products (nn.Linear, x W^T) run at: {decode} GFLOP/s\n")
    print("| method | rollout | ref + old log-probs | update | iteration |")
    print("|---|---|---|---|---|")
    for method, r in summary.items():
        cells = [f"{r['x_floor'][k]:.1f}x ({r['floor_s'][k]:.2f})" for k in ("rollout", "logprobs", "update", "iteration")]
        print(f"| {method} | " + " | ".join(cells) + " |")


def check_trl(methods: list[str]) -> None:
    """Stop with what to install when a TRL method is asked for and TRL is absent; warn off-version."""
    if not any(m.startswith("trl-") for m in methods):
        return
    if importlib.util.find_spec("trl") is None:
        asked = ", ".join(m for m in methods if m.startswith("trl-"))
        sys.exit(f"vs_trl: TRL is not installed, and the methods to measure include {asked}.\n"
                 f"Install the benchmark extra (pip install -e '.[bench]': TRL {TRL_TESTED}.x), "
                 "or measure rebelrl alone with --methods rebelrl.")
    installed = importlib.metadata.version("trl")
    if not installed.startswith(TRL_TESTED + "."):
        print(f"vs_trl: TRL {installed} is installed; the phase timers wrap private methods of TRL {TRL_TESTED}, "
              "so check that each phase still holds what the docstring says", file=sys.stderr)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of each method, alternating (default 3)")
    parser.add_argument("--iterations", type=int, default=6, help="iterations (optimizer steps) a run (default 6)")
    parser.add_argument("--warmup", type=int, help="first iterations of each run left out of the medians (default 2, or 1 for 2 iterations)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts an iteration, 2 replies each (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--full-length", action="store_true", help="force every reply to --max-new-tokens (min = max new tokens)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="repeat r runs with seed + r on every side")
    parser.add_argument("--floor-seconds", type=float, default=2.0, help="seconds spent on each machine-rate measurement")
    parser.add_argument("--no-floor", action="store_true", help="skip the floor report")
    parser.add_argument("--out", help="JSON results (default runs/vs_trl.json, runs/vs_trl-full-length.json)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the children's logs and results (their folder is printed)")
    for hidden in ("--child", "--child-out", "--workdir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = max(0, min(2, args.iterations - 1))
    if not 0 <= args.warmup < args.iterations:
        parser.error(f"--warmup {args.warmup} must leave at least one of the {args.iterations} iterations")
    return args


def main() -> None:
    args = parse_args()
    if args.child:
        run_child(args)
        return
    check_trl(args.methods)
    workdir = Path(tempfile.mkdtemp(prefix="vs_trl-"))
    machine = None if args.no_floor else launch("floor", 0, args, workdir)
    runs = [launch(method, r, args, workdir) for r in range(args.repeats) for method in args.methods]
    check_same_prompts(runs)
    summary = summarise(runs, machine, args.warmup)
    print_tables(summary, machine, args)
    out = Path(args.out or f"runs/vs_trl{'-full-length' if args.full_length else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("child", "child_out", "workdir", "repeat")}
    out.write_text(json.dumps({"settings": settings, "machine": machine, "summary": summary, "runs": runs}, indent=1))
    print(f"\nresults: {out}")
    if args.keep_logs:
        print(f"logs: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
