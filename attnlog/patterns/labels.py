"""Head labels: Kovaleva et al. (2019)-style names for what a head does, from its scores."""

from __future__ import annotations

import numpy as np

__all__ = ["LABEL_INPUTS", "label_heads"]

# The scores `label_heads` reads; a table gets labels only when it has all of them.
LABEL_INPUTS = ("delimiter", "sink", "prev_token", "next_token", "same_sentence", "broad")


def label_heads(
    scores: dict[str, np.ndarray],
    *,
    vertical: float = 0.6,
    diagonal: float = 0.5,
    broad: float = 0.9,
    block_margin: float = 0.25,
    chance: float | None = None,
) -> np.ndarray:
    """Kovaleva-style label per head from its scores (docs/patterns.md, "Head labels").

    `vertical` (delimiter or sink >= vertical), `diagonal` (prev_token + next_token >= diagonal),
    both -> `vertical+diagonal`; else `block` (same_sentence >= chance + block_margin), `broad`
    (broad >= broad), else `heterogeneous`. Missing or NaN scores never match.

    Args:
        scores: name -> [L, H] array (a `ScoreTable.scores`).
        chance: same_sentence of a head that ignores sentences (share of same-sentence keys);
            default 0.5, a balanced pair.

    Returns:
        [L, H] array of label strings.
    """
    shape = next(iter(scores.values())).shape if scores else None
    if shape is None or len(shape) != 2:
        raise ValueError("label_heads needs at least one [L, H] score")

    def get(name: str) -> np.ndarray:
        return np.asarray(scores.get(name, np.full(shape, np.nan)), dtype=np.float64)

    with np.errstate(invalid="ignore"):
        is_vertical = (get("delimiter") >= vertical) | (get("sink") >= vertical)
        near = np.nan_to_num(get("prev_token")) + np.nan_to_num(get("next_token"))
        is_diagonal = near >= diagonal
        is_block = get("same_sentence") >= (0.5 if chance is None else chance) + block_margin
        is_broad = get("broad") >= broad
    labels = np.full(shape, "heterogeneous", dtype=object)
    labels[is_broad] = "broad"
    labels[is_block] = "block"
    labels[is_vertical] = "vertical"
    labels[is_diagonal] = "diagonal"
    labels[is_vertical & is_diagonal] = "vertical+diagonal"
    return labels.astype(str)
