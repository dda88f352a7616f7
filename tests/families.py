"""Tiny randomly initialised models of the families whose chat formats differ, saved as folders so
that runs load them the way a user's model is loaded (``model.name=/path``).

| family | architecture | turn terminator | EOS | chat template |
|---|---|---|---|---|
| chatml | Llama (SmolLM2, Qwen2) | ``<|im_end|>`` | ``<|im_end|>`` | ChatML |
| llama3 | Llama | ``<|eot_id|>`` | ``<|end_of_text|>`` | Llama-3 headers |
| gemma | Gemma | ``<end_of_turn>`` | ``<eos>`` | Gemma turns |
| neox | GPT-NeoX (Pythia) | EOS | ``<|endoftext|>`` | none: plain text |
| sampling-defaults | Llama, ChatML | ``<|im_end|>`` | ``<|im_end|>`` | ChatML, and a generation config that sets temperature 0.3, top-p 0.5, top-k 5 and repetition penalty 1.5 |

The llama3 checkpoint declares only ``<|end_of_text|>`` as its EOS, so stopping at ``<|eot_id|>``
must come from the template itself.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import GemmaConfig, GemmaForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers import PreTrainedTokenizerFast

from rebelrl.models import tiny_tokenizer

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
FAMILIES = ("chatml", "llama3", "gemma", "neox", "sampling-defaults")
TERMINATORS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "neox": "<|endoftext|>", "sampling-defaults": "<|im_end|>"}


def char_tokenizer(specials: list[str], **roles) -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII with the given special tokens first."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=roles.get("unk_token", specials[0])))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **roles)
    tokenizer.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in roles.values()]})
    return tokenizer


def _tokenizer(family: str) -> PreTrainedTokenizerFast:
    if family in ("chatml", "sampling-defaults"):
        return tiny_tokenizer()
    if family == "llama3":
        tok = char_tokenizer(["<|reserved|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                             unk_token="<|reserved|>", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
        tok.chat_template = LLAMA3_TEMPLATE
        return tok
    if family == "gemma":
        tok = char_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
                             pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>")
        tok.chat_template = GEMMA_TEMPLATE
        return tok
    if family == "neox":  # no pad token and no chat template, as Pythia ships
        return char_tokenizer(["<|endoftext|>", "<|padding|>"], unk_token="<|endoftext|>", eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    raise ValueError(family)


def _model(family: str, tokenizer: PreTrainedTokenizerFast, seed: int):
    V, common = len(tokenizer), dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
    torch.manual_seed(seed)
    if family == "gemma":
        model = GemmaForCausalLM(GemmaConfig(vocab_size=V, num_key_value_heads=1, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common))
    elif family == "neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                 tie_word_embeddings=False, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=V, num_key_value_heads=2, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **common))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    if family == "sampling-defaults":
        g = model.generation_config
        g.do_sample, g.temperature, g.top_p, g.top_k, g.repetition_penalty = True, 0.3, 0.5, 5, 1.5
    return model.eval()


def build_family(family: str, folder: Path, seed: int = 0) -> Path:
    """Write the family's tiny model and tokenizer to ``folder`` (a Hugging Face folder) and return it."""
    tokenizer = _tokenizer(family)
    model = _model(family, tokenizer, seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
