"""The table of bench/gpu_check.sh: reads the figures its steps wrote and prints them against the goals.

    python -m bench.gpu_report train.json score.json [--json all.json]
"""

import argparse
import importlib.metadata
import json
import platform

GOALS = [  # (figure, goal, at least)
    ("MFU of ours (measured bf16 matmul rate)", "mfu", 0.35),
    ("one 25,000-review epoch at 512, s (at most)", "epoch", 8.0),
    ("ours / Trainer, samples/s", "vs_trainer", 2.0),
    ("ours / Trainer group_by_length, samples/s", "vs_grouped", 1.3),
    ("Predictor / pipeline(batch_size=64), reviews/s", "vs_pipeline", 2.0),
    ("service at 64 clients / offline Predictor", "vs_offline", 0.8),
    ("service / per-request server at 64 clients", "vs_per_request", 5.0),
]


def figures(train, score):
    """Each goal's figure; None where a run it needs failed or was cut short (its step says which)."""
    runs, scoring, serving = train.get("runs", {}), score.get("scoring", {}), score.get("serving", {})

    def ratio(a, b):
        return a / b if a is not None and b is not None else None

    ours = runs.get("ours", {})
    samples = {name: r["samples_s"] for name, r in runs.items()}
    served = {name: r["req_s"] for name, r in serving.items()}
    return {"mfu": ours.get("mfu_measured"), "epoch": ours.get("epoch_25k_s"),
            "vs_trainer": ratio(samples.get("ours"), samples.get("Trainer")),
            "vs_grouped": ratio(samples.get("ours"), samples.get("Trainer grouped")),
            "vs_pipeline": ratio(scoring.get("predictor_reviews_s"), scoring.get("pipeline_reviews_s")),
            "vs_offline": ratio(served.get("ours"), scoring.get("predictor_reviews_s")),
            "vs_per_request": ratio(served.get("ours"), served.get("per-request"))}


def anatomy_lines(anatomy):
    """bench/gpu_train.py's anatomy of a training step, in words: a line for the run's batch, one per batch size."""
    def ms(value):
        return "-" if value is None else f"{value:.1f}"

    lines = [f"one training step, ms: {anatomy['wall_ms_4d_mask']:.1f} end to end, the device busy "
             f"{ms(anatomy['device_ms'])} of it; {anatomy['wall_ms_2d_mask']:.1f} with the 2D mask (a wait each step)"]
    for size, a in anatomy.get("by_batch_size", {}).items():
        lines.append(f"  batch {size} ({a['tokens_per_step']:.0f} real tokens): {a['wall_ms_4d_mask']:.1f} ms a step, "
                     f"the device busy {ms(a['device_ms'])} ms")
    if anatomy.get("syncs") is not None:  # measured on a GPU alone
        waits = ", ".join(f"{where} ({count}x)" for where, count in anatomy["syncs"].items()) or "none"
        lines.append(f"  waits for the device in one step: {waits}")
    graphed = anatomy.get("graphed")
    if graphed and "failed" in graphed:
        lines.append(f"  one step as a CUDA graph: failed ({graphed['failed']})")
    elif graphed:
        lines.append(f"  one step of shape {graphed['shape']}: {graphed['eager_ms']:.1f} ms eager, "
                     f"{graphed['graphed_ms']:.1f} ms replayed as a CUDA graph")
    return lines


def read(path):
    """A step's figures, or none where the step wrote nothing (it failed or ran out of time first)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as err:
        print(f"{path}: no figures ({type(err).__name__}: {err})")
        return {}


def software():
    """The versions the check ran with: the GPU machine has its own, not the project's pins."""
    import torch
    names = ("torch", "transformers", "accelerate", "tokenizers", "polars", "starlette", "uvicorn")
    found = {name: importlib.metadata.version(name) for name in names}
    return {"python": platform.python_version(), "cuda": torch.version.cuda, **found}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train")
    parser.add_argument("score")
    parser.add_argument("--json", default=None, help="Write all figures together to this file.")
    args = parser.parse_args()
    train, score = read(args.train), read(args.score)
    values, versions = figures(train, score), software()
    print("software: " + ", ".join(f"{name} {version}" for name, version in versions.items()))
    if "card" in train:
        print(f"card: {train['card']}, {train['precision']}; matmul {train['matmul_flops'] / 1e12:.0f} TFLOP/s "
              f"measured, {train['datasheet_flops'] / 1e12:.0f} data sheet")
    print("| figure | measured | goal | met |\n|---|---:|---:|---|")
    for label, key, goal in GOALS:
        if values[key] is None:
            print(f"| {label} | not measured | {goal} | - |")
            continue
        met = values[key] <= goal if key == "epoch" else values[key] >= goal
        print(f"| {label} | {values[key]:.2f} | {goal} | {'yes' if met else 'no'} |")
    print("| trainer | tokens/s | samples/s | MFU measured | MFU data sheet | 25k epoch s | samples/s after step 50 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in train.get("runs", {}).items():
        steady = f"{r['steady_samples_s']:.1f}" if r.get("steady_samples_s") else "-"
        print(f"| {name} | {r['tokens_s']:.0f} | {r['samples_s']:.1f} | {r['mfu_measured']:.1%} | "
              f"{r['mfu_datasheet']:.1%} | {r['epoch_25k_s']:.1f} | {steady} |")
    if anatomy := train.get("step_anatomy"):
        print("\n".join(anatomy_lines(anatomy)))
    offline = score.get("scoring", {}).get("predictor_reviews_s")
    for name, r in score.get("serving", {}).items():
        versus = f", {r['req_s'] / offline:.2f}x the offline Predictor" if offline else ""
        print(f"serving at {score.get('clients', '?')} clients, {name}: {r['req_s']:.0f} req/s, "
              f"p50 {r['p50_ms']:.0f} ms, {r['errors']} errors{versus}")
    for name, why in {**train.get("failed", {}), **score.get("failed", {})}.items():
        print(f"failed: {name}: {why}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"train": train, "score": score, "figures": values, "software": versions}, f, indent=2)
    missing = [key for key, value in values.items() if value is None]
    if missing:
        raise SystemExit(f"not measured: {', '.join(missing)}")


if __name__ == "__main__":
    main()
