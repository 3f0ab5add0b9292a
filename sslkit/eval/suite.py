"""``sslkit eval suite``: several protocols on several datasets, one report.

For each dataset named (``NAME`` or ``NAME:ROOT``) the suite loads the checkpoint's feature
network pointed at it (:func:`~sslkit.eval.clean.evaluation_setup`, as ``sslkit eval <protocol>
--data NAME --data-root ROOT`` does); a dataset that cannot be found or has no labels is
skipped, with its one-line reason in the report. The clean features of both splits are embedded
once for every protocol that reads only them (k-NN, linear, few-shot); the others (fine-tuning,
per-layer and moment probes) run the network themselves. Each protocol runs with its defaults
(its own command takes options). Every dataset also gets RankMe (Garrido et al., ICML 2023)
of its test embeddings, which needs no labels.

Writes ``report.json`` (every result and time), ``report.md`` (one table of dataset x
protocol headline numbers, RankMe, the times, the skipped datasets) and ``report.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from sslkit.errors import UserError
from sslkit.eval.clean import clean_features, evaluation_setup
from sslkit.eval.monitors import rankme
from sslkit.eval.protocols import PROTOCOLS, run_protocol


def default_protocols() -> list[str]:
    """Every registered protocol that reads frozen features only (k-NN, linear, few-shot): the cheap ones."""
    return [name for name in PROTOCOLS.names() if PROTOCOLS.get(name).shared_features]


def parse_data(spec: str) -> tuple[str, Optional[str]]:
    """``NAME`` or ``NAME:ROOT`` -> (name, root or None)."""
    name, _, root = spec.partition(":")
    return name, root or None


def run_suite(
    checkpoint: str | Path,
    datasets: Sequence[str],
    protocols: Optional[Sequence[str]] = None,
    output: Optional[str | Path] = None,
    settings: Optional[dict[str, Any]] = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Run ``protocols`` on each of ``datasets`` and write the report (module docstring).

    Args:
        checkpoint: a checkpoint directory or a ``backbone.safetensors``.
        datasets: ``NAME`` or ``NAME:ROOT`` each.
        protocols: names in :data:`~sslkit.eval.protocols.PROTOCOLS` (None: :func:`default_protocols`).
        output: the report's folder (default: ``suite/`` beside the checkpoint).
        settings, overrides: as for :func:`~sslkit.eval.clean.evaluation_setup` (limits, ``key=value``).

    Returns:
        The report: ``{"checkpoint", "protocols", "datasets": {spec: {"rankme", "results", "seconds"}},
        "skipped": {spec: reason}, "files": [...]}``.
    """
    protocols = default_protocols() if protocols is None else protocols
    for name in protocols:
        PROTOCOLS.get(name)  # an unknown name fails before any work
    checkpoint = Path(checkpoint)
    out = Path(output) if output else (checkpoint if checkpoint.is_dir() else checkpoint.parent) / "suite"
    report: dict[str, Any] = {"checkpoint": str(checkpoint), "protocols": list(protocols), "datasets": {},
                              "skipped": {}}
    main = True
    for spec in datasets:
        name, root = parse_data(spec)
        start = time.perf_counter()
        try:  # not found, not decodable, no labels: skipped, with the reason
            cfg, model, accelerator = evaluation_setup(checkpoint, name, root, settings, overrides)
            features = clean_features(cfg, model, accelerator)
        except UserError as err:
            report["skipped"][spec] = str(err)
            print(f"suite: {spec} skipped: {err}")
            continue
        main = accelerator.is_main_process
        entry: dict[str, Any] = {"rankme": rankme(features.test), "results": {},
                                 "seconds": {"embed": time.perf_counter() - start}}
        if main:
            print(f"suite: {spec}: RankMe {entry['rankme']:.1f} of {features.test.shape[1]} dimensions")
        for protocol in protocols:
            start = time.perf_counter()
            result = run_protocol(protocol, cfg, model, accelerator, features=features, checkpoint=checkpoint)
            entry["results"][protocol] = result
            entry["seconds"][protocol] = time.perf_counter() - start
            if main:
                print(f"suite: {spec}: {protocol}: {PROTOCOLS.get(protocol).summary(result)} "
                      f"({entry['seconds'][protocol]:.0f} s)")
        report["datasets"][spec] = entry
    if main:
        out.mkdir(parents=True, exist_ok=True)
        report["files"] = [str(out / f) for f in ("report.json", "report.md", "report.png")]
        (out / "report.md").write_text(report_markdown(report))
        if report["datasets"]:
            from sslkit.plot import plot_suite  # matplotlib only when drawing

            plot_suite(headline_table(report), out / "report.png")
        else:
            report["files"].remove(str(out / "report.png"))
        (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def headline_table(report: dict) -> dict[str, dict[str, float]]:
    """``{dataset: {column: value}}``: each protocol's headline numbers, and RankMe."""
    return {spec: {**{column: value for protocol, result in entry["results"].items()
                      for column, value in PROTOCOLS.get(protocol).headline(result).items()},
                   "RankMe": entry["rankme"]}
            for spec, entry in report["datasets"].items()}


def report_markdown(report: dict) -> str:
    """The report as Markdown: the dataset x protocol table, the times, the skipped datasets."""
    table = headline_table(report)
    lines = [f"# Evaluation of `{report['checkpoint']}`", ""]
    if table:
        columns = list(dict.fromkeys(c for row in table.values() for c in row))
        lines += ["Top-1 accuracy (fractions) per protocol; RankMe: effective rank of the test embeddings.", "",
                  "| dataset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for spec, row in table.items():
            cells = [(f"{row[c]:.1f}" if c == "RankMe" else f"{row[c]:.4f}") if c in row else "" for c in columns]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
        steps = list(dict.fromkeys(s for e in report["datasets"].values() for s in e["seconds"]))
        lines += ["", "Seconds per step:", "", "| dataset | " + " | ".join(steps) + " |",
                  "|---" * (len(steps) + 1) + "|"]
        for spec, entry in report["datasets"].items():
            lines.append(f"| {spec} | " + " | ".join(f"{entry['seconds'].get(s, 0):.1f}" for s in steps) + " |")
    if report["skipped"]:
        lines += ["", "Skipped:", ""] + [f"- `{spec}`: {' '.join(reason.split())}"  # one line per dataset
                                         for spec, reason in report["skipped"].items()]
    return "\n".join(lines) + "\n"
