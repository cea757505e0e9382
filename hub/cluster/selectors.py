"""Kubernetes label selectors: parse the string form once, match label maps, render canonically.

A rollout's targets are chosen by a selector such as ``site=a,line in (1,2),!retired``. The same
string is sent to the Kubernetes API (``labelSelector``) and evaluated locally against the static
inventory and the node cache, so the hub must accept exactly what Kubernetes accepts and reject
everything else before any node is touched. Invalid selectors raise ``SelectorError`` (an
``InvalidRequest``: HTTP 400, CLI exit 2) naming the offending term.

Grammar (comma-separated requirements, all must hold; whitespace around tokens is ignored):
``key=value``, ``key==value``, ``key!=value``, ``key in (v1,v2)``, ``key notin (v1,v2)``,
``key`` (exists) and ``!key`` (does not exist). An empty selector matches every node.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from hub.errors import InvalidRequest

Operator = Literal["=", "!=", "in", "notin", "exists", "!"]

_NAME_RE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_TOKEN_RE = re.compile(r"\s*(==|!=|=|\(|\)|,|!|[^\s=!(),]+)")


class SelectorError(InvalidRequest, code="invalid_selector"):
    """A label selector Kubernetes would reject."""


def validate_key(key: str) -> None:
    """Raise SelectorError unless ``key`` is a valid label key (``[prefix/]name``)."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN_RE.match(prefix)):
        raise SelectorError(
            f"invalid label key {key!r}: prefix must be a DNS subdomain (lowercase, <=253)"
        )
    if not _NAME_RE.match(name):
        raise SelectorError(
            f"invalid label key {key!r}: name must be 1-63 characters [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )


def validate_value(value: str) -> None:
    """Raise SelectorError unless ``value`` is a valid label value (may be empty)."""
    if not _VALUE_RE.match(value):
        raise SelectorError(
            f"invalid label value {value!r}: at most 63 characters [A-Za-z0-9-_.], "
            "starting and ending alphanumeric"
        )


@dataclass(frozen=True)
class Requirement:
    """One term of a selector."""

    key: str
    op: Operator
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` satisfies this term (Kubernetes semantics)."""
        present = self.key in labels
        if self.op == "exists":
            return present
        if self.op == "!":
            return not present
        if self.op in ("=", "in"):
            return present and labels[self.key] in self.values
        # "!=" and "notin" match nodes that lack the key, as in Kubernetes
        return not present or labels[self.key] not in self.values

    def __str__(self) -> str:
        if self.op == "exists":
            return self.key
        if self.op == "!":
            return "!" + self.key
        if self.op in ("=", "!="):
            return f"{self.key}{self.op}{self.values[0]}"
        return f"{self.key} {self.op} ({','.join(self.values)})"


@dataclass(frozen=True)
class Selector:
    """A parsed selector: every requirement must hold. ``str()`` gives the canonical form."""

    requirements: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether a node with ``labels`` is selected."""
        return all(r.matches(labels) for r in self.requirements)

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    @property
    def empty(self) -> bool:
        """True when the selector selects everything."""
        return not self.requirements

    def and_(self, other: Selector) -> Selector:
        """Both selectors at once (requirements concatenated, duplicates dropped)."""
        reqs = list(self.requirements)
        reqs += [r for r in other.requirements if r not in reqs]
        return Selector(tuple(reqs))


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if m is None:  # pragma: no cover - the token regex matches any non-space run
            raise SelectorError(f"cannot parse selector at {text[pos:]!r}")
        tokens.append(m.group(1))
        pos = m.end()
    return tokens


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = _tokenize(text)
        self.i = 0

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise SelectorError(f"selector {self.text!r} ends unexpectedly")
        self.i += 1
        return tok

    def expect(self, want: str) -> None:
        tok = self.take()
        if tok != want:
            raise SelectorError(f"selector {self.text!r}: expected {want!r}, got {tok!r}")

    def key(self) -> str:
        tok = self.take()
        if tok in ("=", "==", "!=", "(", ")", ",", "!"):
            raise SelectorError(f"selector {self.text!r}: expected a label key, got {tok!r}")
        validate_key(tok)
        return tok

    def value(self) -> str:
        tok = self.peek()
        # an empty value is legal: "key=" or "key in (a,)"
        if tok is None or tok in (",", ")"):
            return ""
        if tok in ("=", "==", "!=", "(", "!"):
            raise SelectorError(f"selector {self.text!r}: expected a value, got {tok!r}")
        self.i += 1
        validate_value(tok)
        return tok

    def value_set(self) -> tuple[str, ...]:
        self.expect("(")
        values = [self.value()]
        while self.peek() == ",":
            self.i += 1
            values.append(self.value())
        self.expect(")")
        if values == [""]:
            raise SelectorError(f"selector {self.text!r}: a set needs at least one value")
        return tuple(sorted(set(values)))

    def requirement(self) -> Requirement:
        if self.peek() == "!":
            self.i += 1
            return Requirement(self.key(), "!")
        key = self.key()
        op = self.peek()
        if op is None or op == ",":
            return Requirement(key, "exists")
        self.i += 1
        if op in ("=", "=="):
            return Requirement(key, "=", (self.value(),))
        if op == "!=":
            return Requirement(key, "!=", (self.value(),))
        if op in ("in", "notin"):
            return Requirement(key, op, self.value_set())  # type: ignore[arg-type]
        raise SelectorError(
            f"selector {self.text!r}: unknown operator {op!r} after {key!r} "
            "(use =, ==, !=, in, notin)"
        )

    def parse(self) -> Selector:
        if self.peek() is None:
            return Selector(())
        reqs = [self.requirement()]
        while self.peek() is not None:
            self.expect(",")
            reqs.append(self.requirement())
        return Selector(tuple(reqs))


def parse_selector(text: str | None) -> Selector:
    """Parse a selector string; raise SelectorError with the offending term."""
    if text is None:
        return Selector(())
    if not isinstance(text, str):
        raise SelectorError("selector must be a string")
    if len(text) > 4096:
        raise SelectorError("selector is longer than 4096 characters")
    return _Parser(text).parse()


def equals(labels: Mapping[str, str]) -> Selector:
    """A selector of ``key=value`` terms (e.g. the camera-node label)."""
    for k, v in labels.items():
        validate_key(k)
        validate_value(v)
    return Selector(tuple(Requirement(k, "=", (v,)) for k, v in sorted(labels.items())))
