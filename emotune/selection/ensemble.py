"""Ensembles of a search's best trials: choose members on dev, combine them, score on data not used to choose.

``emotune select-top --k 3`` (see :func:`select_top`) reads a finished search from MLflow, takes its trials
ranked by their ranking score ``best_val_score`` (the best value of the search's ``trial.select_by``; trials of
older searches, which lack it, rank by ``best_val_f1``, their best dev macro-F1), combines them and evaluates
the ensemble:

- ``hard`` (the paper's): majority vote of the members' labels; a tie goes to the best-ranked member that
  voted for one of the tied labels;
- ``soft``: the mean of the members' class probabilities;
- ``greedy``: ensemble selection with replacement (Caruana et al., ICML 2004) over the search's trials, on dev
  probabilities, starting from the best trial; a trial may be picked several times (its weight). Trials that
  the best beats with confidence (see below) are left out of its pool: on dev data a weak trial can look
  useful by chance, and greedy would take it.

``--k tied`` (hard and soft) takes the best-ranked trial and every trial statistically tied with it: one the
best does not beat in at least ``search.ties_confidence`` (default 0.95) of paired bootstrap resamples of the
selection data (:func:`emotune.noise.better_with_confidence`). The members are clamped to at least
``TIED_FLOOR`` (3) and at most ``TIED_CEILING`` (7): with fewer tied trials the next best-ranked fill up to
three, because a majority vote of two members is the better member alone; with more, the seven best-ranked
are kept, because further members of a tied crowd cost prediction time and add little.

Members are chosen on dev only. The ensemble is scored on the labelled test split when there is one;
otherwise dev is split in two and the second half, never used for choosing, is the evaluation data (then
the ranking, the ties and greedy's pool are all measured on the first half). Trials with equal scores (common
once several reach the same score) rank by when their MLflow run started, earlier first, then by run id, so
the same search always gives the same members.

``--calibrate`` (soft and greedy; the hard vote takes no offsets) tunes per-class offsets on the selection data
and applies them to everything the ensemble writes and predicts. Its figures follow: the headline macro-F1
(printed, ``macro_f1`` in ``evaluation.json``, ``ensemble_macro_f1`` in MLflow), the report and the confusion
matrix are those of the calibrated predictions; the score without offsets is kept as ``macro_f1_uncalibrated``.

The ensemble folder (``--out``) is replaced only when it holds an ensemble emotune wrote (its
``ensemble.json``), an interrupted ``select-top`` or nothing: any other folder is left alone.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from emotune import evaluation
from emotune.data.folds import scored_clips
from emotune.errors import EmotuneError
from emotune.estimate import EVALUATIONS_FILE
from emotune.model.checkpoint import CARD_FILE, WEIGHTS_FILE, ModelCard
from emotune.names import ENSEMBLE_METHODS

# --- combining predictions ----------------------------------------------------------------------------------

def hard_vote(member_probs: Sequence[np.ndarray]) -> np.ndarray:
    """Majority vote of the members' argmax labels (members ordered best first); ties go to the best member.

    On a tie the winner is the label of the highest-ranked member whose own vote is one of the tied labels.
    Returns class indices.
    """
    votes = np.stack([p.argmax(axis=1) for p in member_probs])  # members x items
    n_classes = member_probs[0].shape[1]
    out = np.empty(votes.shape[1], dtype=np.int64)
    for i in range(votes.shape[1]):
        counts = np.bincount(votes[:, i], minlength=n_classes)
        tied = set(np.flatnonzero(counts == counts.max()).tolist())
        out[i] = next(int(v) for v in votes[:, i] if int(v) in tied)
    return out


def soft_vote(member_probs: Sequence[np.ndarray], weights: Sequence[float] | None = None) -> np.ndarray:
    """The (weighted) mean of the members' probabilities."""
    stacked = np.stack(member_probs)
    w = np.ones(len(member_probs)) if weights is None else np.asarray(weights, dtype=np.float64)
    return np.tensordot(w / w.sum(), stacked, axes=1)


def greedy_selection(candidate_probs: Sequence[np.ndarray], y_true: Sequence[int], n_classes: int, steps: int = 25,
                     start: int = 0) -> tuple[list[int], list[float]]:
    """Caruana's forward selection with replacement on macro-F1 of the averaged probabilities.

    Starts from candidate ``start`` and adds, ``steps`` times, the candidate (repeats allowed) that makes the
    averaged ensemble best; ties prefer the earlier (better-ranked) candidate. Returns the bag with the best
    score seen along the way (as a list of candidate indices, repeats meaning weight) and the score curve.
    """
    bag = [start]
    total = candidate_probs[start].copy()
    curve = [evaluation.macro_f1(y_true, total.argmax(1), n_classes)]
    best_bag, best_score = list(bag), curve[0]
    for _ in range(steps):
        scores = [evaluation.macro_f1(y_true, ((total + p) / (len(bag) + 1)).argmax(1), n_classes)
                  for p in candidate_probs]
        pick = int(np.argmax(scores))  # argmax returns the first of equal scores: the better-ranked candidate
        bag.append(pick)
        total += candidate_probs[pick]
        curve.append(scores[pick])
        if scores[pick] > best_score:
            best_bag, best_score = list(bag), scores[pick]
    return best_bag, curve


def tune_offsets(log_probs: np.ndarray, y_true: Sequence[int], n_classes: int, rounds: int = 3) -> np.ndarray:
    """Per-class offsets added to log-probabilities, found by coordinate search to maximise macro-F1."""
    offsets = np.zeros(n_classes)
    grid = np.linspace(-2.0, 2.0, 41)
    best = evaluation.macro_f1(y_true, (log_probs + offsets).argmax(1), n_classes)
    for _ in range(rounds):
        for c in range(n_classes):
            for value in grid:
                trial = offsets.copy()
                trial[c] = value
                score = evaluation.macro_f1(y_true, (log_probs + trial).argmax(1), n_classes)
                if score > best + 1e-12:
                    best, offsets = score, trial
    return offsets


def combine(method: str, member_probs: Sequence[np.ndarray], weights: Sequence[float],
            offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ensemble's class indices and class scores for ``method`` (hard votes score as vote shares)."""
    if method == "hard":
        labels = hard_vote(member_probs)
        n_classes = member_probs[0].shape[1]
        shares = np.mean([np.eye(n_classes)[p.argmax(1)] for p in member_probs], axis=0)
        return labels, shares
    probs = soft_vote(member_probs, weights)
    scores = np.log(np.clip(probs, 1e-12, 1.0)) + (offsets if offsets is not None else 0.0)
    return scores.argmax(1), probs


# --- reading a search from MLflow ------------------------------------------------------------------------------

@dataclass
class Candidate:
    """One finished trial of the search: its MLflow run, dev scores and downloaded best artifacts."""

    run_id: str
    name: str
    dev_f1: float  # best_val_f1: the best dev macro-F1, shown beside the members
    stopped_by_asha: bool
    folder: Path | None = None
    params: dict = field(default_factory=dict)
    started: int = 0  # the run's start time (ms since the epoch): breaks ties of score
    score: float | None = None  # best_val_score, what ranks the trial; None: dev_f1 ranks it (older searches)

    def __post_init__(self) -> None:
        if self.score is None:
            self.score = self.dev_f1


def find_search(tracking: dict, search: str | None):
    """The parent run of search ``search`` (a name or a run id), or of the latest search."""
    from emotune.tracking.store import TAG_KIND, client, ensure_experiment, retry

    mlflow_client = client(tracking["uri"])
    experiment_id = ensure_experiment(tracking)
    parents = retry(mlflow_client.search_runs, [experiment_id], filter_string=f"tags.`{TAG_KIND}` = 'search'",
                    order_by=["attributes.start_time DESC"], max_results=1000)
    if not parents:
        raise EmotuneError(f"no search found in {tracking['uri']} (experiment {tracking['experiment']}): "
                           "run `python -m emotune.search` first, or point tracking.uri / paths.runs_dir at its store.")
    if search is None:
        return parents[0]
    for run in parents:
        if search in (run.info.run_id, run.data.tags.get("emotune.search")):
            return run
    names = sorted({r.data.tags.get("emotune.search", "?") for r in parents})
    raise EmotuneError(f"no search named '{search}' in {tracking['uri']}. Searches there: {', '.join(names)}.")


def candidates_of(tracking: dict, parent, exclude_stopped: bool) -> list[Candidate]:
    """The search's finished trials, best ranking score (best_val_score, else best_val_f1) first; equal scores by
    run start, then run id."""
    from emotune.tracking.store import TAG_KIND, child_runs

    found = []
    for run in child_runs(tracking, parent.info.run_id):
        if run.data.tags.get(TAG_KIND) != "trial" or run.info.status != "FINISHED":
            continue
        if "best_val_f1" not in run.data.metrics:
            continue
        stopped = run.data.tags.get("emotune.stopped_by") == "asha"
        if exclude_stopped and stopped:
            continue
        metrics = run.data.metrics
        found.append(Candidate(run.info.run_id, run.info.run_name, float(metrics["best_val_f1"]), stopped,
                               params=dict(run.data.params), started=int(run.info.start_time or 0),
                               score=float(metrics["best_val_score"]) if "best_val_score" in metrics else None))
    return sorted(found, key=lambda c: (-c.score, c.started, c.run_id))


def download(tracking: dict, candidate: Candidate, into: Path) -> Path:
    """The trial's best checkpoint, model card, predictions and config, copied to ``into``."""
    from emotune.tracking.store import client, retry

    into.mkdir(parents=True, exist_ok=True)
    mlflow_client = client(tracking["uri"])
    retry(mlflow_client.download_artifacts, candidate.run_id, "best", str(into))
    retry(mlflow_client.download_artifacts, candidate.run_id, "config.json", str(into))
    candidate.folder = into / "best"
    return candidate.folder


# --- the command ------------------------------------------------------------------------------------------------

def _truth(ids: Sequence[str], utterances, labels: Sequence[str]) -> list[int]:
    by_id = {u.id: u.label for u in utterances}
    return [list(labels).index(by_id[i]) for i in ids]


def _aligned(folder: Path, split: str, ids: Sequence[str]) -> np.ndarray:
    found_ids, probs, _ = evaluation.read_predictions(folder / f"{split}_predictions.csv")
    row = {uid: i for i, uid in enumerate(found_ids)}
    missing = [i for i in ids if i not in row]
    if missing:
        raise EmotuneError(f"{folder / f'{split}_predictions.csv'} lacks {len(missing)} ids (e.g. {missing[0]}): "
                           "the trial was trained on a different corpus or split.")
    return probs[[row[i] for i in ids]]


def ensemble_estimate(tracking: dict, candidates: list[Candidate], request: EnsembleRequest, scored_utts,
                      select_ids: list[str], labels: list[str]):
    """The bias-corrected estimate (:mod:`emotune.estimate`) of choosing this ensemble on ``select_ids``: the
    ranking of every finished trial and each one's checkpoint repeated on resamples of those clips. Returns the
    estimate, or a sentence saying why there is none."""
    from emotune.estimate import bias_corrected, curves_of

    if request.method == "greedy" or request.k == TIED:
        return f"the estimate repeats a top-k choice; --method {request.method} --k {request.k} chooses otherwise"
    if request.method == "soft" and request.k != 1:
        return "the estimate repeats a hard vote of the top k; --method soft averages probabilities"
    from emotune.tracking.store import download_json

    evaluations = [download_json(tracking, c.run_id, EVALUATIONS_FILE) for c in candidates]
    if evaluations[0] is None:
        return f"the best trial's run has no {EVALUATIONS_FILE} (a search from before emotune wrote it)"
    found = [e for e in evaluations if e is not None]
    truth = {u.id: u.label for u in scored_utts}
    try:
        return bias_corrected(curves_of(found, truth, labels, select_ids), k=int(request.k))
    except (ValueError, KeyError, IndexError) as exc:
        return f"the trials' evaluations do not match the corpus ({exc})"


TIED = "tied"  # --k tied: the best-ranked trial and the trials statistically tied with it
TIED_FLOOR = 3  # fewest members of --k tied: a majority vote of two is the better member alone
TIED_CEILING = 7  # most members of --k tied: more members of a tied crowd cost prediction time and add little
TIES_CONFIDENCE = 0.95  # search.ties_confidence of searches saved before it existed


@dataclass(frozen=True)
class EnsembleRequest:
    """What ``emotune select-top`` is asked for."""

    k: int | str = 3  # members, or TIED (hard and soft); greedy ignores it: its pool is the finished trials
    method: str = "hard"  # one of ENSEMBLE_METHODS
    search: str | None = None  # a search name or run id; None: the latest search in the store
    exclude_stopped: bool = False  # leave out trials ASHA stopped
    steps: int = 25  # greedy selection steps
    calibrate: bool = False  # per-class offsets tuned on the selection data (soft and greedy)
    out_dir: str | Path | None = None  # the ensemble folder; None: <runs>/ensembles/<search>-<method>-k<k>

    def check(self) -> None:
        """Refuse a request that cannot be met, before anything is read."""
        if self.method not in ENSEMBLE_METHODS:
            raise EmotuneError(f"unknown method '{self.method}'; choose one of {', '.join(ENSEMBLE_METHODS)}")
        if self.k == TIED:
            if self.method == "greedy":
                raise EmotuneError("--k tied is for --method hard or soft: greedy picks its own members (and their "
                                   "weights) from every trial the best does not beat with confidence. Leave out "
                                   "--k with greedy, or use --method hard or soft with --k tied.")
            return
        # bool is an int to Python, but never a number of members
        if isinstance(self.k, bool) or not isinstance(self.k, int):
            raise EmotuneError(f"bad --k value '{self.k}': --k takes a number of members or 'tied' (the best trial "
                               "and the trials statistically tied with it), e.g. --k 3 or --k tied.")
        if self.k < 1:
            raise EmotuneError(f"--k {self.k}: --k must be at least 1 (or 'tied')")


@dataclass
class EvaluationPlan:
    """Which dev clips choose the members, and which data the ensemble is scored on (never both)."""

    select_idx: np.ndarray  # positions in the dev split that members are chosen on
    eval_ids: list[str]
    eval_true: list[int]
    eval_split: str  # the split the evaluation clips come from: "test" or "dev"
    description: str


def evaluation_plan(corpus, dev_ids: list[str], dev_true: list[int], labels: list[str], seed: int) -> EvaluationPlan:
    """Labelled test: choose on all the scored clips (``dev_ids``: dev, or every labelled clip out of fold), score
    on test. Otherwise the scored clips are halved (seeded): choose on one half, score on the other."""
    if corpus.test_labelled:
        eval_ids = [u.id for u in corpus.test]
        return EvaluationPlan(np.arange(len(dev_ids)), eval_ids, _truth(eval_ids, corpus.test, labels), "test",
                              "test split (labelled)")
    order = np.random.default_rng(seed).permutation(len(dev_ids))
    select_idx, held = np.sort(order[: len(order) // 2]), np.sort(order[len(order) // 2 :])
    description = (f"held-out half of dev ({len(held)} clips, seed {seed}); members were ranked on the other half, "
                   "but each trial picked its best epoch on all of dev")
    return EvaluationPlan(select_idx, [dev_ids[i] for i in held], [dev_true[i] for i in held], "dev", description)


@dataclass
class Scored:
    """The ensemble's figures on the evaluation data, and each member's alone."""

    result: dict  # macro_f1 of ``predicted``; with offsets also macro_f1_calibrated (equal) and macro_f1_uncalibrated
    report: dict  # per-class precision, recall, F1 of ``predicted``
    members: list[dict]
    predicted: np.ndarray  # the ensemble's classes on the evaluation data, offsets applied as in the files it writes


@dataclass
class Chosen:
    """An ensemble: its members (best first), how they are combined, and the label order."""

    method: str
    members: list[Candidate]
    weights: list[float]
    offsets: np.ndarray | None
    labels: list[str]

    def member_probs(self, split: str, ids: Sequence[str]) -> list[np.ndarray]:
        """Each member's class probabilities on ``ids`` of ``split``, from its prediction files."""
        return [_aligned(m.folder, split, ids) for m in self.members]

    def combine(self, split: str, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Class indices and class scores of the ensemble (offsets applied) on ``ids`` of ``split``."""
        return combine(self.method, self.member_probs(split, ids), self.weights, self.offsets)

    def score(self, plan: EvaluationPlan) -> Scored:
        n_classes = len(self.labels)
        probs = self.member_probs(plan.eval_split, plan.eval_ids)
        # Scored as written and predicted: the headline, report and confusion matrix must describe those labels.
        predicted, _ = combine(self.method, probs, self.weights, self.offsets)
        result = {"macro_f1": evaluation.macro_f1(plan.eval_true, predicted, n_classes)}
        if self.offsets is not None:
            plain, _ = combine(self.method, probs, self.weights)
            # the name earlier ensembles gave the calibrated figure, kept so their runs compare with new ones
            result["macro_f1_calibrated"] = result["macro_f1"]
            result["macro_f1_uncalibrated"] = evaluation.macro_f1(plan.eval_true, plain, n_classes)
        members = [{"run_id": member.run_id, "name": member.name, "weight": weight, "dev_f1": member.dev_f1,
                    "eval_macro_f1": evaluation.macro_f1(plan.eval_true, alone.argmax(1), n_classes),
                    "stopped_by_asha": member.stopped_by_asha}
                   for member, weight, alone in zip(self.members, self.weights, probs)]
        return Scored(result, evaluation.class_report(plan.eval_true, predicted, self.labels), members, predicted)


def best_ahead_shares(sel_probs: Sequence[np.ndarray], sel_true: Sequence[int], n_classes: int) -> list[float]:
    """For each candidate (best-ranked first): the share of paired resamples of the selection data in which the
    best-ranked one scores a higher macro-F1 (0.5 for the best itself)."""
    from emotune.noise import shares_best_ahead

    return shares_best_ahead(sel_true, sel_probs[0].argmax(1), [probs.argmax(1) for probs in sel_probs], n_classes)


def tied_positions(shares: Sequence[float], confidence: float) -> list[int]:
    """Positions in the ranking of the best (0) and of the candidates tied with it: their share of
    :func:`best_ahead_shares` is below ``confidence``."""
    return [i for i, share in enumerate(shares) if i == 0 or share < confidence]


def tied_members(shares: Sequence[float], confidence: float) -> tuple[list[int], list[int]]:
    """``--k tied``: the members' positions in the ranking, and :func:`tied_positions`.

    The members are the tied ones, clamped: below ``TIED_FLOOR`` the next best-ranked fill up, above
    ``TIED_CEILING`` the best-ranked are kept.
    """
    tied = tied_positions(shares, confidence)
    if len(tied) < TIED_FLOOR:
        fill = [i for i in range(len(shares)) if i not in tied][: TIED_FLOOR - len(tied)]
        return sorted(tied + fill), tied
    return tied[:TIED_CEILING], tied


@dataclass
class Selection:
    """The members chosen on the selection data, their weights, and what the choice left out."""

    members: list[Candidate]  # best first
    weights: list[float]
    curve: list[float]  # greedy: the ensemble's selection macro-F1 after each step
    offsets: np.ndarray | None  # calibration offsets (--calibrate)
    tied: list[Candidate] = field(default_factory=list)  # --k tied and greedy: the best and those tied with it
    note: str = ""  # how the members were chosen, when it needs saying


def choose_members(pool: list[Candidate], sel_probs: list[np.ndarray], sel_true: list[int], request: EnsembleRequest,
                   n_classes: int, shares: Sequence[float] | None = None,
                   confidence: float = TIES_CONFIDENCE) -> Selection:
    """Members (best first), their weights, the greedy curve and the calibration offsets, from selection data.

    ``shares`` (:func:`best_ahead_shares` of ``pool``) are needed by ``--k tied`` and restrict greedy's pool to
    the trials tied with the best.
    """
    tied = tied_positions(shares, confidence) if shares is not None else list(range(len(pool)))
    note = ""
    if request.method == "greedy":
        # a trial the best beats with confidence may still lift the selection score by chance: greedy never sees it
        bag, curve = greedy_selection([sel_probs[i] for i in tied], sel_true, n_classes, steps=request.steps, start=0)
        counts = {tied[i]: bag.count(i) for i in dict.fromkeys(bag)}
        picked, weights = list(counts), [float(n) for n in counts.values()]
        if shares is not None:
            left_out = len(pool) - len(tied)
            note = (f"greedy: {left_out} of {len(pool)} trials left out of the pool: the best scores higher than "
                    f"each of them in at least {confidence:.0%} of paired resamples of the selection data"
                    if left_out else f"greedy: no trial left out of the pool (none is beaten by the best with "
                    f"{confidence:.0%} confidence on the selection data)")
    elif request.k == TIED:
        if shares is None:
            raise ValueError("--k tied needs the shares of resamples in which the best beats each candidate")
        picked, tied = tied_members(shares, confidence)
        weights, curve = [1.0] * len(picked), []
        others = f"the best trial and {len(tied) - 1} tied with it (paired bootstrap, {confidence:.0%})"
        if len(tied) < TIED_FLOOR:
            note = (f"k=tied: {others}, fewer than the floor of {TIED_FLOOR} (a majority vote of two is the better "
                    f"member alone): the next best-ranked fill up; ensembling {len(picked)}")
        elif len(tied) > TIED_CEILING:
            note = (f"k=tied: {others}, more than the ceiling of {TIED_CEILING}: ensembling the {len(picked)} "
                    "best-ranked")
        else:
            note = f"k=tied: {others}; ensembling those {len(picked)}"
    else:
        picked, weights, curve = list(range(request.k)), [1.0] * request.k, []
    offsets = None
    if request.calibrate and request.method != "hard":
        sel_scores = np.log(np.clip(soft_vote([sel_probs[i] for i in picked], weights), 1e-12, 1.0))
        offsets = tune_offsets(sel_scores, sel_true, n_classes)
    return Selection([pool[i] for i in picked], weights, curve, offsets,
                     [pool[i] for i in tied] if shares is not None else [], note)


def select_top(cfg: dict, request: EnsembleRequest | None = None) -> dict:
    """Build, evaluate and save an ensemble of the best trials of a search; returns its summary."""
    from emotune.data.prepare import prepare_corpus

    request = request or EnsembleRequest()
    request.check()
    tracking, k, method = cfg["tracking"], request.k, request.method
    parent = find_search(tracking, request.search)
    name = parent.data.tags.get("emotune.search", parent.info.run_id)
    candidates = candidates_of(tracking, parent, request.exclude_stopped)
    needed = 1 if method == "greedy" else TIED_FLOOR if k == TIED else k
    if len(candidates) < needed:
        note = " (trials stopped by ASHA left out)" if request.exclude_stopped else ""
        asked = f"--k tied takes at least {TIED_FLOOR} members" if k == TIED else f"asked for {k} members"
        fix = "Pass --k a number of members instead" if k == TIED else "Lower --k"
        raise EmotuneError(f"{asked} but search '{name}' has only {len(candidates)} finished trials{note}. {fix}, "
                           "or run more trials (search.num_samples).")

    out = Path(request.out_dir).resolve() if request.out_dir else (
        Path(cfg["paths"]["runs_dir"]) / "ensembles" / f"{name}-{method}-k{k}")
    check_replaceable(out)  # before any work, so a refusal costs nothing

    from emotune.tracking.store import download_text

    search_cfg = json.loads(download_text(tracking, parent.info.run_id, "config.json"))
    corpus = prepare_corpus(search_cfg["data"], cfg["paths"]["runs_dir"], progress=False)
    labels = list(corpus.labels)
    folds = int(search_cfg.get("trial", {}).get("folds", 1))
    scored_utts = scored_clips(corpus, folds)  # dev, or every labelled clip out of fold
    dev_ids = [u.id for u in scored_utts]
    dev_true = _truth(dev_ids, scored_utts, labels)
    plan = evaluation_plan(corpus, dev_ids, dev_true, labels, int(search_cfg["seed"]))
    if out.exists():
        shutil.rmtree(out)

    # Without test labels the ranking must use the selection half only: every finished trial is a candidate,
    # since the ranking scores were measured on all of dev, the held-out half too. Ties and greedy weigh every
    # finished trial against the best.
    pool = candidates if method == "greedy" or k == TIED or plan.eval_split == "dev" else candidates[:k]
    for i, candidate in enumerate(pool):
        download(tracking, candidate, out / ".candidates" / f"{i:02d}")
    sel_true = [dev_true[i] for i in plan.select_idx]
    sel_probs = [_aligned(c.folder, "dev", dev_ids)[plan.select_idx] for c in pool]
    sel_f1 = [evaluation.macro_f1(sel_true, p.argmax(1), len(labels)) for p in sel_probs]
    if plan.eval_split == "dev":  # rank on the selection half only; a stable sort: ties keep the candidates' order
        order = sorted(range(len(pool)), key=lambda i: -sel_f1[i])
        pool, sel_probs, sel_f1 = [pool[i] for i in order], [sel_probs[i] for i in order], [sel_f1[i] for i in order]
    ranking = [{"name": c.name, "run_id": c.run_id, "score": c.score, "selection_macro_f1": f}
               for c, f in zip(pool, sel_f1)]
    shares, confidence = None, float(search_cfg.get("search", {}).get("ties_confidence", TIES_CONFIDENCE))
    if method == "greedy" or k == TIED:
        shares = best_ahead_shares(sel_probs, sel_true, len(labels))
        for entry, share in zip(ranking, shares):
            entry["best_ahead_share"] = share
    chosen = choose_members(pool, sel_probs, sel_true, request, len(labels), shares, confidence)
    if chosen.note:
        print(chosen.note)

    ensemble = Chosen(method, chosen.members, chosen.weights, chosen.offsets, labels)
    estimate = ensemble_estimate(tracking, candidates, request, scored_utts, [dev_ids[i] for i in plan.select_idx],
                                 labels)
    scored = ensemble.score(plan)
    files = [_save(out, ensemble, corpus, parent, request)]
    files += _write_evaluation(out, plan, ensemble, scored)
    files += _write_predictions(out, corpus, ensemble)
    shutil.rmtree(out / ".candidates", ignore_errors=True)
    run_id = _log(tracking, parent, request, plan, ensemble, scored, files,
                  estimate.metrics() if not isinstance(estimate, str) else {})
    summary = {"estimate": estimate if isinstance(estimate, str) else
               estimate.metrics() | {"raw_f1": estimate.raw, "text": estimate.text("selection macro-F1", folds)},
               "search": name, "method": method, "k": k, "evaluation": plan.description, **scored.result,
               "members": scored.members, "ranking": ranking, "out_dir": str(out), "run_id": run_id,
               "greedy_curve": chosen.curve, "tied": [c.run_id for c in chosen.tied],
               "ties_confidence": confidence}
    _print_summary(summary, scored.report, labels)
    return summary


# What select-top leaves in a folder it writes: the finished ensemble's manifest, or its downloads in progress.
ENSEMBLE_MARKERS = ("ensemble.json", ".candidates")


def check_replaceable(out: Path) -> None:
    """Refuse an ``--out`` that select-top may not replace: anything but an ensemble it wrote or an empty folder.

    The folder is deleted before the new ensemble is written, so a user's own folder given by mistake would
    be lost with everything in it.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise EmotuneError(f"the ensemble folder {out} is a file. Pass --out a folder that does not exist yet "
                           "(select-top creates it) or one that holds an earlier ensemble.")
    if any((out / marker).exists() for marker in ENSEMBLE_MARKERS) or not any(out.iterdir()):
        return
    raise EmotuneError(f"the ensemble folder {out} already exists and holds files that are not an emotune ensemble "
                       "(no ensemble.json); select-top replaces its folder, so it refuses to delete them. Pass --out "
                       "a new folder (or one holding an earlier ensemble), or move those files away first.")


def _save(out: Path, ensemble: Chosen, corpus, parent, request: EnsembleRequest) -> Path:
    """The ensemble folder: everything ``emotune predict`` needs, with no access to MLflow or the corpus."""
    entries, encoder_folders = [], {}
    for i, (member, weight) in enumerate(zip(ensemble.members, ensemble.weights)):
        target = out / "members" / f"{i + 1:02d}"
        target.mkdir(parents=True)
        for fname in (WEIGHTS_FILE, CARD_FILE):
            shutil.copy2(member.folder / fname, target / fname)
        shutil.copy2(member.folder.parent / "config.json", target / "config.json")
        for enc in ModelCard.load(target).encoders.values():
            if enc.get("kind") == "tiny" and enc.get("folder"):  # built here, not downloadable: ship it
                local = f"encoders/{Path(enc['folder']).name}"
                if local not in encoder_folders.values() and Path(enc["folder"]).is_dir():
                    shutil.copytree(enc["folder"], out / local)
                encoder_folders[enc["folder"]] = local
        entries.append({"folder": f"members/{i + 1:02d}", "run_id": member.run_id, "name": member.name,
                        "weight": weight, "dev_f1": member.dev_f1})
    manifest = {"format": 1, "method": ensemble.method, "k": request.k,
                "greedy_steps": request.steps if ensemble.method == "greedy" else None, "labels": ensemble.labels,
                "members": entries, "encoder_folders": encoder_folders,
                "calibration_offsets": ensemble.offsets.tolist() if ensemble.offsets is not None else None,
                "norm_stats": corpus.norm.to_dict(), "search": parent.data.tags.get("emotune.search"),
                "search_run_id": parent.info.run_id, "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    path = out / "ensemble.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


def _write_evaluation(out: Path, plan: EvaluationPlan, ensemble: Chosen, scored: Scored) -> list:
    result, labels = scored.result, ensemble.labels
    calibrated = "macro_f1_uncalibrated" in result
    files = [evaluation.confusion_png(plan.eval_true, scored.predicted, labels, out / "confusion_matrix.png",
                                      title=f"{ensemble.method} ensemble on {plan.description.split(';')[0]}: "
                                            f"macro-F1 {result['macro_f1']:.3f}"
                                            + (" with calibration offsets" if calibrated else ""))]
    text = [f"evaluation data: {plan.description}", f"ensemble ({ensemble.method}) macro-F1 {result['macro_f1']:.4f}"]
    if calibrated:
        text[-1] += (" with calibration offsets: the report below, confusion_matrix.png, submission.csv and the "
                     "prediction column of test_predictions.csv apply them")
        text.append(f"ensemble ({ensemble.method}) macro-F1 {result['macro_f1_uncalibrated']:.4f} without "
                    "calibration offsets (for comparison only)")
    text += ["", evaluation.report_text(scored.report, labels), "", "members on the same data:"]
    text += [f"  {s['name']}  weight {s['weight']:.0f}  dev {s['dev_f1']:.4f}  evaluation {s['eval_macro_f1']:.4f}"
             for s in scored.members]
    (out / "evaluation.txt").write_text("\n".join(text) + "\n")
    files.append(out / "evaluation.txt")
    confusion = evaluation.confusion_counts(plan.eval_true, scored.predicted, len(labels))
    files.append(evaluation.save_json({"evaluation": plan.description, **result, "report": scored.report,
                                       "confusion_matrix": {"rows_true_columns_predicted": labels,
                                                            "counts": confusion.tolist()},
                                       "members": scored.members}, out / "evaluation.json"))
    return files


def _write_predictions(out: Path, corpus, ensemble: Chosen) -> list:
    """Test-split predictions with their class scores, and the challenge submission ``id,label``: the same labels."""
    if not corpus.test:
        return []
    ids, labels = [u.id for u in corpus.test], ensemble.labels
    predicted, scores = ensemble.combine("test", ids)
    files = [evaluation.write_predictions(out / "test_predictions.csv", ids, scores, labels, predicted=predicted)]
    with (out / "submission.csv").open("w", encoding="utf-8") as f:
        f.write("id,label\n")
        f.writelines(f"{uid},{labels[int(p)]}\n" for uid, p in zip(ids, predicted))
    files.append(out / "submission.csv")
    return files


def _log(tracking: dict, parent, request: EnsembleRequest, plan: EvaluationPlan, ensemble: Chosen, scored: Scored,
         files: list, estimate: dict) -> str:
    """The ensemble's MLflow run, a child of the search's; returns its id."""
    from emotune.tracking.store import TrackedRun

    name = parent.data.tags.get("emotune.search", parent.info.run_id)
    method, k = ensemble.method, request.k
    run = TrackedRun.start(tracking, name=f"ensemble-{name}-{method}-k{k}", kind="ensemble",
                           parent_run_id=parent.info.run_id, tags={"emotune.search": name})
    run.log_params({"method": method, "k": k, "greedy_steps": request.steps if method == "greedy" else None,
                    "exclude_stopped": request.exclude_stopped, "calibrate": request.calibrate,
                    "evaluation": plan.description[:250],
                    "members": ",".join(f"{m.run_id}x{int(w)}" for m, w in zip(ensemble.members, ensemble.weights))})
    run.log_metrics({f"ensemble_{key}": v for key, v in scored.result.items()} |
                    {f"member{i + 1}_macro_f1": s["eval_macro_f1"] for i, s in enumerate(scored.members)} |
                    {"best_member_macro_f1": max(s["eval_macro_f1"] for s in scored.members)} | estimate)
    run.log_artifacts(files)
    run.finish()
    return run.run_id


def _print_summary(summary: dict, report: dict, labels) -> None:
    print(f"{summary['method']} ensemble of search '{summary['search']}' "
          f"({len(summary['members'])} members), scored on the {summary['evaluation']}:")
    if "macro_f1_uncalibrated" in summary:
        print(f"  ensemble macro-F1 {summary['macro_f1']:.4f} with calibration offsets: the predictions, "
              "submission.csv, confusion matrix and report written apply them")
        print(f"  ensemble macro-F1 {summary['macro_f1_uncalibrated']:.4f} without calibration offsets "
              "(for comparison only)")
    else:
        print(f"  ensemble macro-F1 {summary['macro_f1']:.4f}")
    estimate = summary["estimate"]
    if isinstance(estimate, str):
        print(f"  expected score on unseen clips not computed: {estimate}")
    else:
        print(f"  {estimate['text']}")
    for s in summary["members"]:
        print(f"  member {s['name']:<28} weight {s['weight']:.0f}  dev {s['dev_f1']:.4f}  "
              f"evaluation {s['eval_macro_f1']:.4f}{'  (stopped by ASHA)' if s['stopped_by_asha'] else ''}")
    print(f"Ensemble folder: {summary['out_dir']}  (predict with: emotune predict {summary['out_dir']} --csv FILE "
          "--audio-dir DIR)")
    print(f"MLflow run {summary['run_id']}")
