"""Full training state on disk: save atomically, find the newest, keep the last few, check on resume.

A checkpoint is `OUT/checkpoints/step-00000120/`: Accelerate's `save_state` (model, optimizer,
scheduler, every process's RNG) plus `trainer_state.json` (`TrainState`: where the loop stands)
and `train_config.json`, the tokenizer and the best model's weights so far (so that resuming
from it never picks up a best model from the abandoned future). It is written under a `.tmp-`
name, flushed to disk and renamed when complete, so neither a crash nor a power cut leaves a
folder that looks complete but is not; old ones are renamed before they are deleted. The loop
itself lives in `training`.
"""

import dataclasses
import glob
import json
import math
import os
import re
import shutil
from dataclasses import dataclass

import torch
from safetensors import safe_open

from .config import CONFIG_FILE, STATE_FILE, TrainArgs, invariants
from .errors import SentimentError, flag, warn
from .files import as_plain_files, fsync_path, fsync_tree, remove_path

BEST_WEIGHTS = "best.safetensors"
INVARIANTS = tuple(invariants(TrainArgs))  # settings a resumed run must share with the saved one


@dataclass
class TrainState:
    """Where the training loop stands; saved in every checkpoint as `trainer_state.json`."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # the epoch under way
    batches_done: int = 0  # batches of this epoch already trained on (mid-epoch resume skips them)
    train_samples: int = 0  # examples trained on, all processes together
    train_seconds: float = 0.0  # time spent training, evaluation and checkpoints left out
    best_val_accuracy: float = -1.0  # the best model so far, by validation accuracy …
    best_val_loss: float = math.inf  # … then lower loss on a tie
    best_step: int = None
    best_epoch: int = None
    evals_since_best: int = 0  # evaluations in a row without a better model (early stopping counts them)
    stopped_early: str = None  # why the run stopped before its last step, if it did

    def is_better(self, accuracy, loss):
        # Best by accuracy; on a tie, the lower loss (the later, more confident model, usually).
        return (accuracy, -loss) > (self.best_val_accuracy, -self.best_val_loss)


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def best_weights(output_dir):
    """The best model's weights so far: beside the checkpoints, and copied into each of them."""
    return os.path.join(checkpoint_root(output_dir), BEST_WEIGHTS)


def step_of(folder):
    return int(os.path.basename(folder).removeprefix("step-"))


def complete_checkpoints(output_dir):
    """Finished checkpoints, oldest first (unfinished ones still carry their `.tmp-` name)."""
    found = glob.glob(os.path.join(checkpoint_root(output_dir), "step-*", STATE_FILE))
    return sorted(os.path.dirname(path) for path in found)


def remove_leftovers(output_dir):
    """Remove what killed runs left half-made in `output_dir`'s checkpoints: a checkpoint being saved
    (`.tmp-`), one being deleted (`.del-`), best weights being written. Each can be as large as a
    checkpoint, and no later run reuses its name for sure. Only the run holding the folder calls this."""
    root = checkpoint_root(output_dir)
    leftovers = glob.glob(os.path.join(root, ".tmp-step-*")) + glob.glob(os.path.join(root, ".del-step-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(best_weights(output_dir) + ".tmp"):
        os.remove(best_weights(output_dir) + ".tmp")


def remove_checkpoints(output_dir):
    """Remove a run's checkpoints and best weights (`--overwrite`). A `checkpoints` that is a link (to a
    larger disk, say) is kept, and only the checkpoints' own entries go from where it points."""
    root = checkpoint_root(output_dir)
    if not (os.path.islink(root) and os.path.isdir(root)):
        remove_path(root)
        return
    for name in os.listdir(root):
        if name in (BEST_WEIGHTS, BEST_WEIGHTS + ".tmp") or re.fullmatch(r"(\.tmp-|\.del-)?step-\d+", name):
            remove_path(os.path.join(root, name))


def remove_tree(folder):
    """Rename, then delete: a kill midway leaves a `.del-` folder, never a half-deleted complete-looking one."""
    doomed = os.path.join(os.path.dirname(folder), ".del-" + os.path.basename(folder))
    if os.path.exists(doomed):  # left by a kill during an earlier deletion
        shutil.rmtree(doomed)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def link_or_copy(source, target):
    """A hard link where the file system allows it (the best weights are replaced, never changed in place)."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def save_checkpoint(accelerator, output_dir, state, config, tokenizer, keep):
    """Save the full training state at `state.step`; every process must call this."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{state.step:08d}")
    tmp = os.path.join(root, f".tmp-step-{state.step:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
        if accelerator.is_main_process:
            tokenizer.save_pretrained(tmp)  # a tiny model's vocabulary exists nowhere else
            for name, content in ((STATE_FILE, dataclasses.asdict(state)), (CONFIG_FILE, config)):
                with open(os.path.join(tmp, name), "w") as f:
                    json.dump(content, f, indent=2)
            if state.best_step is not None:  # the best model belongs to this checkpoint's past
                link_or_copy(best_weights(output_dir), os.path.join(tmp, BEST_WEIGHTS))
            as_plain_files(glob.glob(os.path.join(tmp, "*.safetensors")))
            fsync_tree(tmp)
            if os.path.exists(final):
                remove_tree(final)
            os.replace(tmp, final)
    except BaseException:
        if accelerator.is_main_process:  # a full disk: give back the space the half checkpoint took
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if accelerator.is_main_process:
        fsync_path(root)
        for old in complete_checkpoints(output_dir)[:-keep]:
            remove_tree(old)
    accelerator.wait_for_everyone()
    return final


def damage(folder):
    """What is wrong with a complete-looking checkpoint (None if nothing): empty files after a power
    cut, unreadable JSON, weights whose header does not parse."""
    try:
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                return f"{name} is empty"
        read_state(folder)
        with open(os.path.join(folder, CONFIG_FILE)) as f:
            if not isinstance(json.load(f), dict):
                raise ValueError(f"{CONFIG_FILE} holds no settings")
        for path in glob.glob(os.path.join(folder, "*.safetensors")):
            with safe_open(path, "pt"):
                pass
    except Exception as err:  # any failure to read it means the same: do not resume from it
        return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def find_checkpoint(resume, output_dir):
    """The checkpoint folder that `--resume` names: 'latest' in `output_dir` (the newest that is not
    damaged, saying which were passed over), or a path."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise SentimentError(f"--resume latest: no complete checkpoint in {checkpoint_root(output_dir)}")
        for folder in reversed(found):
            problem = damage(folder)
            if problem is None:
                return folder
            warn(f"checkpoint {folder} is damaged ({problem}); trying the one before")
        raise SentimentError(f"--resume latest: every checkpoint in {checkpoint_root(output_dir)} is damaged")
    resume = os.path.normpath(resume)  # as a shell completes it, with a slash at the end
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise SentimentError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    problem = damage(resume)
    if problem:
        raise SentimentError(f"--resume {resume}: the checkpoint is damaged ({problem}); resume from an older one")
    return resume


def forget_after(output_dir, folder, step):
    """Resuming from `folder`, the checkpoint of `step` (named as the user likes, if not `output_dir`'s),
    abandons the checkpoints saved after it; remove them, so a later `--resume latest` cannot pick one,
    and restore the best weights this checkpoint knew."""
    for newer in complete_checkpoints(output_dir):
        if step_of(newer) > step:
            remove_tree(newer)
    saved, best = os.path.join(folder, BEST_WEIGHTS), best_weights(output_dir)
    if os.path.exists(best):
        os.remove(best)
    if os.path.exists(saved):
        os.makedirs(checkpoint_root(output_dir), exist_ok=True)  # resumed into a new folder, it has none yet
        link_or_copy(saved, best)


def check_random_states(folder, num_processes):
    """Say so when a process's random state will not load: the resumed run still goes on, but it
    no longer replays the same dropout as the run it continues (Accelerate only logs this)."""
    for rank in range(num_processes):
        path = os.path.join(folder, f"random_states_{rank}.pkl")
        try:
            torch.load(path, weights_only=False)
        except Exception as err:
            warn(f"{path} does not load ({type(err).__name__}); the resumed run will not repeat the interrupted "
                 f"one exactly")


def load_trainer_state(folder, config):
    """The loop's position from a checkpoint, after checking the run's invariants match."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        saved = json.load(f)
    defaults = {f.name: f.default for f in dataclasses.fields(TrainArgs)}  # for settings newer than the checkpoint
    changed = [f"{flag(key)} was {saved.get(key, defaults[key])!r}, now {config.get(key)!r}"
               for key in INVARIANTS if saved.get(key, defaults[key]) != config.get(key)]
    for key, what in (("num_processes", "processes"), ("mixed_precision", "mixed precision in effect")):
        if saved.get(key) is not None and saved.get(key) != config.get(key):  # None: saved before it was recorded
            changed.append(f"{what} was {saved.get(key)}, now {config.get(key)}")
    if saved.get("data_digest") is not None and saved["data_digest"] != config.get("data_digest"):
        changed.append("the rows of the data files differ from the checkpoint's (texts or labels edited, added "
                       "or removed)")
    if changed:
        raise SentimentError(f"cannot resume from {folder}: " + "; ".join(changed)
                             + ". Resume with the settings it was saved with")
    return read_state(folder)


def read_state(folder):
    """The checkpoint's `TrainState`; a ValueError naming the field where `STATE_FILE` holds what this version
    of the loop does not know (a field it lacks or a value of the wrong type), which it would fail on later."""
    with open(os.path.join(folder, STATE_FILE)) as f:
        saved = json.load(f)
    if not isinstance(saved, dict):
        raise ValueError(f"{STATE_FILE} holds no fields")
    fields = {f.name: f for f in dataclasses.fields(TrainState)}
    for name, value in saved.items():
        if name not in fields:
            raise ValueError(f"{STATE_FILE} has a field this version does not know, {name!r}: saved by another "
                             f"version of sentiment?")
        kind, what = {int: ((int,), "whole number"), float: ((int, float), "number"), str: ((str,), "text")}[
            fields[name].type]
        if not (isinstance(value, kind) and not isinstance(value, bool)) and not (
                value is None and fields[name].default is None):
            raise ValueError(f"{STATE_FILE}: {name} is {value!r}, not a {what}")
    return TrainState(**saved)
