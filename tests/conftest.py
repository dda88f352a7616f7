import pytest
import torch

from rebelrl.models import tiny_model, tiny_tokenizer


@pytest.fixture
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture
def model(tokenizer):
    return tiny_model(tokenizer, seed=0)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
