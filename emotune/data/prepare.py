"""From a ``data`` config to ready splits: build the demo corpus if asked, read and check, split, normalise.

This is the data layer's single entry point for the rest of emotune: the trial, the feature cache and
``emotune check-corpus`` all call :func:`prepare_corpus` with the plain ``data`` dict of the config.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from emotune.data.audio import AudioInfo, NormStats
from emotune.data.corpus import SkipReport, Utterance, format_summary, load_corpus, norm_stats, split_train_dev
from emotune.data.demo import ensure_demo_corpus


@dataclass
class PreparedCorpus:
    """Train, dev and test utterances, the class order, and the training split's normalisation statistics."""

    train: list[Utterance]
    dev: list[Utterance]
    test: list[Utterance]
    labels: tuple[str, ...]
    norm: NormStats
    audio: dict[str, AudioInfo]
    report: SkipReport
    settings: dict

    @property
    def test_labelled(self) -> bool:
        return bool(self.test) and all(u.label is not None for u in self.test)

    @property
    def splits(self) -> dict[str, list[Utterance]]:
        return {"train": self.train, "dev": self.dev, "test": self.test}

    def summary(self) -> str:
        test_note = "labelled" if self.test_labelled else ("unlabelled" if self.test else "none")
        return "\n".join([
            f"corpus {self.settings['root']}  (test split: {test_note})",
            format_summary(self.splits, self.labels, self.audio),
            f"normalisation (train split, {self.norm.n_files} files): mean {self.norm.mean:.5f}, "
            f"std {self.norm.std:.5f}",
            self.report.summary(),
        ])

    def stats(self) -> dict:
        return {
            "labels": list(self.labels),
            "counts": {name: dict(Counter(u.label for u in split)) for name, split in self.splits.items()},
            "seconds": {name: round(sum(self.audio[u.id].duration for u in split if u.id in self.audio), 2)
                        for name, split in self.splits.items()},
            "norm": self.norm.to_dict(),
            "skipped_rows": len(self.report),
            "skipped_by_kind": dict(self.report.counts()),
            "settings": self.settings,
        }

    def save(self, folder: str | Path) -> Path:
        """Write ``corpus_stats.json`` and, if rows were skipped, ``skipped_rows.csv`` to ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "corpus_stats.json").write_text(json.dumps(self.stats(), indent=2, ensure_ascii=False))
        if len(self.report):
            self.report.write_csv(folder / "skipped_rows.csv")
        return folder


def prepare_corpus(data: dict, runs_dir: str | Path, progress: bool = True) -> PreparedCorpus:
    """Load the corpus that the ``data`` config describes (paths already absolute) and split it."""
    if data.get("demo"):
        ensure_demo_corpus(data["root"], n_clips=int(data["demo"]["clips"]), seed=int(data["demo"]["seed"]),
                           progress=progress)
    corpus = load_corpus(
        data["train_csv"],
        data["audio_dir"],
        data.get("test_csv"),
        data.get("test_labels"),
        labels=data["labels"],
        group_column=data.get("group_column"),
        on_error=data["on_error"],
        scan_cache=Path(runs_dir) / "cache" / "audio_scan.json",
        progress=progress,
    )
    train, dev = split_train_dev(corpus.train, float(data["dev_fraction"]), int(data["split_seed"]),
                                 by_group=bool(data.get("group_column")))
    settings = {k: data.get(k) for k in ("root", "train_csv", "test_csv", "test_labels", "audio_dir",
                                         "dev_fraction", "split_seed", "group_column", "on_error")}
    return PreparedCorpus(train, dev, corpus.test, corpus.labels, norm_stats(train, corpus.audio),
                          corpus.audio, corpus.report, settings)
