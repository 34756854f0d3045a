import json
import re
import shutil

import numpy as np
import pytest
import torch
from helpers import DeviceWaits, cudnn_attention_allowed
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForSequenceClassification

from sentiment.demo_data import demo_reviews
from sentiment.errors import SentimentError, SettingError
from sentiment.modeling import broadcast_mask
from sentiment.predictor import Predictor

TEXTS = ["The acting was superb. I loved it.", "The plot was dreadful. Avoid it.",
         "It runs a little over two hours. " * 40 + "The score was beautiful. A real treat.",
         "The script was tedious. <br /><br />I hated it."]


def test_predictions_keep_input_order_and_label_names(trained_model):
    predictor = Predictor(str(trained_model))
    answers = predictor.predict(TEXTS)
    assert [a["label"] for a in answers] == ["positive", "negative", "positive", "negative"]
    for a in answers:
        assert set(a["scores"]) == {"negative", "positive"}
        assert a["score"] == max(a["scores"].values())
        assert sum(a["scores"].values()) == pytest.approx(1.0)


def test_sorted_batches_match_one_by_one_scoring(trained_model):
    texts = demo_reviews(50, seed=20)["review"].to_list()
    batched = Predictor(str(trained_model), batch_size=8, max_batch_tokens=200, precision="fp32").probabilities(texts)
    single = np.concatenate([Predictor(str(trained_model), batch_size=1, precision="fp32").probabilities([t])
                             for t in texts[:10]])
    np.testing.assert_allclose(batched[:10], single, atol=1e-5)
    assert (batched.argmax(1) == Predictor(str(trained_model), batch_size=50).probabilities(texts).argmax(1)).all()


def test_scoring_many_batches_waits_for_the_device_only_for_the_answers(trained_model):
    # Each forward pass waited for the device (transformers asking whether a 2D mask held any padding), so on
    # a GPU no batch was queued while the one before it ran. Counted on the CPU (helpers.DeviceWaits).
    predictor = Predictor(str(trained_model), batch_size=16, precision="fp32")
    texts = demo_reviews(200, seed=3)["review"].to_list()
    with DeviceWaits() as spy:
        probs = predictor.probabilities(texts)
    assert len(list(predictor.batches(predictor.encode(texts).lengths))) >= 10
    assert spy.waits == []
    assert predictor.broadcast
    predictor.broadcast = False  # the 2D mask, made 4D by transformers: the same scores
    np.testing.assert_allclose(predictor.probabilities(texts), probs, atol=1e-6)


def test_scoring_attends_without_cudnn_whose_graphs_are_built_per_shape(trained_model, monkeypatch):
    # On an H200 the first pass over 10,000 reviews took 11.7 s and the same pass again 2.3 s: cuDNN attention
    # built a graph for each batch shape it had not met, and the service's batches hardly ever repeat a shape.
    predictor = Predictor(str(trained_model), batch_size=16, precision="fp32")
    allowed = cudnn_attention_allowed(monkeypatch)
    predictor.probabilities(demo_reviews(40, seed=3)["review"].to_list())
    assert allowed and not any(allowed)
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_gpu_batches_are_copied_through_rooms_pinned_once_each_taken_again_after_copies(trained_model, monkeypatch):
    # On a GPU the CPU writes the next batch while the device still copies earlier ones, so a room may be written
    # again only once the copies out of it are done; and memory pinned per call (or per batch) made the Predictor
    # slower than pipeline on an H200. Run here with plain memory in place of page-locked, and events that say
    # which copies were waited for.
    from sentiment import predictor as module
    events, waited = [], []

    class Event:
        def __init__(self):
            self.serial = len(events)
            events.append(self)

        def synchronize(self):
            waited.append(self.serial)

    monkeypatch.setattr(module.Staging, "event", lambda staging: Event())
    pinned = []
    real_staging = module.Staging

    def staging(size, **kwargs):
        pinned.append(real_staging(size, rooms=3, **kwargs))
        return pinned[-1]

    monkeypatch.setattr(module, "Staging", staging)
    predictor = Predictor(str(trained_model), batch_size=16, precision="fp32")
    texts = demo_reviews(200, seed=3)["review"].to_list()
    plain = predictor.probabilities(texts)
    predictor.staged = True
    np.testing.assert_array_equal(predictor.probabilities(texts), plain)
    batches = len(events)
    assert batches >= 10 and len(pinned) == 1 and not pinned[0].memory.is_pinned()  # pinned on a CUDA device alone
    assert waited == list(range(batches - 3))  # each batch waited for the copies of the one three before it
    np.testing.assert_allclose(predictor.probabilities(texts[:50]), plain[:50], atol=1e-6)  # batched otherwise
    assert len(pinned) == 1 and waited == list(range(len(events) - 3))  # the same rooms, still taken in turn
    assert pinned[0].memory.shape[1] == 2 * predictor.max_batch_tokens


def test_a_batch_larger_than_a_staging_room_is_copied_from_where_it_is(trained_model, monkeypatch):
    from sentiment import predictor as module
    predictor = Predictor(str(trained_model), batch_size=16, precision="fp32")
    texts = demo_reviews(100, seed=3)["review"].to_list()
    plain = predictor.probabilities(texts)
    lengths = predictor.encode(texts).lengths
    sizes = [2 * len(batch) * int(lengths[batch].max()) for batch in predictor.batches(lengths)]
    room = int(np.median(sizes))  # rooms smaller than some batches, as under a huge token budget
    monkeypatch.setattr(module, "ROOM_IDS", room)
    predictor.staged = True
    np.testing.assert_array_equal(predictor.probabilities(texts), plain)
    assert predictor.staging.memory.shape[1] == room
    assert 0 < predictor.staging.turn == sum(size <= room for size in sizes) < len(sizes)


@pytest.mark.parametrize("model_type, attention, broadcast", [
    ("distilbert", "sdpa", True), ("bert", "sdpa", True), ("distilbert", "eager", False), ("gpt2", "sdpa", False)])
def test_only_encoders_attending_through_sdpa_get_the_broadcast_mask(model_type, attention, broadcast):
    # A decoder given a 4D mask would lose its causal mask; eager attention adds the mask, which must then be 0/-inf.
    shape = {"distilbert": dict(dim=32, n_layers=1, n_heads=2, hidden_dim=64),
             "gpt2": dict(n_embd=32, n_layer=1, n_head=2),
             "bert": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)}[model_type]
    config = AutoConfig.for_model(model_type, num_labels=2, vocab_size=100, **shape)
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)
    assert broadcast_mask(model) is broadcast


def test_batches_keep_to_the_count_the_token_budget_and_the_padding_limit(trained_model):
    lengths = np.array([90, 256, 40, 250, 100, 200, 255, 254])

    def batches(**limits):
        return [[int(lengths[i]) for i in b] for b in Predictor(str(trained_model), **limits).batches(lengths)]

    # (3 + 1) x 256 > 1000 tokens; 100 would be padded to 250, 40 to 100: by more than a quarter
    assert batches(batch_size=16, max_batch_tokens=1000) == [[256, 255, 254], [250, 200], [100, 90], [40]]
    assert batches(batch_size=2, max_batch_tokens=4096) == [[256, 255], [254, 250], [200], [100, 90], [40]]


def test_calibration_temperature_is_applied(trained_model):
    predictor = Predictor(str(trained_model), precision="fp32")
    logits = predictor.logits(predictor.encode(["The plot was dreadful. Avoid it."]))
    z = logits[0] / predictor.settings.temperature
    expected = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    np.testing.assert_allclose(predictor.probabilities(["The plot was dreadful. Avoid it."])[0], expected, rtol=1e-5)


def test_empty_texts_are_errors_not_crashes(trained_model):
    answers = Predictor(str(trained_model)).predict(["", None, "I loved it."])
    assert answers[0]["error"] and answers[1]["error"] and answers[2]["label"] == "positive"


def test_one_string_is_one_text_any_iterable_of_texts_works_and_other_items_are_named(trained_model):
    predictor = Predictor(str(trained_model))
    one = predictor.predict("I loved it. The acting was superb.")  # was one answer per character, each empty
    assert len(one) == 1 and one[0]["label"] == "positive"
    texts = ["I loved it.", "The plot was awful. I hated it."]
    assert predictor.predict(text for text in texts) == predictor.predict(texts) == predictor.predict(tuple(texts))
    with pytest.raises(TypeError, match=r"texts\[1\] is int, not a string"):  # was polars' error about a Series
        predictor.predict(["I loved it.", 3])
    # Bytes decoded with errors="surrogateescape" (file names, arguments): was polars' UnicodeEncodeError.
    undecoded = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")
    with pytest.raises(ValueError, match=r"texts\[1\] holds a lone surrogate \('\\udce9' at character 3\), which is "
                                         r"not Unicode text"):
        predictor.predict(["I loved it.", undecoded])


# Each is dropped whole by the tokenizer's normaliser (control and zero-width characters, a lone
# accent, private use): it was scored as [CLS] [SEP] and answered with a label and a confident score.
NO_TOKENS = ["\x00", "\u200b \u200b", "\x01\x7f", "\u0301", "\ue000"]


def test_texts_the_tokenizer_keeps_nothing_of_are_not_scored(trained_model):
    predictor = Predictor(str(trained_model))
    answers = predictor.predict(["I loved it.", *NO_TOKENS, "\u200bI loved it.\x00"])
    assert [a["label"] for a in answers] == ["positive", *[None] * len(NO_TOKENS), "positive"]
    assert all("nothing to score" in a["error"] for a in answers[1:-1])
    assert answers[-1]["score"] == pytest.approx(answers[0]["score"])


def test_a_folder_that_is_not_a_classifier_is_refused(tmp_path, trained_model):
    with pytest.raises(SentimentError, match="no such model folder"):
        Predictor(str(tmp_path / "nowhere"))
    config = json.loads((trained_model / "config.json").read_text())
    config["architectures"] = ["DistilBertModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(SentimentError, match="not a sequence classifier"):
        Predictor(str(tmp_path))


def set_in(file, name, value):
    def damage(folder):
        path = folder / file
        path.write_text(json.dumps({**json.loads(path.read_text()), name: value}))
    return damage


def set_setting(name, value):
    return set_in("sentiment.json", name, value)


def without_weight(name):
    def damage(folder):
        weights = load_file(folder / "model.safetensors")
        del weights[name]
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return damage


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / "config.json").write_text("{"), "config.json: could not load the model configuration"),
    (set_in("config.json", "architectures", 513), "not a sequence classifier (architectures: 513)"),  # a TypeError
    # transformers named 10**20 labels, one at a time, until the process was killed for its memory.
    (set_in("config.json", "num_labels", 10**20), "num_labels is 100000000000000000000, not a count of labels"),
    # transformers starts a weight the file lacks at random, and the folder scored as if trained.
    (without_weight("classifier.weight"), "the weights file lacks 1 of the model's weights (classifier.weight), "
                                          "which would be random"),
    (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:1000]),
     "could not load the weights (SafetensorError"),
    (lambda f: (f / "model.safetensors").unlink(), "could not load the weights (OSError"),
    (lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text()[:100]),
     "could not load the tokenizer"),
    # Without tokenizer files transformers builds one of special tokens only: every word became [UNK].
    (lambda f: [(f / name).unlink() for name in ("tokenizer.json", "tokenizer_config.json")],
     "no tokenizer files"),
    (set_in("tokenizer_config.json", "model_max_length", ""), "model_max_length must be a number, got ''"),
    (lambda f: (f / "sentiment.json").write_text("[]"), "sentiment.json: could not load the settings"),
    (set_setting("labels", ["a", "b", "c"]), "labels must be a list of 2 different names, as the model has 2 classes"),
    (set_setting("labels", ["a", "a"]), "labels must be a list of 2 different names"),  # one key in every answer
    (set_setting("max_length", "512"), "max_length must be a whole number"),
    (set_setting("temperature", -1.0), "temperature must be a finite number above 0"),  # it swapped every label
    (set_setting("temperature", True), "temperature must be a finite number above 0"),  # was read as 1
    (set_setting("truncation", "middle"), "truncation must be one of head, tail, head"),
], ids=["config", "architectures", "labels counted", "a weight missing", "weights cut short", "weights missing",
        "tokenizer cut short", "no tokenizer", "tokenizer's max length", "settings", "labels", "labels twice",
        "max length", "temperature", "temperature true", "truncation"])
def test_a_damaged_model_folder_is_one_error_naming_the_part(tmp_path, trained_model, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(trained_model, folder)
    damage(folder)
    with pytest.raises(SentimentError, match=re.escape(message)):
        Predictor(str(folder))


def test_a_training_run_or_one_of_its_checkpoints_is_named_as_such(tmp_path, trained_model):
    # Both were "not a model folder (no config.json)", with no word of where the model is or will be.
    checkpoint = sorted((trained_model / "checkpoints").glob("step-*"))[-1]
    with pytest.raises(SentimentError, match=re.escape(f"it is a training checkpoint: the model is written to its "
                                                       f"run's folder, {trained_model}, when the run ends")):
        Predictor(str(checkpoint))
    run = tmp_path / "run"
    shutil.copytree(trained_model / "checkpoints", run / "checkpoints")
    shutil.copy(trained_model / "train_config.json", run)
    with pytest.raises(SentimentError, match=re.escape(f"it is a training run's folder without a model yet, written "
                                                       f"when the run ends: wait for it, or continue a stopped run "
                                                       f"with train.py --output-dir {run} --resume latest")):
        Predictor(str(run))
    with pytest.raises(SentimentError, match=r"not a model folder \(no config.json\)$"):
        Predictor(str(tmp_path))


def test_int8_quantisation_scores_like_the_full_model(trained_model):
    texts = demo_reviews(60, seed=24)["review"].to_list()
    full = Predictor(str(trained_model)).probabilities(texts)
    int8 = Predictor(str(trained_model), quantize="int8").probabilities(texts)
    assert (full.argmax(1) == int8.argmax(1)).mean() >= 0.95
    assert np.abs(full - int8).max() < 0.2


def test_bf16_scores_like_fp32_and_bad_precisions_are_refused(trained_model):
    texts = demo_reviews(60, seed=25)["review"].to_list()
    fp32, bf16 = Predictor(str(trained_model), precision="fp32"), Predictor(str(trained_model), precision="bf16")
    ids = fp32.encode(texts)
    assert not np.array_equal(fp32.logits(ids), bf16.logits(ids))  # autocast really ran in bf16
    full, half = fp32.probabilities(texts), bf16.probabilities(texts)
    assert (full.argmax(1) == half.argmax(1)).mean() >= 0.95
    assert np.abs(full - half).max() < 0.05
    with pytest.raises(SentimentError, match="precision"):
        Predictor(str(trained_model), precision="fp8")
    with pytest.raises(SentimentError, match="fp16 runs on a GPU only"):
        Predictor(str(trained_model), precision="fp16", device="cpu")
    with pytest.raises(SentimentError, match="pick one"):
        Predictor(str(trained_model), precision="bf16", quantize="int8")


def test_any_classification_folder_works_with_default_settings(tmp_path, trained_model):
    import shutil
    folder = tmp_path / "plain"
    shutil.copytree(trained_model, folder)
    (folder / "sentiment.json").unlink()  # a Hugging Face folder that train.py did not write
    predictor = Predictor(str(folder))
    assert predictor.labels == ["negative", "positive"]
    trained = json.loads((trained_model / "sentiment.json").read_text())["max_length"]  # the saved tokenizer's limit
    # and side: the trained model kept the end of long texts, so its tokenizer cuts from the left
    settings = predictor.settings
    assert (settings.truncation, settings.temperature, predictor.max_length) == ("tail", 1.0, trained)
    assert predictor.predict(["The acting was superb. I loved it."])[0]["label"] == "positive"


def test_fp32_scoring_runs_fp32_weights_and_a_max_length_over_the_limit_is_refused(tmp_path, trained_model):
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification
    folder = tmp_path / "bf16"
    shutil.copytree(trained_model, folder)
    AutoModelForSequenceClassification.from_pretrained(folder).to(torch.bfloat16).save_pretrained(folder)
    predictor = Predictor(str(folder), precision="fp32")
    assert {p.dtype for p in predictor.model.parameters()} == {torch.float32}
    with pytest.raises(SettingError, match="max_length: 1024 tokens is over this model's limit of 512"):
        Predictor(str(trained_model), max_length=1024)


def test_auto_precision_asks_the_chosen_gpu_and_ignores_emulated_bf16(monkeypatch):
    from sentiment import predictor as module
    asked = []

    def capability(device):
        asked.append(str(device))
        return {"cuda:0": (7, 0), "cuda:1": (9, 0)}[str(device)]  # a V100 and an H100

    monkeypatch.setattr(module.torch.cuda, "get_device_capability", capability)
    monkeypatch.setattr(module.torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation says yes
    assert module.half_precision("auto", None, torch.device("cuda:0")) is None  # fp32, never fp16 unasked
    assert module.half_precision("auto", None, torch.device("cuda:1")) is torch.bfloat16
    assert asked == ["cuda:0", "cuda:1"]
    assert module.half_precision("fp16", None, torch.device("cuda:0")) is torch.float16


def test_emulated_bf16_is_told_apart_from_bf16_in_hardware(monkeypatch):
    from sentiment import devices
    monkeypatch.setattr(devices.torch.cuda, "get_device_capability", lambda device: {"cuda:0": (7, 5)}.get(
        str(device), (9, 0)))
    monkeypatch.setattr(devices.torch.cuda, "get_device_name", lambda device: "Tesla T4")
    assert devices.emulated_bf16(torch.device("cuda:0")) == (
        "Tesla T4 (compute capability 7.5) has no bf16 arithmetic; bf16 is emulated there, without the tensor cores "
        "fp16 runs on")
    assert devices.emulated_bf16(torch.device("cuda:1")) is None
    assert devices.emulated_bf16(torch.device("mps")) is None  # nothing known: nothing said
    for native in (True, False):
        monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
        assert (devices.emulated_bf16(torch.device("cpu")) is None) == native


def test_scoring_in_bf16_where_it_is_emulated_says_what_is_faster(monkeypatch, trained_model, capfd):
    from sentiment import devices
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: False)
    Predictor(str(trained_model), device="cpu", precision="bf16")
    assert "warning: precision bf16: this CPU has neither AVX512-BF16 nor AMX; bf16 is emulated here, slower than " \
           "fp32; fp32 is faster here" in capfd.readouterr().err
    Predictor(str(trained_model), device="cpu", precision="auto")  # auto picks fp32 there, without a word
    assert "warning" not in capfd.readouterr().err


def test_auto_precision_picks_fp32_on_an_accelerator_that_is_not_cuda(monkeypatch):
    from sentiment import predictor as module
    monkeypatch.setattr(module.torch.cuda, "get_device_capability", lambda device: pytest.fail("asked CUDA"))
    assert module.half_precision("auto", None, torch.device("mps")) is None  # it asked CUDA about an Apple GPU


@pytest.mark.parametrize("device, accelerator, message", [
    ("nonsense", "cuda", "'nonsense' is not a device; use auto, cpu, cuda or cuda:N"),
    ("cuda", None, "no cuda device on this machine: it has only its CPU"),
    ("mps", "cuda", "no mps device on this machine: its accelerator is cuda"),
    ("cuda:5", "cuda", "there is no cuda:5: this machine has 2 cuda devices, numbered from 0"),
])
def test_a_device_that_is_not_here_is_named_before_the_model_loads(monkeypatch, device, accelerator, message):
    # Each was a traceback from deep inside PyTorch (`--device cuda` where there is no GPU: "Torch not
    # compiled with CUDA enabled", `--device mps` on such a machine too).
    from sentiment import predictor as module
    monkeypatch.setattr(module.torch.accelerator, "is_available", lambda: accelerator is not None)
    monkeypatch.setattr(module.torch.accelerator, "current_accelerator",
                        lambda *a: torch.device(accelerator) if accelerator else None)
    monkeypatch.setattr(module.torch.accelerator, "device_count", lambda: 2 if accelerator else 0)
    with pytest.raises(SettingError, match=re.escape(f"device: {message}")):
        Predictor("no model is read before the device is known", device=device)
    if accelerator:
        assert module.pick_device("cuda:1") == torch.device("cuda:1")
    assert module.pick_device("cpu") == torch.device("cpu")


def test_more_threads_than_cpus_is_named_before_the_model_loads():
    # It was "could not load the weights (RuntimeError: can't start new thread)" with --threads 100000.
    with pytest.raises(SettingError, match=r"threads: 100000 is more than the \d+ CPUs this process may use"):
        Predictor("no model is read before the threads are known", threads=100_000)


def decoder_classifier_folder(folder, texts):
    """A tiny GPT-2 classifier as such folders come: a byte-level BPE tokenizer with an end-of-text token
    and no padding token, and no padding id in the config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                           initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", model_max_length=64)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1},
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer.pad_token is None and config.pad_token_id is None


def test_a_decoder_whose_tokenizer_cannot_pad_trains_and_scores_in_batches(tmp_path, reviews_csv):
    from helpers import run_script
    from transformers import pipeline
    texts = demo_reviews(200, seed=5)["review"].to_list()
    decoder_classifier_folder(tmp_path / "gpt2", texts)
    # Scoring the folder as it is: texts of one length share a batch, which GPT-2 refuses without a padding id;
    # texts of other lengths are padded, and each must still be read at its own last token.
    same = ["a good film", "a bad movie", "a fine plot"]
    texts = same + ["It was " + "really " * 8 + "good.", "bad"]
    predictor = Predictor(str(tmp_path / "gpt2"), batch_size=8, precision="fp32")
    alone = np.concatenate([predictor.probabilities([t]) for t in texts])
    np.testing.assert_allclose(predictor.probabilities(texts), alone, atol=1e-5)

    from transformers import AutoTokenizer, GPT2Config

    from sentiment.modeling import padding_id
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gpt2")
    config = GPT2Config(pad_token_id=50256)  # GPT-2's id, past this small vocabulary: the end-of-text token pads
    assert padding_id(tokenizer, config) == tokenizer.eos_token_id == config.pad_token_id

    out = tmp_path / "trained"
    run_script("train.py", "--data", str(reviews_csv), "--model", str(tmp_path / "gpt2"), "--output-dir", str(out),
               "--epochs", "1", "--batch-size", "8", "--max-length", "64", "--lr", "1e-3")
    config = json.loads((out / "config.json").read_text())
    tokens = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["pad_token_id"], tokens["pad_token"]) == (config["eos_token_id"], "<|endoftext|>")
    predictor = Predictor(str(out), batch_size=8, precision="fp32")
    alone = np.concatenate([predictor.probabilities([t]) for t in texts])
    np.testing.assert_allclose(predictor.probabilities(texts), alone, atol=1e-5)
    # The folder alone is enough for transformers' own batched pipeline too (which knows nothing of the
    # calibration temperature: the same labels, not the same probabilities).
    classify = pipeline("text-classification", model=str(out), batch_size=4)
    piped = [answer["label"] for answer in classify(texts)]
    assert piped == [answer["label"] for t in texts for answer in classify([t], batch_size=1)]
    assert piped == [predictor.labels[i] for i in alone.argmax(axis=1)]


@pytest.mark.parametrize("staged", [False, True])  # True: through page-locked memory, as on a GPU
def test_a_batch_the_device_has_no_memory_for_is_halved_and_later_batches_fit(trained_model, capsys, staged):
    texts = demo_reviews(60, seed=31)["review"].to_list()
    predictor = Predictor(str(trained_model), batch_size=64, max_batch_tokens=100_000, precision="fp32")
    predictor.staged = staged
    expected = predictor.probabilities(texts)
    model, limit, calls = predictor.model, 400, []

    def short_of_memory(**batch):  # a GPU that holds at most `limit` tokens of activations
        tokens = batch["input_ids"].numel()
        calls.append(tokens)
        if tokens > limit:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate for {tokens} tokens")
        return model(**batch)

    predictor.model = short_of_memory
    np.testing.assert_allclose(predictor.probabilities(texts), expected, atol=1e-6)
    failed = [k for k, n in enumerate(calls) if n > limit]
    assert failed and predictor.max_batch_tokens <= limit
    for k in failed:  # each failure halves what is asked for from then on: a few failures, not one a batch
        assert max(calls[k + 1:]) <= calls[k] // 2
    calls.clear()
    np.testing.assert_allclose(predictor.probabilities(texts), expected, atol=1e-6)
    assert max(calls) <= limit  # a second file is cut to the lowered budget from its first batch
    assert "ran out of memory on" in capsys.readouterr().err
    limit = 5  # not even one text fits
    with pytest.raises(SentimentError, match="ran out of memory scoring one text of .* tokens; lower --max-length"):
        predictor.probabilities(texts[:3])
