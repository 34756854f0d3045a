"""Scores of a classifier: accuracy, macro F1, confusion matrix, calibration.

Pure numpy and torch on arrays of class ids, logits or probabilities; used by training
(validation, test, temperature fitting) and by `infer.py` when its input carries labels.
"""

import numpy as np
import torch

ECE_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def classification_report(y_true, y_pred, labels):
    """Accuracy, macro F1, the confusion matrix (rows: true, columns: predicted) and class counts."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    k = len(labels)
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(float)
    precision = np.divide(tp, confusion.sum(0), out=np.zeros(k), where=confusion.sum(0) > 0)
    recall = np.divide(tp, confusion.sum(1), out=np.zeros(k), where=confusion.sum(1) > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros(k), where=precision + recall > 0)
    return {
        "accuracy": float(tp.sum() / max(len(y_true), 1)),
        "macro_f1": float(f1.mean()),
        "examples": int(len(y_true)),
        "examples_per_class": {label: int(n) for label, n in zip(labels, confusion.sum(1))},
        "confusion_matrix": {"labels": list(labels), "rows_true_columns_predicted": confusion.tolist()},
    }


def reliability_bins(probs, y_true, bins=ECE_BINS):
    """Per equal-width confidence bin that holds examples: [mean confidence, accuracy, examples]."""
    probs, y_true = np.asarray(probs), np.asarray(y_true)
    confidence, predicted = probs.max(1), probs.argmax(1)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    return [[float(confidence[which == b].mean()), float((predicted[which == b] == y_true[which == b]).mean()),
             int((which == b).sum())] for b in range(bins) if (which == b).any()]


def expected_calibration_error(probs, y_true, bins=ECE_BINS):
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by bin size."""
    rows = reliability_bins(probs, y_true, bins)
    total = sum(n for _, _, n in rows)
    return float(sum(n / total * abs(accuracy - confidence) for confidence, accuracy, n in rows))


def inverse_frequency_weights(label_ids, classes):
    """Class weights n / (k · n_c): the rare class's errors count as much, in all, as the common one's."""
    counts = np.bincount(np.asarray(label_ids, dtype=np.int64), minlength=classes).astype(float)
    return len(label_ids) / (classes * np.maximum(counts, 1))


def fit_temperature(logits, y_true):
    """The temperature T > 0 that minimises the negative log-likelihood of softmax(logits / T).

    Temperature scaling (Guo et al., 2017) changes confidences, never the predicted class.
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    y_true = torch.as_tensor(np.asarray(y_true))
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), y_true)
        loss.backward()
        return loss

    optimizer.step(closure)
    # Perfectly separated validation data drives T towards 0; keep it in a range that still ranks.
    return float(log_t.detach().exp().clamp(MIN_TEMPERATURE, MAX_TEMPERATURE))


def softmax(logits, temperature=1.0):
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def output_function(config):
    """How a classifier's logits become its scores, as transformers' text-classification pipeline decides
    from the config: labels that exclude each other share a softmax; labels that do not (multi-label),
    or a single logit, each get a sigmoid; a regression keeps its raw output."""
    if config.problem_type == "regression":
        return "none"
    if config.problem_type == "multi_label_classification" or config.num_labels == 1:
        return "sigmoid"
    return "softmax"


def scores(logits, function, temperature=1.0):
    """The scores `output_function` names, of logits divided by `temperature` (a regression's are raw)."""
    if function == "none":
        return np.asarray(logits, dtype=np.float64)
    if function == "sigmoid":  # written with tanh, which cannot overflow as exp(-z) can
        return 0.5 * (1 + np.tanh(np.asarray(logits, dtype=np.float64) / (2 * temperature)))
    return softmax(logits, temperature)
