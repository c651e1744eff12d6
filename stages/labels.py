"""The label vocabulary, written once: what a list, a labels file or a manifest may say, and what the model learns."""
from __future__ import annotations

from ..manifests.errors import InputError

ALIASES = {"real": "real", "fake": "fake", "0": "real", "1": "fake"}  # any case, as users write them
TARGET = {"real": 0, "fake": 1}  # the training target and the positive class of every metric: fake
NOT_A_LABEL = "label {} is not real, fake, 0 or 1"


def parse_label(value) -> str | None:
    """'real', 'fake', or None for an empty cell (an unlabelled video)."""
    text = str(value).strip().lower()
    if not text:
        return None
    if text not in ALIASES:
        raise InputError(NOT_A_LABEL.format(repr(value)))
    return ALIASES[text]
