"""Training steps replayed as CUDA graphs (`--cuda-graphs`): which shape is captured when, what reaches a replay
(the batch, the scheduler's rate), and where the flag is refused. A CPU cannot capture: a stand-in runs the step
again at each replay, writing its loss where a graph would. tests/test_gpu.py trains with real graphs."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification, DistilBertConfig, get_linear_schedule_with_warmup

from helpers import TINY, DeviceWaits

from sentiment import training
from sentiment.batching import Collator
from sentiment.config import TrainArgs, parse_args
from sentiment.demo_data import demo_reviews
from sentiment.errors import SentimentError
from sentiment.graphs import GraphedSteps
from sentiment.training import make_accelerator, param_groups


def tiny_model():
    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, hidden_dim=64, n_layers=2, n_heads=2, dropout=0.0,
                              attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=2)
    return AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa").train()


def batch(rows, width, seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(width // 2, width + 1, (rows,), generator=generator)
    mask = (torch.arange(width) < lengths[:, None]).long()
    return {"input_ids": torch.randint(5, 100, (rows, width), generator=generator) * mask,
            "attention_mask": mask, "labels": torch.randint(0, 2, (rows,), generator=generator)}


def loss_of(model):
    def loss(b):
        mask = b["attention_mask"][:, None, None, :].bool()
        logits = model(input_ids=b["input_ids"], attention_mask=mask).logits
        return torch.nn.functional.cross_entropy(logits, b["labels"])
    return loss


def step_of(model, optimizer, max_grad_norm):
    """The recipe's eager step, in plain torch: loss, backward, clip, AdamW, and no gradients left behind."""
    def step(b):
        loss = loss_of(model)(b)
        loss.backward()
        if max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def optimizer_and_schedule(model, steps):
    optimizer = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3, fused=True)
    return optimizer, get_linear_schedule_with_warmup(optimizer, 3, steps)


class Replays:
    """A stand-in for `cuda_graph_capture()`: capturing runs nothing; each replay runs the step again and writes
    its loss into the tensor the capture returned, as a graph's replay writes its captured outputs."""

    def __init__(self):
        self.captured = 0

    def __call__(self, step):
        self.captured += 1
        loss = torch.zeros(())
        return (lambda: loss.copy_(step())), loss


def test_graphed_steps_train_as_eager_steps_do_with_each_batch_and_the_scheduled_rate():
    # Shapes 4x16 and 4x32 come back and are captured on their second batch; 3x16 comes once and stays eager.
    shapes = [(4, 16), (4, 32), (4, 16), (4, 16), (4, 32), (3, 16), (4, 16), (4, 32), (4, 16)]
    batches = [batch(rows, width, seed) for seed, (rows, width) in enumerate(shapes)]

    eager = tiny_model()
    optimizer, schedule = optimizer_and_schedule(eager, len(batches))
    expected = []
    eager_step = step_of(eager, optimizer, 1.0)
    for b in batches:
        expected.append(eager_step(b).item())
        schedule.step()

    graphed, replays = tiny_model(), Replays()
    optimizer, schedule = optimizer_and_schedule(graphed, len(batches))
    steps = GraphedSteps(step_of(graphed, optimizer, 1.0), optimizer, replays)
    losses = []
    with DeviceWaits() as spy:  # a graph can hold no wait for the device, and a step between replays needs none
        for b in batches:
            losses.append(steps.step(b).clone())  # a replay's loss is written over by the next
            schedule.step()
    assert spy.waits == []
    losses = [loss.item() for loss in losses]

    assert replays.captured == 2 and len(steps.graphs) == 2
    assert losses == pytest.approx(expected, abs=1e-6)
    for (name, a), b in zip(eager.named_parameters(), graphed.parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=0, msg=name)
    assert all(p.grad is None for p in graphed.parameters())  # no step's gradients outlive it
    assert all(isinstance(group["lr"], float) for group in optimizer.param_groups)  # checkpoints see plain rates


def test_a_replay_reads_the_new_batch_and_rate_not_the_captured_ones():
    # Against itself with the copies left out, the test above must fail: replaying the captured batch, or the
    # rate at capture (the warm-up's second step), trains otherwise.
    b1, b2, b3 = batch(4, 16, 1), batch(4, 16, 2), batch(4, 16, 3)
    model = tiny_model()
    optimizer, schedule = optimizer_and_schedule(model, 3)
    steps = GraphedSteps(step_of(model, optimizer, 0.0), optimizer, Replays())
    steps.step(b1)
    schedule.step()
    steps.step(b2)  # captured here, then replayed
    schedule.step()
    inputs, _, loss = steps.graphs[next(iter(steps.graphs))]
    with torch.no_grad():
        before = loss_of(model)(b3).item()
    steps.step(b3)
    assert torch.equal(inputs["input_ids"], b3["input_ids"]) and loss.item() == pytest.approx(before, abs=1e-6)
    assert [lr.item() for lr in steps.lrs] == pytest.approx([g["lr"] for g in optimizer.param_groups])
    assert steps.lrs[0].item() == pytest.approx(1e-3 * 2 / 3)  # warm-up: step 2 of 3


def test_cuda_graphs_are_refused_where_a_step_cannot_be_captured_saying_why(tmp_path):
    args = TrainArgs(data="demo", output_dir=str(tmp_path / "out"), cuda_graphs=True, grad_accum=2)
    with pytest.raises(SentimentError) as refused:
        make_accelerator(args)
    message = str(refused.value)
    assert message.startswith("--cuda-graphs: this run is on the CPU, and graphs replay on a CUDA GPU; ")
    assert "raise --batch-size instead of --grad-accum" in message and message.endswith("leave --cuda-graphs out")


def test_graphed_batches_are_padded_to_a_few_widths_never_past_the_longest_allowed():
    collate = Collator(pad_id=0, multiple_of=64, most=100)
    assert collate([{"input_ids": [5] * 3}])["input_ids"].shape == (1, 64)
    assert collate([{"input_ids": [5] * 65}, {"input_ids": [6]}])["input_ids"].shape == (2, 100)


def test_a_run_with_cuda_graphs_learns_from_steps_replayed_per_padded_width(tmp_path, monkeypatch):
    # The recipe's wiring: its batches padded to the graphs' widths, its own step (Accelerate's) graphed,
    # its scheduler's rates in the replays. Captured by the stand-in: a CPU cannot capture.
    data = tmp_path / "reviews.csv"
    demo_reviews(1200, seed=30).write_csv(data)
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    replays, widths = Replays(), []
    monkeypatch.setattr(training, "check_cuda_graphs", lambda args, accelerator: None)
    monkeypatch.setattr(training, "cuda_graph_capture", lambda: replays)
    real_step = GraphedSteps.step

    def step(self, batch):
        widths.append(batch["input_ids"].shape[1])
        return real_step(self, batch)
    monkeypatch.setattr(GraphedSteps, "step", step)
    metrics = training.train(parse_args(TrainArgs, "", ["--data", str(data), *TINY, "--max-length", "128",
                                                        "--cuda-graphs", "--checkpoint-every", "0",
                                                        "--output-dir", str(tmp_path / "out")]))
    assert metrics["steps"] == len(widths) == 120 and set(widths) <= {64, 128}
    assert 1 <= replays.captured <= 2 * len(set(widths))  # each width's full batches and its short last one
    assert metrics["test_accuracy"] >= 0.9


def test_a_step_that_cannot_be_captured_ends_the_run_saying_so():
    def refusing(step):
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")

    model = tiny_model()
    optimizer, _ = optimizer_and_schedule(model, 2)
    steps = GraphedSteps(step_of(model, optimizer, 1.0), optimizer, refusing)
    steps.step(batch(4, 16, 1))
    with pytest.raises(SentimentError, match=r"^--cuda-graphs: a training step of shape \(4, 16\) could not be "
                                             r"captured as a CUDA graph \(CUDA error: operation not permitted when "
                                             r"stream is capturing\); train without --cuda-graphs$"):
        steps.step(batch(4, 16, 2))
