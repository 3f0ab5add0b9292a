"""Evaluation: clean-image features, FAISS k-NN (also as a training hook), linear, few-shot and
label-fraction probes, k-NN + linear, RankMe; the protocols of ``sslkit eval`` are in
:mod:`sslkit.eval.protocols` (and finetune, layers, moments, suite)."""

from sslkit.eval.features import extract_features
from sslkit.eval.fewshot import balanced_indices, fewshot_eval, fewshot_indices, fraction_linear_eval
from sslkit.eval.knn import KNNMonitor, knn_accuracy, knn_scores, knn_scores_multi
from sslkit.eval.knn_linear import knn_linear_eval
from sslkit.eval.linear import train_linear_probes
from sslkit.eval.monitors import CollapseMonitor, effective_rank, embedding_std, rankme

__all__ = ["KNNMonitor", "extract_features", "knn_accuracy", "knn_scores", "knn_scores_multi",
           "CollapseMonitor", "effective_rank", "embedding_std", "rankme", "balanced_indices",
           "fewshot_eval", "fewshot_indices", "fraction_linear_eval", "knn_linear_eval", "train_linear_probes"]
