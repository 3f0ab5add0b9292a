"""A list of image files: ``data.name=file_list data.root=<list.txt or list.csv>``.

A ``.csv`` list has a header row; its ``data.path_column`` (default ``path``) names the
files and its ``data.label_column`` (default ``label``), when present, their classes. Any
other list (``.txt``) has one path per line, optionally followed by a tab and a label; blank
lines and lines starting with ``#`` are skipped. Relative paths are relative to the list's
folder. Labels are class names: the sorted distinct names are classes 0, 1, ... (numerically
sorted when every name is an integer). Both splits are the whole list (point ``eval.data`` at
another list, or a labelled dataset, for evaluation).

The files are decoded as an ``ImageFolder``'s are (``data.bad_images``, ``data.decode``).
A listed file that does not exist is an error naming it, or with ``data.bad_images=skip``
left out and counted (the run's first line says how many).
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sslkit.config import DataConfig
from sslkit.data.datasets import DATASETS, check_bad_images
from sslkit.data.image_folder import ImageFolder, check_decode
from sslkit.errors import UserError


class FileListConfig(DataConfig):
    """``file_list``'s own keys: where the paths and labels are in the list."""

    # auto: labels from the label column when the list has one | column: required | none: no labels
    labels: Literal["auto", "column", "none"] = "auto"
    path_column: str = "path"  # .csv lists: the header of the column of file paths
    label_column: str = "label"  # .csv lists: the header of the label column (.txt: the text after a tab)


def read_list(path: Path, cfg: FileListConfig) -> tuple[list[str], list[str] | None]:
    """The list's file paths as written and, when it has them and ``cfg.labels`` allows, their
    labels; a missing column is one error naming the list and its columns."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader)
        shown = ", ".join(columns) if columns else "none: the file is empty"
        if cfg.path_column not in columns:
            raise UserError(
                f"{path} has no column {cfg.path_column!r} (its columns: {shown}): set data.path_column to the "
                "header of the column of file paths"
            )
        has_labels = cfg.label_column in columns
        if cfg.labels == "column" and not has_labels:
            raise UserError(
                f"{path} has no column {cfg.label_column!r} (its columns: {shown}) and data.labels=column: set "
                "data.label_column to the header of the label column, or data.labels=none"
            )
        paths = [row[cfg.path_column] for row in rows]
        labels = [row[cfg.label_column] for row in rows] if has_labels and cfg.labels != "none" else None
        return paths, labels
    lines = [(n, line.rstrip("\r\n")) for n, line in enumerate(path.read_text().splitlines(), 1)]
    lines = [(n, line) for n, line in lines if line.strip() and not line.startswith("#")]
    fields = [(n, line.split("\t", 1)) for n, line in lines]
    paths = [parts[0] for _, parts in fields]
    with_label = [len(parts) == 2 and parts[1].strip() != "" for _, parts in fields]
    if cfg.labels == "none" or (cfg.labels == "auto" and not all(with_label)) or not fields:
        if cfg.labels == "auto" and any(with_label) and not all(with_label):
            n = fields[with_label.index(False)][0]
            raise UserError(
                f"{path}: line {n} has no label (a tab and a label after the path) while other lines have one: "
                "label every line, or set data.labels=none"
            )
        return paths, None
    if not all(with_label):
        n = fields[with_label.index(False)][0]
        raise UserError(
            f"{path}: line {n} has no label column (a tab and a label after the path) and data.labels=column: "
            "label every line, or set data.labels=none"
        )
    return paths, [parts[1].strip() for _, parts in fields]


def class_names(labels: list[str]) -> list[str]:
    """The distinct labels in class order: numeric when every label is an integer, else sorted text."""
    names = set(labels)
    if all(name.lstrip("-").isdigit() for name in names):
        return sorted(names, key=int)
    return sorted(names)


@DATASETS.register("file_list", config=FileListConfig)
def file_list(cfg: FileListConfig, split: str) -> ImageFolder:
    """The files of the list ``data.root`` (both splits); see the module docstring."""
    check_bad_images(cfg.bad_images)
    check_decode(cfg.decode)
    if cfg.root is None:
        raise UserError("dataset 'file_list' needs data.root=<list.txt or list.csv of image paths>")
    if cfg.image_size is None:
        raise UserError("dataset 'file_list' needs data.image_size=<side in pixels> (e.g. 224)")
    path = Path(cfg.root)
    if not path.is_file():
        what = "a folder (use data.name=image_folder for it)" if path.is_dir() else "not there"
        raise UserError(f"data.root {path} is {what}: file_list needs a .txt or .csv list of image paths")
    paths, labels = read_list(path, cfg)
    if not paths:
        raise UserError(f"{path} lists no image files: write one path per line (.txt) or a {cfg.path_column!r} "
                        "column (.csv)")
    base = path.parent
    full = [p if os.path.isabs(p) else str(base / p) for p in paths]
    present = [os.path.isfile(p) for p in full]
    missing = present.count(False)
    if missing:
        first = full[present.index(False)]
        if cfg.bad_images == "error" or missing == len(full):
            raise UserError(
                f"{path} names {missing} file(s) that do not exist, e.g. {first} (relative paths are relative "
                f"to {base}): fix the list"
                + (", or set data.bad_images=skip to leave them out" if missing < len(full) else "")
            )
        full = [p for p, ok in zip(full, present) if ok]
        labels = None if labels is None else [name for name, ok in zip(labels, present) if ok]
    classes = [] if labels is None else class_names(labels)
    index = {name: i for i, name in enumerate(classes)}
    targets = [-1] * len(full) if labels is None else [index[name] for name in labels]
    info = {"labels": "none" if labels is None else "column", "skipped": {"missing": missing} if missing else {}}
    return ImageFolder(np.array(full), torch.tensor(targets, dtype=torch.int64), classes, cfg.image_size,
                       cfg.channels, cfg.bad_images, cfg.decode, info)
