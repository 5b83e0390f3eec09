"""A reader for the small YAML subset of ``deploy/`` (PyYAML is not a dependency of the project).

It reads block mappings and sequences, plain and quoted scalars, ``>``/``|`` block scalars,
comments and the empty ``[]``/``{}``: what compose files, Prometheus configs and Grafana
provisioning use. Anything outside that subset (anchors, flow collections, tags,
multi-document streams) raises ``ValueError`` rather than being misread, so a deploy file that
grows past the subset fails its test loudly. ``promtool`` (when installed) checks the
Prometheus files with the real parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["load"]

_KEY = re.compile(r"""^(?P<key>[A-Za-z0-9_][\w./-]*|"[^"]*"|'[^']*'):(?: +(?P<rest>.*))?$""")
_INT = re.compile(r"^[-+]?\d+$")
_UNSUPPORTED = ("&", "*", "!", "{", "[", "%", "@", "`")


@dataclass(frozen=True, slots=True)
class _Line:
    indent: int
    text: str


def load(text: str) -> object:
    """Parse ``text``; raise ``ValueError`` for anything outside the subset."""
    reader = _Reader(text)
    first = reader.peek()
    if first is None:
        return None
    value = reader.node(first.indent)
    if reader.peek() is not None:
        line = reader.peek()
        raise ValueError(f"unexpected line {reader.index + 1}: {line.text if line else ''!r}")
    return value


class _Reader:
    def __init__(self, text: str) -> None:
        if "\t" in text:
            raise ValueError("tabs are not allowed in YAML indentation")
        self.lines = text.splitlines()
        self.index = 0

    def peek(self) -> _Line | None:
        while self.index < len(self.lines):
            raw = self.lines[self.index]
            stripped = raw.strip()
            if stripped == "---" and self.index == 0:
                self.index += 1
                continue
            if stripped and not stripped.startswith("#"):
                return _Line(len(raw) - len(raw.lstrip(" ")), stripped)
            self.index += 1
        return None

    def node(self, indent: int) -> object:
        line = self.peek()
        assert line is not None
        if _is_item(line.text):
            return self.sequence(indent)
        return self.mapping(indent)

    def mapping(self, indent: int) -> dict[str, object]:
        result: dict[str, object] = {}
        while (line := self.peek()) is not None and line.indent == indent:
            if _is_item(line.text):
                break
            match = _KEY.match(line.text)
            if match is None:
                raise ValueError(f"line {self.index + 1}: not a 'key: value' line: {line.text!r}")
            key = _scalar_text(match["key"])
            if key in result:
                raise ValueError(f"line {self.index + 1}: duplicate key {key!r}")
            self.index += 1
            result[key] = self.value(match["rest"] or "", indent)
        if (line := self.peek()) is not None and line.indent > indent:
            raise ValueError(f"line {self.index + 1}: unexpected indentation")
        return result

    def sequence(self, indent: int) -> list[object]:
        items: list[object] = []
        while (line := self.peek()) is not None and line.indent == indent and _is_item(line.text):
            body = line.text[1:].lstrip(" ")
            if _KEY.match(body):
                # "- key: value" opens a mapping whose keys sit where "key" starts.
                offset = line.indent + len(line.text) - len(body)
                self.lines[self.index] = " " * offset + body
                items.append(self.mapping(offset))
            else:
                self.index += 1
                items.append(self.value(body, indent))
        return items

    def value(self, rest: str, indent: int) -> object:
        rest = _strip_comment(rest)
        if rest in (">", ">-", "|", "|-"):
            return self.block_scalar(rest, indent)
        if rest:
            return _scalar(rest)
        line = self.peek()
        if line is None:
            return None
        if line.indent > indent or (line.indent == indent and _is_item(line.text)):
            return self.node(line.indent)
        return None

    def block_scalar(self, style: str, indent: int) -> str:
        collected: list[str] = []
        block_indent: int | None = None
        while self.index < len(self.lines):
            raw = self.lines[self.index]
            if raw.strip():
                current = len(raw) - len(raw.lstrip(" "))
                if current <= indent:
                    break
                block_indent = current if block_indent is None else block_indent
                collected.append(raw[block_indent:])
            else:
                collected.append("")
            self.index += 1
        while collected and not collected[-1]:
            collected.pop()
        if style.startswith(">"):
            text = " ".join(part.strip() for part in collected if part.strip())
        else:
            text = "\n".join(collected)
        return text if style.endswith("-") else text + "\n"


def _is_item(text: str) -> bool:
    return text == "-" or text.startswith("- ")


def _strip_comment(text: str) -> str:
    if text[:1] in ("'", '"'):
        return text.strip()
    cut = text.find(" #")
    return (text if cut < 0 else text[:cut]).strip()


def _scalar(text: str) -> object:
    if text[:1] in ("'", '"'):
        return _scalar_text(text)
    if text.startswith(_UNSUPPORTED) and text not in ("[]", "{}"):
        raise ValueError(f"outside the supported YAML subset: {text!r}")
    if text in ("true", "false"):
        return text == "true"
    if text in ("null", "~"):
        return None
    if text == "[]":
        return []
    if text == "{}":
        return {}
    if _INT.match(text):
        return int(text)
    return text


def _scalar_text(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == "'":
        return text[1:-1].replace("''", "'")
    if len(text) >= 2 and text[0] == text[-1] == '"':
        inner = text[1:-1]
        if "\\" in inner.replace('\\"', "").replace("\\\\", ""):
            raise ValueError(f'escape sequences beyond \\" and \\\\ are not supported: {text!r}')
        return inner.replace('\\"', '"').replace("\\\\", "\\")
    if text[:1] in ("'", '"'):
        raise ValueError(f"unterminated quoted scalar: {text!r}")
    return text
