"""Peak memory and time of the training log-prob pass: rebelrl against TRL's and the plain recipe.

Each method runs in its own process on the same model and batch (forward + backward of the summed
completion log-probs, as in a training step) and reports how far resident memory rises above its level
just before the step (the largest rise over the repeats), plus the median wall time.

    python benchmarks/logprobs.py                       # SmolLM2-135M-Instruct, 8 x (192 + 64) tokens
    python benchmarks/logprobs.py --batch 16 --prompt-len 448

Methods:
    rebelrl  ``rebelrl.logprobs.completion_logprobs``: only completion positions reach the output
             head (``logits_to_keep``), log-softmax row by row.
    trl      full-sequence logits, then TRL's ``selective_log_softmax`` on the completion slice
             (needs ``pip install trl``; skipped if absent).
    plain    full-sequence logits, ``log_softmax`` over the whole (B, L, V) tensor in float32, gather.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import threading
import time

METHODS = ("rebelrl", "trl", "plain")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRss:
    """Samples resident memory every millisecond in a thread: ru_maxrss cannot be reset, and the
    model load peaks higher than the step being measured."""

    def __enter__(self):
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())

    @property
    def rise(self) -> float:
        return self.peak - self.base


def run_one(method: str, args) -> dict:
    import torch

    from rebelrl.logprobs import completion_logprobs, position_ids_from_mask
    from rebelrl.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(args.model)
    V = model.config.vocab_size
    B, P, T = args.batch, args.prompt_len, args.completion_len
    prompt_ids = torch.randint(0, V, (B, P))
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[: B // 2, : P // 4] = 0  # half the rows left-padded
    completion_ids = torch.randint(0, V, (B, T))
    completion_mask = torch.ones(B, T, dtype=torch.long)

    def full_logits():
        ids = torch.cat([prompt_ids, completion_ids], 1)
        mask = torch.cat([prompt_mask, completion_mask], 1)
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), use_cache=False)
        return out.logits[:, P - 1 : -1] / args.temperature  # (B, T, V)

    if method == "rebelrl":
        def step():
            return completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask, args.temperature)
    elif method == "trl":
        from trl.trainer.utils import selective_log_softmax

        def step():
            return selective_log_softmax(full_logits(), completion_ids)
    else:
        def step():
            return torch.log_softmax(full_logits().float(), dim=-1).gather(-1, completion_ids[..., None]).squeeze(-1)

    times, rises, reference = [], [], None
    for _ in range(args.repeats):
        model.zero_grad(set_to_none=True)
        with PeakRss() as memory:
            t0 = time.perf_counter()
            logps = step()
            (logps * completion_mask).sum().backward()
            times.append(time.perf_counter() - t0)
        rises.append(memory.rise)
        reference = logps.detach()
        del logps
    return {
        "method": method,
        "peak_rss_rise_mb": max(rises),
        "median_s": statistics.median(times),
        "checksum": float(reference.sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=192)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args.method, args)))
        return
    rows = []
    for method in METHODS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"
            print(f"{method}: skipped ({reason})", file=sys.stderr)
            continue
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    print(f"model {args.model}, batch {args.batch} x ({args.prompt_len} prompt + {args.completion_len} completion) tokens, "
          f"forward + backward, median of {args.repeats}\n")
    print("| method | peak RSS rise (MB) | median time (s) | sum of log-probs |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['peak_rss_rise_mb']:.0f} | {r['median_s']:.2f} | {r['checksum']:.3f} |")


if __name__ == "__main__":
    main()
