"""A vLLM engine behind a small HTTP server on loopback, for ``rollout.backend=vllm``.

This file runs in the vLLM environment (``scripts/setup_vllm.sh`` makes ``.venv-vllm``), not in
rebelrl's: vLLM pins an older transformers than rebelrl needs, so the two talk over HTTP. It imports
only the standard library, torch, safetensors and vLLM, and rebelrl starts it as
``python -I vllm_server.py --model DIR --port P ...`` (``-I``: the folder of this file is not put on
the import path). The engine runs in this process; rebelrl stops it when a run ends, fails or is
interrupted, and it stops itself if the process that started it is gone (even killed outright).

    GET  /health     {"model", "dtype", "max_model_len", "peak_rss_mb"} once the engine is up
    POST /generate   {"requests": [{"prompt": [ids], "max_tokens", "min_tokens", "temperature", "top_p",
                      "top_k", "repetition_penalty", "stop", "seed"}, ...]}
                     -> {"outputs": [{"tokens": [ids], "logprobs": [floats]}, ...]} (a reply that stopped
                     ends with its stop token)
    POST /weights    {"path": "file.safetensors"}: load these weights (Hugging Face names) into the
                     engine, in place, and drop every cached prefix computed with the old ones
    POST /adapter    {"path": "folder"}: a PEFT LoRA adapter (--max-lora-rank): loaded now, in place of
                     the previous one, and applied to every later request
    POST /shutdown   stop
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def _load_weights(worker, path: str) -> int:
    """Runs on the engine's worker: copy the tensors of ``path`` into the model, by name."""
    from safetensors.torch import load_file

    weights = load_file(path)
    # In checkpoint format: vLLM re-runs what it did after the first load (fusing q/k/v, repacking for the CPU's kernels).
    runner = worker.model_runner
    runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
    model = runner.get_model()
    config = getattr(model, "config", None)
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if getattr(config, "tie_word_embeddings", False) and head is not None and embed is not None:
        # A tied output matrix is not in the checkpoint: the reload puts the old one back. Tie it to the new
        # embeddings again, and let its kernel redo what it derives from the weight (the CPU's packed copy).
        head.weight = embed.weight
        if hasattr(head, "quant_method") and hasattr(head.quant_method, "process_weights_after_loading"):
            head.quant_method.process_weights_after_loading(head)
    return len(weights)


def _lora_rank(rank: int) -> int:
    """The smallest rank vLLM's engine takes that holds an adapter of ``rank``."""
    return next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)


class Engine:
    def __init__(self, args):
        from vllm import LLM

        self.llm = LLM(
            args.model, dtype=args.dtype, seed=args.seed, generation_config="vllm",  # the checkpoint's sampling defaults never apply
            logprobs_mode="processed_logprobs",  # the log-probs of the distribution each token was drawn from
            enable_prefix_caching=True, max_model_len=args.max_model_len, gpu_memory_utilization=args.gpu_memory_utilization,
            skip_tokenizer_init=True,  # rebelrl sends token ids and reads token ids back: its tokenizer alone renders text
            enforce_eager=args.eager,
            **({"enable_lora": True, "max_lora_rank": _lora_rank(args.max_lora_rank), "max_loras": 1} if args.max_lora_rank else {}),
        )
        self.adapter = None  # the LoRARequest every request carries (rollout.vllm_lora=adapter)
        self.version = None  # the policy version loaded last (None: the checkpoint it started from)
        self.info = {"model": args.model, "dtype": str(self.llm.llm_engine.model_config.dtype).replace("torch.", ""),
                     "max_model_len": self.llm.llm_engine.model_config.max_model_len,
                     "eager": bool(self.llm.llm_engine.model_config.enforce_eager)}

    def generate(self, requests: list[dict]) -> list[dict]:
        from vllm import SamplingParams

        prompts, params = [], []
        for r in requests:
            prompts.append({"prompt_token_ids": r["prompt"]})
            params.append(SamplingParams(
                n=1, max_tokens=r["max_tokens"], min_tokens=r["min_tokens"], temperature=r["temperature"], top_p=r["top_p"],
                top_k=r["top_k"], repetition_penalty=r["repetition_penalty"], seed=r["seed"],
                # exactly the configured stop tokens: the model's EOS stops a reply only if it is one of them
                stop_token_ids=r["stop"], ignore_eos=True, logprobs=0, detokenize=False, skip_special_tokens=False,
            ))
        outputs = self.llm.generate(prompts, params, use_tqdm=False, lora_request=self.adapter)
        results = []
        for out in outputs:
            c = out.outputs[0]
            tokens = list(c.token_ids)
            logprobs = [step[token].logprob for step, token in zip(c.logprobs, tokens)]
            results.append({"tokens": tokens, "logprobs": logprobs})
        return results

    def load_adapter(self, path: str) -> None:
        from vllm.lora.request import LoRARequest

        # One adapter id, replaced in place: the engine keeps no old adapters around.
        self.adapter = LoRARequest("policy", 1, path, load_inplace=True)
        self.llm.llm_engine.add_lora(self.adapter)
        self.llm.reset_prefix_cache()

    def load(self, path: str) -> int:
        loaded = self.llm.collective_rpc(_load_weights, args=(path,))[0]
        self.llm.reset_prefix_cache()  # prefixes cached under the old weights must not be reused
        return loaded


def serve(args) -> None:
    engine = Engine(args)
    stop = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):  # requests are not logged; the engine logs its own progress
            pass

        def _reply(self, code: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                import resource

                self._reply(200, {**engine.info, "version": engine.version,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
            else:
                self._reply(404, {"error": f"no such endpoint: {self.path}"})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            try:
                if self.path == "/generate":
                    t = time.perf_counter()
                    outputs = engine.generate(body["requests"])
                    self._reply(200, {"outputs": outputs, "seconds": time.perf_counter() - t})
                elif self.path == "/weights":
                    t = time.perf_counter()
                    loaded = engine.load(body["path"])
                    engine.version = body.get("version")
                    self._reply(200, {"loaded": loaded, "seconds": time.perf_counter() - t})
                elif self.path == "/adapter":
                    t = time.perf_counter()
                    engine.load_adapter(body["path"])
                    engine.version = body.get("version")
                    self._reply(200, {"seconds": time.perf_counter() - t})
                elif self.path == "/shutdown":
                    self._reply(200, {})
                    stop.set()
                else:
                    self._reply(404, {"error": f"no such endpoint: {self.path}"})
            except Exception as e:  # the client shows it and stops the run
                self._reply(500, {"error": f"{type(e).__name__}: {e}"})

    server = HTTPServer((args.host, args.port), Handler)
    server.timeout = 0.5
    print(f"rebelrl vLLM server: ready on {args.host}:{args.port}", flush=True)
    while not stop.is_set():
        server.handle_request()
    server.server_close()


def _watch_parent(pid: int) -> None:
    """Stop this process (and whatever the engine started) once ``pid`` is gone."""
    while True:
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            if os.getpgrp() == os.getpid():  # started in a session of its own: whatever the engine started goes too
                os.killpg(os.getpgrp(), signal.SIGKILL)
            os._exit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--max-lora-rank", type=int, default=0, help="serve a LoRA adapter of at most this rank (0: none)")
    parser.add_argument("--eager", action="store_true", help="no compilation: a faster start, slower decoding")
    parser.add_argument("--parent", type=int, default=None, help="stop when this process is gone")
    args = parser.parse_args()
    if args.parent is not None:
        threading.Thread(target=_watch_parent, args=(args.parent,), daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args)


if __name__ == "__main__":
    main()
