"""Which encoder pair wins, the paper's own question: per speech x text pair, its trials, best and mean score, whether
its best trial is tied with the best pair's (paired bootstrap on the clips), and its expected F1 on unseen clips."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from emotune.insight.record import SearchRecord, score

PAIR_KEYS = ("encoders.speech", "encoders.text")


@dataclass
class PairRow:
    speech: str
    text: str
    trials: int
    best: float
    mean: float
    se: float | None                 # standard error of the mean score over the pair's trials (None: one trial)
    best_trial: str
    tied: bool | None = None         # tied with the best pair's best trial (None: not compared)
    share: float | None = None       # share of paired resamples in which the best pair's best trial scores higher
    expected: tuple[float, float, float] | None = None  # bias-corrected expected F1 and its 95% interval
    note: str = ""                   # why a comparison or estimate is missing

    @property
    def label(self) -> str:
        return f"{self.speech} + {self.text}"


def pair_of(record: SearchRecord, row: dict) -> tuple[str, str]:
    """A trial's encoder pair: its sampled encoders, or the search's fixed ones."""
    return tuple(str(row.get(f"param:{k}") if row.get(f"param:{k}") is not None else record.cfg["encoders"][k[9:]])
                 for k in PAIR_KEYS)


def group_by_pair(record: SearchRecord) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in record.finished:  # best-ranked first, so each group is too
        groups.setdefault(pair_of(record, row), []).append(row)
    return groups


def _summary_row(pair: tuple[str, str], rows: Sequence[dict]) -> PairRow:
    scores = [score(r) for r in rows]
    mean = sum(scores) / len(scores)
    se = (math.sqrt(sum((s - mean) ** 2 for s in scores) / (len(scores) - 1) / len(scores))
          if len(scores) > 1 else None)
    return PairRow(pair[0], pair[1], len(rows), max(scores), mean, se, str(rows[0]["trial_id"]))


def pair_table(record: SearchRecord, corpus) -> list[PairRow]:
    """Every pair the search tried, the best pair first. ``corpus``: the search's prepared corpus (its labelled
    clips are what the trials were scored on)."""
    from emotune.insight.standing import search_estimate, search_ties

    groups = group_by_pair(record)
    table = sorted((_summary_row(pair, rows) for pair, rows in groups.items()), key=lambda p: -p.best)
    if not table:
        return table
    leaders = [groups[(p.speech, p.text)][0] for p in table]
    ties = search_ties(record.cfg, corpus, leaders, record.trials_dir)
    for row, leader in zip(table, leaders):
        trial_id = str(leader["trial_id"])
        if ties.problem:
            row.note = ties.problem
        elif trial_id in ties.skipped:
            row.note = ties.skipped[trial_id]
        else:
            row.tied = trial_id in ties.tied
            row.share = ties.shares.get(trial_id)
        estimate = search_estimate(record.cfg, corpus, groups[(row.speech, row.text)], record.trials_dir)
        if isinstance(estimate, str):
            row.note = "; ".join(n for n in (row.note, f"no estimate: {estimate}") if n)
        else:
            row.expected = (estimate.expected, estimate.low, estimate.high)
    return table
