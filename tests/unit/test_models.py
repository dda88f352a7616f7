import pytest
import torch
from transformers import PreTrainedTokenizerFast

from rebelrl.models import prepare_tokenizer, tiny_tokenizer
from rebelrl.rollout import HFGenerator, SamplingParams
from rebelrl.types import Conversation


def test_tokenizer_without_pad_or_template_gets_eos_padding_left_and_plain_text():
    tok = tiny_tokenizer()
    bare = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|im_end|>")
    assert bare.pad_token is None and bare.chat_template is None
    ready = prepare_tokenizer(bare)
    assert ready.pad_token == "<|im_end|>" and ready.padding_side == "left"
    # a base model continues the user's text itself, not a chat format it never saw
    text = ready.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "hi"
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"},
            {"role": "user", "content": "V"}]
    assert ready.apply_chat_template(chat, tokenize=False) == "S\n\nUA<|im_end|>\n\nV"


def test_prompt_format_chat_without_a_template_is_an_error():
    bare = PreTrainedTokenizerFast(tokenizer_object=tiny_tokenizer().backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="no chat template"):
        prepare_tokenizer(bare, "chat")


def test_top_k_one_samples_the_greedy_completion(model, tokenizer):
    gen = HFGenerator(model, tokenizer)
    prompts = [Conversation.from_prompt("abc"), Conversation.from_prompt("hello there")]
    greedy = gen.generate(prompts, 1, SamplingParams(temperature=0, max_new_tokens=8))
    top1 = gen.generate(prompts, 1, SamplingParams(temperature=1.3, top_k=1, max_new_tokens=8))
    assert torch.equal(greedy.completion_ids, top1.completion_ids)


def test_top_p_and_temperature_change_samples_but_not_shapes(model, tokenizer):
    gen = HFGenerator(model, tokenizer)
    prompts = [Conversation.from_prompt("abc")]
    torch.manual_seed(0)
    a = gen.generate(prompts, 4, SamplingParams(temperature=1.0, top_p=0.5, max_new_tokens=6))
    assert a.completion_ids.shape[0] == 4 and (a.sample_logps <= 0).all()


def test_plain_text_prompts_start_with_bos_where_the_tokenizers_own_encoding_does():
    """A Llama-2-style base tokenizer puts <s> before any text it encodes; a plain-text prompt then
    starts with it too (and with nothing where the tokenizer adds none, as Pythia's)."""
    from tokenizers import processors

    from rebelrl.models import prepare_tokenizer
    from rebelrl.rollout import encode_prompts
    from rebelrl.types import Conversation
    from tests.families import char_tokenizer

    with_bos = char_tokenizer(["<unk>", "<s>", "</s>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with_bos._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    without_bos = char_tokenizer(["<unk>", "<s>", "</s>"], unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    prompt = Conversation.from_prompt("TL;DR:")
    for tokenizer, expected_first in ((with_bos, True), (without_bos, False)):
        expected = tokenizer("TL;DR:").input_ids
        assert (expected[0] == 1) == bool(expected_first)
        ids, _ = encode_prompts(prepare_tokenizer(tokenizer, "plain"), [prompt])
        assert ids[0].tolist() == expected


def test_a_folder_that_holds_no_model_is_refused_in_one_line(tmp_path, capsys):
    """model.name (and ref_name, guide.model, ...) naming a folder without a model's config.json: one
    line naming the key, before the run directory is claimed, not a tokenizer's traceback."""
    from rebelrl.cli import main

    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "readme.txt").write_text("just notes")
    assert main(["train", f"model.name={folder}", f"run_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert f"model.name: {folder} is a folder without a model's config.json" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
