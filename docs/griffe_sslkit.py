"""A griffe extension for the API reference (mkdocs.yml loads it; it is not part of the site).

sslkit's docstrings are Google style with a few habits of their own, rendered here as meant:

- ``Shapes:`` is not a Google section. Followed by an indented block, griffe makes it an
  admonition of one run-on paragraph; here it becomes a list, one tensor per item, names in
  code (``- `z_a, z_b`: (N, D) ...``). A one-line ``Shapes: ...`` gets a bold label.
- ``Example:`` / ``Example::`` (singular) are not griffe's ``Examples:`` section, so their
  ``>>>`` lines would render as nested block quotes; they become ``Examples:`` and render as
  Python code.
- ``Args:`` entries that document several parameters at once, ``a, b, c: widths``, become
  one entry per name with the shared description, so each is matched against the signature
  (and still warned about when it is not in it) and shows its type and default.
- A dataclass's fields (the config sections of ``sslkit/config.py``) are documented by
  trailing comments, ``lr: float = 0.06  # base learning rate, ...``: the class gets an
  ``Attributes:`` section listing every field with its comment and default.

Only the text griffe parses changes, so a parameter that is not in the signature or has no
type still fails ``mkdocs build --strict``. Each rule is a no-op on docstrings already
written the standard way (``Examples:``, one name per ``Args:`` entry).
"""

from __future__ import annotations

import io
import re
import tokenize
from typing import Any

import griffe

_ITEM = re.compile(r"^(?P<indent> +)(?P<name>[\w*][\w*, ]*):\s+(?P<desc>.*)$")
_ARGS = ("Args:", "Arguments:", "Parameters:", "Params:")
_FACTORY = re.compile(r"^field\(default_factory=(?P<factory>[\w.]+)\)$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], i: int) -> int:
    """The end of the indented block that starts at ``lines[i]`` (blank lines inside kept)."""
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith(" ")):
        if not lines[i].strip() and not (i + 1 < len(lines) and lines[i + 1].startswith(" ")):
            break  # a blank line followed by an unindented one ends the block
        i += 1
    return i


def _items(block: list[str]) -> list[tuple[re.Match, list[str]]]:
    """``name: description`` items of a section's block, each with its continuation lines."""
    items: list[tuple[re.Match, list[str]]] = []
    item_indent = None
    for line in block:
        match = _ITEM.match(line)
        if match and (item_indent is None or _indent(line) == item_indent):
            item_indent = _indent(line)
            items.append((match, []))
        elif items:
            items[-1][1].append(line)
        else:
            return []  # not a list of items: leave the section as it is
    return items


def rewrite(text: str) -> str:
    """The docstring ``text`` (dedented, as griffe holds it) with the rules above applied."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        if line in ("Example:", "Example::"):
            out.append("Examples:")
            i += 1
            while i < len(lines) and not lines[i].strip():  # "Example::" + blank line + block
                i += 1
        elif line == "Shapes:" or line in _ARGS:
            end = _block(lines, i + 1)
            block = lines[i + 1:end]
            items = _items(block)
            out.append(line)
            if not items:
                out.extend(block)
            for match, continuation in items:
                if line == "Shapes:":
                    out.append(f"{match['indent']}- `{match['name']}`: {match['desc']}")
                    out.extend(continuation)
                else:  # one entry per name, the description repeated
                    for name in match["name"].split(","):
                        out.append(f"{match['indent']}{name.strip()}: {match['desc']}")
                        out.extend(continuation)
            i = end
        elif line.startswith("Shapes: "):
            out.append("**Shapes:** " + line[len("Shapes: "):])
            i += 1
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def trailing_comment(source: str) -> str | None:
    """The text of the comment that ends the first line of ``source``, if any."""
    first = source.split("\n", 1)[0] + "\n"
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(first).readline))
    except (tokenize.TokenError, SyntaxError):  # a statement over several lines: no comment
        return None
    comments = [t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT]
    return comments[-1] if comments and comments[-1] else None


def _default(value: object) -> str:
    """A field's default as a user writes it: ``field(default_factory=dict)`` is ``{}``."""
    text = str(value)
    factory = _FACTORY.match(text)
    if factory:
        return {"dict": "{}", "list": "[]", "tuple": "()"}.get(factory["factory"], f"{factory['factory']}()")
    return text


def fields_section(cls: griffe.Class) -> str:
    """An ``Attributes:`` section: every field of ``cls``, its trailing comment, its default."""
    entries = []
    for name, member in cls.members.items():
        if member.is_alias or not member.is_attribute or name.startswith("_"):
            continue
        comment = trailing_comment(member.source) if member.lineno else None
        default = f"Default: `{_default(member.value)}`." if member.value is not None else None
        description = " ".join(filter(None, [f"{comment}." if comment else None, default]))
        entries.append(f"    {name}: {description}")
    return "Attributes:\n" + "\n".join(entries) if entries else ""


class SslkitDocstrings(griffe.Extension):
    """Applies :func:`rewrite` to every docstring griffe loads, and documents the fields of
    dataclasses from their trailing comments."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if obj.is_class and "dataclass" in obj.labels:
            existing = obj.docstring.value if obj.docstring is not None else ""
            section = "" if "Attributes:" in existing else fields_section(obj)
            if section:
                text = f"{existing}\n\n{section}" if existing else section
                obj.docstring = griffe.Docstring("", lineno=obj.lineno, parent=obj, parser=loader.docstring_parser,
                                                 parser_options=loader.docstring_options)
                obj.docstring.value = text  # as is: the constructor would dedent the section
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
