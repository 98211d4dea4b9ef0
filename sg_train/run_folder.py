"""Run folders: one folder holds everything a training run writes, and a new run never mixes
with an earlier one.

Layout (``<run>`` is ``trainer.default_root_dir``)::

    <run>/run.json                 identity: W&B run id, every start and resume (this module)
    <run>/config.yaml              the resolved configuration (LightningCLI)
    <run>/checkpoints/last.ckpt    the latest state, rewritten after every epoch (resume from it)
    <run>/checkpoints/<best>.ckpt  the best checkpoint(s) by the configured monitor
    <run>/results.json             every retrieval evaluation of the run, in order
    <run>/retrieval_curves.png     the retrieval metrics over the epochs (written at the end of fit)
    <run>/retrieval_examples/<dataset>/<stage>_epoch<NNN>.png   what the model retrieves, per evaluation
    <run>/skipped_images.tsv       images the data pipeline could not read
    <run>/wandb/                   the W&B run files (offline runs: ``wandb sync <run>/wandb/offline-run-*``)

:func:`plan_run` decides, before anything is built, whether a ``fit`` starts a new run in the
folder or continues the one there, and refuses what would mix two runs.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sg_train.errors import UserInputError
from sg_train.files import atomic_write

__all__ = [
    "CHECKPOINT_DIR",
    "CURVES_FILE",
    "EXAMPLES_DIR",
    "LAST_CHECKPOINT",
    "RESULTS_FILE",
    "RUN_FILE",
    "RunFolderError",
    "RunPlan",
    "check_checkpoint_file",
    "check_writable_dir",
    "earlier_run_files",
    "plan_run",
    "read_run_file",
    "record_start",
    "resolve_checkpoint",
]

RUN_FILE = "run.json"
RUN_FORMAT = "sg-train/run"
RUN_VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
RESULTS_FILE = "results.json"
CURVES_FILE = "retrieval_curves.png"
EXAMPLES_DIR = "retrieval_examples"
# run.json is written once every pre-flight check has passed; a logger folder alone (W&B creates its
# folder before the setup checks run) does not make a folder taken.
_EARLIER_RUN_MARKERS = (RUN_FILE, RESULTS_FILE, "skipped_images.tsv")


class RunFolderError(UserInputError):
    """A run folder that cannot be used as asked (holds another run, not writable, ...)."""


@dataclass(frozen=True)
class RunPlan:
    """What a ``fit`` will do: ``run_dir`` (absolute), ``resume_from`` (a checkpoint or None),
    ``wandb_id`` (the W&B run id to use, continued on resume), ``info`` (run.json contents)."""

    run_dir: Path
    resume_from: Path | None
    wandb_id: str | None
    info: dict[str, Any]


def earlier_run_files(run_dir: str | os.PathLike) -> list[str]:
    """Names under ``run_dir`` that show a run already lives there (empty: the folder is free)."""
    run_dir = Path(run_dir)
    found = [name for name in _EARLIER_RUN_MARKERS if (run_dir / name).exists()]
    checkpoints = run_dir / CHECKPOINT_DIR
    if checkpoints.is_dir():
        found += [f"{CHECKPOINT_DIR}/{p.name}" for p in sorted(checkpoints.glob("*.ckpt"))]
    return found


def read_run_file(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """``<run_dir>/run.json`` as a dict, or None when there is none; raises RunFolderError if unreadable."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"run file {path} is unreadable ({exc}); it records the run's W&B id: restore it "
                             "or delete it to continue under a new W&B run") from None
    if not isinstance(info, dict) or info.get("format") != RUN_FORMAT:
        raise RunFolderError(f"{path} is not an sg-train run file (format {RUN_FORMAT!r})")
    return info


def _run_dir_of_checkpoint(ckpt: Path) -> Path | None:
    """``<run>`` for a checkpoint at ``<run>/checkpoints/<name>.ckpt``; None elsewhere."""
    return ckpt.parent.parent if ckpt.parent.name == CHECKPOINT_DIR else None


def check_checkpoint_file(ckpt_path: str | os.PathLike) -> Path:
    """``ckpt_path`` as a Path if it is a complete ``torch.save`` file; else RunFolderError naming it.

    Cheap (reads the zip directory, not the tensors): a missing, empty or cut-off file is named
    before Lightning's own loading fails with "Ran out of input" and no path.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise RunFolderError(f"--ckpt_path {ckpt_path}: no such file")
    if not zipfile.is_zipfile(path):  # torch.save's format; a cut-off write is not a zip
        raise RunFolderError(
            f"--ckpt_path {ckpt_path}: not a PyTorch checkpoint ({path.stat().st_size} bytes; empty, or cut off "
            "while being written?); use another checkpoint of the run"
        )
    return path


def resolve_checkpoint(run_dir: str | os.PathLike, ckpt_path: str | os.PathLike | None) -> Path | None:
    """The checkpoint a ``fit`` continues from (see :func:`plan_run`), or None for a new run."""
    run_dir = Path(run_dir).expanduser().resolve()
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        return last if last.is_file() else None
    resume_from = check_checkpoint_file(ckpt_path).resolve()
    owner = _run_dir_of_checkpoint(resume_from)
    if owner is not None and owner != run_dir:
        raise RunFolderError(
            f"--ckpt_path {ckpt_path} belongs to the run folder {owner}, but trainer.default_root_dir is {run_dir}: "
            f"add --trainer.default_root_dir {owner} to continue that run, or start a new run from its weights "
            f"with --model.init_from {ckpt_path}"
        )
    return resume_from


def plan_run(
    run_dir: str | os.PathLike,
    ckpt_path: str | os.PathLike | None,
    *,
    new_wandb_id: str | None = None,
) -> RunPlan:
    """Decide how ``fit`` uses ``run_dir``; raise :class:`RunFolderError` for anything that mixes runs.

    - ``ckpt_path=None``: a new run; ``run_dir`` must hold no earlier run (see
      :func:`earlier_run_files`), else the error names what is there and the two ways out.
    - ``ckpt_path="last"``: continue ``<run_dir>/checkpoints/last.ckpt`` if it exists, else start
      a new run (a job script that is simply re-submitted after a crash): in an empty folder, or
      again in a folder whose run ended before it saved any checkpoint (a crash in its first
      epoch, a pre-flight refusal); a folder with other checkpoints but no ``last.ckpt`` is refused,
      naming the newest one.
    - ``ckpt_path=<file>``: continue from that checkpoint; when it lies in a run folder's
      ``checkpoints/`` that folder must be ``run_dir`` (one run, one folder).

    ``new_wandb_id``: the id to give a new run's W&B logger (None: no W&B logger). On resume the
    id recorded in ``run.json`` is kept, so the W&B curves continue in the same run.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    resume_from = resolve_checkpoint(run_dir, ckpt_path)
    info = read_run_file(run_dir)
    if resume_from is None:
        earlier = earlier_run_files(run_dir)
        saved = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        if earlier and (saved or str(ckpt_path) != "last"):
            last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
            if last.is_file():
                go_on = f"continue it with --ckpt_path {last}"
            elif saved:
                go_on = f"it has no last.ckpt; continue it from its newest checkpoint with --ckpt_path {saved[-1]}"
            else:
                go_on = "it saved no checkpoint to continue from: start it again with --ckpt_path last"
            raise RunFolderError(
                f"the run folder {run_dir} already holds a run ({', '.join(earlier[:6])}); {go_on}; or start a new "
                "run in another folder with --trainer.default_root_dir <new folder>"
            )
        # a new run, or (--ckpt_path last) the folder's run started again: it ended before saving any
        # checkpoint, so nothing of it can be continued; its earlier starts stay listed in run.json
        # and its W&B run stays as it was (the new start gets a new W&B id)
        starts = info["starts"] if earlier and info is not None else []
        info = {"format": RUN_FORMAT, "version": RUN_VERSION, "wandb_id": new_wandb_id, "starts": starts}
    elif info is None:  # a checkpoint from a folder without run.json (copied, or older sg-train)
        info = {"format": RUN_FORMAT, "version": RUN_VERSION, "wandb_id": new_wandb_id, "starts": []}
    return RunPlan(run_dir=run_dir, resume_from=resume_from, wandb_id=info.get("wandb_id"), info=info)


def check_writable_dir(
    path: str | os.PathLike,
    what: str,
    fix: str = "choose a writable location, e.g. --trainer.default_root_dir <folder>",
) -> Path:
    """Create ``path`` (and parents) and prove a file can be written there; return it.

    Raises :class:`RunFolderError` naming ``what`` (e.g. "checkpoint folder"), the path, the
    reason and ``fix``, before a run spends any time training.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise RunFolderError(f"cannot write the {what} {path} ({exc.strerror or exc}); {fix}") from None
    return path


def record_start(plan: RunPlan, command: str) -> None:
    """Append this start (time, command line, checkpoint resumed from) to ``<run>/run.json``."""
    check_writable_dir(plan.run_dir, "run folder")
    plan.info["starts"].append({
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "argv": list(sys.argv),
        "resumed_from": str(plan.resume_from) if plan.resume_from is not None else None,
    })
    atomic_write(plan.run_dir / RUN_FILE, lambda fh: json.dump(plan.info, fh, indent=2), mode="w")
