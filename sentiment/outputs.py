"""The output folder of a training run: one run at a time, and no file ever half-written.

`claim` takes the folder for this run (a second run into it stops with a one-line error),
refuses a folder of files that are not a run's, and refuses to mix a new run into an old one
unless told to overwrite or resume; a run that writes nothing leaves no trace. `publish_model`
writes the model folder beside the old one and moves it in only once it is complete, so after
`--overwrite` the previous model stays whole and usable until the new one is ready, and readers
never take parts of two models for one. `log_line` and `truncate_log` keep `log.jsonl`. Writing
any one file safely is `files`' concern; the training loop itself lives in `training`.
"""

import errno
import fcntl
import json
import os
import shutil
import socket

from .checkpointing import checkpoint_root, remove_checkpoints, remove_leftovers
from .config import CONFIG_FILE, LOG_FILE, METRICS_FILE, MODEL_FILES, PUBLISHING_FILE
from .errors import SentimentError, warn
from .files import fsync_path, fsync_tree, remove_path, write_atomically
from .modeling import save_model_folder

LOCK_FILE = ".lock"
STAGING = ".tmp-model"


def claim(args, accelerator):
    """Lock `--output-dir` for this run (main process) and check it may be written; returns the lock."""
    out, lock = args.output_dir, None
    if accelerator.is_main_process:
        if os.path.exists(out) and not os.path.isdir(out):
            raise SentimentError(f"--output-dir {out} is a file; name a folder")
        if not_a_run(out):
            # A run writes its checkpoints, log and model files there (config.json among them), and --overwrite
            # replaces them: in another folder they would be the user's own (a project's config.json).
            raise SentimentError(f"--output-dir {out} holds files that are not a training run's (it has no "
                                 f"{CONFIG_FILE}); a run would write its own among them, replacing any of the same "
                                 f"name (config.json, model.safetensors); choose a new or empty folder")
        lock = OutputLock(out)
        remove_leftovers(out)
    accelerator.wait_for_everyone()
    busy = [name for name in os.listdir(out) if name != LOCK_FILE]
    # A checkpoint of another run, resumed into this folder's run, would replace its later checkpoints and log
    another = args.resume not in (None, "latest") and not one_of_its_checkpoints(args.resume, out)
    refusal = None
    if busy and not args.resume and not args.overwrite:
        refusal = (f"--output-dir {out} is not empty; pass --overwrite to replace it, --resume latest to continue "
                   f"it, or choose another folder")
    elif busy and another and not args.overwrite:
        refusal = (f"--resume {args.resume} is not a checkpoint of the run in --output-dir {out}, whose checkpoints "
                   f"and log resuming would replace; resume into a new or empty folder, or pass --overwrite to "
                   f"replace that run")
    if refusal:
        if lock:
            lock.close(refused=True)  # the folder is left as it was found
        raise SentimentError(refusal)
    if accelerator.is_main_process and busy and args.overwrite and (not args.resume or another):
        remove_checkpoints(out)  # the old model (and its metrics) stays until the new is ready
        for name in (LOG_FILE, STAGING):
            remove_path(os.path.join(out, name))
    accelerator.wait_for_everyone()
    return lock


class OutputLock:
    """A run's hold on its output folder: an exclusive `flock` on the folder's LOCK_FILE, which names the
    holder's process. `close` lets go; where the run wrote nothing else there (it stopped on bad data, or
    was refused), the folder is left as it was found: the file removed, and the folder if the run made it."""

    def __init__(self, folder):
        self.folder, self.path, self.locked = folder, os.path.join(folder, LOCK_FILE), True
        self.made_folder = not os.path.exists(folder)
        while True:
            self.made = not os.path.exists(self.path)
            try:
                os.makedirs(folder, exist_ok=True)
                # Never through a link: the file is emptied for this run's number, and a link's target would be
                self.handle = open(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644),
                                   "a+")
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise SentimentError(f"--output-dir {folder}: its {LOCK_FILE} is a symbolic link, which a run "
                                         f"would empty the target of; remove it") from None
                raise SentimentError(f"--output-dir {folder}: cannot write there ({err.strerror})") from None
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.seek(0)
                holder = self.handle.read().strip() or "?"
                self.handle.close()
                raise SentimentError(f"--output-dir {folder} is in use by another training run (process {holder}); "
                                     f"wait for it or choose another folder") from None
            except OSError as err:  # a network file system without a lock service (ENOLCK): train all the same
                warn(f"--output-dir {folder} cannot be locked ({err.strerror}), so a second run into it would not be "
                     f"refused: start one run at a time there")
                self.locked = False
                break
            if self.holds_the_file():
                break
            self.handle.close()  # a run letting go removed the file this one had opened: lock the one there now
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(str(os.getpid()))
        self.handle.flush()

    def holds_the_file(self):
        try:
            return os.path.samestat(os.fstat(self.handle.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return False

    def close(self, refused=False):
        """Let go of the folder; `refused`: the run was refused it, and wrote nothing there."""
        try:
            if self.locked and self.made and (refused or set(os.listdir(self.folder)) == {LOCK_FILE}):
                os.remove(self.path)  # while locked: a run that opened it before finds it gone, and retries
                if self.made_folder:
                    os.rmdir(self.folder)
        except OSError:  # a folder that cannot be tidied is no reason for an error at the end of a run
            pass
        finally:
            self.handle.close()


def one_of_its_checkpoints(path, folder):
    """Whether the checkpoint at `path` is one of the run's in `folder` (it need not exist)."""
    return os.path.realpath(os.path.dirname(os.path.abspath(path))) == os.path.realpath(checkpoint_root(folder))


def not_a_run(folder):
    """Whether `folder` holds files, and no run's settings: not the folder of a training run."""
    return (os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, CONFIG_FILE))
            and any(name != LOCK_FILE for name in os.listdir(folder)))


def publish_model(folder, model, tokenizer, settings, metrics):
    """Write the model folder and its `metrics.json` into `folder`: all of it beside the old one first,
    then moved in file by file under a PUBLISHING_FILE marker, which readers wait on (a live run) or
    refuse (a run killed midway, whose files may be mixed; `--resume latest` publishes again)."""
    staging = os.path.join(folder, STAGING)
    if os.path.islink(staging):  # never written through: the model's files would land where it points
        os.remove(staging)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_model_folder(staging, model, tokenizer, settings)
        with open(os.path.join(staging, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=2)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a full disk: give back the space the half model took
        raise
    marker = os.path.join(folder, PUBLISHING_FILE)
    if os.path.lexists(marker):  # a killed run's, or a link: made anew, never written through
        os.remove(marker)
    with open(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    fsync_path(marker)
    fsync_path(folder)
    new = set(os.listdir(staging))
    for name in MODEL_FILES - new:  # an old file the new model does not write
        if os.path.isfile(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name in sorted(new):
        os.replace(os.path.join(staging, name), os.path.join(folder, name))
    os.rmdir(staging)
    fsync_path(folder)
    os.remove(marker)
    fsync_path(folder)


def log_line(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_log(path, step):
    """Drop log lines written after the checkpoint a run resumes from: they are about to be redone.
    A line cut short by a crash is dropped too, and so is one of other bytes or of no step."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):
                continue
            recorded = record.get("step") if isinstance(record, dict) else None
            if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded <= step:
                kept.append(json.dumps(record) + "\n")
    write_atomically(path, "".join(kept))
