"""Rule rewards: scores computed from the text alone, no model to load."""

from __future__ import annotations

from functools import lru_cache

from rebelrl.types import Conversation


@lru_cache(maxsize=1)
def _vader_analyzer():
    # Built once: the analyzer reads its lexicon file on construction.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def vader_sentiment(conversations: list[Conversation]) -> list[float]:
    """VADER compound sentiment of the last assistant message, in [-1, 1].

    The classic "make the reply positive" task: cheap, deterministic, and easy to see move.
    A conversation without an assistant message scores 0 (VADER's score for empty text).

    >>> chat = Conversation.from_prompt("How was the film?")
    >>> vader_sentiment([chat.with_reply("I love this, wonderful!"), chat.with_reply("I hate this, awful.")])
    [0.871, -0.802]
    """
    analyzer = _vader_analyzer()
    return [float(analyzer.polarity_scores(c.last_assistant)["compound"]) for c in conversations]
