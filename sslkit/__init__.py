"""sslkit: self-supervised pretraining for images (SimCLR, ...) on Accelerate, kornia and FAISS."""

__version__ = "0.1.0"
