"""Fine-tune a transformer to classify sentiment: `accelerate launch train.py --data reviews.csv`.

All options: `python train.py --help`. The work is done by `sentiment.training.train`.
"""

import sys

from sentiment.config import TrainArgs, parse_args
from sentiment.errors import exit_on_user_error

if __name__ == "__main__":
    if sys.stdout is not None:  # None when the shell closed it (`>&-`): prints then go nowhere
        sys.stdout.reconfigure(errors="backslashreplace")  # a label the terminal cannot show must not end the run
    with exit_on_user_error():
        args = parse_args(TrainArgs, __doc__.splitlines()[0])
        from sentiment.training import train  # torch and transformers load after the flags: --help is instant
        train(args)
