"""Full training state on disk: save atomically, find the newest, keep the last few, check on resume.

A checkpoint is `OUT/checkpoints/step-00000120/`: Accelerate's `save_state` (model, optimizer,
scheduler, every process's RNG) plus `trainer_state.json` (where the loop stands) and
`train_config.json` and the tokenizer. It is written under a `.tmp-` name and renamed when complete, so a crash
while saving never leaves a folder that looks complete. The loop itself lives in `training`.
"""

import glob
import json
import os
import shutil

from .errors import SentimentError

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "train_config.json"
# Settings a resumed run must share with the run that saved the checkpoint: they fix the data
# split, the batch order, the learning-rate schedule or the model's shape.
INVARIANTS = ("data", "val_data", "test_data", "val_size", "test_size", "text_column", "label_column",
              "skip_bad_rows", "model", "max_length", "truncation", "epochs", "batch_size", "grad_accum", "lr",
              "weight_decay", "warmup_ratio", "max_grad_norm", "seed", "max_steps")


def checkpoint_root(output_dir):
    return os.path.join(output_dir, "checkpoints")


def complete_checkpoints(output_dir):
    """Finished checkpoints, oldest first (unfinished ones still carry their `.tmp-` name)."""
    found = glob.glob(os.path.join(checkpoint_root(output_dir), "step-*", STATE_FILE))
    return sorted(os.path.dirname(path) for path in found)


def save_checkpoint(accelerator, output_dir, state, config, tokenizer, keep):
    """Save the full training state at `state['step']`; every process must call this."""
    root = checkpoint_root(output_dir)
    final = os.path.join(root, f"step-{state['step']:08d}")
    tmp = os.path.join(root, f".tmp-step-{state['step']:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier save
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()  # every process's RNG state is in before the rename
    if accelerator.is_main_process:
        tokenizer.save_pretrained(tmp)  # a tiny model's vocabulary exists nowhere else
        for name, content in ((STATE_FILE, state), (CONFIG_FILE, config)):
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
        return json.load(f)
