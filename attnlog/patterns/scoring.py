"""`score()`: the pattern scores of whole probes (a snapshot), batched by length."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from attnlog.patterns.accumulator import ScoreAccumulator, call_user, check_attention
from attnlog.patterns.context import Device, PatternContext
from attnlog.patterns.registry import PATTERNS, PatternFn, select
from attnlog.patterns.table import ScoreTable, build_table, unique_names

if TYPE_CHECKING:
    from attnlog.snapshot import ProbeAttention, Snapshot

__all__ = ["score"]


def score(
    snapshot_or_probes: Snapshot | ProbeAttention | Iterable[ProbeAttention],
    patterns: Iterable[str] | str | None = None,
    *,
    step: int | None = None,
) -> ScoreTable:
    """Every selected pattern for every probe, combined over probes.

    All probes are scored in one padded batch by a `ScoreAccumulator`, layers (or, for long
    probes, blocks of query rows) at a time; `max_logit` comes from the probes' q/k.

    Args:
        snapshot_or_probes: a `Snapshot`, a `ProbeAttention` or a list of them (torch or numpy).
        patterns: names from `PATTERNS` (default: all).
        step: training step (default: the snapshot's, else 0).

    Returns:
        ScoreTable with numpy float32 [L, H] per pattern: `per_probe` per probe, `scores` the
        NaN-ignoring mean over probes (`max_logit`: the max), `labels` when the scores that
        `label_heads` needs were selected.

    Raises:
        ValueError: unknown pattern names, bad shapes, or a pattern returning a wrong shape.
    """
    names = select(patterns)
    probes, snap_step = _probes_of(snapshot_or_probes)
    step = step if step is not None else (snap_step or 0)
    contexts = [PatternContext.from_probe(p) for p in probes]  # tiny CPU work before any kernel
    attentions = [check_attention(p.attention, c.n) for p, c in zip(probes, contexts)]
    if len({a.shape[:2] for a in attentions}) > 1:
        raise ValueError("probes have different numbers of layers/heads; score them separately")
    fns = {n: PATTERNS[n] for n in names}
    device = attentions[0].device
    per_probe = _builtin_scores(fns, contexts, attentions)
    results = []
    for done, attn, ctx in zip(per_probe, attentions, contexts):
        prepared = None
        for name in names:  # registered patterns see each probe's whole attention
            if name not in done:
                prepared = ctx.prepare(attn.to(device)) if prepared is None else prepared
                done[name] = call_user(name, fns[name], prepared, ctx)
        results.append(torch.stack([done[n] for n in names]))
    host = torch.stack(results).cpu().numpy()  # [P, K, L, H]: the one device->host copy
    return build_table(host, names, unique_names([p.name for p in probes]), contexts, step)


def _builtin_scores(
    fns: dict[str, PatternFn],
    contexts: Sequence[PatternContext],
    attentions: Sequence[torch.Tensor],
) -> list[dict[str, torch.Tensor]]:
    """Per probe: name -> [L, H] of the built-in patterns among `fns`, scored in length groups."""
    builtin = {
        n: f for n, f in fns.items() if hasattr(f, "row_kernel") or hasattr(f, "from_logits")
    }
    per_probe: list[dict[str, torch.Tensor]] = [{} for _ in attentions]
    if not builtin:
        return per_probe
    L, H = attentions[0].shape[:2]
    device = attentions[0].device
    for group in _length_groups([c.n for c in contexts], device):
        acc = ScoreAccumulator.of_functions([contexts[i] for i in group], builtin, L, H, device)
        acc.add_probes([attentions[i] for i in group])
        for i, result in zip(group, acc.results()):  # [K_builtin, L, H]
            per_probe[i] = dict(zip(builtin, result))
    return per_probe


def _probes_of(
    source: Snapshot | ProbeAttention | Iterable[ProbeAttention],
) -> tuple[list[ProbeAttention], int | None]:
    """The probes to score, and the snapshot's step when `source` is a snapshot."""
    if hasattr(source, "probes") and hasattr(source, "step"):  # Snapshot
        return list(source.probes), int(source.step)
    if hasattr(source, "attention"):  # one ProbeAttention
        return [source], None
    probes = list(source)
    if not probes or not all(hasattr(p, "attention") for p in probes):
        raise ValueError("score() needs a Snapshot, a ProbeAttention or a non-empty list of them")
    return probes, None


def _length_groups(lengths: Sequence[int], device: Device) -> list[list[int]]:
    """Indices of the probes that `score()` pads into one batch.

    On an accelerator, all of them: kernel launches dominate, so one batch is cheapest. On the
    CPU arithmetic dominates, so probes of similar length go together: padding a group adds at
    most half of its probes' own attention (a 40-token induction probe padded with 12-token
    sentences would cost ~5x).
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    if torch.device(device).type != "cpu":
        return [order]
    groups: list[list[int]] = []
    area = 0
    for i in order:  # ascending: each new probe is its group's longest
        n2 = lengths[i] ** 2
        if groups and n2 * (len(groups[-1]) + 1) <= 1.5 * (area + n2):
            groups[-1].append(i)
            area += n2
        else:
            groups.append([i])
            area = n2
    return groups
