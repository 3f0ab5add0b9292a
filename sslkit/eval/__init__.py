"""Evaluation: clean-image features and FAISS k-NN classification (also as a training hook)."""

from sslkit.eval.features import extract_features
from sslkit.eval.knn import KNNMonitor, knn_accuracy, knn_scores

__all__ = ["KNNMonitor", "extract_features", "knn_accuracy", "knn_scores"]
