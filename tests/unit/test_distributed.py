"""Several processes, one run: two gloo processes on the loopback interface, started and stopped by
each test, against one process doing the same work.

- one REBEL update on a global batch of pairs shared between two processes moves the weights as the
  same update in one process (and would not without gradient averaging), and so does one DAPO update
  (a token mean) whose processes hold different numbers of tokens;
- the held-out evaluation shared between two processes gives the numbers one process gets on the
  same prompts and seeds;
- metrics of the processes' shares combine into the whole batch's (hand-derived numbers);
- a two-process run killed after iteration 3 and resumed repeats the uninterrupted two-process run;
- REFUEL trains end to end through ``rebelrl train --num_processes 2``;
- the shipped FSDP config (FSDP2 over gloo) trains as DDP does and resumes to its uninterrupted run,
  and gathers the weights once per generate call whatever the forward passes of each process;
- two launches as two machines on loopback equal one launch of two processes.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from rebelrl.algos import pg, rebel
from rebelrl.algos.run import Run
from rebelrl.cli import main
from rebelrl.config import ConfigError
from rebelrl.eval.evaluate import eval_metrics, eval_rows
from rebelrl.models import tiny_model, tiny_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.seeding import seeded
from rebelrl.train.config import TrainConfig
from rebelrl.train.distributed import ONE_PROCESS, Processes, check_shares, combine_metrics
from rebelrl.train.optim import make_schedule
from rebelrl.types import Conversation, PairBatch, Rollout, TokenBatch
from tests.tiny_run import PROMPTS, REFUEL_ARGS, RULE_MODULE, TINY_ARGS, read_jsonl, setup_task, strip_timings

TRAIN_PROMPTS = [Conversation.from_prompt(p) for p in PROMPTS[:8]]
EVAL_PROMPTS = [Conversation.from_prompt(p) for p in PROMPTS[8:14]]
SAMPLING = SamplingParams(temperature=0.7, max_new_tokens=6)


def lowercase(conversations) -> list[float]:
    return [sum(ch.islower() for ch in c.last_assistant) / max(len(c.last_assistant), 1) for c in conversations]


# --- processes started by a test ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(worker, *args, timeout: float = 300) -> None:
    """``worker(rank, port, *args)`` in two fresh processes joined over gloo on 127.0.0.1; raises if
    either fails, and ends both if they outlive ``timeout``."""
    context = mp.start_processes(worker, args=(_free_port(), *args), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):  # raises if a process failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.__name__} did not finish within {timeout} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.terminate()
                p.join()


def _join(rank: int, port: int) -> Processes:
    """Make this process rank ``rank`` of two (what a launcher's environment says) and start accelerate."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)  # as the one-process reference runs: the same arithmetic
    return Processes.start()


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- one update, two processes vs one -------------------------------------------------------------------


def _bare_run(processes: Processes, eval_prompts=()) -> Run:
    """A ``Run`` holding what one update and one evaluation need: a tiny policy, its reference, and
    plain SGD without clipping, so that the step is the averaged gradient itself (AdamW divides each
    gradient entry by its own magnitude, which turns last-bit differences of entries near 0 into
    differences of the step)."""
    cfg = TrainConfig()
    cfg.update.epochs, cfg.update.minibatch_size, cfg.update.micro_batch_size = 1, 8, 2  # one step on all 8 pairs
    cfg.rebel.eta, cfg.rebel.kl_coef, cfg.optim.lr, cfg.optim.max_grad_norm = 1.0, 0.0, 1e-2, 0.0
    tokenizer = tiny_tokenizer()
    policy, ref = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.optim.lr)
    wrapped, optimizer = processes.prepare(policy, optimizer)
    return Run(
        cfg=cfg, run_dir=Path("."), task=SimpleNamespace(eval=list(eval_prompts), env=None), reward_fn=lowercase, reward_name="lowercase",
        tokenizer=tokenizer, policy=policy, ref=ref, generator=HFGenerator(policy, tokenizer), optimizer=optimizer,
        scheduler=make_schedule(getattr(optimizer, "optimizer", optimizer), "constant", 10), sampling=SAMPLING, eval_sampling=SAMPLING,
        processes=processes, wrapped_policy=wrapped if wrapped is not policy else None,
    )


def _one_update(processes: Processes, average: bool = True) -> dict:
    """One REBEL step on the same 8 pairs in every process (sampled under one seed: the global batch),
    each process training on its share of them. ``average=False`` keeps every backward local."""
    run = _bare_run(processes)
    with seeded(0):
        rollout = run.generator.generate(TRAIN_PROMPTS, 2, SAMPLING)  # (16,) the same rows in every process
    scores = torch.tensor(lowercase(rollout.conversations))
    batch = rebel.assemble(run, rollout, scores, rebel.make_pairs(scores, 2, "best_worst"))  # (8, 2)
    share = slice(*(processes.rank * 8 // processes.count, (processes.rank + 1) * 8 // processes.count))
    p = batch.pairs
    batch.pairs = PairBatch(p.index[share], p.rewards[share], p.scores[share], p.old_logps[share], p.ref_logps[share], p.lengths[share])
    with run.learner.no_sync() if not average else nullcontext():
        metrics = rebel.update(run, batch)
    metrics = processes.combine(metrics, rows=2 * len(batch.pairs), tokens=int(rollout.completion_mask[batch.pairs.index].sum()))
    return {"weights": {k: v.detach().clone() for k, v in run.policy.state_dict().items()}, "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"]}


def _rollout_rows(rollout: Rollout, rows: torch.Tensor) -> Rollout:
    picked = {f.name: getattr(rollout, f.name)[rows] for f in fields(Rollout) if isinstance(getattr(rollout, f.name), torch.Tensor)}
    return Rollout(**{**{f.name: getattr(rollout, f.name) for f in fields(Rollout)}, **picked,
                      "conversations": [rollout.conversations[i] for i in rows.tolist()]})


def _one_token_mean_update(processes: Processes) -> dict:
    """One DAPO step (GRPO's loss with the token mean) on the same 8 completions in every process,
    advantages taken over all 8; process r trains on its share of them, the 4 shortest on process 0
    and the 4 longest on process 1, so the two hold different numbers of tokens."""
    run = _bare_run(processes)
    run.cfg.algo, run.cfg.grpo.aggregation = "grpo", "token_mean"
    method = pg.METHODS["grpo"]
    with seeded(3):
        rollout = run.generator.generate(TRAIN_PROMPTS[:4], 2, SAMPLING)  # (8,)
    collected = pg.assemble(run, rollout, torch.tensor(lowercase(rollout.conversations)), method)
    by_length = rollout.completion_lengths.argsort(stable=True)
    share = by_length[processes.rank * 8 // processes.count : (processes.rank + 1) * 8 // processes.count]
    b = collected.batch
    collected.rollout = _rollout_rows(rollout, share)
    collected.batch = TokenBatch(b.old_logps[share], b.ref_logps[share], b.advantages[share])
    pg.update(run, collected, method)
    return {"weights": {k: v.detach().clone() for k, v in run.policy.state_dict().items()},
            "tokens": int(rollout.completion_mask[share].sum())}


def _shared_eval(processes: Processes) -> dict:
    run = _bare_run(processes, EVAL_PROMPTS)
    rows = run._shared_eval(lambda prompts, seed: eval_rows(run.generator, run.ref, prompts, lowercase, SAMPLING, seed, None))
    return {"metrics": eval_metrics(rows, SAMPLING), "completions": [r["completion"] for r in rows]}


def _update_worker(rank: int, port: int, out: str) -> None:
    processes = _join(rank, port)
    result = {"averaged": _one_update(processes), "local": _one_update(processes, average=False), "eval": _shared_eval(processes),
              "token_mean": _one_token_mean_update(processes)}
    torch.save(result, Path(out) / f"rank{rank}.pt")


def test_two_processes_make_the_one_process_update_and_evaluation(tmp_path, one_thread):
    """Two processes, four pairs each, micro-batches of two (one local accumulation, then the
    all-reduce): the weights after the step equal one process's step on all eight pairs within 1e-6,
    and so do the combined loss and gradient norm (within 2e-5). Without averaging (every backward under no_sync)
    each process steps on its own four pairs: the weights then differ from the one-process step by
    up to ~1e-2 (lr 1e-2 times gradient entries of order 1), which shows the comparison can fail. The held-out evaluation of 6 prompts in two parts of 3 (seeds 1234
    and 1235), one part per process, equals one process evaluating the same two parts."""
    _spawn(_update_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    one = _one_update(ONE_PROCESS)

    for result in ranks:
        for key, expected in one["weights"].items():
            torch.testing.assert_close(result["averaged"]["weights"][key], expected, atol=1e-6, rtol=0)
        # Each process's micro-batches cut their own padding, so log-probs move by float32 rounding
        # (~1e-7) and the squared regression error by a few parts in a million.
        assert result["averaged"]["loss"] == pytest.approx(one["loss"], rel=2e-5)
        assert result["averaged"]["grad_norm"] == pytest.approx(one["grad_norm"], rel=2e-5)
    local_gap = max((ranks[0]["local"]["weights"][k] - one["weights"][k]).abs().max().item() for k in one["weights"])
    assert local_gap > 1e-4, f"the test cannot tell averaged gradients from local ones ({local_gap:.2g})"

    # DAPO's token mean over processes holding 9 and 16 tokens (say): each token weighs 1 / all tokens,
    # as in one process, not 1 / (2 x its own process's tokens).
    one_dapo = _one_token_mean_update(ONE_PROCESS)
    assert ranks[0]["token_mean"]["tokens"] != ranks[1]["token_mean"]["tokens"], "the shares must differ in tokens"
    for result in ranks:
        for key, expected in one_dapo["weights"].items():
            torch.testing.assert_close(result["token_mean"]["weights"][key], expected, atol=1e-6, rtol=0)

    run = _bare_run(ONE_PROCESS, EVAL_PROMPTS)
    rows = [row for c in (0, 1) for row in eval_rows(run.generator, run.ref, EVAL_PROMPTS[3 * c : 3 * c + 3], lowercase, SAMPLING, 1234 + c, None)]
    for result in ranks:
        assert result["eval"]["completions"] == [r["completion"] for r in rows]
        assert result["eval"]["metrics"] == pytest.approx(eval_metrics(rows, SAMPLING), rel=1e-6)


# --- metrics ---------------------------------------------------------------------------------------------


def test_metrics_of_the_shares_combine_into_the_whole_batchs():
    """Process 0: scores [1, 2] (mean 1.5, sample std 0.7071), 10 completion tokens with dropped mass
    0.1 per token, 16 completions counted, 2 s of rollout. Process 1: scores [3, 5] (mean 4, std
    1.4142), 30 tokens at 0.4, 16 completions, 3 s. The whole batch [1, 2, 3, 5]: mean 2.75, sample
    variance ((1.75^2 + 0.75^2 + 0.25^2 + 2.25^2) / 3 = 8.75 / 3), std 1.70783; dropped mass per
    token (10 x 0.1 + 30 x 0.4) / 40 = 0.325; 32 completions; the slower process's 3 s; the largest
    log pi_t gap 0.02; a mean loss over equal shares (1 + 3) / 2 = 2."""
    shares = [
        ({"score_mean": 1.5, "score_std": math.sqrt(0.5), "sampler_dropped_mass": 0.1, "completions": 16, "time/rollout": 2.0,
          "logp_mismatch_max": 0.01, "loss": 1.0}, 2, 10),
        ({"score_mean": 4.0, "score_std": math.sqrt(2.0), "sampler_dropped_mass": 0.4, "completions": 16, "time/rollout": 3.0,
          "logp_mismatch_max": 0.02, "loss": 3.0}, 2, 30),
    ]
    combined = combine_metrics(shares)
    assert combined == pytest.approx({"score_mean": 2.75, "score_std": math.sqrt(8.75 / 3), "sampler_dropped_mass": 0.325, "completions": 32,
                                      "time/rollout": 3.0, "logp_mismatch_max": 0.02, "loss": 2.0})
    assert combine_metrics(shares[:1]) == shares[0][0]  # one process: its own metrics, untouched
    # shares of unequal size weigh by their completions: (3 x 1 + 1 x 5) / 4
    assert combine_metrics([({"kl_to_ref": 1.0}, 3, 9), ({"kl_to_ref": 5.0}, 1, 3)])["kl_to_ref"] == pytest.approx(2.0)


def test_the_prompts_of_an_iteration_must_divide_among_the_processes(tmp_path, monkeypatch, capsys):
    cfg = TrainConfig()
    cfg.rollout.prompts_per_iter = 10
    with pytest.raises(ConfigError, match=r"^rollout.prompts_per_iter=10 must be a multiple of the 4 processes"):
        check_shares(cfg, 4)
    cfg.rollout.prompts_per_iter, cfg.update.minibatch_size, cfg.update.micro_batch_size = 8, 8, 8
    with pytest.raises(ConfigError, match=r"^update.micro_batch_size=8: DeepSpeed .* set update.micro_batch_size=4"):
        check_shares(cfg, 2, steps_in_backward=True)
    # through the CLI, before any process is started
    prompts = setup_task(tmp_path, monkeypatch)
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", f"run_dir={tmp_path / 'run'}", "--num_processes", "3"]) == 2
    assert "config error: rollout.prompts_per_iter=8 must be a multiple of the 3 processes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# --- resume, and REFUEL through the launcher -----------------------------------------------------------------


def _resume_worker(rank: int, port: int, root: str) -> None:
    """The uninterrupted run, then a run killed after iteration 3 (both processes, as Ctrl-C would),
    then its resume: in the same two processes."""
    _join(rank, port)
    sys.path.insert(0, root)
    args = ["train", *TINY_ARGS, f"task.prompts={root}/prompts.jsonl", "iterations=4", "threads=1"]
    assert main([*args, f"run_dir={root}/full"]) == 0
    real = Run.end_iteration

    def end_then_die(self, iteration, metrics, rollout=None):
        real(self, iteration, metrics, rollout)
        if iteration == 3:
            raise KeyboardInterrupt

    Run.end_iteration = end_then_die
    assert main([*args, f"run_dir={root}/killed"]) == 130
    Run.end_iteration = real
    assert main([*args, f"run_dir={root}/killed", "--resume"]) == 0


def test_a_two_process_run_resumes_to_the_uninterrupted_run(tmp_path):
    (tmp_path / "tiny_rules.py").write_text(RULE_MODULE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    _spawn(_resume_worker, str(tmp_path))
    full, killed = tmp_path / "full", tmp_path / "killed"
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert strip_timings(read_jsonl(killed / name)) == strip_timings(read_jsonl(full / name)), name
    assert len(read_jsonl(full / "metrics.jsonl")) == 4
    a = load_file(full / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.load(full / "checkpoints" / "iter-000004" / "trainer_state.pt", weights_only=True)
    first, second = state["rng_by_process"]
    assert not torch.equal(first["torch"], second["torch"]), "the processes drew from the same random stream"


def test_refuel_trains_through_the_launcher_in_two_processes(tmp_path, monkeypatch):
    setup_task(tmp_path, monkeypatch)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-m", "rebelrl.cli", "train", *REFUEL_ARGS, "iterations=2", "threads=1", f"run_dir={run}", "--num_processes", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (DistributedType.MULTI_CPU), each sampling 4 prompts an iteration with seed 0 + its rank" in result.stderr
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [1, 2]
    assert all(math.isfinite(m["loss"]) and math.isfinite(m["branch_turn_mean"]) for m in metrics)
    evals = read_jsonl(run / "eval.jsonl")
    assert [e["n_prompts"] for e in evals] == [6, 6] and "win_rate_turn_3" in evals[-1]
    initial = tiny_model(tiny_tokenizer(), seed=0).state_dict()
    trained = load_file(run / "checkpoints" / "iter-000002" / "model" / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in trained)


# --- FSDP2 on CPU processes ----------------------------------------------------------------------------------

STOPPING_REWARD = '''
import os

_training_calls = 0


def lowercase_until_told(conversations):
    """lowercase_fraction; raises KeyboardInterrupt (Ctrl-C) at the TINY_STOP_AT-th training batch of a process."""
    global _training_calls
    if len(conversations) == 8:  # a process's share of a training batch (the held-out parts hold 3)
        _training_calls += 1
        if _training_calls == int(os.environ.get("TINY_STOP_AT", "0")):
            raise KeyboardInterrupt
    return lowercase_fraction(conversations)
'''


def _launch(tmp_path: Path, run: Path, *extra: str, fsdp: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """``rebelrl train`` on the tiny model in two CPU processes: FSDP through ``accelerate launch`` and the
    shipped ``configs/accelerate/fsdp.yaml``, or DDP through ``--num_processes 2``."""
    args = ["train", *[a for a in TINY_ARGS if not a.startswith("reward.fn")], "reward.fn=tiny_rules:lowercase_until_told",
            f"task.prompts={tmp_path / 'prompts.jsonl'}", "iterations=4", "threads=1", f"run_dir={run}", *extra]
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp.yaml"
    cmd = ([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "rebelrl.cli", *args] if fsdp
           else [sys.executable, "-m", "rebelrl.cli", *args, "--num_processes", "2"])
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=600)


def test_fsdp_on_two_cpu_processes_trains_as_ddp_and_resumes_to_the_uninterrupted_run(tmp_path):
    """The shipped FSDP config (FSDP2, fully_shard over gloo) on two CPU processes: each process holds
    half of every weight, gathers them once per generate call and trains on its share. Its first
    update gives DDP's loss and gradient norm on the same samples (rel. 1e-5: the same gradient
    reduced in another order), its run is DDP's within float rounding, and a run interrupted (Ctrl-C
    in both processes at iteration 3) and resumed from its iteration-2 checkpoint repeats the
    uninterrupted run: metrics, evaluations and final weights bit for bit."""
    (tmp_path / "tiny_rules.py").write_text(RULE_MODULE + STOPPING_REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    full, killed, ddp = tmp_path / "full", tmp_path / "killed", tmp_path / "ddp"
    result = _launch(tmp_path, full)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (DistributedType.FSDP)" in result.stderr
    result = _launch(tmp_path, ddp, fsdp=False)
    assert result.returncode == 0, result.stderr[-3000:]
    fsdp_rows, ddp_rows = read_jsonl(full / "metrics.jsonl"), read_jsonl(ddp / "metrics.jsonl")
    for key in ("loss", "grad_norm", "score_mean"):
        assert fsdp_rows[0][key] == pytest.approx(ddp_rows[0][key], rel=1e-5), key
    assert [r["loss"] for r in fsdp_rows] == pytest.approx([r["loss"] for r in ddp_rows], rel=1e-3)

    result = _launch(tmp_path, killed, env={"TINY_STOP_AT": "3"})
    assert result.returncode != 0 and (killed / "checkpoints" / "iter-000002").is_dir()
    assert not (killed / "checkpoints" / "iter-000004").exists()
    result = _launch(tmp_path, killed, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert strip_timings(read_jsonl(killed / name)) == strip_timings(read_jsonl(full / name)), name
    a = load_file(full / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the checkpoint is the whole model, as one process saves it: it loads into the plain model
    model = tiny_model(tiny_tokenizer())
    assert model.load_state_dict(a, strict=False).unexpected_keys == []
    assert a["model.embed_tokens.weight"].shape == model.model.embed_tokens.weight.shape


def _fsdp_generate_worker(rank: int, port: int, out: str) -> None:
    """FSDP2 as the FSDP config sets it up; inside ``full_weights`` process 0 runs three forward passes
    and process 1 one (as decoding rows that stop at different steps do), then both train a step."""
    os.environ.update(ACCELERATE_USE_FSDP="true", FSDP_VERSION="2", FSDP_AUTO_WRAP_POLICY="TRANSFORMER_BASED_WRAP",
                      FSDP_RESHARD_AFTER_FORWARD="true", FSDP_STATE_DICT_TYPE="FULL_STATE_DICT")
    processes = _join(rank, port)
    tokenizer = tiny_tokenizer()
    policy = tiny_model(tokenizer, seed=0)
    learner, optimizer = processes.prepare(policy, torch.optim.SGD(policy.parameters(), lr=1e-2))
    ids = torch.tensor([[5, 9, 12, 30, 41]])
    with torch.no_grad(), processes.full_weights(learner):
        logits = [policy(input_ids=ids).logits for _ in range(3 if rank == 0 else 1)]
    learner(input_ids=ids).logits.float().pow(2).mean().backward()
    optimizer.step()
    torch.save({"logits": logits[0], "sharded": processes.shards_weights}, Path(out) / f"rank{rank}.pt")


def test_fsdp_sampling_gathers_the_weights_once_whatever_the_forward_passes(tmp_path):
    """Without gathering the weights for the whole generate call, each forward pass would be a
    collective, and processes that decode different numbers of steps would wait on each other for
    ever (the test would time out); the gathered weights give the plain model's logits."""
    _spawn(_fsdp_generate_worker, str(tmp_path), timeout=120)
    plain = tiny_model(tiny_tokenizer(), seed=0)(input_ids=torch.tensor([[5, 9, 12, 30, 41]])).logits
    for rank in (0, 1):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert result["sharded"]
        torch.testing.assert_close(result["logits"], plain, atol=1e-6, rtol=0)


def test_two_machines_on_loopback_give_the_one_machine_run(tmp_path):
    """accelerate's multi-node launch, as a user past one box runs it (one launch per machine, each with
    its --machine_rank, both pointed at the main machine's address), here as two "machines" on
    127.0.0.1 with one process each: the run equals one launch of two processes with the same global
    batch (metrics, evaluations and weights bit for bit)."""
    (tmp_path / "tiny_rules.py").write_text(RULE_MODULE + STOPPING_REWARD)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    one = tmp_path / "one"
    result = _launch(tmp_path, one, fsdp=False)
    assert result.returncode == 0, result.stderr[-3000:]
    two = tmp_path / "two"
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "ddp.yaml"
    args = ["train", *[a for a in TINY_ARGS if not a.startswith("reward.fn")], "reward.fn=tiny_rules:lowercase_until_told",
            f"task.prompts={tmp_path / 'prompts.jsonl'}", "iterations=4", "threads=1", f"run_dir={two}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "OMP_NUM_THREADS": "1"}
    port = _free_port()
    machines = [subprocess.Popen([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_machines", "2",
                                  "--machine_rank", str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                                  "--main_process_port", str(port), "-m", "rebelrl.cli", *args],
                                 env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    try:
        errors = [m.communicate(timeout=600)[1] for m in machines]
    finally:
        for m in machines:
            if m.poll() is None:
                m.kill()
    assert [m.returncode for m in machines] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    assert "2 processes (DistributedType.MULTI_CPU)" in errors[0]
    for name in ("metrics.jsonl", "eval.jsonl"):
        assert strip_timings(read_jsonl(two / name)) == strip_timings(read_jsonl(one / name)), name
    a = load_file(one / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    b = load_file(two / "checkpoints" / "iter-000004" / "model" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
