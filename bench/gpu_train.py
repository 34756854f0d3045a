"""GPU training speed: the project's train.py against Hugging Face `Trainer`, DistilBERT, bf16, max length 512.

Needs no download: it writes 25,000 generated reviews whose token lengths follow IMDb's (median
about 230 tokens, 15 % over 512), a WordPiece vocabulary for them, and a DistilBERT with the
seed architecture (6 layers, hidden 768, 12 heads) randomly initialised, which times the same
work as the pretrained weights. The three trainers (ours, `Trainer` with its default collator,
`Trainer` with `train_sampling_strategy="group_by_length"`) get the same folder, rows, batch and
precision; ours also runs with its steps replayed as CUDA graphs (--cuda-graphs), so again at
four times the batch (both on a GPU alone), and compiled (torch.compile through Accelerate), its
rate once compiled shown beside its whole-run rate. Prints tokens/s of real (unpadded) tokens,
samples/s, model FLOPs utilisation against the card's measured dense bf16 matmul rate and its data-sheet peak,
and the time of one 25,000-review epoch, with the card's name; and the anatomy of one step (its time
end to end against the device's busy time in it, at three batch sizes, two on a CPU; its cost with the padding mask
transformers waits on; one step replayed as a CUDA graph). Part of bench/gpu_check.sh.

    python -m bench.gpu_train                # on a machine with a CUDA GPU
    python -m bench.gpu_train --rows 256 --steps 4 --small    # a quick check of the script on a CPU
"""

import argparse
import collections
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import polars as pl
import torch

from bench.common import forward_flops
from bench.gpu_report import anatomy_lines

ROOT = os.path.join(os.path.dirname(__file__), "..")


def generated_reviews(rows, seed=0):
    """Reviews of made-up words (one token each) with IMDb-like lengths: lognormal, median ~230 tokens."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(20000)])
    lengths = np.clip(rng.lognormal(np.log(230), 0.75, rows).astype(int), 10, 2500)
    texts = [" ".join(rng.choice(words, n)) for n in lengths]
    return pl.DataFrame({"review": texts, "sentiment": rng.choice(["negative", "positive"], rows)})


def build_model_folder(folder, texts, small):
    from transformers import AutoModelForSequenceClassification, DistilBertConfig

    from sentiment.modeling import train_tiny_tokenizer
    tokenizer = train_tiny_tokenizer(texts, vocab_size=30522)
    shape = dict(dim=64, n_layers=2, n_heads=2, hidden_dim=128) if small else {}  # default: the seed architecture
    config = DistilBertConfig(vocab_size=len(tokenizer), num_labels=2, **shape)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return config, tokenizer


def bf16_matmul_rate(n=8192, seconds=2.0):
    """The card's dense bf16 matmul rate, FLOP/s; on a CPU (the smoke run) its fp32 rate, so MFU is a number."""
    gpu = torch.cuda.is_available()
    n, seconds = (n, seconds) if gpu else (1024, seconds / 10)  # a CPU's: a figure, not a goal's denominator
    a, b = (torch.randn(n, n, device="cuda" if gpu else "cpu", dtype=torch.bfloat16 if gpu else torch.float32)
            for _ in range(2))
    a @ b
    if gpu:
        torch.cuda.synchronize()
    rounds, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        rounds += 1
    if gpu:
        torch.cuda.synchronize()
    return rounds * 2 * n ** 3 / (time.perf_counter() - start)


def run_ours(data, folder, out, batch_size, steps, precision, compiled=None, graphs=False):
    """train.py in a subprocess: (seconds, samples/s, samples/s after the first steps). `compiled`, a torch.compile
    backend, has Accelerate wrap the model in torch.compile with it (dynamic shapes), as `accelerate launch
    --dynamo_backend inductor`; `graphs` replays its steps as CUDA graphs (--cuda-graphs)."""
    flags = ["--data", data, "--val-size", "0", "--test-size", "0", "--model", folder, "--output-dir", out,
             "--overwrite", "--max-length", "512", "--batch-size", str(batch_size), "--epochs", "1",
             "--mixed-precision", precision, "--checkpoint-every", "0", "--truncation", "head",
             *(["--cuda-graphs"] if graphs else [])]
    if steps:
        flags += ["--max-steps", str(steps)]
    # Compiled, each recompilation and its reason go to the log (the second GPU run's compiled steps 2 and 22 took
    # 27 s and 3 s, after 42 s for the first).
    env = {**os.environ, **({"ACCELERATE_DYNAMO_BACKEND": compiled, "ACCELERATE_DYNAMO_USE_DYNAMIC": "1",
                             "TORCH_LOGS": "recompiles"} if compiled else {})}
    subprocess.run([sys.executable, "train.py", *flags], cwd=ROOT, check=True, stdout=subprocess.DEVNULL, env=env)
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    return metrics["train_seconds"], metrics["train_samples_per_second"], steady_rate(out, batch_size)


def steady_rate(out, batch_size, after=50):
    """Samples/s from the first logged step past `after` to the end, from the cumulative rates train.py logs:
    the rate once compiling and warm-up are done. None when the run logged too few steps."""
    with open(os.path.join(out, "log.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if "samples_per_second" in r]
    first = next((r for r in rows if r["step"] >= after), None)
    if first is None or first is rows[-1]:
        return None
    elapsed = [r["step"] * batch_size / r["samples_per_second"] for r in (first, rows[-1])]
    return (rows[-1]["step"] - first["step"]) * batch_size / (elapsed[1] - elapsed[0])


# Dense bf16 tensor-core peaks from the data sheets (SXM parts), in FLOP/s.
PEAKS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def datasheet_peak(card):
    return next((peak for name, peak in PEAKS.items() if name in card), float("nan"))


def step_anatomy(folder, lengths, batch_sizes, precision, steps=40):
    """Where a training step's time goes, at each of `batch_sizes`: ms per step from end to end, and the
    device's busy time in it (the sum of its kernels' times, torch.profiler); a step much longer than its
    device time is bound by the host, and larger batches then cost little more. At the first size also the
    end-to-end time with the collated 2D padding mask (transformers asks the device whether it holds padding
    first, a wait each step) and the device's busiest operations. The same model, bf16 autocast, fused AdamW
    and attention kernels as train.py, on batches of the run's own lengths, already on the device; every batch
    runs once before the timing, so each shape's first-time costs are left out. (The first version timed the
    CPU's queueing behind a sleep kernel: a step's thousand-odd launches fill CUDA's queue, and the CPU waits.)"""
    from transformers import AutoModelForSequenceClassification

    from sentiment.batching import Collator, LengthGroupedBatches
    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    collate = Collator(0, multiple_of=8 if gpu else 1)
    rng = np.random.default_rng(0)

    def batches_of(size):
        batches = []
        for batch in list(LengthGroupedBatches(lengths, size, seed=0))[:steps]:
            padded = collate([{"input_ids": rng.integers(5, 1000, lengths[i])} for i in batch])
            padded["labels"] = torch.tensor(rng.integers(0, 2, len(batch)))
            batches.append({k: v.to(device) for k, v in padded.items()})
        return batches

    def step(batch, mask_4d=True):
        mask = batch["attention_mask"]
        forward_backward(model, batch["input_ids"], mask[:, None, None, :].bool() if mask_4d else mask,
                         batch["labels"], precision)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if gpu:
            torch.cuda.synchronize()

    def wall_ms(batches, mask_4d):
        for batch in batches:  # each shape once first: kernels chosen, memory cached
            step(batch, mask_4d)
        sync()
        start = time.perf_counter()
        for batch in batches:
            step(batch, mask_4d)
        sync()
        return (time.perf_counter() - start) / len(batches) * 1e3

    def profiled(batches):
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
        with torch.profiler.profile(activities=activities) as profile:
            for batch in batches:
                step(batch)
            sync()
        events = profile.key_averages()
        busy = sum(e.self_device_time_total for e in events) / len(batches) / 1e3 if gpu else None
        return busy, events

    figures = {"by_batch_size": {}}
    for size in batch_sizes:
        batches = batches_of(size)
        by_size = {"wall_ms_4d_mask": wall_ms(batches, True),
                   "tokens_per_step": float(np.mean([int(b["attention_mask"].sum()) for b in batches]))}
        by_size["device_ms"], events = profiled(batches[:5])
        figures["by_batch_size"][str(size)] = by_size
        if size == batch_sizes[0]:
            figures.update(by_size, wall_ms_2d_mask=wall_ms(batches, False), syncs=syncs_in(step, batches[0]))
            figures["profile"] = events.table(sort_by="self_cuda_time_total" if gpu else "self_cpu_time_total",
                                              row_limit=20, max_name_column_width=60)
            try:  # the graph's shape: the run's longest batch of this size, as a bucket's would be
                figures["graphed"] = graphed_step(model.config, max(batches, key=lambda b: b["input_ids"].numel()),
                                                  precision)
            except Exception as err:  # capture refused (an operation that waits on the device): said, not fatal
                figures["graphed"] = {"failed": f"{type(err).__name__}: {err}"}
        del batches
    return figures


def forward_backward(model, ids, mask, labels, precision, cache=True):
    """The forward and backward passes and gradient clipping of train.py's step: bf16 autocast where asked (its cache
    off while a CUDA graph captures: the graph keeps its own casts) and the attention kernels for varying shapes."""
    from sentiment.modeling import varying_shapes
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16", cache_enabled=cache), \
            varying_shapes():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.nn.functional.cross_entropy(logits.float(), labels).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)


def syncs_in(step, batch):
    """Where one `step(batch)` waits for the device (torch.cuda.set_sync_debug_mode): the Python line of each wait
    and how often; None on a CPU. A wait stops the host from queueing ahead, and no CUDA graph can hold one."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    where = collections.Counter(f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return dict(where)


def graphed_step(config, batch, precision, rounds=30):
    """ms per training step at one fixed shape, eager against replayed as one CUDA graph (forward, backward,
    clipping and a capturable fused AdamW step captured together, so the CPU queues nothing but the replay):
    what CUDA graphs over a few padded-length buckets would give a step bound by the host. None on a CPU."""
    if not torch.cuda.is_available():
        return None
    from transformers import AutoModelForSequenceClassification
    model = AutoModelForSequenceClassification.from_config(config).cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True, capturable=True)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"][:, None, None, :].bool()

    def step():
        forward_backward(model, ids, mask, labels, precision, cache=False)
        optimizer.step()

    def ms_per(run):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(rounds):
            run()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / rounds * 1e3

    def eager():
        optimizer.zero_grad(set_to_none=True)
        step()

    side = torch.cuda.Stream()  # warm-up off the capturing stream, as capture asks: optimizer state, workspaces
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            eager()
    torch.cuda.current_stream().wait_stream(side)
    eager_ms = ms_per(eager)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the gradients the backward allocates in the graph's pool stay its own
    with torch.cuda.graph(graph):
        step()
    return {"shape": list(ids.shape), "eager_ms": eager_ms, "graphed_ms": ms_per(graph.replay)}


def run_trainer(frame, folder, batch_size, steps, precision, grouped=False):
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    enc = tokenizer(frame["review"].to_list(), truncation=True, max_length=512)
    labels = (frame["sentiment"] == "positive").cast(int).to_list()
    rows = [{"input_ids": i, "attention_mask": m, "labels": y}
            for i, m, y in zip(enc["input_ids"], enc["attention_mask"], labels)]
    # Length grouping is `train_sampling_strategy` in recent transformers, `group_by_length` before.
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    sampling = ({"train_sampling_strategy": "group_by_length" if grouped else "random"}
                if "train_sampling_strategy" in fields else {"group_by_length": grouped})
    with tempfile.TemporaryDirectory() as scratch:
        args = TrainingArguments(output_dir=scratch, per_device_train_batch_size=batch_size,
                                 num_train_epochs=1, max_steps=steps or -1, bf16=precision == "bf16",
                                 save_strategy="no", report_to=[], disable_tqdm=True, logging_strategy="no",
                                 use_cpu=not torch.cuda.is_available(), **sampling)
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=DataCollatorWithPadding(tokenizer))
        result = trainer.train()
    return result.metrics["train_runtime"], result.metrics["train_samples_per_second"], None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=25000, help="Generated reviews (one epoch).")
    parser.add_argument("--batch-size", type=int, default=32, help="Per-device batch of every trainer.")
    parser.add_argument("--steps", type=int, default=0, help="Stop after this many steps (0: the whole epoch).")
    parser.add_argument("--small", action="store_true", help="A tiny DistilBERT, to check the script on a CPU.")
    # The CPU smoke's: dynamo's trace of the model through Accelerate's wrapping, as on the GPU, without inductor's
    # C++ build (95 s of the rehearsal's), not the code a GPU runs anyway (Triton's). "eager" takes 16 s there,
    # "aot_eager" 34 s (AOTAutograd's trace too, which the suite's compiled training run covers): the smoke has 3 min.
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "aot_eager", "eager"],
                        help="torch.compile's backend for the compiled run.")
    parser.add_argument("--keep-model", default=None, help="Also copy the generated model folder here.")
    parser.add_argument("--json", default=None, help="Write every figure to this JSON file.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:  # data, model and runs: hundreds of MB at full size
        measure(args, work)


def measure(args, work):
    gpu = torch.cuda.is_available()
    precision = "bf16" if gpu else "no"
    frame = generated_reviews(args.rows)
    data, folder = os.path.join(work, "reviews.csv"), os.path.join(work, "model")
    frame.write_csv(data)
    config, tokenizer = build_model_folder(folder, frame["review"].to_list(), args.small)
    if args.keep_model:
        shutil.copytree(folder, args.keep_model, dirs_exist_ok=True)
    lengths = [min(len(i), 512) for i in tokenizer(frame["review"].to_list(), add_special_tokens=True)["input_ids"]]
    tokens, flops = sum(lengths), 3 * forward_flops(config, lengths)  # forward + backward ≈ 3 forwards
    rate = bf16_matmul_rate()
    card = torch.cuda.get_device_name() if gpu else "CPU"
    peak = datasheet_peak(card)
    print(f"card: {card}; bf16 matmul rate {rate / 1e12:.0f} TFLOP/s (data sheet {peak / 1e12:.0f}); {args.rows} "
          f"reviews, {tokens / args.rows:.0f} tokens each on average at max length 512; batch {args.batch_size}; "
          f"{precision}")
    print(f"{'trainer':<18} {'tokens/s':>10} {'samples/s':>10} {'MFU':>6} {'MFU peak':>9} {'epoch s':>8} "
          f"{'steady s/s':>10}")

    report = {"card": card, "matmul_flops": rate, "datasheet_flops": peak, "precision": precision,
              "rows": args.rows, "batch_size": args.batch_size, "compile_backend": args.compile_backend, "runs": {},
              "failed": {}}
    results = report["runs"]

    def trainer(run):
        """A trainer's run, `run()` giving (seconds, samples/s, steady samples/s): its figures recorded under its
        name and printed as a row of the table."""
        def measure(name):
            seconds, samples_per_second, steady = run()
            per_sample_flops = flops / args.rows
            results[name] = r = {"samples_s": samples_per_second, "tokens_s": samples_per_second * tokens / args.rows,
                                 "mfu_measured": samples_per_second * per_sample_flops / rate,
                                 "mfu_datasheet": samples_per_second * per_sample_flops / peak,
                                 "epoch_25k_s": 25000 / samples_per_second, "seconds": seconds,
                                 "steady_samples_s": steady}
            print(f"{name:<18} {r['tokens_s']:>10.0f} {r['samples_s']:>10.1f} {r['mfu_measured']:>6.1%} "
                  f"{r['mfu_datasheet']:>9.1%} {r['epoch_25k_s']:>8.1f} {steady or float('nan'):>10.1f}", flush=True)
        return measure

    def ours(batch_size=args.batch_size, **how):
        return trainer(lambda: run_ours(data, folder, os.path.join(work, "out"), batch_size, args.steps, precision,
                                        **how))

    def anatomy(name):
        report["step_anatomy"] = a = step_anatomy(folder, np.array(lengths), sizes, precision, args.steps or 40)
        print("\n".join(anatomy_lines(a)), flush=True)
        print(a["profile"], flush=True)

    # The step's anatomy at three batch sizes; on a CPU (the smoke, which has 3 minutes) at two, the same code.
    sizes = [args.batch_size, 2 * args.batch_size, *([4 * args.batch_size] if gpu else [])]
    # Ours, eager and with its steps replayed as CUDA graphs, then the anatomy of its step (quick, and what the next
    # change hinges on), then the peers the goals compare it with; the compiled run, whose compiling takes minutes,
    # last. The figures are written after every run, so a run that fails, or a time limit (bench/gpu_check.sh),
    # costs only its own. CUDA graphs on a GPU alone: train.py refuses them elsewhere.
    runs = {"ours": ours(),
            **({"ours, CUDA graphs": ours(graphs=True)} if gpu else {}),
            "step anatomy": anatomy,
            "Trainer": trainer(lambda: run_trainer(frame, folder, args.batch_size, args.steps, precision)),
            # The grouped Trainer's rate over its first 250 steps (8,000 reviews at batch 32): its goal was met by
            # a wide margin in the first GPU run, and its whole epoch (80 s there) would leave the compiled run none.
            "Trainer grouped": trainer(lambda: run_trainer(frame, folder, args.batch_size, args.steps or 250,
                                                           precision, True)),
            # at four times the batch the eager step was 1.69x the samples/s (the second GPU run): graphed, the
            # device's own bound. (On a CPU, where train.py refuses graphs, it would be "ours" again, bigger.)
            **({f"ours, CUDA graphs, batch {sizes[-1]}": ours(sizes[-1], graphs=True)} if gpu else {}),
            # not in the goals: compiling takes its own time, said apart
            "ours compiled": ours(compiled=args.compile_backend)}
    for name, run in runs.items():
        try:
            run(name)
        except Exception as err:  # a compiler missing on the machine, a Trainer API changed: the rest still run
            report["failed"][name] = f"{type(err).__name__}: {err}"
            print(f"{name}: failed ({report['failed'][name]}); its error is above", flush=True)
        save(args.json, report)
    for name in ("ours", "ours, CUDA graphs"):
        for peer in ("Trainer", "Trainer grouped"):
            if name in results and peer in results:
                print(f"{name} / {peer}: {results[name]['samples_s'] / results[peer]['samples_s']:.2f}x samples/s")
    eager, compiled = results.get("ours"), results.get("ours compiled")
    trained = min(args.rows, args.steps * args.batch_size) if args.steps else args.rows
    if eager and compiled and eager["steady_samples_s"] and compiled["steady_samples_s"]:
        print(f"ours compiled / ours, once compiled: {compiled['steady_samples_s'] / eager['steady_samples_s']:.2f}x; "
              f"compiling cost about {compiled['seconds'] - trained / compiled['steady_samples_s']:.0f} s")
    if report["failed"]:
        raise SystemExit(f"failed: {', '.join(report['failed'])}")


def save(path, report):
    """Write `report` to `path` (if given) whole: a kill while writing leaves the previous version."""
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(report, f, indent=2)
        os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main()
