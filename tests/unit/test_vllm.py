"""rollout.backend=vllm on vLLM's CPU build, in the environment ``scripts/setup_vllm.sh`` makes.

A tiny random Llama (head size 32, the smallest vLLM's CPU attention takes) is saved to a folder
that both the trainer and the engine load. Against rebelrl's own decoding loop on the same weights:

- greedy replies are the same tokens, with and without a forced prefix;
- the engine's log-probs of its samples are the trainer's log pi_t (float32, within 1e-3 nats a
  reply), also after the policy changed (the weights were really pushed: before the push they are
  far off), and with LoRA merged;
- the sampler is mapped exactly (seeds, top-k, min tokens, the stop token);
- REBEL and REFUEL train through the CLI, and every other online method (and a guide rolling out)
  samples on the engine; the engine is gone after a run ends, and after its trainer is killed outright;
- two training processes share one engine: the one that does not load the weights waits until the
  engine serves its policy's version.

Without the vLLM environment these tests skip, unless REBELRL_REQUIRE_VLLM=1 (CI), which makes
its absence a failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from rebelrl.cli import main
from rebelrl.logprobs import rollout_logprobs
from rebelrl.models import apply_lora, tiny_model_config, tiny_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.rollout.vllm_engine import EngineError, VLLMGenerator, VLLMServer, engine_state_dict, find_vllm_python
from rebelrl.types import Conversation
from tests.tiny_run import PROMPTS as TINY_PROMPTS
from tests.tiny_run import REFUEL_ARGS, RULE_MODULE, TINY_ARGS, read_jsonl, setup_task


def _vllm_python() -> Path | None:
    try:
        python = find_vllm_python(None)
    except EngineError:
        python = None
    if python is not None and subprocess.run([str(python), "-c", "import vllm"], capture_output=True).returncode == 0:
        return python
    if os.environ.get("REBELRL_REQUIRE_VLLM") == "1":
        pytest.fail("REBELRL_REQUIRE_VLLM=1 but there is no vLLM environment: run `bash scripts/setup_vllm.sh`")
    return None


@pytest.fixture(scope="module")
def vllm_python():
    python = _vllm_python()
    if python is None:
        pytest.skip("no vLLM environment (bash scripts/setup_vllm.sh)")
    return python


def _tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    tokenizer = tiny_tokenizer()
    config = tiny_model_config(tokenizer)
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 2, 1, 32  # head size 32
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    _tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(vllm_python, folder, tmp_path_factory):
    server = VLLMServer.start(vllm_python, str(folder), "float32", 0, tmp_path_factory.mktemp("engine") / "vllm.log")
    try:
        server.wait()
        yield server
    finally:
        server.stop()


PROMPTS = [Conversation.from_prompt(p) for p in ["say hello", "write", "a b c", "why?", "tell me more", "ok"]]


def _policy(folder: Path) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(folder).eval()


def _reply_gap(rollout, policy, temperature: float) -> torch.Tensor:
    """(N,) |sum of the engine's log-probs - sum of the trainer's| over each reply's drawn tokens."""
    trainer = rollout_logprobs(policy, rollout, temperature, 8)
    return ((rollout.sample_logps - trainer) * rollout.policy_mask).sum(1).abs()


def test_greedy_replies_are_the_hf_backends(engine, folder):
    policy, tokenizer = _policy(folder), tiny_tokenizer()
    vllm, hf = VLLMGenerator(engine, policy, tokenizer), HFGenerator(policy, tokenizer)
    greedy = SamplingParams(temperature=0, max_new_tokens=12)
    a, b = vllm.generate(PROMPTS, 1, greedy), hf.generate(PROMPTS, 1, greedy)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.finished, b.finished) and [c.last_assistant for c in a.conversations] == [c.last_assistant for c in b.conversations]
    # Forced prefixes (dataset reset): the engine continues from them as rebelrl's loop does.
    prefixes = [tokenizer.encode("ab", add_special_tokens=False), [], tokenizer.encode("x", add_special_tokens=False), [], [], []]
    a, b = vllm.generate(PROMPTS, 2, greedy, prefixes=prefixes), hf.generate(PROMPTS, 2, greedy, prefixes=prefixes)
    assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.forced, b.forced)
    assert a.completion_ids[0, :2].tolist() == prefixes[0]


def test_the_engines_log_probs_follow_the_policy_after_an_update(engine, folder):
    """Sampling at T = 0.7, the engine's log-probs of its own replies are the trainer's log pi_t within
    1e-3 nats a reply (float32; measured ~1e-5). After the policy's weights change, a stale engine is
    off by whole nats, and one that was pushed the weights matches again."""
    policy, tokenizer = _policy(folder), tiny_tokenizer()
    generator = VLLMGenerator(engine, policy, tokenizer)
    params = SamplingParams(temperature=0.7, max_new_tokens=12)
    before = generator.generate(PROMPTS, 2, params)
    assert _reply_gap(before, policy, 0.7).max() < 1e-3
    with torch.no_grad():  # an update: every weight moves
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    generator.stale = False  # as if nobody said the policy changed: the engine still holds the old weights
    stale = generator.generate(PROMPTS, 2, params)
    assert _reply_gap(stale, policy, 0.7).max() > 0.1
    generator.mark_stale()
    fresh = generator.generate(PROMPTS, 2, params)
    assert _reply_gap(fresh, policy, 0.7).max() < 1e-3
    assert generator.sync_seconds and not generator.stale


def test_lora_is_merged_into_the_engines_weights(engine, folder):
    policy = apply_lora(_policy(folder), 4, 8, 0.0, "all-linear")
    with torch.no_grad():  # a trained adapter: B is no longer 0
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.3)
    base = {k: v.clone() for k, v in policy.state_dict().items()}
    state = engine_state_dict(policy)
    assert not any("lora_" in k or "base_layer" in k for k in state)
    assert all(torch.equal(v, policy.state_dict()[k]) for k, v in base.items()), "merging must leave the trained weights as they were"
    generator = VLLMGenerator(engine, policy, tiny_tokenizer())
    rollout = generator.generate(PROMPTS, 2, SamplingParams(temperature=0.7, max_new_tokens=12))
    assert _reply_gap(rollout, policy, 0.7).max() < 1e-3


def test_the_sampler_is_mapped_exactly(engine, folder):
    policy, tokenizer = _policy(folder), tiny_tokenizer()
    generator = VLLMGenerator(engine, policy, tokenizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=10)
    # The same seeds give the same replies; the global stream gives a run its own.
    a = generator.generate(PROMPTS, 2, params, seeds=[7] * len(PROMPTS))
    b = generator.generate(PROMPTS, 2, params, seeds=[7] * len(PROMPTS))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids[0], a.completion_ids[1]), "a prompt's replies take seeds of their own"
    # top-k = 1 is greedy
    top1 = generator.generate(PROMPTS, 1, SamplingParams(temperature=1.0, top_k=1, max_new_tokens=10))
    greedy = generator.generate(PROMPTS, 1, SamplingParams(temperature=0, max_new_tokens=10))
    assert torch.equal(top1.completion_ids, greedy.completion_ids)
    # min_new_tokens: the stop token is masked until then; a stop token ends a reply and is kept.
    stop = generator.stop_ids[0]
    long = generator.generate(PROMPTS, 4, SamplingParams(temperature=1.0, max_new_tokens=10, min_new_tokens=10))
    assert (long.completion_mask.sum(1) == 10).all() and not (long.completion_ids[:, :9] == stop).any()
    free = generator.generate(PROMPTS * 4, 4, SamplingParams(temperature=2.0, max_new_tokens=40))
    ended = free.finished.nonzero().squeeze(1)
    assert len(ended) > 0, "some reply should end at temperature 2 within 40 tokens"
    for row in ended.tolist():
        length = int(free.completion_mask[row].sum())
        assert free.completion_ids[row, length - 1] == stop and (free.completion_ids[row, : length - 1] != stop).all()


def _engine_processes(parent: int) -> list[int]:
    """Pids of engine servers whose parent (the ``--parent`` they watch) is ``parent``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(part.endswith(b"vllm_server.py") for part in cmd) and f"{parent}".encode() in cmd:
                found.append(int(entry.name))
    return found


def _vllm_args(folder: Path) -> list[str]:
    return [f"model.name={folder}", "rollout.backend=vllm", "threads=1"]


def test_rebel_trains_through_the_cli_on_the_engine(vllm_python, folder, tmp_path, monkeypatch, capsys):
    prompts = setup_task(tmp_path, monkeypatch)
    run = tmp_path / "run"
    before = set(_engine_processes(os.getpid()))  # engines of other tests in this process (the module's) are theirs
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", *_vllm_args(folder), "iterations=3", f"run_dir={run}"]) == 0
    err = capsys.readouterr().err
    assert "rebelrl: sampling with vLLM (float32, compiled" in err
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 3
    for row in metrics:
        assert row["old_logps_recomputed"] == 1.0 and row["vllm/logp_gap_max"] < 1e-3 and row["time/vllm_sync"] > 0
        assert "sampler_dropped_mass" not in row  # the engine does not say: nothing is made up
    assert (run / "vllm.log").exists() and not set(_engine_processes(os.getpid())) - before


def test_refuel_trains_through_the_cli_on_the_engine(vllm_python, folder, tmp_path, monkeypatch):
    setup_task(tmp_path, monkeypatch)
    run = tmp_path / "run"
    before = set(_engine_processes(os.getpid()))
    assert main(["train", *REFUEL_ARGS, *_vllm_args(folder), "iterations=2", "eval.every=2", "checkpoint.every=2", f"run_dir={run}"]) == 0
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 2 and all(row["vllm/logp_gap_max"] < 1e-3 for row in metrics)
    assert json.loads((run / "eval.jsonl").read_text().splitlines()[-1])["iteration"] == 2
    assert not set(_engine_processes(os.getpid())) - before


def test_the_engine_is_gone_after_its_trainer_is_killed(vllm_python, folder, tmp_path, monkeypatch):
    setup_task(tmp_path, monkeypatch)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    trainer = subprocess.Popen([sys.executable, "-m", "rebelrl.cli", "train", *TINY_ARGS, f"task.prompts={tmp_path / 'prompts.jsonl'}",
                                *_vllm_args(folder), "iterations=50", f"run_dir={run}"],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not (run / "metrics.jsonl").exists():  # the engine has served a rollout
            assert trainer.poll() is None and time.monotonic() < deadline, "the run ended before its first iteration"
            time.sleep(0.5)
        engines = _engine_processes(trainer.pid)
        assert len(engines) == 1
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 30
        while Path(f"/proc/{engines[0]}").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not Path(f"/proc/{engines[0]}").exists() or b"Z" in Path(f"/proc/{engines[0]}/stat").read_bytes().split()[2]
    finally:
        if trainer.poll() is None:
            trainer.kill()
        for pid in _engine_processes(trainer.pid):
            os.kill(pid, signal.SIGKILL)


# --- without vLLM: the errors a user meets first -------------------------------------------------------


def test_a_missing_vllm_environment_is_one_line_before_the_run_dir_is_claimed(tmp_path, monkeypatch, capsys, folder):
    prompts = setup_task(tmp_path, monkeypatch)
    monkeypatch.delenv("REBELRL_VLLM_PYTHON", raising=False)
    run = tmp_path / "run"
    args = ["train", *TINY_ARGS, f"task.prompts={prompts}", f"model.name={folder}", "rollout.backend=vllm", f"run_dir={run}",
            f"rollout.vllm_python={tmp_path / 'nowhere' / 'python'}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "rollout.vllm_python=" in err and "scripts/setup_vllm.sh" in err
    assert not run.exists()


def test_an_engine_that_cannot_start_says_why_and_leaves_nothing_running(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'RuntimeError: no CPU backend for this model' >&2\nexit 3\n")
    fake.chmod(0o755)
    server = VLLMServer.start(fake, str(tmp_path), "float32", 0, tmp_path / "vllm.log", timeout=60)
    with pytest.raises(EngineError, match=r"stopped while starting \(exit code 3\): RuntimeError: no CPU backend"):
        server.wait()
    assert server.process.poll() is not None


def test_settings_of_the_engine_are_refused_without_it(tmp_path, monkeypatch, capsys):
    prompts = setup_task(tmp_path, monkeypatch)
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", "rollout.vllm_dtype=bfloat16", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "rollout.vllm_dtype=bfloat16 is read only with rollout.backend=vllm" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", "rollout.vllm_eager=true", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "rollout.vllm_eager=True is read only with rollout.backend=vllm" in capsys.readouterr().err
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", "rollout.backend=vllm", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "model.name=tiny-random" in capsys.readouterr().err


def test_lora_as_an_adapter_the_engine_applies(vllm_python, folder, tmp_path):
    """rollout.vllm_lora=adapter: the engine serves the base weights it started with and applies the
    policy's adapter, reloaded after an update; its log-probs are the LoRA policy's."""
    server = VLLMServer.start(vllm_python, str(folder), "float32", 0, tmp_path / "vllm.log", max_lora_rank=4)
    try:
        policy = apply_lora(_policy(folder), 4, 8, 0.0, "all-linear")
        generator = VLLMGenerator(server, policy, tiny_tokenizer(), lora="adapter")
        params = SamplingParams(temperature=0.7, max_new_tokens=12)
        for _ in range(2):  # an adapter, then the adapter after an update
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    if "lora_" in name:
                        p.add_(torch.randn_like(p) * 0.3)
            generator.mark_stale()
            rollout = generator.generate(PROMPTS, 2, params)
            assert _reply_gap(rollout, policy, 0.7).max() < 1e-3
    finally:
        server.stop()


OTHER_ALGOS = {
    "online_dpo": ["algo=online_dpo", "rollout.samples_per_prompt=4"],
    "rloo": ["algo=rloo", "rollout.samples_per_prompt=4"],
    "grpo": ["algo=grpo", "rollout.samples_per_prompt=4"],
    "ppo": ["algo=ppo"],
    "astar_po": ["algo=astar_po", "astar.ref_samples=2"],
    "ppo_guide_rollout": ["algo=ppo", "guide.mode=rollout", "guide.prob=1.0"],
}
EAGER = {"rloo", "ppo"}  # these start the engine without compiling it (rollout.vllm_eager)


@pytest.mark.parametrize("algo", OTHER_ALGOS)
def test_every_online_method_samples_on_the_engine(algo, vllm_python, folder, tmp_path, monkeypatch, capsys):
    """One iteration of each other online method through the CLI with the engine sampling: log pi_t is
    the trainer's, and the engine's replies are its policy's (the gap stays float rounding), compiled or
    eager."""
    prompts = setup_task(tmp_path, monkeypatch)
    run = tmp_path / "run"
    eager = ["rollout.vllm_eager=true"] if algo in EAGER else []
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", *_vllm_args(folder), *OTHER_ALGOS[algo], *eager, "iterations=1",
                 f"run_dir={run}"]) == 0
    assert f"rebelrl: sampling with vLLM (float32, {'eager' if eager else 'compiled'}," in capsys.readouterr().err
    assert f"enforce_eager={bool(eager)}" in (run / "vllm.log").read_text()  # vLLM's own account of its settings
    (row,) = read_jsonl(run / "metrics.jsonl")
    assert row["old_logps_recomputed"] == 1.0 and row["vllm/logp_gap_max"] < 1e-3


def test_log_pi_t_settings_that_the_engine_would_ignore_are_refused(tmp_path, monkeypatch, capsys, folder):
    prompts = setup_task(tmp_path, monkeypatch)
    base = ["train", *TINY_ARGS, f"task.prompts={prompts}", f"model.name={folder}", f"run_dir={tmp_path / 'run'}"]
    assert main([*base, "rollout.backend=vllm", "rollout.old_logprobs=sampler"]) == 2
    assert "rollout.old_logprobs=sampler with rollout.backend=vllm" in capsys.readouterr().err
    assert main([*base, "rollout.backend=vllm", "rollout.logprob_tolerance=0.01"]) == 2
    assert "rollout.logprob_tolerance=0.01 decides when" in capsys.readouterr().err
    assert main([*base, "rollout.old_logprobs=recompute", "rollout.logprob_tolerance=0.01"]) == 2
    assert "with rollout.old_logprobs=recompute they never are" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_rollout_batch_size_bounds_the_prompts_of_a_request(engine, folder):
    """rollout.batch_size is the most prompts a request to the engine holds, as it is the most a
    decoding batch of rebelrl's loop holds; the replies do not depend on it (greedy)."""
    policy, tokenizer = _policy(folder), tiny_tokenizer()
    greedy = SamplingParams(temperature=0, max_new_tokens=8)
    whole = VLLMGenerator(engine, policy, tokenizer, batch_size=32).generate(PROMPTS, 2, greedy)
    small = VLLMGenerator(engine, policy, tokenizer, batch_size=2)
    sizes, post = [], engine.post

    def counted(path, body, **kw):
        if path == "/generate":
            sizes.append(len(body["requests"]))
        return post(path, body, **kw)

    small.server = type("Counting", (), {"post": staticmethod(counted), "weights_dir": engine.weights_dir})()
    assert torch.equal(small.generate(PROMPTS, 2, greedy).completion_ids, whole.completion_ids)
    assert sizes == [4, 4, 4]  # 6 prompts x 2 replies, 2 prompts a request


def test_a_run_stops_its_own_engine_and_no_other(engine, folder, tmp_path, monkeypatch):
    """An engine started before a run (a notebook's, another run's in the same process) keeps serving
    after the run ends; the run's own is gone."""
    prompts = setup_task(tmp_path, monkeypatch)
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", *_vllm_args(folder), "iterations=1", f"run_dir={tmp_path / 'run'}"]) == 0
    assert engine.process.poll() is None and engine.weights_dir.is_dir()
    assert _engine_processes(os.getpid()) == [engine.process.pid]


def test_a_process_that_does_not_load_waits_for_the_policy_version_it_holds(engine, folder):
    """Two generators on one engine, as two training processes share it: the one that does not load
    waits until the engine serves its version of the policy, and samples from it (log-probs within
    1e-3 of its trainer's); an engine ahead of it is an error, not a silent off-policy sample."""
    import threading

    policy, other, tokenizer = _policy(folder), _policy(folder), tiny_tokenizer()
    main_process = VLLMGenerator(engine, policy, tokenizer)
    waiting = VLLMGenerator(engine, other, tokenizer, loads=False)
    params = SamplingParams(temperature=0.7, max_new_tokens=12)
    main_process.generate(PROMPTS, 1, params)  # version 0: the policy's own weights
    assert _reply_gap(waiting.generate(PROMPTS, 1, params), other, 0.7).max() < 1e-3
    with torch.no_grad():  # the same step in both processes
        for p, q in zip(policy.parameters(), other.parameters()):
            noise = torch.randn_like(p) * 0.05
            p.add_(noise), q.add_(noise)
    main_process.mark_stale(), waiting.mark_stale()
    box = {}
    thread = threading.Thread(target=lambda: box.update(rollout=waiting.generate(PROMPTS, 1, params)))
    thread.start()
    time.sleep(1.0)
    assert thread.is_alive()  # the engine still serves version 0
    main_process.generate(PROMPTS, 1, params)  # loads version 1
    thread.join(timeout=60)
    assert not thread.is_alive() and _reply_gap(box["rollout"], other, 0.7).max() < 1e-3
    main_process.mark_stale(), main_process.generate(PROMPTS, 1, params)  # the engine at version 2, this process at 1
    waiting.stale = True
    with pytest.raises(EngineError, match="serves the policy of version 2, this process holds version 1"):
        waiting.generate(PROMPTS, 1, params)


@pytest.mark.parametrize("layout", ["ddp", "fsdp", "ddp_lora_adapter"])
def test_two_training_processes_share_one_engine(layout, vllm_python, folder, tmp_path):
    """REBEL in two processes (DDP through --num_processes 2, FSDP2 through accelerate launch and the
    shipped config, DDP training a LoRA the engine applies as an adapter) with the engine sampling:
    the main process starts one engine, the other attaches to it; every reply of both is its
    policy's after every update."""
    (tmp_path / "tiny_rules.py").write_text(RULE_MODULE)
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TINY_PROMPTS))
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path]), "OMP_NUM_THREADS": "1"}
    lora = ["model.lora_r=4", "optim.lr=1e-3", "rollout.vllm_lora=adapter"] if layout == "ddp_lora_adapter" else []
    args = ["train", *TINY_ARGS, f"task.prompts={tmp_path / 'prompts.jsonl'}", *_vllm_args(folder), "rollout.vllm_eager=true",
            *lora, "iterations=3", f"run_dir={run}"]
    config = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp.yaml"
    cmd = ([sys.executable, "-m", "rebelrl.cli", *args, "--num_processes", "2"] if layout != "fsdp" else
           [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--main_process_port", str(_free_port()), "-m", "rebelrl.cli", *args])
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "vllm.log").read_text().count("rebelrl vLLM server: ready on") == 1  # one engine for both
    metrics = read_jsonl(run / "metrics.jsonl")
    assert len(metrics) == 3
    for row in metrics:  # vllm/logp_gap_max is the largest over both processes' replies
        assert row["old_logps_recomputed"] == 1.0 and row["vllm/logp_gap_max"] < 1e-3 and row["completions"] == 16


def test_processes_on_several_machines_are_refused_with_the_engine(tmp_path, monkeypatch, capsys, folder):
    from rebelrl.train.distributed import Processes

    accelerator = type("Accelerator", (), {"num_processes": 4, "process_index": 0})()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert not Processes(accelerator).on_one_machine
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert Processes(accelerator).on_one_machine
    prompts = setup_task(tmp_path, monkeypatch)
    monkeypatch.setattr(Processes, "on_one_machine", property(lambda self: False))
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", *_vllm_args(folder), f"run_dir={tmp_path / 'run'}"]) == 2
    assert "rollout.backend=vllm: the engine serves the processes of one machine" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before the run directory was claimed


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lora_on_sharded_weights_is_refused_with_the_engine(tmp_path, monkeypatch, capsys, folder):
    from rebelrl.train.distributed import Processes

    prompts = setup_task(tmp_path, monkeypatch)
    monkeypatch.setattr(Processes, "shards_weights", property(lambda self: True))
    assert main(["train", *TINY_ARGS, f"task.prompts={prompts}", *_vllm_args(folder), "model.lora_r=4", f"run_dir={tmp_path / 'run'}"]) == 2
    assert "model.lora_r > 0 and sharded weights (FSDP, ZeRO-3)" in capsys.readouterr().err
