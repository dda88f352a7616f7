"""Rewards: registry, no-EOS penalty, score checks, VADER, reasoning-gym and the reward-model scorer."""

import doctest
import math

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

from rebelrl.rewards import (
    RewardFn,
    RewardModelScorer,
    apply_no_eos_penalty,
    check_scores,
    extract_answer,
    last_token_index,
    load_reward,
    reasoning_gym_prompts,
    reasoning_gym_reward,
    vader_sentiment,
)
from rebelrl.rewards import reasoning, rules
from rebelrl.types import Conversation

# ---- rewards addressed by import path in the registry tests below -----------------------------


def length_reward(conversations):
    return [float(len(c.last_assistant)) for c in conversations]


def make_constant_reward(value):
    return lambda conversations: [value] * len(conversations)


class Holder:
    reward = staticmethod(length_reward)


class CountWords:
    def __call__(self, conversations):
        return [float(len(c.last_assistant.split())) for c in conversations]


NOT_CALLABLE = 3


def _chat(reply: str, prompt: str = "hi") -> Conversation:
    return Conversation.from_prompt(prompt).with_reply(reply)


# ---- registry ----------------------------------------------------------------------------------


def test_load_reward_builtin_and_import_paths():
    assert load_reward("vader") is vader_sentiment
    assert load_reward("reasoning_gym") is reasoning_gym_reward
    assert load_reward(f"{__name__}:length_reward") is length_reward
    assert load_reward(f"{__name__}:Holder.reward") is length_reward  # dotted attribute
    convs = [_chat("abc"), _chat("a b")]
    assert load_reward(f"{__name__}:make_constant_reward", {"value": 2.5})(convs) == [2.5, 2.5]
    # A class is instantiated even without kwargs, then scores as an object.
    counter = load_reward(f"{__name__}:CountWords")
    assert isinstance(counter, CountWords) and isinstance(counter, RewardFn)
    assert counter(convs) == [1.0, 2.0]


@pytest.mark.parametrize(
    "spec, kwargs, expected",
    [
        ("nocolon", None, "built-in name"),
        ("a.b:c:d", None, "import path"),
        (":attr", None, "import path"),
        ("no_such_module_xyz:f", None, "cannot import module 'no_such_module_xyz': No module named"),
        ("{mod}:missing_reward", None, "has no attribute 'missing_reward'"),
        ("{mod}:Holder.nope", None, "has no attribute 'nope'"),
        ("{mod}:NOT_CALLABLE", None, "int object is not callable"),
        ("{mod}:NOT_CALLABLE", {"x": 1}, "is not callable"),
        ("{mod}:make_constant_reward", {"wrong": 1}, "building it with kwargs ['wrong'] failed"),
    ],
)
def test_load_reward_errors_name_the_spec(spec, kwargs, expected):
    spec = spec.format(mod=__name__)
    with pytest.raises(ValueError) as err:
        load_reward(spec, kwargs)
    assert repr(spec) in str(err.value) and expected in str(err.value)


def test_apply_no_eos_penalty():
    """Unfinished row 1 gets the penalty -3; finished rows keep their scores; None changes nothing."""
    assert apply_no_eos_penalty([0.5, 2.0, -1.0], [True, False, True], -3.0) == [0.5, -3.0, -1.0]
    assert apply_no_eos_penalty([0.5, 2.0], [False, False], 0.0) == [0.0, 0.0]
    assert apply_no_eos_penalty([0.5, 2.0], [False, True], None) == [0.5, 2.0]
    with pytest.raises(ValueError, match="2 scores but 1 finished"):
        apply_no_eos_penalty([0.5, 2.0], [True], -1.0)


def test_check_scores():
    assert check_scores([1, 0.5], 2, "r") == [1.0, 0.5]
    assert all(type(s) is float for s in check_scores([1, 2], 2, "r"))
    cases = [
        ([1.0], "returned 1 scores for 2 conversations"),
        ([1.0, math.nan], "score 1 is nan"),
        ([math.inf, 1.0], "score 0 is inf"),
        (["1", 1.0], "score 0 is '1' (str)"),
        ([1.0, True], "score 1 is True (bool)"),
        (0.5, "returned float"),
    ]
    for scores, expected in cases:
        with pytest.raises(ValueError) as err:
            check_scores(scores, 2, "my_reward")
        assert "'my_reward'" in str(err.value) and expected in str(err.value)


# ---- rule rewards -------------------------------------------------------------------------------


def test_vader_orders_sentiment_and_stays_in_range():
    scores = vader_sentiment([_chat("I love this, wonderful!"), _chat("I hate this, awful."), _chat("")])
    assert scores[0] > 0 > scores[1] and scores[2] == 0.0
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in scores)
    assert vader_sentiment([Conversation.from_prompt("no reply yet")]) == [0.0]


def test_docstring_examples_hold():
    for module in (rules, reasoning):
        assert doctest.testmod(module).failed == 0


# ---- reasoning gym ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("work... <answer>3</answer> then <answer> -4 </answer>", "-4"),  # last tag pair
        ("12 and 13 <answer>  </answer>", None),  # empty tags: no guessing from the reasoning
        ("Answer: 5\nsome words\nFinal answer: **17**.", "17"),  # last answer line
        ("We add.\nThe answer is 1,234.", "1,234"),
        ("3 + 4 makes 7 and 2.5 more", "2.5"),  # last number
        ("it comes to -1,250", "-1250"),
        ("no idea", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_reasoning_gym_reward_scores_with_the_dataset_checker():
    prompts = reasoning_gym_prompts("basic_arithmetic", size=3, seed=1)
    assert [p.meta["entry"]["question"] for p in prompts] == [
        p.meta["entry"]["question"] for p in reasoning_gym_prompts("basic_arithmetic", size=3, seed=1)
    ]
    first = prompts[0]
    entry = first.meta["entry"]
    assert first.first_user.startswith(entry["question"]) and "<answer></answer>" in first.first_user
    answer = entry["answer"]
    wrong = str(int(answer) + 1)
    convs = [
        first.with_reply(f"Let me compute.\n<answer>{answer}</answer>"),
        first.with_reply(f"<answer>{wrong}</answer>"),
        first.with_reply("I am not sure."),
    ]
    correct, incorrect, missing = reasoning_gym_reward(convs)
    assert correct == 1.0 and incorrect < 1.0 and missing == 0.0


def test_reasoning_gym_reward_names_the_row_without_entry():
    good = reasoning_gym_prompts("basic_arithmetic", size=1, seed=0)[0].with_reply("<answer>1</answer>")
    with pytest.raises(ValueError, match=r"conversation 1 has no reasoning-gym entry in meta\['entry'\]"):
        reasoning_gym_reward([good, _chat("<answer>1</answer>")])


# ---- reward model -------------------------------------------------------------------------------


def test_last_token_index_left_right_and_full():
    mask = torch.tensor(
        [
            [0, 0, 1, 1, 1],  # left padded: last real token at 4
            [1, 1, 1, 0, 0],  # right padded: at 2
            [1, 1, 1, 1, 1],  # no padding: at L - 1 = 4
            [0, 0, 0, 0, 0],  # nothing real: 0 by convention
        ]
    )
    assert last_token_index(mask).tolist() == [4, 2, 4, 0]
    assert last_token_index(mask.bool()).tolist() == [4, 2, 4, 0]


CHARS = sorted(set(" abcdefghijklmnopqrstuvwxyz:.,!?\n"))


def _char_tokenizer(padding_side: str, with_pad: bool = True) -> PreTrainedTokenizerFast:
    specials = ["[PAD]", "[UNK]", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials + CHARS)}  # 36 ids
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    extra = {"pad_token": "[PAD]"} if with_pad else {}
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="</s>", **extra)
    tok.padding_side = padding_side
    return tok


def _tiny_reward_model() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=0, max_position_embeddings=256,
    )
    return LlamaForSequenceClassification(config).eval()


def test_reward_model_score_does_not_depend_on_padding():
    """The short chat, padded left, padded right or alone, is read at its own last token: same score."""
    model = _tiny_reward_model()
    long_chat = _chat("what a lovely morning, thank you so much!", prompt="hello there, how are you?")
    short_chat = _chat("fine.")
    left = RewardModelScorer(model, _char_tokenizer("left"))([long_chat, short_chat])
    right = RewardModelScorer(model, _char_tokenizer("right"))([long_chat, short_chat])
    alone = RewardModelScorer(model, _char_tokenizer("right"))([short_chat])
    assert left == pytest.approx(right, abs=1e-5)
    assert left[1] == pytest.approx(alone[0], abs=1e-5)
    assert abs(left[0] - left[1]) > 1e-4  # the scores are not trivially equal

    # Unpadded, the model's own pooling also reads the last token: the numbers agree with it.
    ids = _char_tokenizer("right")("user: hi\nassistant: fine.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hf_score = model(input_ids=ids).logits[0, 0].item()
    assert alone[0] == pytest.approx(hf_score, abs=1e-5)


def test_reward_model_batches_and_truncates_from_the_left():
    model = _tiny_reward_model()
    chats = [_chat(f"reply number {'x' * i}") for i in range(5)]
    one_batch = RewardModelScorer(model, _char_tokenizer("left"), batch_size=8)(chats)
    small_batches = RewardModelScorer(model, _char_tokenizer("left"), batch_size=2)(chats)
    assert one_batch == pytest.approx(small_batches, abs=1e-5)
    # Keeping the last 8 tokens of "user: hi\nassistant: abcdefgh" is scoring "abcdefgh" alone.
    cut = RewardModelScorer(model, _char_tokenizer("right"), max_length=8)([_chat("abcdefgh")])
    ids = _char_tokenizer("right")("abcdefgh", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert cut[0] == pytest.approx(model(input_ids=ids).logits[0, 0].item(), abs=1e-5)


def test_reward_model_from_pretrained_sets_a_pad_token(tmp_path):
    model = _tiny_reward_model()
    model.save_pretrained(tmp_path)
    _char_tokenizer("right", with_pad=False).save_pretrained(tmp_path)
    scorer = RewardModelScorer.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert scorer.tokenizer.pad_token == "</s>"
    assert scorer.model.config.pad_token_id == scorer.tokenizer.eos_token_id
    chat = [_chat("fine.")]
    assert scorer(chat) == pytest.approx(RewardModelScorer(model, _char_tokenizer("right"))(chat), abs=1e-5)
    spec = "rebelrl.rewards.reward_model:RewardModelScorer.from_pretrained"
    assert isinstance(load_reward(spec, {"name_or_path": str(tmp_path)}), RewardModelScorer)


def test_reward_model_without_score_head_uses_pooled_logits_on_right_padding():
    """An encoder classifier pools its first token; padded right, the short chat scores as alone."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=1, pad_token_id=0, max_position_embeddings=256,
    )
    model = BertForSequenceClassification(config).eval()
    chats = [_chat("a much longer reply than the other one"), _chat("ok")]
    batched = RewardModelScorer(model, _char_tokenizer("left"))(chats)  # padding side overridden to right
    alone = RewardModelScorer(model, _char_tokenizer("left"))(chats[1:])
    assert batched[1] == pytest.approx(alone[0], abs=1e-5)
