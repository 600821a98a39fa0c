"""Reading a spec: YAML with bounds, `extends` with a deep merge, `--set dotted.key=value` overrides, then
the schema (palm.spec.schema) and its cross-field checks. Any problem raises `SpecError` naming the file,
the key path and what was expected, before any work starts.

The workflow graph is checked one layer up, where the stage declarations live (palm.dag.workflow's
`load_spec`, which every command uses); `read_spec` here is the spec alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from palm.base import safeyaml, storage
from palm.base.errors import SpecError
from palm.spec.schema import Spec, check_consistency

def node_spec(spec: Spec, overrides: dict[str, Any]) -> Spec:
    """The spec a workflow node runs with: `spec` (without its workflow) and the node's overrides, each a
    dotted key as with --set, validated and checked. SpecError keyed by the override's own key."""
    if not overrides:
        return spec
    tree = spec.model_dump(mode="json", exclude={"workflow"})
    for key, value in overrides.items():
        if not _KEY.match(str(key)):
            raise SpecError(f"expected a dotted key, got {key!r}", key=str(key))
        tree = set_dotted(tree, str(key), value)
    check_integers(tree)
    try:
        node = Spec.model_validate(tree)
    except ValidationError as e:
        err = format_validation_error(e, "")
        raise SpecError(err.detail, key=err.key) from None
    check_consistency(node)
    return node


def _read_yaml(path: Path, *, parent: bool = False) -> dict[str, Any]:
    """The mapping in the YAML file at `path` (palm.base.safeyaml's bounds and duplicate-key check). A spec
    named on the command line may be a pipe (`<(...)`); a parent named by `extends` must be a regular file
    (the caller says which file, and that key, when it is not)."""
    try:
        text = safeyaml.read_text(path, allow_fifo=not parent)
    except FileNotFoundError:
        raise SpecError("file not found", file=str(path)) from None
    except safeyaml.NotReadable as e:
        raise SpecError(e.reason, file=str(path)) from None
    except UnicodeDecodeError as e:
        raise SpecError(f"not UTF-8 text (byte {e.start})", file=str(path)) from None
    except OSError as e:
        raise SpecError(f"cannot read: {e.strerror or e}", file=str(path)) from None
    try:
        data = safeyaml.safe_load(text)
    except yaml.YAMLError as e:
        what = "refused YAML" if isinstance(e, safeyaml.YAMLRefused) else "invalid YAML"
        raise SpecError(f"{what}: {safeyaml.error_text(e)}", file=str(path)) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", file=str(path))
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """Mappings merge key by key; any other value (lists included) in `over` replaces `base`'s."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _spec_sections() -> set[str]:
    return {*Spec.model_fields, "extends"}


def _read_parent(parent_path: Path, child: Path, parent: str) -> dict[str, Any]:
    """The parent spec `extends: parent` names, from `child`. Only a regular file that parses as a mapping
    of spec sections is a parent: anything else is one line keyed `extends` of the child that says what
    the parent is, never quoting its content (`extends: /etc/passwd` must not print the file)."""
    where = dict(file=str(child), key="extends")
    name, show = safeyaml.shown(parent, 120), safeyaml.shown(str(parent_path), 200)
    try:
        data = _read_yaml(parent_path, parent=True)
    except SpecError as e:
        if e.detail == "file not found":
            raise SpecError(f"{name} not found (looked in {child.parent})", **where) from None
        if e.detail.startswith("refused YAML"):
            raise  # palm's own words (a bound, a duplicate key), at the parent's line
        if e.detail.startswith("invalid YAML"):
            # PyYAML's problem text can quote the file (an alias's or a tag's name): the place only.
            mark = re.match(r"invalid YAML: (line \d+, column \d+)", e.detail)
            raise SpecError(f"{name} is not a spec file: invalid YAML{' at ' + mark.group(1) if mark else ''} "
                            f"(`palm spec show {show}` says what is wrong)", **where) from None
        if e.detail.startswith("expected a mapping"):
            raise SpecError(f"{name} is not a spec file (not a YAML mapping)", **where) from None
        raise SpecError(f"{name} {e.detail}" if e.detail.startswith("is ") else f"{name}: {e.detail}",
                        **where) from None
    if not set(map(str, data)) <= _spec_sections():
        raise SpecError(f"{name} is not a spec file (its top-level keys are not spec sections: "
                        f"{', '.join(sorted(_spec_sections()))}); check it with `palm spec show {show}`", **where)
    return data


#: At most this many files in an `extends` chain (the spec itself included).
MAX_EXTENDS = 64


def _load_tree(path: Path) -> dict[str, Any]:
    """The merged tree of the spec at `path` and its parents. Iterative: the chain is walked up to its root
    (at most MAX_EXTENDS files, a cycle refused), then merged from the root down."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: set[Path] = set()
    here, name = path.resolve(), ""
    while True:
        if here in seen:
            cycle = " -> ".join(str(p) for p, _ in chain[[p for p, _ in chain].index(here):])
            raise SpecError(f"extends forms a cycle: {cycle} -> {here}", file=str(here), key="extends")
        if len(chain) >= MAX_EXTENDS:
            raise SpecError(f"the extends chain is longer than {MAX_EXTENDS} files; flatten it",
                            file=str(chain[0][0]), key="extends")
        data = _read_yaml(here) if not chain else _read_parent(here, chain[-1][0], name)
        parent = data.pop("extends", None)
        chain.append((here, data))
        seen.add(here)
        if parent is None:
            break
        if not isinstance(parent, str) or not parent:
            raise SpecError("expected a file name (relative to this file)", file=str(here), key="extends")
        parent_path = here.parent / parent
        if not os.path.lexists(parent_path):
            raise SpecError(f"{safeyaml.shown(parent, 120)} not found (looked in {here.parent})", file=str(here),
                            key="extends")
        here, name = parent_path.resolve(), parent
    tree: dict[str, Any] = {}
    for _, data in reversed(chain):
        tree = deep_merge(tree, data)
    return tree


#: The largest integer a spec may hold (a signed 64-bit integer): `train.steps` with 4,000 digits used to
#: overflow in `palm plan`.
MAX_INT = 2**63 - 1


def check_integers(tree: Any, file: str | None = None) -> None:
    """SpecError naming the key of the first integer out of [-MAX_INT, MAX_INT] (walked iteratively)."""
    todo: list[tuple[str, Any]] = [("", tree)]
    while todo:
        key, value = todo.pop()
        if isinstance(value, dict):
            todo.extend((f"{key}.{k}" if key else str(k), v) for k, v in value.items())
        elif isinstance(value, list):
            todo.extend((f"{key}.{i}", v) for i, v in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            raise SpecError(f"integer of {len(str(abs(value))):,} digits is out of range (at most 2**63 - 1)",
                            file=file, key=safeyaml.shown(key, 120))


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*$")


def apply_override(tree: dict[str, Any], assignment: str) -> dict[str, Any]:
    """Apply `dotted.key=value`; the value is read as YAML and typed by the schema at validation."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise SpecError(f"expected dotted.key=value, got {assignment!r}", file="--set")
    try:
        value = safeyaml.safe_load(raw) if raw.strip() else ""
    except safeyaml.YAMLRefused as e:  # a duplicate key or a bound: never a plain string the user meant
        raise SpecError(f"refused YAML value: {safeyaml.error_text(e)}", file="--set", key=key) from None
    except yaml.YAMLError:
        value = raw
    return set_dotted(tree, key, value, file="--set")


def set_dotted(tree: dict[str, Any], key: str, value: Any, file: str | None = None) -> dict[str, Any]:
    """A copy of `tree` with `value` at the dotted `key` (list items by index); sections are created."""
    parts = key.split(".")
    out = dict(tree)
    node = out
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not (part.isdigit() and int(part) < len(node)):
                raise SpecError(f"index {part} out of range (list of {len(node)})", file=file, key=key)
            child = node[int(part)]
        else:
            child = node.get(part)
        if isinstance(child, list) and parts[i + 1].isdigit():
            child = list(child)
        elif child is None:
            child = {}
        elif isinstance(child, dict):
            child = dict(child)
        else:
            raise SpecError(f"{'.'.join(parts[: i + 1])} is a value, not a section", file=file, key=key)
        if isinstance(node, list):
            node[int(part)] = child
        else:
            node[part] = child
        node = child
    last = parts[-1]
    if isinstance(node, list):
        idx = int(last) if last.isdigit() else -1
        if not 0 <= idx < len(node):
            raise SpecError(f"index {last} out of range (list of {len(node)})", file=file, key=key)
        node[idx] = value
    else:
        node[last] = value
    return out


def format_validation_error(err: ValidationError, file: str) -> SpecError:
    """One SpecError for pydantic's errors: the first one's key and message, the others as `also` lines."""
    lines = []
    for e in err.errors():
        key = ".".join(safeyaml.shown(p) for p in e["loc"] if p != "[key]") or "(top level)"
        msg = e["msg"]
        if e["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            msg = "unknown key (not in the schema; see `palm spec schema`)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and not isinstance(e["input"], (dict, list)):
            got = repr(e["input"])
            msg = f"{msg} (got {got if len(got) <= 80 else got[:77] + '...'})"
        lines.append((key, msg))
    key, msg = lines[0]
    extra = "".join(f"\n  also {k}: {m}" for k, m in lines[1:])
    return SpecError(msg + extra, file=file, key=key)


def _load_remote_tree(path: str) -> dict[str, Any]:
    """A spec on gs:// (the resolved spec.json a run records, which launched workers read): one file,
    no `extends` (a recorded spec is already merged)."""
    try:
        if storage.size(path) > safeyaml.MAX_BYTES:
            raise SpecError(f"is larger than {safeyaml.MAX_BYTES // 2**20} MiB, too large for a YAML file", file=path)
        text = storage.read_text(path)
    except FileNotFoundError:
        raise SpecError("file not found", file=path) from None
    try:
        data = safeyaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"invalid YAML/JSON: {safeyaml.error_text(e)}", file=path) from None
    if not isinstance(data, dict):
        raise SpecError(f"expected a mapping at the top level, got {type(data).__name__}", file=path)
    if "extends" in data:
        raise SpecError("a spec on gs:// cannot extend another; record the resolved spec (palm spec show)",
                        file=path, key="extends")
    return data


def read_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, merge, override, validate and check a spec (a local file, or gs://), its workflow graph aside
    (palm.dag.workflow.load_spec checks that too). Raises SpecError."""
    if str(path).startswith("gs://"):
        path_text = str(path)
        tree = _load_remote_tree(path_text)
        path = path_text  # for messages; pathlib would fold gs:// into gs:/
    else:
        path = Path(path)
        tree = _load_tree(path)
    for assignment in overrides:
        tree = apply_override(tree, assignment)
    check_integers(tree, str(path))
    try:
        spec = Spec.model_validate(tree)
    except ValidationError as e:
        raise format_validation_error(e, str(path)) from None
    try:
        check_consistency(spec)
    except SpecError as e:
        raise SpecError(e.detail, file=str(path), key=e.key) from None
    return spec
