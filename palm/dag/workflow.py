"""A spec's workflow: a graph of named nodes, each a stage type run with the spec and its own overrides.

    workflow:
      <node>:
        stage: <type>          # default: the node's own name
        needs: [<node>, ...]   # the nodes whose outputs it reads
        set: {<dotted.key>: <value>, ...}   # spec overrides for this node alone

A node reads one output of each input type of its stage type (palm.dag.table.STAGES): the node of that
type among its `needs`, or else the nearest one among its ancestors (an eval node reads the tokenizer its
model was trained with without naming it); two as near as each other are ambiguous. A collecting stage (scaling) reads every node its `needs` name. Unknown nodes or
types, cycles, an input found twice or not at all, a need the stage does not read, and overrides that
the spec's schema refuses are all `SpecError`s naming the node, raised when the spec is loaded.

Without `workflow` the graph is the default chain of the stage types marked default that apply to the
spec, each node named after its type: the same output paths and keys as a pipeline without graphs.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from palm.base import safeyaml
from palm.base.errors import PalmError, SpecError
from palm.dag.table import STAGES
from palm.spec.loading import node_spec, read_spec
from palm.spec.schema import Spec


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    #: The stage type (a key of palm.dag.table.STAGES).
    stage: str
    #: The spec this node runs with: the workflow's spec with the node's own overrides.
    spec: Any
    #: Input type -> the node whose output it reads.
    inputs: dict[str, str]
    #: Nodes a collecting stage reads.
    collected: tuple[str, ...] = ()
    #: Nodes that must be complete first (gates).
    after: tuple[str, ...] = ()
    #: Its own overrides, as declared.
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def needs(self) -> tuple[str, ...]:
        """Every node it waits for."""
        return tuple(dict.fromkeys([*self.inputs.values(), *self.collected, *self.after]))


@dataclasses.dataclass(frozen=True)
class Workflow:
    #: In an order where each node comes after everything it needs.
    nodes: dict[str, Node]
    declared: bool

    def upstream(self, names: Iterable[str]) -> set[str]:
        """The given nodes and everything they need, transitively."""
        seen: set[str] = set()
        todo = list(names)
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(self.nodes[name].needs)
        return seen

    def downstream(self, name: str) -> set[str]:
        """The node and everything that needs it, transitively."""
        out = {name}
        for node in self.nodes.values():
            if any(n in out for n in node.needs):
                out.add(node.name)
        return out

    def select(self, requested: str | Iterable[str] | None) -> list[str]:
        """Node names for `--stages a,b` (all when None), in order; PalmError naming unknown ones."""
        if requested is None or requested == "":
            return list(self.nodes)
        names = [s.strip() for s in requested.split(",")] if isinstance(requested, str) else list(requested)
        names = [n for n in names if n]
        unknown = [n for n in names if n not in self.nodes]
        if unknown:
            raise PalmError(f"--stages: unknown stage(s) {unknown} for this spec; choose from {', '.join(self.nodes)}")
        return [n for n in self.nodes if n in names]

    def edges(self) -> list[tuple[str, str]]:
        return [(need, node.name) for node in self.nodes.values() for need in node.needs]

    def describe(self) -> list[dict[str, Any]]:
        """One row per node: name, stage type, what it reads, what it waits for, its overrides."""
        return [{"name": n.name, "stage": n.stage, "inputs": dict(n.inputs), "collects": list(n.collected),
                 "after": list(n.after), "set": n.overrides} for n in self.nodes.values()]


def training_node(spec: Any, name: str) -> Node:
    """The spec's workflow node `name`, which must train (PalmError naming the ones that do otherwise)."""
    workflow = resolve_workflow(spec)
    node = workflow.nodes.get(name)
    if node is None or not STAGES[node.stage].trains:
        trains = [n.name for n in workflow.nodes.values() if STAGES[n.stage].trains]
        raise PalmError(f"--node {name}: not a training node of this spec's workflow; choose from {', '.join(trains)}")
    return node


def _error(node: str, message: str, key: str = "") -> SpecError:
    return SpecError(message, key=f"workflow.{node}{'.' + key if key else ''}")


def default_workflow(spec: Any) -> Workflow:
    names = [s.name for s in STAGES.values() if s.default and s.applies(spec)]
    nodes = {}
    for name in names:
        stage = STAGES[name]
        nodes[name] = Node(name, name, spec, {kind: kind for kind in stage.inputs_for(spec)},
                           after=tuple(g for g in stage.gates if g in names))
    return Workflow(nodes, declared=False)


def resolve_workflow(spec: Any) -> Workflow:
    """The spec's workflow graph, checked (SpecError naming the node on anything wrong)."""
    if not getattr(spec, "workflow", None):
        return default_workflow(spec)
    declared = spec.workflow
    if len(declared) > MAX_NODES:
        raise SpecError(f"{len(declared):,} nodes; a workflow has at most {MAX_NODES:,}", key="workflow")
    types: dict[str, str] = {}
    for name, decl in declared.items():
        for key in decl.set:
            if str(key).split(".")[0] not in NODE_SETTABLE:
                raise _error(name, f"a node may not change {safeyaml.shown(str(key), 60)}: it belongs to the whole "
                             f"spec; a node's set changes keys under {', '.join(NODE_SETTABLE)}", "set")
        stage = decl.stage or name
        if stage not in STAGES:
            raise _error(name, f"unknown stage type {stage!r}; the types are {', '.join(STAGES)}"
                         + ("" if decl.stage else " (a node's type defaults to its name; set `stage`)"), "stage")
        for need in decl.needs:
            if need not in declared:
                raise _error(name, f"needs {need!r}, which is not a node of the workflow", "needs")
            if need == name:
                raise _error(name, "needs itself", "needs")
        types[name] = stage
    order = _order(declared)

    def kinds(node: str) -> tuple[str, ...]:
        return STAGES[types[node]].kinds()

    # Per node and output kind, the nearest ancestors of that kind (distance 1: its needs), and the gating
    # ancestors with their distance, nearest first: one pass in order, linear in the nodes and their needs
    # (the old table of every ancestor of every node was quadratic: 163 s for 1,500 nodes).
    all_kinds = {k for t in types.values() for k in STAGES[t].kinds()}
    gate_kinds = {g for t in types.values() for g in STAGES[t].gates}
    nearest: dict[str, dict[str, tuple[int, list[str]]]] = {}
    gating: dict[str, dict[str, int]] = {}
    for name in order:  # every need's entries are known by now
        near: dict[str, tuple[int, list[str]]] = {}
        gates: dict[str, int] = {}
        for need in declared[name].needs:
            for kind in all_kinds:
                d, found = (0, [need]) if kind in kinds(need) else nearest[need].get(kind, (None, []))
                if d is None:
                    continue
                best = near.get(kind)
                if best is None or d + 1 < best[0]:
                    near[kind] = (d + 1, list(found))
                elif d + 1 == best[0]:
                    best[1].extend(n for n in found if n not in best[1])
            own = [(need, 0)] if gate_kinds & set(kinds(need)) else []
            for node, d in [*own, *gating[need].items()]:
                gates[node] = min(gates.get(node, d + 1), d + 1)
        nearest[name] = near
        gating[name] = dict(sorted(gates.items(), key=lambda kv: kv[1]))

    nodes: dict[str, Node] = {}
    for name in order:
        decl, stage = declared[name], STAGES[types[name]]
        needs = list(decl.needs)
        try:
            own_spec = node_spec(spec, decl.set)
        except SpecError as e:
            raise _error(name, e.detail, f"set.{e.key}" if e.key else "set") from None
        reads = stage.inputs_for(own_spec)
        inputs: dict[str, str] = {}
        for kind in reads:
            found = nearest[name].get(kind, (0, []))[1]
            if len(found) != 1:
                raise _error(name, (f"reads a {kind} output but finds none among its needs and their ancestors; "
                                    f"add a {kind} node to needs") if not found else
                             (f"reads one {kind} output but finds {len(found)} as near as each other: "
                              f"{', '.join(found)}; name the one it reads in needs"), "needs")
            inputs[kind] = found[0]
        collected = tuple(n for n in needs if n not in inputs.values() and any(k in kinds(n) for k in stage.collects))
        if stage.collects and not collected:
            raise _error(name, f"collects {' and '.join(stage.collects)} outputs; name them in needs", "needs")
        after = tuple(n for n in gating[name] if any(g in kinds(n) for g in stage.gates))
        unread = [n for n in needs if n not in inputs.values() and n not in collected and n not in after]
        if unread:
            raise _error(name, f"a {types[name]} stage does not read {', '.join(f'{n} ({types[n]})' for n in unread)}; "
                         f"it reads {', '.join(reads + stage.collects) or 'nothing'}", "needs")
        if not stage.applies(own_spec):
            raise _error(name, f"a {types[name]} stage does not apply to this node's spec "
                         f"({stage.summary})", "stage")
        if "train" in inputs and "train" in stage.provides:  # a finetune node: its base model's parameters
            base = nodes[inputs["train"]].spec.model
            for key in SHAPE_KEYS:
                if getattr(own_spec.model, key) != getattr(base, key):
                    raise _error(name, f"a {types[name]} node continues {inputs['train']}'s parameters, so its "
                                 f"model.{key} must be {getattr(base, key)!r} as there, not "
                                 f"{getattr(own_spec.model, key)!r}", f"set.model.{key}")
        nodes[name] = Node(name, types[name], own_spec, inputs, collected, after, dict(decl.set))
    return Workflow(nodes, declared=True)


def _order(declared: dict[str, Any]) -> list[str]:
    """The nodes in declaration order, each moved after what it needs; SpecError on a cycle. Iterative (a
    depth-first walk with its own stack), so a long chain declared in reverse order is no RecursionError,
    and linear in the nodes and their needs."""
    order: list[str] = []
    state: dict[str, str] = {}
    for root in declared:
        if state.get(root) == "done":
            continue
        state[root] = "visiting"
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(declared[root].needs))]
        while stack:
            name, needs = stack[-1]
            need = next(needs, None)
            if need is None:
                stack.pop()
                state[name] = "done"
                order.append(name)
            elif state.get(need) == "visiting":
                path = [n for n, _ in stack]
                cycle = path[path.index(need):] + [need]
                raise _error(need, f"the workflow has a cycle: {' -> '.join(cycle)}", "needs")
            elif state.get(need) != "done":
                state[need] = "visiting"
                stack.append((need, iter(declared[need].needs)))
    return order


#: At most this many nodes in a declared workflow (a bound on what one spec may ask of the checks).
MAX_NODES = 10_000
#: Keys a node's `set` may change: the sections a stage reads. Not `name`, `description`, `workflow` or
#: `retries`, which belong to the whole spec.
NODE_SETTABLE = ("model", "data", "tokenizer", "pack", "train", "eval", "infra")
#: Model keys that decide the shape of the parameters: a finetune node continues its base model's
#: parameters, so these must be the base's.
SHAPE_KEYS = ("num_layers", "d_model", "num_heads", "head_dim", "num_kv_heads", "ffw_multiplier", "vocab_size",
              "scan_layers")

_NODE = re.compile(r"[a-z0-9][a-z0-9-]*")


def check_graph(spec: Spec) -> None:
    """The retry policies name stage types, and the workflow graph resolves."""
    for stage in spec.retries:
        if stage not in STAGES:
            raise SpecError(f"not a stage type; the types are {', '.join(STAGES)}", key=f"retries.{stage}")
    for name in spec.workflow or {}:
        if not _NODE.fullmatch(name):
            raise SpecError("node names are lowercase letters, digits and dashes, starting with a letter or digit",
                            key=f"workflow.{safeyaml.shown(name, 60)}")
    resolve_workflow(spec)


def load_spec(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Spec:
    """Read, merge, override, validate and check a spec (a local file, or gs://) and its workflow graph:
    what every command runs on. Raises SpecError naming the file and the key."""
    spec = read_spec(path, overrides)
    try:
        check_graph(spec)
    except SpecError as e:
        file = str(path) if str(path).startswith("gs://") else str(Path(path))  # as read_spec names it
        raise SpecError(e.detail, file=file, key=e.key) from None
    return spec
