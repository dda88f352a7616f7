"""Sampling completions from a policy behind one small protocol."""

from rebelrl.rollout.base import Generator, SamplingParams
from rebelrl.rollout.hf import HFGenerator, encode_prompts

__all__ = ["Generator", "SamplingParams", "HFGenerator", "encode_prompts"]
