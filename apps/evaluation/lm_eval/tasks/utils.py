"""Document filters for the local lm-eval tasks: `process_<subject>` keeps one MMLU subject.

lm-eval loads this file by path (`process_docs: !function utils.process_abstract_algebra`);
the function for any subject is made on demand, so the module needs no list of subjects.
"""

from __future__ import annotations

from collections.abc import Callable

PREFIX = "process_"


def subject_filter(subject: str) -> Callable:
    """A `process_docs` function keeping the rows of `subject` (all splits go through it)."""

    def process_docs(dataset):
        return dataset.filter(
            lambda subjects: [s == subject for s in subjects], input_columns="subject", batched=True
        )

    process_docs.__name__ = process_docs.__qualname__ = f"{PREFIX}{subject}"
    return process_docs


def __getattr__(name: str) -> Callable:
    if name.startswith(PREFIX) and len(name) > len(PREFIX):
        return subject_filter(name[len(PREFIX) :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
