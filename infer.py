"""Score reviews with a trained model: `python infer.py --model outputs/model "text" …` or `--input FILE`.

All options: `python infer.py --help`. Scale out with `accelerate launch infer.py --input … --output …`.
The work is done by `sentiment.inference.run`.
"""

from sentiment.config import InferArgs, parse_args
from sentiment.errors import exit_on_user_error
from sentiment.inference import run

if __name__ == "__main__":
    with exit_on_user_error():
        run(parse_args(InferArgs, __doc__.splitlines()[0]))
