"""Real `FeatureExamples` built by hand (no model) for the protocol tests."""

from __future__ import annotations

from train.interp.examples import FeatureExamples, Window

WORDS = (
    "apple",
    "river",
    "stone",
    "cloud",
    "piano",
    "tiger",
    "lemon",
    "candle",
    "forest",
    "mirror",
    "rocket",
    "violin",
)


def window(
    conversation: int, tokens: list[str], activations: list[float], special: list[bool] | None = None
) -> Window:
    """A window whose peak is its largest activation."""
    peak = max(range(len(activations)), key=lambda i: activations[i])
    return Window(
        conversation=conversation,
        start=0,
        token_ids=tuple(hash((conversation, t, i)) % 50_000 for i, t in enumerate(tokens)),
        tokens=tuple(tokens),
        activations=tuple(activations),
        special=tuple(special or [t.startswith("<|") for t in tokens]),
        peak=peak,
    )


def feature(index: int, strength: float = 5.0) -> FeatureExamples:
    """A feature firing on the word `WORDS[index]`: 20 top windows and 5 windows per decile, each from its own
    conversation (conversation ids are unique per feature)."""
    word = WORDS[index % len(WORDS)]
    base = 10_000 * (index + 1)

    def make(conv: int, act: float) -> Window:
        tokens = ["<|im_start|>", "user", "\n", "I", " like", f" {word}", " and", " tea", "\n", f"#{conv}"]
        acts = [0.0] * len(tokens)
        acts[5] = act
        return window(conv, tokens, acts)

    top = [make(base + i, strength - 0.01 * i) for i in range(20)]
    deciles = [[make(base + 100 + 10 * q + j, strength * (q + 1) / 11) for j in range(5)] for q in range(10)]
    return FeatureExamples(feature=index, top=top, deciles=deciles, density=0.01, max_activation=strength)


def negatives(index: int, n: int = 12) -> list[Window]:
    """Windows without the feature's word, where it is 0 everywhere."""
    return [
        window(
            900_000 + 100 * index + i,
            ["<|im_start|>", "assistant", "\n", "The", " weather", f" {i}"],
            [0.0] * 6,
        )
        for i in range(n)
    ]


def hard_negatives(index: int, n: int = 12) -> list[Window]:
    """Windows that hold the feature's word where it does not fire."""
    word = WORDS[index % len(WORDS)]
    return [
        window(
            800_000 + 100 * index + i,
            ["<|im_start|>", "assistant", "\n", f" {word}", " is", f" {i}"],
            [0.0] * 6,
        )
        for i in range(n)
    ]
