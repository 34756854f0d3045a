"""Training steps replayed as CUDA graphs, one graph per batch shape (`train.py --cuda-graphs`).

An eager training step queues every kernel of the forward pass, the backward pass, the clipping and
AdamW's update from Python, some three thousand of them for DistilBERT: at batch 32 on an H200 the
host took 20.4 ms to queue a step the device ran in 11.3 ms, and the device waited. A CUDA graph
queues a whole step in one launch. A graph is fixed to the shapes it was captured with, so batches
are padded to a multiple of `BUCKET` tokens (8 widths at 512 tokens), and each shape gets its own
graph: a shape's first batch runs eagerly (kernels chosen, AdamW's moments made, memory cached), its
second is captured, and it and every later one are replayed.

All graphs share one memory pool. That is safe because nothing that outlives a step lives in it:
the weights and AdamW's moments are made by the eager steps before any capture, the gradients are
let go at the end of each step, and the loss a step returns is read before the next step runs.
"""

import torch

from .errors import SentimentError

BUCKET = 64  # tokens between the padded widths of training batches: 8 shapes at 512


def check_cuda_graphs(args, accelerator):
    """Refuse `--cuda-graphs` where a step could not be captured, saying what to do instead."""
    reasons = []
    if accelerator.device.type != "cuda":
        reasons.append(f"this run is on the {accelerator.device.type.upper()}, and graphs replay on a CUDA GPU")
    if accelerator.num_processes > 1:  # DDP's gradient all-reduce would have to be captured with the step
        reasons.append(f"it trains on one GPU, and this run has {accelerator.num_processes} processes")
    if args.grad_accum > 1:
        reasons.append("a graph replays one whole optimizer step; raise --batch-size instead of --grad-accum")
    if accelerator.mixed_precision == "fp16":  # the grad scaler asks the device each step whether it overflowed
        reasons.append("fp16's loss scaling asks the device about overflow at every step; use bf16 or no")
    if accelerator.state.dynamo_plugin.backend.value != "NO":
        reasons.append("the model is also compiled (a dynamo backend); use one or the other")
    if reasons:
        raise SentimentError("--cuda-graphs: " + "; ".join(reasons) + "; or leave --cuda-graphs out")


def cuda_graph_capture():
    """`capture(step)` -> (replay, outputs): `step` captured as a CUDA graph, not run; every capture of one
    `cuda_graph_capture()` shares its memory pool."""
    pool = torch.cuda.graph_pool_handle()

    def capture(step):
        graph = torch.cuda.CUDAGraph()
        # "thread_local": the loader's pinning thread allocates page-locked memory for the next batches meanwhile,
        # which in the default "global" mode breaks the capture and leaves that thread with an error.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = step()
        return graph.replay, outputs
    return capture


class GraphedSteps:
    """Optimizer steps, each replayed as the CUDA graph of its batch's shape once that shape has been met.

    `step(batch)` is the eager step (the recipe's `train_step`): forward, backward, clipping,
    `optimizer.step()`, and `zero_grad(set_to_none=True)`, so that no gradient outlives it; it returns the
    loss. Graphed, it returns the loss, valid until the next step. What runs in Python runs at capture alone:
    Accelerate's wrappers may take part, as with one process, no grad scaler and no accumulation they decide
    nothing per step. The learning rate a scheduler sets on the optimizer's groups reaches each replay
    through one tensor per group. `capture` is `cuda_graph_capture()` on a GPU; the tests give a stand-in
    that runs the step again at each replay."""

    def __init__(self, step, optimizer, capture):
        self.eager_step, self.optimizer, self.capture = step, optimizer, capture
        device = optimizer.param_groups[0]["params"][0].device
        self.lrs = [torch.tensor(float(group["lr"]), device=device) for group in optimizer.param_groups]
        self.met = set()
        self.graphs = {}  # shape -> (the batch's tensors the graph reads, replay, the loss it writes)

    def step(self, batch):
        shape = tuple((name, tuple(tensor.shape), tensor.dtype) for name, tensor in batch.items())
        if shape not in self.met:  # eagerly: kernels chosen and state made outside any graph
            self.met.add(shape)
            return self.eager_step(batch).detach()
        if shape not in self.graphs:
            inputs = {name: tensor.clone() for name, tensor in batch.items()}
            try:
                self.graphs[shape] = (inputs, *self.capture(lambda: self.captured_step(inputs)))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # an operation that cannot be captured: a wait for the device, say
                raise SentimentError(f"--cuda-graphs: a training step of shape {tuple(batch['input_ids'].shape)} "
                                     f"could not be captured as a CUDA graph ({str(err).strip().splitlines()[0]}); "
                                     f"train without --cuda-graphs") from err
        inputs, replay, loss = self.graphs[shape]
        for name, tensor in batch.items():
            inputs[name].copy_(tensor, non_blocking=True)
        for lr, group in zip(self.lrs, self.optimizer.param_groups):
            lr.fill_(group["lr"])  # the scheduler's rate for this step, queued before the replay
        replay()
        return loss

    def captured_step(self, batch):
        """The eager step, as captured: AdamW reads each group's rate from `self.lrs` and is told it is captured
        (it refuses to be otherwise; told so when eager, it warns). The groups are left as they were, so
        checkpoints and the scheduler see plain rates."""
        groups = self.optimizer.param_groups
        kept = [{key: group[key] for key in ("lr", "capturable") if key in group} for group in groups]
        self.optimizer.zero_grad(set_to_none=True)  # the backward makes the gradients, in the graph's pool
        try:
            for group, lr in zip(groups, self.lrs):
                group.update(lr=lr, capturable=True)
            return self.eager_step(batch).detach()
        finally:
            for group, settings in zip(groups, kept):
                group.update(settings)
