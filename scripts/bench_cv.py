"""The K-fold pool: every configuration trained as a 5-fold trial, each evaluation's out-of-fold and test
predictions kept, so that single-split, fewer-fold and K-fold searches can all be replayed on one recording.

Called by ``python scripts/bench_hpo.py record-cv``. Each configuration is one ``trial.folds=5`` trial of the
project's own Trainer (no Ray: nothing is decided during recording), trained without pruning or early stopping to
``trial.max_epochs``. Per evaluation it keeps the out-of-fold predicted class of every labelled clip and, per head,
its test predictions; the class probabilities (out of fold, and each head's on test) go to one compressed file per
configuration, quantised to 1/255, so that bags and ensembles can average probabilities. A configuration is
appended to ``runs/hpo-cv-pool.jsonl`` when it finishes: a stopped recording continues where it was.
"""

from __future__ import annotations

import json
import time

import numpy as np

from _bench import BENCH_DIR, RUNS_DIR

FOLDS = 5
PARTIAL = RUNS_DIR / "hpo-cv-pool.jsonl"
PROBS_DIR = RUNS_DIR / "hpo-cv-pool"
POOL_FILE = BENCH_DIR / "hpo-cv-pool.json.gz"


def _digits(values) -> str:
    return "".join(map(str, values))


def _record_one(job: tuple[int, dict, dict]) -> dict:
    """Train configuration ``index`` as a K-fold trial to max_epochs in this process, keeping every evaluation."""
    import torch

    from emotune import evaluation
    from emotune.search.space import apply_sampled
    from emotune.trial import Trainer, TrialContext, predict

    index, sampled, base = job
    torch.set_num_threads(1)
    cfg = apply_sampled(base, sampled)
    cfg["tracking"] = None  # nothing to record in MLflow: the pool file is the record
    rows: list[dict] = []
    oof_probs: list[np.ndarray] = []
    test_probs: list[np.ndarray] = []

    class Recorder(Trainer):
        def _epoch(self):
            n = len(self.labels)
            test_true = [self.labels.index(u.label) for u in self.corpus.test]
            for metrics, dev_probs, improved in super()._epoch():
                started = time.perf_counter()
                per_head = np.stack([predict(head, self.source, self.corpus.test, self.lengths,
                                             self.settings.eval_batch_size, self.device) for head in self.heads])
                bag = per_head.mean(0).argmax(1)
                rows.append({"evaluation": metrics["evaluation"], "val_f1": metrics["val_f1"],
                             "val_f1_se": metrics["val_f1_se"], "val_loss": metrics["val_loss"],
                             "seconds": metrics["epoch_seconds"], "test_seconds": time.perf_counter() - started,
                             "test_f1": evaluation.macro_f1(test_true, bag, n),
                             "oof_pred": _digits(dev_probs.argmax(1)),
                             "test_pred": [_digits(p.argmax(1)) for p in per_head], "bag_pred": _digits(bag)})
                oof_probs.append(np.round(dev_probs * 255).astype(np.uint8))
                test_probs.append(np.round(per_head * 255).astype(np.uint8))
                yield metrics, dev_probs, improved

        def _save_best(self, dev_probs):  # every evaluation's predictions are kept above instead
            return None

    started = time.perf_counter()
    trainer = Recorder(cfg, TrialContext(progress=False, cpus=1))
    trainer.fit()
    PROBS_DIR.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(PROBS_DIR / f"config-{index:03d}.npz", oof=np.stack(oof_probs), test=np.stack(test_probs))
    return {"index": index, "config": sampled, "rows": rows, "setup_seconds": trainer.setup_seconds,
            "wall_seconds": time.perf_counter() - started}


def record(args, pool_config, draw_configurations) -> None:
    """Train the K-fold pool, ``args.workers`` configurations at a time, appending each as it finishes."""
    import gzip
    import multiprocessing

    from emotune.data.folds import trial_folds
    from emotune.data.prepare import prepare_corpus
    from emotune.features.prepare import prepare_features
    from emotune.search.space import encoders_in_play

    base = pool_config([f"trial.max_epochs={args.epochs}", f"seed={args.seed}", f"trial.folds={FOLDS}"])
    configurations = draw_configurations(base, args.configs, args.seed)
    corpus = prepare_corpus(base["data"], base["paths"]["runs_dir"])
    for modality, names in encoders_in_play(base).items():  # every encoder's cache filled (or extended) once, here
        for name in names:
            prepare_features(corpus, base["encoders"] | {modality: name}, base["features"], [modality],
                             base["paths"])
    folds = trial_folds(corpus.train, corpus.dev, FOLDS, int(base["data"]["fold_seed"]), by_group=False)
    done = {}
    if PARTIAL.is_file():
        for line in PARTIAL.read_text().splitlines():
            entry = json.loads(line)
            whole = len(entry["rows"]) == args.epochs and (PROBS_DIR / f"config-{entry['index']:03d}.npz").is_file()
            if entry["index"] < len(configurations) and entry["config"] == configurations[entry["index"]] and whole:
                done[entry["index"]] = entry
    todo = [(i, c, base) for i, c in enumerate(configurations) if i not in done]
    print(f"recording {len(todo)} {FOLDS}-fold configurations ({len(done)} already in {PARTIAL}); labelled "
          f"{len(folds.clips)} clips, test {len(corpus.test)}", flush=True)
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(args.workers) as workers, PARTIAL.open("a") as out:
        for count, entry in enumerate(workers.imap_unordered(_record_one, todo), start=1):
            out.write(json.dumps(entry) + "\n")
            out.flush()
            done[entry["index"]] = entry
            elapsed = time.perf_counter() - started
            print(f"{count}/{len(todo)} configuration {entry['index']}: best out-of-fold "
                  f"{max(r['val_f1'] for r in entry['rows']):.3f} ({entry['wall_seconds']:.0f} s; "
                  f"{elapsed / 60:.1f} min so far, about {elapsed / count * (len(todo) - count) / 60:.0f} min to go)",
                  flush=True)
    labels = corpus.labels
    pool = {"overrides": base_overrides(args), "labels": labels, "folds": FOLDS,
            "fold": _digits(folds.fold_of()[u.id] for u in folds.clips),
            "oof_true": _digits(labels.index(u.label) for u in folds.clips),
            "test_true": _digits(labels.index(u.label) for u in corpus.test),
            "record_seconds": sum(t["wall_seconds"] for t in done.values()),
            "space": base["space"]["params"], "trials": [done[i] for i in sorted(done)]}
    with gzip.open(POOL_FILE, "wt") as f:
        json.dump(pool, f)
    print(f"written: {POOL_FILE} ({len(done)} configurations)")


def base_overrides(args) -> list[str]:
    return [f"trial.max_epochs={args.epochs}", "trial.early_stop=null", f"seed={args.seed}", f"trial.folds={FOLDS}"]
