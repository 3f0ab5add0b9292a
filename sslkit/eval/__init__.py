"""Evaluation: clean-image features and FAISS k-NN classification (also as a training hook)."""

from sslkit.eval.features import extract_features
from sslkit.eval.fewshot import fewshot_eval, fewshot_indices
from sslkit.eval.knn import KNNMonitor, knn_accuracy, knn_scores, knn_scores_multi
from sslkit.eval.linear import train_linear_probes
from sslkit.eval.monitors import CollapseMonitor, effective_rank, embedding_std

__all__ = ["KNNMonitor", "extract_features", "knn_accuracy", "knn_scores", "knn_scores_multi",
           "CollapseMonitor", "effective_rank", "embedding_std",
           "fewshot_eval", "fewshot_indices", "train_linear_probes"]
