"""Statistics of greedy replies: length, distinct-n, repetition and whether they ended."""

from __future__ import annotations

import statistics

from transformers import PreTrainedTokenizerBase

from apps.evaluation.primitives import distinct_n_share


def reply_stats(
    replies: list[str], tokenizer: PreTrainedTokenizerBase, max_new_tokens: int
) -> dict[str, float]:
    """Length, distinct-1/2, repetition and ended-share of `replies`.

    `distinct_n`: distinct word n-grams / all word n-grams over all replies. `repetition`: the mean over
    replies of the share of a reply's word 3-grams that repeat an earlier one in it. `ended`: the share of
    replies shorter than the token limit; generation stops early only at `<|im_end|>` (the EOS), so this is
    the share that ended on it (lengths are measured by re-tokenising the reply text).
    """
    tokens = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies]
    return {
        "mean_tokens": statistics.fmean(tokens),
        "mean_words": statistics.fmean(len(r.split()) for r in replies),
        "distinct_1": distinct_n_share(replies, 1),
        "distinct_2": distinct_n_share(replies, 2),
        "repetition": statistics.fmean(1 - distinct_n_share([r], 3) for r in replies),
        "ended": sum(n < max_new_tokens for n in tokens) / len(tokens),
    }
