"""What log pi_t costs and how exact each source is, on SmolLM2-135M-Instruct, per dtype.

For each dtype: sample 16 chitchat prompts x 2 replies (T = 0.7, at most 48 new tokens) with the HF
sampler, then compute the same replies' log-probs with the no-grad forward that training uses. It
reports the per-reply gap between the sampler's record and that forward (the bias the record would
put into the regression), the sampler time, and the cost of recomputing.

    python benchmarks/pi_t.py [--dtypes float32 bfloat16 float16] [--threads 2]

Run it alone: two jobs at once on 2 cores distort every timing.
"""

from __future__ import annotations

import argparse
import time

import torch

from rebelrl.envs import build_task
from rebelrl.logprobs import rollout_logprobs
from rebelrl.models import DEFAULT_MODEL, load_causal_lm, load_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.train.config import TaskConfig


def measure(dtype: str, prompts, repeats: int) -> dict:
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_causal_lm(DEFAULT_MODEL, dtype)
    generator = HFGenerator(model, tokenizer, batch_size=16)
    params = SamplingParams(temperature=0.7, max_new_tokens=48)
    rows = []
    for r in range(repeats):
        torch.manual_seed(r)
        t0 = time.perf_counter()
        rollout = generator.generate(prompts, 2, params)
        t1 = time.perf_counter()
        forward = rollout_logprobs(model, rollout, 0.7, batch_size=32).sum(1)
        t2 = time.perf_counter()
        gap = rollout.sample_logps.sum(1) - forward  # (N,) per reply
        rows.append((t1 - t0, t2 - t1, gap, rollout.completion_lengths.float().mean().item()))
    gaps = torch.cat([g for _, _, g, _ in rows])
    return {
        "dtype": dtype,
        "sample_s": sorted(r[0] for r in rows)[len(rows) // 2],
        "recompute_s": sorted(r[1] for r in rows)[len(rows) // 2],
        "gap_mean": gaps.mean().item(),
        "gap_abs_mean": gaps.abs().mean().item(),
        "gap_abs_max": gaps.abs().max().item(),
        "length": sum(r[3] for r in rows) / len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = build_task(TaskConfig(n_train=64)).train[:16]
    print("| dtype | sampling (s, median) | recompute forward (s, median) | sampler - forward, mean (nats/reply) | mean abs | max abs | mean reply (tokens) |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        m = measure(dtype, prompts, args.repeats)
        print(f"| {m['dtype']} | {m['sample_s']:.1f} | {m['recompute_s']:.2f} | {m['gap_mean']:+.2e} | {m['gap_abs_mean']:.2e} | "
              f"{m['gap_abs_max']:.2e} | {m['length']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
