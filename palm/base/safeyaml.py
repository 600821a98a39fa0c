"""YAML from users, read with bounds: every spec, `--set` value and multiple-choice task file goes through here.

`yaml.safe_load` accepts duplicate keys (the last one silently wins), expands aliases without limit (a
"billion laughs" document of a few hundred bytes is a tree of billions of nodes, which validating or
merging then walks for ever), nests as deep as the input does, and `Path.read_text` reads whatever a path
names (a device such as /dev/zero never ends, a FIFO blocks). Here:

- files are read only when they are regular files (`allow_fifo` also admits a pipe, for a spec given as
  `<(...)`), and at most `MAX_BYTES` of them;
- a key given twice in one mapping is refused, naming the key and both lines;
- the document, with every alias expanded, may hold at most `MAX_NODES` nodes and nest `MAX_DEPTH` deep.

Each refusal is a `YAMLRefused` (a `yaml.MarkedYAMLError`, so it carries the line), and callers turn it into
their one-line error. Messages quote at most a short, escaped key (`shown`), never a file's content.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

#: Largest YAML file read (specs are a few kB; the largest shipped one is under 10 kB).
MAX_BYTES = 4 * 2**20
#: Most nodes a document may expand to (aliases counted as often as they are used).
MAX_NODES = 200_000
#: Deepest nesting of mappings and sequences.
MAX_DEPTH = 64


class YAMLRefused(yaml.MarkedYAMLError):
    """A document palm will not load: a duplicate key, or one beyond the bounds above."""


class NotReadable(Exception):
    """A path that is not a file palm reads: `reason` says what it is instead."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def shown(value: Any, limit: int = 60) -> str:
    """`value` fit for a one-line message: printable text as it is, anything else escaped; at most `limit`."""
    text = str(value)
    if not (text.isprintable() and len(text) <= limit):
        text = repr(text)
        if len(text) > limit:
            text = text[: limit - 3] + "..."
    return text


class BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, and documents that expand past MAX_NODES or nest past
    MAX_DEPTH. Node sizes (with aliases expanded) are counted once per node as it is composed, so the
    check itself is linear in the document's text."""

    def __init__(self, stream: Any):
        super().__init__(stream)
        self._depth = 0
        self._sizes: dict[int, int] = {}
        self._nodes: list[Any] = []  # keeps the counted nodes alive, so their ids stay theirs

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise YAMLRefused(None, None, f"nested more than {MAX_DEPTH} levels deep", self.peek_event().start_mark)
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                target = self.anchors.get(event.anchor)
                if target is not None and id(target) not in self._sizes:
                    raise YAMLRefused(None, None, f"alias *{shown(event.anchor)} refers to a node that contains it",
                                      event.start_mark)
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            if isinstance(node, yaml.SequenceNode):
                size = 1 + sum(self._sizes.get(id(child), 1) for child in node.value)
            elif isinstance(node, yaml.MappingNode):
                size = 1 + sum(self._sizes.get(id(k), 1) + self._sizes.get(id(v), 1) for k, v in node.value)
            else:
                size = 1
            self._sizes[id(node)] = size
            self._nodes.append(node)
            if size > MAX_NODES:
                raise YAMLRefused(None, None, f"expands to more than {MAX_NODES:,} values (through aliases?)",
                                  node.start_mark)
        return node

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:
                    continue  # an unhashable key: SafeLoader says so itself
                if first is not key_node.start_mark:
                    raise YAMLRefused(f"in a mapping starting at line {node.start_mark.line + 1}", node.start_mark,
                                      f"duplicate key {shown(key)!s} (first at line {first.line + 1})",
                                      key_node.start_mark)
        return super().construct_mapping(node, deep=deep)



def safe_load(text: str) -> Any:
    """yaml.safe_load with duplicate keys refused and the bounds above; raises yaml.YAMLError."""
    if len(text) > MAX_BYTES:
        raise YAMLRefused(None, None, f"larger than {MAX_BYTES // 2**20} MiB", None)
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_text(path: str | Path, *, allow_fifo: bool = False) -> str:
    """The UTF-8 text of a regular file (or, with `allow_fifo`, a pipe), at most MAX_BYTES.

    Raises FileNotFoundError, NotReadable (a directory, a device, a FIFO, too large), OSError (e.g.
    permission denied) or UnicodeDecodeError. The file is opened without blocking and checked before a
    byte is read, so a FIFO nobody writes to or a device like /dev/zero does not hang the reader."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise NotReadable("is a directory, not a file")
        if stat.S_ISFIFO(mode) and allow_fifo:
            os.set_blocking(fd, True)
        elif not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
            raise NotReadable(f"is {kind}, not a regular file")
        chunks, total = [], 0
        while total <= MAX_BYTES:
            chunk = os.read(fd, min(1 << 20, MAX_BYTES + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > MAX_BYTES:
            raise NotReadable(f"is larger than {MAX_BYTES // 2**20} MiB, too large for a YAML file")
    finally:
        os.close(fd)
    return b"".join(chunks).decode("utf-8")


def error_text(e: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line and column) and what, without quoting the document."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(e, "problem", None) or type(e).__name__
    opened = getattr(e, "context_mark", None)
    context = getattr(e, "context", None)
    if opened is not None and context and not isinstance(e, YAMLRefused):
        problem += f" ({context} at line {opened.line + 1})"
    return " ".join(f"{where}{problem}".split())


__all__ = ["safe_load", "read_text", "error_text", "shown", "YAMLRefused", "NotReadable",
           "MAX_BYTES", "MAX_NODES", "MAX_DEPTH"]
