"""Full training state on disk: save atomically, find the newest, keep the last few, check on resume.

A checkpoint is `OUT/checkpoints/step-00000120/`: Accelerate's `save_state` (model, optimizer,
scheduler, every process's RNG) plus `trainer_state.json` (`TrainState`: where the loop stands)
and `train_config.json` and the tokenizer. It is written under a `.tmp-` name and renamed when
complete, so a crash while saving never leaves a folder that looks complete. The loop itself
lives in `training`.
"""

import dataclasses
import glob
import json
import math
import os
import shutil
from dataclasses import dataclass

from .config import TrainArgs, invariants
from .errors import SentimentError
from .modeling import CONFIG_FILE

STATE_FILE = "trainer_state.json"
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

    def is_better(self, accuracy, loss):
        # Best by accuracy; on a tie, the lower loss (the later, more confident model, usually).
        return (accuracy, -loss) > (self.best_val_accuracy, -self.best_val_loss)


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir):
    """Finished checkpoints, oldest first (unfinished ones still carry their `.tmp-` name)."""
    found = glob.glob(os.path.join(checkpoint_root(output_dir), "step-*", STATE_FILE))
    return sorted(os.path.dirname(path) for path in found)


def save_checkpoint(accelerator, output_dir, state, config, tokenizer, keep):
    """Save the full training state at `state.step`; every process must call this."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{state.step:08d}")
    tmp = os.path.join(root, f".tmp-step-{state.step:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)  # a tiny model's vocabulary exists nowhere else
        for name, content in ((STATE_FILE, dataclasses.asdict(state)), (CONFIG_FILE, config)):
            with open(os.path.join(tmp, name), "w") as f:
                json.dump(content, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in complete_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_checkpoint(resume, output_dir):
    """The checkpoint folder that `--resume` names: 'latest' in `output_dir`, or a path."""
    if resume == "latest":
        found = complete_checkpoints(output_dir)
        if not found:
            raise SentimentError(f"--resume latest: no complete checkpoint in {checkpoint_root(output_dir)}")
        return found[-1]
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise SentimentError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
    return resume


def load_trainer_state(folder, config):
    """The loop's position from a checkpoint, after checking the run's invariants match."""
    with open(os.path.join(folder, CONFIG_FILE)) as f:
        saved = json.load(f)
    changed = [f"--{key.replace('_', '-')} was {saved.get(key)!r}, now {config.get(key)!r}"
               for key in INVARIANTS if saved.get(key) != config.get(key)]
    if saved.get("num_processes") != config.get("num_processes"):
        changed.append(f"processes were {saved.get('num_processes')}, now {config.get('num_processes')}")
    if changed:
        raise SentimentError(f"cannot resume from {folder}: " + "; ".join(changed)
                             + ". Resume with the settings it was saved with")
    with open(os.path.join(folder, STATE_FILE)) as f:
        return TrainState(**json.load(f))
