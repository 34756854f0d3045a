"""The GPU path: mixed-precision training steps, steps replayed as CUDA graphs, mid-epoch resume, a run whose
device fails, bf16 and fp16 scoring, scoring short of memory, the service, and the service after a device-side
assert.

Deselected on a machine without a GPU (conftest.py); `bash bench/gpu_check.sh` runs them on a
GPU machine (`pytest -m gpu`), and `bench/gpu_check.sh --cpu-smoke` on the CPU at toy size
(SENTIMENT_GPU_TESTS_ON_CPU=1), where fp16, which needs a GPU, is left out of the precisions.
"""

import json
import time

import numpy as np
import pytest
import torch
from helpers import TINY, run_script
from safetensors.torch import load_file

from sentiment import checkpointing
from sentiment.demo_data import demo_reviews
from sentiment.predictor import Predictor

pytestmark = pytest.mark.gpu
GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
PRECISIONS = ["bf16", "fp16"] if GPU else ["bf16"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpu") / "reviews.csv"
    demo_reviews(1200, seed=30).write_csv(path)
    return path


@pytest.mark.parametrize("precision", PRECISIONS)
def test_training_steps_in_mixed_precision_learn(tmp_path, data, precision):
    out = tmp_path / precision
    run_script("train.py", "--data", str(data), *TINY, "--mixed-precision", precision, "--output-dir", str(out))
    metrics = json.loads((out / "metrics.json").read_text())
    config = json.loads((out / "train_config.json").read_text())
    assert config["mixed_precision"] == precision
    assert metrics["test_accuracy"] >= 0.9 and metrics["steps"] == 120
    weights = load_file(out / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # fp32 master weights, saved as such
    assert all(torch.isfinite(t).all() for t in weights.values())


@pytest.mark.skipif(not GPU, reason="capture needs a CUDA device; test_graphs.py checks the same run's wiring on the "
                                    "CPU with a stand-in for capture")
def test_training_steps_replayed_as_cuda_graphs_learn_and_resume(tmp_path, data):
    out = tmp_path / "out"
    flags = ["--data", str(data), *TINY, "--max-length", "128", "--mixed-precision", "bf16", "--cuda-graphs",
             "--checkpoint-every", "60", "--output-dir", str(out)]
    run_script("train.py", *flags)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.9 and metrics["steps"] == 120
    weights = load_file(out / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # A resume captures its graphs anew, over the checkpoint's optimizer state (saved as not capturable)
    middle = [c for c in checkpointing.complete_checkpoints(out) if checkpointing.step_of(c) == 60]
    run_script("train.py", *flags, "--resume", str(middle[0]))
    again = json.loads((out / "metrics.json").read_text())
    assert again["steps"] == 120 and again["test_accuracy"] >= 0.9


def test_a_run_stopped_mid_epoch_resumes_to_the_same_end(tmp_path, data):
    out = tmp_path / "out"
    flags = ["--data", str(data), *TINY, "--mixed-precision", "bf16", "--checkpoint-every", "30",
             "--output-dir", str(out)]
    run_script("train.py", *flags)
    whole = json.loads((out / "metrics.json").read_text())
    middle = [c for c in checkpointing.complete_checkpoints(out) if checkpointing.step_of(c) == 90]
    assert middle, "the step-90 checkpoint (mid-epoch 2) is kept"
    resumed = run_script("train.py", *flags, "--resume", str(middle[0]))
    assert "at step 90" in resumed.stdout
    again = json.loads((out / "metrics.json").read_text())
    assert again["steps"] == whole["steps"] and abs(again["test_accuracy"] - whole["test_accuracy"]) <= 0.02


# train.py, whose third step looks up an index past the end of a table on the model's device: on a GPU a
# device-side assert, after which every CUDA call of the process fails; on a CPU an IndexError.
FAILING_STEP = """
import runpy, sys, torch
from sentiment import training
real_loss = training.FineTuneRecipe.loss
def loss(self, batch):
    if self.state.step == 3:
        device = batch["input_ids"].device
        torch.nn.functional.embedding(torch.tensor([10], device=device), torch.zeros(5, 4, device=device)).cpu()
    return real_loss(self, batch)
training.FineTuneRecipe.loss = loss
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_run_whose_device_fails_ends_with_that_error_alone(tmp_path, data):
    # Freeing the run's memory and process group as it ends asks the device again; after a device-side
    # assert that raised a second error over the first (or hung, in NCCL's teardown).
    result = run_script("-c", FAILING_STEP, "train.py", "--data", str(data), *TINY, "--output-dir", str(tmp_path),
                        check=False, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.count("Traceback (most recent call last)") == 1, result.stderr[-3000:]
    assert ("device-side assert" if GPU else "IndexError") in result.stderr


@pytest.mark.parametrize("precision", PRECISIONS)
def test_half_precision_scoring_agrees_with_fp32(trained_model, precision):
    texts = demo_reviews(200, seed=31)["review"].to_list()
    fp32 = Predictor(str(trained_model), device=DEVICE, precision="fp32").probabilities(texts)
    half = Predictor(str(trained_model), device=DEVICE, precision=precision)
    if GPU:
        assert next(half.model.parameters()).dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    scores = half.probabilities(texts)
    assert np.isfinite(scores).all()
    assert (fp32.argmax(1) == scores.argmax(1)).mean() >= 0.98
    assert np.abs(fp32 - scores).max() < 0.05


def test_the_service_answers_on_the_device(trained_model):
    from starlette.testclient import TestClient

    from sentiment.config import ServeSettings
    from sentiment.serving import create_app
    with TestClient(create_app(ServeSettings(model=str(trained_model), device=DEVICE))) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        answer = client.post("/predict", json={"texts": ["The acting was superb. I loved it."] * 40})
        assert answer.status_code == 200
        assert {p["label"] for p in answer.json()["predictions"]} == {"positive"}


@pytest.mark.skipif(not GPU, reason="a memory cap needs a CUDA device; test_predictor checks the same halving on the "
                                    "CPU with a model that raises out-of-memory")
def test_scoring_on_a_gpu_short_of_memory_halves_its_batches(trained_model, capfd):
    texts = demo_reviews(3000, seed=32)["review"].to_list()
    expected = Predictor(str(trained_model), device=DEVICE, precision="fp32").probabilities(texts)
    greedy = Predictor(str(trained_model), device=DEVICE, precision="fp32", batch_size=4096, max_batch_tokens=10**7)
    torch.cuda.empty_cache()
    # A real CUDA out-of-memory error: the allocator may hold 32 MiB beyond what is in use now.
    cap = (torch.cuda.memory_reserved() + 32 * 2**20) / torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        scores = greedy.probabilities(texts)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert greedy.max_batch_tokens < 10**7 and "ran out of memory on" in capfd.readouterr().err
    np.testing.assert_allclose(scores, expected, atol=1e-4)


DEVICE_SIDE_ASSERT = """
import json, sys, time
import torch
from starlette.testclient import TestClient
from sentiment.config import ServeSettings
from sentiment.serving import create_app
seen = {}
with TestClient(create_app(ServeSettings(model=sys.argv[1], device="cuda"))) as client:
    while client.get("/ready").status_code != 200:
        time.sleep(0.05)
    predictor = client.app.state.batcher.predictor
    try:  # out of memory: the device still computes
        torch.empty(2**62, dtype=torch.uint8, device="cuda")
    except torch.OutOfMemoryError:
        seen["after out of memory"] = predictor.device_fails()
    seen["before"] = client.post("/predict", json={"text": "good"}).status_code
    try:  # an index past the end of a table: a device-side assert, which poisons the process's CUDA context
        torch.nn.functional.embedding(torch.tensor([10], device="cuda"), torch.zeros(5, 4, device="cuda")).cpu()
    except Exception as err:
        seen["assert"] = type(err).__name__
    after = client.post("/predict", json={"text": "good"})
    seen["after"] = [after.status_code, after.json()["error"]["message"]]
    seen["health"] = client.get("/health").status_code
    print(json.dumps(seen), flush=True)  # before the service stops, on a device that no longer works
"""


@pytest.mark.skipif(not GPU, reason="a device-side assert needs a CUDA device; test_serving checks the service's "
                                    "answer with a model whose device fails")
def test_a_device_side_assert_fails_the_service_s_health_and_out_of_memory_does_not(trained_model):
    # In a process of its own: nothing on its CUDA device works after the assert.
    result = run_script("-c", DEVICE_SIDE_ASSERT, str(trained_model), check=False)
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["after out of memory"] is None and seen["before"] == 200 and seen["assert"]
    assert seen["after"][0] == 503 and "can no longer compute" in seen["after"][1] and seen["health"] == 503
