"""``rollout.backend=vllm``: sampling by a vLLM engine that rebelrl starts, feeds and stops itself.

vLLM pins an older transformers than rebelrl needs, so its engine runs in its own environment
(``scripts/setup_vllm.sh`` makes ``.venv-vllm``) as a small server on loopback
(``rollout/vllm_server.py``), the layout TRL's ``vllm-serve`` has too. ``VLLMGenerator`` is a
``Generator`` like ``HFGenerator``:

- prompts go to the engine as the token ids rebelrl renders (message text never becomes control
  tokens), with the configured sampler mapped one to one (temperature, top-p, top-k, repetition
  penalty, min tokens), the turn terminator as the only stop token and a seed per reply drawn from
  torch's generator, so a run's samples follow its seed and a resumed run draws what the
  uninterrupted one would have;
- forced prefixes (dataset reset, a guide's roll-in) are appended to the prompt and the engine writes
  the rest;
- before sampling with weights the engine has not seen (after every optimizer step, and at the
  start), the policy's weights are written to a safetensors file beside the engine and loaded in
  place, LoRA merged; the engine is never restarted;
- the engine's log-probs are kept in ``sample_logps`` only to be compared: log pi_t is always
  recomputed by the trainer (``Run.old_token_logps``), which logs the per-reply gap.

Several training processes on one machine share one engine: the main process starts it and loads
the weights into it, tagged with the policy's version (its optimizer steps); the others attach to it
and, before sampling, wait until it serves the version they hold.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import PreTrainedTokenizerBase

from rebelrl.errors import UserError
from rebelrl.models import model_device
from rebelrl.rollout.base import SamplingParams
from rebelrl.rollout.chat import encode_prompt, stop_token_ids
from rebelrl.rollout.hf import _forced_mask, left_pad, truncate_at_eos
from rebelrl.types import Conversation, Rollout

SERVER = Path(__file__).with_name("vllm_server.py")
_RUNNING: list[VLLMServer] = []


class EngineError(UserError):
    """The vLLM engine could not start, or failed while serving."""


def find_vllm_python(configured: str | None) -> Path:
    """The Python of the environment vLLM is installed in: ``rollout.vllm_python``, else
    ``$REBELRL_VLLM_PYTHON``, else ``.venv-vllm`` in the working directory or beside rebelrl's sources."""
    candidates = [configured] if configured else [os.environ.get("REBELRL_VLLM_PYTHON"), ".venv-vllm/bin/python",
                                                  str(Path(__file__).resolve().parents[3] / ".venv-vllm" / "bin" / "python")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate).absolute()
    where = f"rollout.vllm_python={configured}" if configured else "no .venv-vllm here (nor $REBELRL_VLLM_PYTHON)"
    raise EngineError(f"rollout.backend=vllm: {where} is not a Python; run `bash scripts/setup_vllm.sh` to make "
                      "the vLLM environment, or set rollout.vllm_python to the python of one")


class VLLMServer:
    """A vLLM engine in its own process on loopback. ``start`` returns at once (the engine takes
    about 100 s to start on a 2-core CPU, the first time); ``wait`` blocks until it serves.
    ``attach`` reaches an engine another process of the run started (``process`` is then None)."""

    def __init__(self, process: subprocess.Popen | None, port: int, log: Path, timeout: float, weights_dir: Path | None):
        self.process, self.port, self.log, self.timeout, self.weights_dir = process, port, log, timeout, weights_dir
        self.info: dict | None = None
        self.started = time.monotonic()
        self.start_seconds: float | None = None  # from start to serving

    @classmethod
    def start(cls, python: Path, model: str, dtype: str, seed: int, log: Path, timeout: float = 900.0,
              memory: float | None = None, max_model_len: int | None = None, max_lora_rank: int = 0, eager: bool = False) -> VLLMServer:
        """``memory`` (``rollout.vllm_memory``): the KV cache in GiB on a CPU (None: 2), the share of the
        GPU's memory on a GPU (None: 0.3, the trainer shares it); ``eager`` (``rollout.vllm_eager``): no
        compilation nor graph capture."""
        port = _free_port()
        on_gpu = torch.cuda.is_available()
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # the engine in the server's own process
               "VLLM_NO_USAGE_STATS": "1", "VLLM_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
        if not on_gpu:
            env["VLLM_CPU_KVCACHE_SPACE"] = f"{memory or 2.0:g}"
        # On a CPU vLLM reads this share as the part of the machine's memory it checks is free at the start.
        gpu_memory_utilization = (memory or 0.3) if on_gpu else 0.3
        env.pop("PYTHONPATH", None)
        cmd = [str(python), "-I", str(SERVER), "--model", model, "--dtype", dtype, "--seed", str(seed), "--port", str(port),
               "--gpu-memory-utilization", f"{gpu_memory_utilization:g}", "--parent", str(os.getpid())]
        if max_model_len:
            cmd += ["--max-model-len", str(max_model_len)]
        if max_lora_rank:
            cmd += ["--max-lora-rank", str(max_lora_rank)]
        if eager:
            cmd.append("--eager")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        shm = Path("/dev/shm")
        weights_dir = Path(tempfile.mkdtemp(prefix="rebelrl-vllm-", dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
        server = cls(process, port, log, timeout, weights_dir)
        _RUNNING.append(server)
        return server

    @classmethod
    def attach(cls, port: int, log: Path, timeout: float = 900.0) -> VLLMServer:
        """The engine on ``port`` that the run's main process started and stops; this process only samples from it."""
        return cls(None, port, log, timeout, None)

    def exit_code(self) -> int | None:
        """The engine's exit code if this process started it and it has stopped, else None."""
        return self.process.poll() if self.process is not None else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def health(self, timeout: float = 10) -> dict:
        """The engine's ``/health`` answer: model, dtype, context length, the policy version it serves, peak memory."""
        return self._request("GET", "/health", timeout=timeout)

    def peak_rss_mb(self) -> float:
        """The engine process's peak resident memory so far (MB)."""
        return float(self.health()["peak_rss_mb"])

    def wait(self) -> dict:
        """Block until the engine serves; its ``/health`` answer (model, dtype, context length)."""
        if self.info is not None:
            return self.info
        deadline = time.monotonic() + self.timeout
        while True:
            code = self.exit_code()
            if code is not None:
                self.stop()
                raise EngineError(f"the vLLM engine stopped while starting (exit code {code}): {self._last_line()} (log: {self.log})")
            try:
                self.info = self._request("GET", "/health", timeout=5)
                self.start_seconds = time.monotonic() - self.started
                return self.info
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise EngineError(f"the vLLM engine did not start within rollout.vllm_start_timeout={self.timeout:g} s (log: {self.log})")
            time.sleep(0.5)

    def post(self, path: str, body: dict, timeout: float | None = None) -> dict:
        self.wait()
        try:
            return self._request("POST", path, body, timeout=timeout)
        except urllib.error.HTTPError as e:
            detail = json.loads(e.read() or b"{}").get("error", str(e))
            raise EngineError(f"the vLLM engine failed on {path}: {detail} (log: {self.log})") from None
        except (urllib.error.URLError, ConnectionError) as e:
            code = self.exit_code()
            raise EngineError(f"the vLLM engine is gone ({'exit code ' + str(code) if code is not None else e}): "
                              f"{self._last_line()} (log: {self.log})") from None

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def _last_line(self) -> str:
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        errors = [line for line in lines if "Error" in line or "error" in line]
        return (errors or lines or ["empty log"])[-1].strip()[-300:]

    def stop(self) -> None:
        """Stop the engine and everything it started; safe to call twice. An attached engine is left
        to the process that started it."""
        if self in _RUNNING:
            _RUNNING.remove(self)
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                self._request("POST", "/shutdown", {}, timeout=5)
                self.process.wait(timeout=20)
            except Exception:
                pass
        if self.process.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(self.process.pid, sig)
                    self.process.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        else:  # the server is gone; whatever it started in its group goes too
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.weights_dir, ignore_errors=True)


def stop_engines() -> None:
    """Stop every engine this process started (at exit)."""
    for server in list(_RUNNING):
        server.stop()


@contextlib.contextmanager
def engines_of_this_block():
    """Stop the engines started inside the block when it ends, fails or is interrupted (a run's), and no
    other: an engine the caller started before is the caller's."""
    before = list(_RUNNING)
    try:
        yield
    finally:
        for server in [s for s in _RUNNING if s not in before]:
            server.stop()


atexit.register(stop_engines)


def full_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full weights of a model whose processes each hold a shard of every weight (FSDP2's
    DTensors), gathered by every process in the same order (a collective: all of them call it); None
    where this process holds the full weights already."""
    from torch.distributed.tensor import DTensor

    state = model.state_dict()
    if not any(isinstance(v, DTensor) for v in state.values()):
        return None
    gathered: dict[int, torch.Tensor] = {}  # a tied weight is gathered once
    for value in state.values():
        if isinstance(value, DTensor) and id(value) not in gathered:
            gathered[id(value)] = value.full_tensor()
    return {key: gathered.get(id(value), value) for key, value in state.items()}


def engine_state_dict(policy: torch.nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The policy's weights under the names of its Hugging Face checkpoint, as the engine loads them:
    LoRA merged (W + the adapter's delta, computed out of place, so the trained weights are untouched),
    a tied output matrix once."""
    from peft import PeftModel

    if isinstance(policy, PeftModel):
        deltas = {}
        for name, module in policy.named_modules():
            if hasattr(module, "base_layer") and hasattr(module, "get_delta_weight") and module.active_adapters:
                deltas[name + ".base_layer.weight"] = sum(module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A)
        state = {}
        for key, value in policy.state_dict().items():
            if "lora_" in key:
                continue
            value = value + deltas[key].to(value.dtype) if key in deltas else value
            state[key.removeprefix("base_model.model.").replace(".base_layer.", ".")] = value
    else:
        state = dict(policy.state_dict()) if state is None else state
    seen, out = set(), {}
    for key, value in state.items():
        if value.data_ptr() in seen:  # tied weights: the engine ties them itself
            continue
        seen.add(value.data_ptr())
        out[key] = value.detach().to("cpu").contiguous()
    return out


class VLLMGenerator:
    """``Generator`` backed by a vLLM engine; ``model`` is the trained policy whose weights it serves."""

    def __init__(self, server: VLLMServer, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, batch_size: int = 32,
                 lora: str = "merged", loads: bool = True):
        """``lora``: how a LoRA policy reaches the engine: merged into the weights, or as an adapter
        the engine applies (it then serves the base weights it started with, which LoRA never changes).
        ``loads``: this process loads the policy into the engine (one process a run); False: it waits
        until the engine serves the policy's version, which another process loads."""
        self.server, self.model, self.tokenizer, self.batch_size, self.lora, self.loads = server, model, tokenizer, batch_size, lora, loads
        self.stop_ids = stop_token_ids(tokenizer, model)
        self.stale = True  # the engine starts from the checkpoint on disk: the policy's own weights go first
        self.version = 0  # the policy's: one more at every change (mark_stale), in every process alike
        self.sync_seconds: list[float] = []
        self._reported = 0  # sync_seconds already handed to take_sync_seconds

    def take_sync_seconds(self) -> float:
        """Seconds spent loading weights into the engine since the last call (an iteration's, whether
        its rollout or the evaluation before it paid them)."""
        seconds, self._reported = sum(self.sync_seconds[self._reported :]), len(self.sync_seconds)
        return seconds

    def mark_stale(self) -> None:
        """The policy changed (an optimizer step, a restored checkpoint): push it before the next sample."""
        self.stale = True
        self.version += 1

    def sync(self) -> float:
        """Load the policy's current weights into the engine (or wait until the process that loads them
        did); seconds taken."""
        t0 = time.perf_counter()
        state = full_state(self.model) if self.lora == "merged" else None  # sharded weights: every process gathers them
        if not self.loads:
            self._wait_for_version()
        elif self.lora == "adapter":
            # The engine reads the adapter's folder whenever it (re)loads it: each stays until the next replaces it.
            folder = self.server.weights_dir / f"adapter-{len(self.sync_seconds)}"
            self.model.save_pretrained(str(folder))  # PEFT: adapter_config.json and the adapter's weights
            self.server.post("/adapter", {"path": str(folder), "version": self.version})
            for old in self.server.weights_dir.glob("adapter-*"):
                if old != folder:
                    shutil.rmtree(old, ignore_errors=True)
        else:
            path = self.server.weights_dir / "policy.safetensors"
            save_file(engine_state_dict(self.model, state), str(path))
            try:
                self.server.post("/weights", {"path": str(path), "version": self.version})
            finally:
                path.unlink(missing_ok=True)
        self.stale = False
        self.sync_seconds.append(time.perf_counter() - t0)
        return self.sync_seconds[-1]

    def _wait_for_version(self) -> None:
        """Block until the engine serves this process's policy version. The main process loads it at
        its next sample; it cannot load a later one first, since every optimizer step waits for every
        process's gradients."""
        deadline = time.monotonic() + self.server.timeout
        while True:
            try:
                serving = self.server.health()["version"]
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):  # busy sampling for another process
                serving = None
            if serving == self.version:
                return
            if serving is not None and serving > self.version:
                raise EngineError(f"the vLLM engine serves the policy of version {serving}, this process holds version "
                                  f"{self.version}: the processes' optimizer steps disagree (log: {self.server.log})")
            if time.monotonic() > deadline:
                raise EngineError(f"the vLLM engine did not load the policy's version {self.version} within "
                                  f"rollout.vllm_start_timeout={self.server.timeout:g} s (log: {self.server.log})")
            time.sleep(0.02)

    @torch.no_grad()
    def generate(self, prompts: list[Conversation], n: int, params: SamplingParams, seeds: list[int] | None = None,
                 prefixes: list[list[int]] | None = None) -> Rollout:
        """As ``HFGenerator.generate``; ``seeds``: one a prompt, whose ``n`` replies take seeds derived from it.
        The engine is sent ``batch_size`` prompts (``rollout.batch_size``) a request."""
        for name, values in (("seeds", seeds), ("prefixes", prefixes)):
            if values is not None and len(values) != len(prompts):
                raise ValueError(f"{name}: one a prompt, got {len(values)} for {len(prompts)} prompts")
        if prefixes is not None and any(len(p) > params.max_new_tokens for p in prefixes):
            raise ValueError(f"a forced prefix is longer than the {params.max_new_tokens} tokens a reply may have")
        if self.stale:
            self.sync()
        device = model_device(self.model)
        N = len(prompts) * n
        # One seed a reply, from torch's generator (or the prompt's seed): the samples follow the run's seed and RNG state.
        if seeds is None:
            reply_seeds = torch.randint(0, 2**62, (N,), dtype=torch.int64).tolist()
        else:
            reply_seeds = [(int(s) * 1_000_003 + j) % 2**62 for s in seeds for j in range(n)]
        top_k = params.top_k if params.top_k > 0 else -1
        prompt_ids = [encode_prompt(self.tokenizer, p) for p in prompts]  # message text never becomes control tokens
        requests, rows = [], []
        for i, ids in enumerate(prompt_ids):
            prefix = list(prefixes[i]) if prefixes is not None else []
            whole = bool(prefix) and (prefix[-1] in self.stop_ids or len(prefix) >= params.max_new_tokens)
            for j in range(n):
                if whole:  # the prefix is the whole reply: nothing to sample
                    continue
                rows.append(i * n + j)
                requests.append({
                    "prompt": ids + prefix, "max_tokens": params.max_new_tokens - len(prefix),
                    "min_tokens": max(0, params.min_new_tokens - len(prefix)), "temperature": params.temperature,
                    "top_p": params.top_p, "top_k": top_k, "repetition_penalty": params.repetition_penalty,
                    "stop": self.stop_ids, "seed": reply_seeds[i * n + j],
                })
        per_call = self.batch_size * n
        outputs = [out for start in range(0, len(requests), per_call)
                   for out in self.server.post("/generate", {"requests": requests[start : start + per_call]})["outputs"]]
        tokens: list[list[int]] = [list(prefixes[r // n]) if prefixes is not None else [] for r in range(N)]
        logps: list[list[float]] = [[0.0] * len(t) for t in tokens]  # forced tokens: nothing was drawn
        for row, out in zip(rows, outputs):
            tokens[row] += out["tokens"]
            logps[row] += out["logprobs"]
        T = max(1, max(len(t) for t in tokens))
        pad = self.tokenizer.pad_token_id
        raw = torch.full((N, T), pad, dtype=torch.long)
        sample_logps = torch.zeros(N, T)
        for r in range(N):
            raw[r, : len(tokens[r])] = torch.tensor(tokens[r], dtype=torch.long)
            sample_logps[r, : len(logps[r])] = torch.tensor(logps[r], dtype=torch.float32)
        completion_ids, completion_mask, finished = truncate_at_eos(raw, self.stop_ids, pad)
        T = completion_ids.shape[1]
        texts = self.tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        ended = finished.tolist()
        prompt_ids, prompt_mask = left_pad(self.tokenizer, prompt_ids, device)
        return Rollout(
            conversations=[p.with_reply(texts[i * n + j], finished=ended[i * n + j]) for i, p in enumerate(prompts) for j in range(n)],
            prompt_ids=prompt_ids.repeat_interleave(n, dim=0),
            prompt_mask=prompt_mask.repeat_interleave(n, dim=0),
            completion_ids=completion_ids.to(device),
            completion_mask=completion_mask.to(device),
            finished=finished.to(device),
            sample_logps=(sample_logps[:, :T] * completion_mask).to(device),
            group_size=n,
            dropped_mass=None,  # the engine does not report what truncation removed
            forced=None if prefixes is None else _forced_mask(prefixes, n, T).to(device),
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


