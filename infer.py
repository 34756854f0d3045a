"""Score reviews with a trained model: `python infer.py --model outputs/model "text" …` or `--input FILE`.

All options: `python infer.py --help`. Scale out with `accelerate launch infer.py --input … --output …`.
The work is done by `sentiment.inference.run`.
"""

from sentiment.config import InferArgs, parse_args
from sentiment.errors import exit_on_user_error

if __name__ == "__main__":
    with exit_on_user_error():
        args = parse_args(InferArgs, __doc__.splitlines()[0])
        from sentiment.inference import run  # torch and transformers load after the flags: --help is instant
        run(args)
