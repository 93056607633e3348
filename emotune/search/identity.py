"""Which search a name means: each search has an id, and its MLflow runs are found by name and id together.

A search's name is its Ray folder (``ray.storage/NAME``) and its parent run in MLflow. Names get reused: the Ray
folder moved away to free disk, ``ray.storage`` changed, two users with the default name on one MLflow server.
So every search gets an id at its first start, kept in ``emotune_search_id.txt`` beside its Tune state and as a
tag on its parent run and its trials' runs. Resuming adopts a parent run only when the ids match; a new search
whose name is taken in the store by another id stops before any work, unless ``search.replace=true``, which ends
the old parent run and keeps every old trial run, retagged as belonging to a replaced search.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from emotune.errors import EmotuneError

ID_FILE = "emotune_search_id.txt"


@dataclass(frozen=True)
class SearchIdentity:
    name: str
    id: str
    legacy: bool  # a search started before ids existed, resumed from its Ray folder: it keeps its parent run

    @property
    def parent_key(self) -> str:
        return f"search/{self.name}"


def identity_of(experiment_dir: Path, name: str, restore: bool) -> SearchIdentity:
    """The id of the search in ``experiment_dir``, made and written at its first start."""
    record = experiment_dir / ID_FILE
    if record.is_file():
        return SearchIdentity(name, record.read_text().strip(), legacy=False)
    experiment_dir.mkdir(parents=True, exist_ok=True)
    search_id = uuid.uuid4().hex[:12]
    record.write_text(search_id + "\n")
    # Tune state without an id: the search ran before ids existed, and its Ray folder says it is this one
    return SearchIdentity(name, search_id, legacy=restore)


def _started(run) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000))


def _clash_message(cfg: dict, me: SearchIdentity, old, n_trials: int, experiment_dir: Path) -> str:
    from emotune.tracking.store import TAG_SEARCH_ID

    old_id = old.data.tags.get(TAG_SEARCH_ID)
    return (
        f"search '{me.name}' already exists in the MLflow store {cfg['tracking']['uri']} as another search: run "
        f"{old.info.run_id} ('{old.info.run_name}'), started {_started(old)}, {n_trials} trial run(s), "
        f"{'search id ' + old_id if old_id else 'from an emotune without search ids'}. This one, in {experiment_dir}, "
        f"is search id {me.id}, so running it would mix the two. Nothing was started. Ways on:\n"
        f"  - resume the old search: put its Ray folder back at {experiment_dir} (the folder whose "
        f"{ID_FILE} reads {old_id or '(none)'}) and run the same command;\n"
        "  - keep both: start this one under another name, search.name=NEW_NAME;\n"
        "  - replace it: search.replace=true ends the old search's run and keeps all its trial runs, tagged as "
        "belonging to a replaced search.")


def _mark_replaced(cfg: dict, old, by: SearchIdentity) -> None:
    """End the old search's run and keep its trials' runs, renamed so that the name now means the new search."""
    from emotune.search.resume import end_running_trials
    from emotune.tracking.store import TAG_RUN_KEY, TAG_SEARCH, TrackedRun, child_runs

    tracking = cfg["tracking"]
    label = f"{by.name} (replaced {time.strftime('%Y-%m-%d %H:%M')})"
    marks = {TAG_SEARCH: label, "emotune.replaced_by": by.id}
    for run in child_runs(tracking, old.info.run_id):
        TrackedRun(tracking, run.info.run_id).set_tags(marks)
    end_running_trials(tracking, old.info.run_id)
    parent = TrackedRun(tracking, old.info.run_id)
    parent.set_tags(marks | {TAG_RUN_KEY: f"{by.parent_key}/replaced/{old.info.run_id}"})
    if old.info.status == "RUNNING":
        parent.finish("KILLED")
    print(f"search '{by.name}': replaced the earlier search of that name (run {old.info.run_id}, started "
          f"{_started(old)}); its runs are kept, tagged emotune.search='{label}'.", flush=True)


def parent_run(cfg: dict, me: SearchIdentity, experiment_dir: Path, tags: dict):
    """The search's MLflow run: adopted when it is this search's (same id), else created.

    Raises :class:`EmotuneError` when the name belongs to another search in the store and ``search.replace`` is
    false. ``tags`` go on a new run.
    """
    from emotune.tracking.store import TAG_KIND, TAG_SEARCH_ID, TrackedRun, child_runs, runs_with_key

    tracking = cfg["tracking"]
    found = runs_with_key(tracking, me.parent_key)
    mine = [r for r in found if r.data.tags.get(TAG_SEARCH_ID) == me.id]
    if not mine and me.legacy:
        mine = [r for r in found if not r.data.tags.get(TAG_SEARCH_ID)][:1]
    others = [r for r in found if r not in mine]
    if others and not cfg["search"]["replace"]:
        old = others[-1]
        trials = [r for r in child_runs(tracking, old.info.run_id) if r.data.tags.get(TAG_KIND) == "trial"]
        raise EmotuneError(_clash_message(cfg, me, old, len(trials), experiment_dir))
    for old in others:
        _mark_replaced(cfg, old, me)
    if not mine:
        return TrackedRun.start(tracking, name=f"search-{me.name}", kind="search", run_key=me.parent_key,
                                tags=tags | {TAG_SEARCH_ID: me.id})
    run = TrackedRun(tracking, mine[0].info.run_id)
    if me.legacy:  # from now on its runs carry the id, like those of any search
        for child in child_runs(tracking, run.run_id):
            TrackedRun(tracking, child.info.run_id).set_tags({TAG_SEARCH_ID: me.id})
        run.set_tags({TAG_SEARCH_ID: me.id})
    run.reopen()
    return run
