"""Spec loading and validation: every shipped spec loads, every broken one fails with exit code 2, one line
naming the file and the key path, and no traceback.

Broken specs are small files in tmp_path that extend specs/tiny.yaml and add the bad bit, or --set overrides.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from palm.cli import main
from palm.spec.schema import Spec
from palm.spec.loading import apply_override, deep_merge
from palm.dag.workflow import load_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
TINY = SPECS / "tiny.yaml"

SHIPPED = sorted(p for p in SPECS.glob("*.yaml") if p.name != "palm-base.yaml")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_spec_loads(path: Path):
    spec = load_spec(path)
    assert isinstance(spec, Spec)
    assert spec.name == path.stem
    mesh = spec.resolved_mesh()
    assert mesh["data"] * mesh["fsdp"] * mesh["model"] == spec.infra.hardware.num_devices


# --------------------------------------------------------------------------------- broken specs


def _child(body: str) -> str:
    """A spec that extends tiny.yaml (by absolute path) and adds `body`."""
    return f"extends: {TINY}\n" + textwrap.dedent(body)


# (id, files {name: text} or None for tiny.yaml itself, --set overrides, substrings stderr must contain).
# The first file is the one passed to `palm plan`; "{file}" stands for its name.
BROKEN = [
    ("unknown-top-level-key", {"broken.yaml": _child("colour: blue\n")}, [],
     ["{file}", "colour", "unknown key"]),
    ("unknown-nested-key", {"broken.yaml": _child("model: {num_layer: 3}\n")}, [],
     ["{file}", "model.num_layer", "unknown key"]),
    ("wrong-type", {"broken.yaml": _child("model: {d_model: big}\n")}, [],
     ["{file}", "model.d_model", "'big'"]),
    ("non-positive-num-layers", {"broken.yaml": _child("model: {num_layers: 0}\n")}, [],
     ["{file}", "model.num_layers", "positive"]),
    ("odd-head-dim", {"broken.yaml": _child("model: {head_dim: 33}\n")}, [],
     ["{file}", "model.head_dim", "RoPE"]),
    ("kv-heads-not-dividing-heads", {"broken.yaml": _child("model: {num_kv_heads: 3}\n")}, [],
     ["{file}", "model.num_kv_heads"]),
    ("mesh-model-not-dividing-heads",
     {"broken.yaml": _child("infra: {hardware: {num_devices: 3}, mesh: {data: 1, fsdp: -1, model: 3}}\n")}, [],
     ["{file}", "infra.mesh.model", "num_heads"]),
    ("mesh-product-not-num-devices",
     {"broken.yaml": _child("infra: {hardware: {num_devices: 2}, mesh: {data: 2, fsdp: 2, model: 1}}\n")}, [],
     ["{file}", "infra.mesh", "num_devices"]),
    ("two-free-mesh-axes", {"broken.yaml": _child("infra: {mesh: {data: -1, fsdp: -1, model: 1}}\n")}, [],
     ["{file}", "infra.mesh", "only one axis may be -1"]),
    ("unknown-mesh-axis", {"broken.yaml": _child("infra: {mesh: {tensor: 1}}\n")}, [],
     ["{file}", "infra.mesh.tensor"]),
    ("mixture-weights-not-one", None, ["data.sources.0.weight=0.65"],
     ["tiny.yaml", "data.sources", "sum to 1.1"]),
    ("mixture-weights-not-one-file", {"broken.yaml": _child("""\
         data:
           sources:
             - {name: a, weight: 0.5, format: builtin, paths: [python-docs]}
             - {name: b, weight: 0.3, format: builtin, paths: [python-stdlib-code]}
         """)}, [], ["{file}", "data.sources", "sum to 0.8"]),
    ("source-weight-zero", None, ["data.sources.2.weight=0"],
     ["tiny.yaml", "data.sources.2.weight", "greater than 0"]),
    ("batch-not-divisible-by-dp", {"broken.yaml": _child("""\
         infra: {hardware: {num_devices: 4}, mesh: {data: 1, fsdp: -1, model: 1}}
         train: {batch_ramp: [{from_step: 0, global_batch: 6}]}
         """)}, [], ["{file}", "train.batch_ramp.0.global_batch", "data-parallel size 4"]),
    ("batch-ramp-not-from-zero",
     {"broken.yaml": _child("train: {batch_ramp: [{from_step: 5, global_batch: 8}]}\n")}, [],
     ["{file}", "train.batch_ramp.0.from_step"]),
    ("batch-ramp-not-increasing", {"broken.yaml": _child("""\
         train:
           batch_ramp: [{from_step: 0, global_batch: 8}, {from_step: 0, global_batch: 16}]
         """)}, [], ["{file}", "train.batch_ramp.1.from_step", "increase"]),
    ("batch-ramp-stage-unknown-key",
     {"broken.yaml": _child("train: {batch_ramp: [{from_step: 0, global_batch: 8, size: 3}]}\n")}, [],
     ["{file}", "train.batch_ramp.0.size", "unknown key"]),
    ("missing-extends-file", {"broken.yaml": "extends: no-such-parent.yaml\nname: broken\n"}, [],
     ["{file}", "extends", "no-such-parent.yaml not found"]),
    ("extends-cycle", {"a.yaml": "extends: b.yaml\nname: a\n", "b.yaml": "extends: a.yaml\nname: b\n"}, [],
     ["{file}", "extends", "cycle", "b.yaml"]),
    ("invalid-yaml", {"broken.yaml": "name: broken\nmodel: {num_layers: 2\ndata: {}\n"}, [],
     ["{file}", "invalid YAML", "line 3"]),
    ("top-level-list", {"broken.yaml": "- name: broken\n- model: {}\n"}, [],
     ["{file}", "mapping", "list"]),
    ("tokenizer-vocab-too-big", {"broken.yaml": _child("tokenizer: {vocab_size: 2048}\n")}, [],
     ["{file}", "tokenizer.vocab_size", "model.vocab_size"]),
    ("missing-data-section", {"broken.yaml": "name: broken\nmodel: {num_layers: 2}\n"}, [],
     ["{file}", "data", "required key is missing"]),
    ("set-unknown-key", None, ["train.stepz=3"],
     ["tiny.yaml", "train.stepz", "unknown key"]),
    ("set-wrong-type", None, ["train.steps=many"],
     ["tiny.yaml", "train.steps", "'many'"]),
    ("set-no-equals", None, ["train.steps"],
     ["--set", "train.steps", "expected dotted.key=value"]),
    ("set-index-out-of-range", None, ["train.batch_ramp.5.global_batch=6"],
     ["--set", "train.batch_ramp.5.global_batch", "out of range"]),
    ("set-into-a-value", None, ["train.steps.max=6"],
     ["--set", "train.steps.max", "not a section"]),
    ("dataflow-without-project", None, ["data.beam.runner=dataflow"],
     ["tiny.yaml", "data.beam.project", "Dataflow"]),
    ("dataflow-local-temp", None, ["data.beam.runner=dataflow", "data.beam.project=p", "data.beam.region=r",
                                   "data.beam.temp_location=/tmp/x"],
     ["tiny.yaml", "data.beam.temp_location", "gs://"]),
    ("flink-without-master", None, ["data.beam.runner=flink"],
     ["tiny.yaml", "data.beam.master_url"]),
    ("dataflow-without-an-image", None, ["data.beam.runner=dataflow", "data.beam.project=p",
                                         "data.beam.region=us-central1", "data.beam.temp_location=gs://b/tmp",
                                         "infra.storage_root=gs://b", "infra.identities.dataflow_workers=d@p"],
     ["tiny.yaml", "data.beam.sdk_container_image", "infra.launcher.image", "packaging: wheel"]),
    ("image-packaging-with-requirements", None, ["data.beam.runner=spark", "data.beam.master_url=spark://m:7077",
                                                 "data.beam.sdk_container_image=img:1",
                                                 "data.beam.requirements_file=requirements.txt"],
     ["tiny.yaml", "data.beam.requirements_file", "packaging: wheel"]),
    ("bad-split-pattern", None, ["data.sources.0.format=txt", "data.sources.0.split_pattern=(unclosed"],
     ["tiny.yaml", "data.sources.0.split_pattern", "regular expression"]),
    ("negative-learning-rate", None, ["train.schedule.peak_learning_rate=-0.01"],
     ["tiny.yaml", "train.schedule.peak_learning_rate", "positive"]),
    ("launcher-needs-accelerator", None, ["infra.launcher.kind=gke"],
     ["tiny.yaml", "infra.hardware.accelerator"]),
    ("loss-spike-threshold-not-above-one", None, ["train.loss_spike.threshold=1"],
     ["tiny.yaml", "train.loss_spike.threshold", "above 1"]),
    ("loss-spike-restart-every-zero", None, ["train.loss_spike.restart_every=0"],
     ["tiny.yaml", "train.loss_spike.restart_every", "positive number of steps or null"]),
    ("loss-spike-negative-rollback", None, ["train.loss_spike.rollback_steps=-5"],
     ["tiny.yaml", "train.loss_spike.rollback_steps", "0 or more, got -5"]),
    ("loss-spike-negative-onset", {"broken.yaml": _child("train: {loss_spike: {onset_steps: -1}}\n")}, [],
     ["{file}", "train.loss_spike.onset_steps", "0 or more"]),
    ("loss-spike-restart-every-text", None, ["train.loss_spike.restart_every=often"],
     ["tiny.yaml", "train.loss_spike.restart_every", "'often'"]),
]


def _materialize(tmp_path: Path, files: dict[str, str] | None) -> Path:
    if files is None:
        return TINY
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path / next(iter(files))


@pytest.mark.parametrize("files, overrides, expected", [c[1:] for c in BROKEN], ids=[c[0] for c in BROKEN])
def test_broken_spec_exits_2_with_key_and_file(tmp_path, capsys, files, overrides, expected):
    path = _materialize(tmp_path, files)
    argv = ["plan", str(path)]
    for o in overrides:
        argv += ["--set", o]
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.startswith("palm: error: ")
    for want in expected:
        want = want.replace("{file}", path.name)
        assert want in err, f"{want!r} not in {err!r}"


def test_at_least_18_broken_specs():
    assert len(BROKEN) >= 18
    assert len({c[0] for c in BROKEN}) == len(BROKEN)


@pytest.mark.slow
def test_broken_spec_in_subprocess_prints_one_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(_child("model: {num_layers: -1}\n"), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "palm.cli", "plan", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "broken.yaml" in lines[0] and "model.num_layers" in lines[0]


def test_several_validation_errors_are_all_listed(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(_child("model: {num_layer: 3, d_model: big}\n"), encoding="utf-8")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "model.num_layer" in err and "model.d_model" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------ overrides


def test_loss_spike_restart_points_can_be_turned_off():
    spec = load_spec(TINY, ["train.loss_spike.restart_every=null"])
    assert spec.train.loss_spike.restart_every is None and spec.train.loss_spike.max_restart_points() == 0
    assert load_spec(TINY).train.loss_spike.max_restart_points() == 7  # ceil((100 + 25) / 25) + 2


def test_set_types_integer():
    spec = load_spec(TINY, ["train.steps=7"])
    assert spec.train.steps == 7
    assert type(spec.train.steps) is int


def test_set_string_value():
    spec = load_spec(SPECS / "palm-8b.yaml", ["model.dtype=float32"])
    assert spec.model.dtype == "float32"
    assert load_spec(SPECS / "palm-8b.yaml").model.dtype == "bfloat16"


def test_set_list_element_field():
    spec = load_spec(TINY, ["train.batch_ramp.1.global_batch=32", "data.sources.0.filters.min_words=5"])
    assert [(s.from_step, s.global_batch) for s in spec.train.batch_ramp] == [(0, 8), (100, 32)]
    assert spec.data.sources[0].filters.min_words == 5
    assert spec.data.sources[1].filters.min_words == 10


def test_set_later_override_wins():
    assert load_spec(TINY, ["train.steps=7", "train.steps=9"]).train.steps == 9


def test_apply_override_does_not_mutate_input():
    tree = {"train": {"steps": 1, "batch_ramp": [{"from_step": 0, "global_batch": 8}]}}
    out = apply_override(tree, "train.batch_ramp.0.global_batch=16")
    out = apply_override(out, "train.steps=3")
    assert tree == {"train": {"steps": 1, "batch_ramp": [{"from_step": 0, "global_batch": 8}]}}
    assert out["train"] == {"steps": 3, "batch_ramp": [{"from_step": 0, "global_batch": 16}]}


def test_child_overrides_one_model_key_and_keeps_the_rest(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(_child("name: child\nmodel: {num_layers: 3}\n"), encoding="utf-8")
    spec, parent = load_spec(path), load_spec(TINY)
    assert spec.model.num_layers == 3
    for key in ("d_model", "num_heads", "head_dim", "vocab_size", "seq_len", "dtype", "remat"):
        assert getattr(spec.model, key) == getattr(parent.model, key), key
    assert spec.name == "child"


def test_inherited_keys_from_base():
    spec = load_spec(SPECS / "palm-8b.yaml")
    assert spec.model.head_dim == 256 and spec.model.num_kv_heads == 1
    assert spec.model.num_layers == 32
    assert len(spec.data.sources) == 6


def test_lists_replace_not_concatenate(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text(_child("""\
        name: child
        train: {batch_ramp: [{from_step: 0, global_batch: 4}]}
        eval: {tasks: [gsm8k]}
        """), encoding="utf-8")
    spec = load_spec(path)
    assert [(s.from_step, s.global_batch) for s in spec.train.batch_ramp] == [(0, 4)]
    assert list(spec.eval.tasks) == ["gsm8k"]
    assert spec.train.steps == load_spec(TINY).train.steps  # the rest of train still comes from tiny.yaml


def test_deep_merge_unit():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 1}
    over = {"a": {"y": [3]}, "c": 2}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": [3]}, "b": 1, "c": 2}
    assert base == {"a": {"x": 1, "y": [1, 2]}, "b": 1}


# --------------------------------------------------------------------------------------- schema


def _schema_properties(schema):
    """(where, property schema) for every property of every section."""
    for name, section in [("Spec", schema), *schema["$defs"].items()]:
        for key, prop in section.get("properties", {}).items():
            yield f"{name}.{key}", prop


def test_every_spec_property_has_a_description():
    from palm.spec.schema import spec_schema

    schema = spec_schema()
    props = list(_schema_properties(schema))
    assert len(props) > 150
    assert [where for where, prop in props if not prop.get("description", "").strip()] == []
    assert [name for name, section in schema["$defs"].items() if not section.get("description")] == []
    # the dataclasses of palm.spec.config (no pydantic there) carry theirs as attribute docstrings too
    assert "multi-query" in schema["$defs"]["ModelConfig"]["properties"]["num_kv_heads"]["description"]


def test_shipped_schema_is_current_and_specs_point_at_it():
    """specs/spec.schema.json is `palm spec schema`'s output (regenerate: uv run palm spec schema >
    specs/spec.schema.json), every spec names it for YAML editors, and it accepts every spec as written."""
    import jsonschema
    import yaml

    from palm.spec.schema import spec_schema

    schema = spec_schema()
    assert (SPECS / "spec.schema.json").read_text() == json.dumps(schema, indent=2) + "\n", (
        "specs/spec.schema.json is stale: uv run palm spec schema > specs/spec.schema.json")
    validator = jsonschema.Draft202012Validator(schema)
    for path in sorted(SPECS.glob("*.yaml")):
        text = path.read_text()
        assert text.startswith("# yaml-language-server: $schema=spec.schema.json\n"), path.name
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(yaml.safe_load(text))]
        assert errors == [], path.name
    bad = yaml.safe_load(TINY.read_text()) | {"modle": {}}
    assert list(validator.iter_errors(bad))


def test_spec_schema_is_json(capsys):
    assert main(["spec", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    props = schema["properties"]
    for key in ("model", "data", "train", "infra", "extends"):
        assert key in props, key
    assert schema["additionalProperties"] is False

    def resolve(node):
        ref = node.get("$ref")
        return schema["$defs"][ref.rsplit("/", 1)[-1]] if ref else node

    model = resolve(props["model"])
    assert model["additionalProperties"] is False
    assert "num_layers" in model["properties"]
    assert resolve(props["train"])["additionalProperties"] is False


# ------------------------------------------------------------- bad input that used to pass silently
# Each is one SpecError (exit 2, one line) naming the file and the key, found before any work starts.

from palm.base.errors import SpecError  # noqa: E402
from palm.base import safeyaml  # noqa: E402


def _nested(key: str, value: str) -> str:
    """`a.b.c` and `.nan` as the YAML block `a:\n  b:\n    c: .nan\n`."""
    parts = key.split(".")
    return "".join("  " * i + f"{p}:\n" for i, p in enumerate(parts[:-1])) + "  " * (len(parts) - 1) + \
        f"{parts[-1]}: {value}\n"


# Float fields of every kind of section (a config dataclass, a pydantic model, a Field with bounds, a dict
# of floats, a retry policy) and an int field, each with NaN or an infinity.
NON_FINITE = [
    ("train.schedule.peak_learning_rate", ".nan"),   # used to end in "train.steps: must be positive"
    ("train.z_loss", ".inf"),
    ("train.optimizer.gradient_clip", ".nan"),
    ("train.optimizer.update_clip", "-.inf"),
    ("train.loss_spike.threshold", ".inf"),
    ("model.layer_norm_epsilon", ".nan"),
    ("data.dedup.near.threshold", ".nan"),
    ("data.quality.alpha", ".inf"),
    ("infra.launcher.poll_seconds", ".nan"),
    ("retries.train.delay_seconds", ".inf"),
    ("eval.max_examples", ".nan"),
    ("eval.batch_size", ".inf"),
]


@pytest.mark.parametrize("key, value", NON_FINITE, ids=[k for k, _ in NON_FINITE])
def test_non_finite_number_in_a_file_names_its_key(tmp_path, key, value):
    path = tmp_path / "broken.yaml"
    path.write_text(_child(_nested(key, value)), encoding="utf-8")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.key == key and e.value.file == str(path), str(e.value)
    assert "finite number" in e.value.detail, str(e.value)


@pytest.mark.parametrize("key, value", NON_FINITE + [("train.z_loss", "nan"), ("train.optimizer.beta1", "-inf"),
                                                     ("data.sources.0.filters.max_fraction_top_ngram_chars.2",
                                                      ".nan")],
                         ids=[k for k, _ in NON_FINITE] + ["z_loss-string-nan", "beta1-string-inf",
                                                           "ngram-dict-value"])
def test_non_finite_number_in_set_names_its_key(key, value):
    with pytest.raises(SpecError) as e:
        load_spec(TINY, [f"{key}={value}"])
    assert e.value.key == key and "finite number" in e.value.detail, str(e.value)


def test_non_finite_number_in_a_workflow_node_override_names_its_key(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(_child("workflow:\n  data: {}\n  train: {needs: [data], set: {train.z_loss: .nan}}\n"))
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.key == "workflow.train.set.train.z_loss" and "finite number" in e.value.detail, str(e.value)


def test_nan_learning_rate_is_one_line_from_the_cli(capsys):
    assert main(["plan", str(TINY), "--set", "train.schedule.peak_learning_rate=.nan"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert "tiny.yaml: train.schedule.peak_learning_rate: Input should be a finite number" in err
    assert "train.steps" not in err


def test_duplicate_key_names_the_key_file_and_both_lines(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text(_child("train:\n  steps: 3\n  seed: 1\n  steps: 4\n"), encoding="utf-8")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert e.value.file == str(path), str(e.value)
    assert "duplicate key steps (first at line 3)" in e.value.detail and "line 5" in e.value.detail, str(e.value)


def test_duplicate_top_level_key_in_a_parent_names_the_parent(tmp_path):
    (tmp_path / "base.yaml").write_text(TINY.read_text() + "name: again\n", encoding="utf-8")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\n", encoding="utf-8")
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "child.yaml")
    assert e.value.file == str(tmp_path / "base.yaml") and "duplicate key name" in e.value.detail, str(e.value)


def test_duplicate_key_in_a_set_value_is_refused():
    with pytest.raises(SpecError) as e:
        load_spec(TINY, ["infra.mesh={data: 1, data: 2}"])
    assert e.value.file == "--set" and e.value.key == "infra.mesh" and "duplicate key data" in e.value.detail


def test_merge_keys_still_work_and_may_override(tmp_path):
    path = tmp_path / "child.yaml"
    text = _child("""\
        name: child
        model: &m {num_layers: 3}
        train:
          schedule: {<<: {peak_learning_rate: 0.5, constant_steps: 100, warmup_steps: 0}, peak_learning_rate: 0.25}
        """)
    path.write_text(text, encoding="utf-8")
    spec = load_spec(path)
    assert spec.train.schedule.peak_learning_rate == 0.25 and spec.model.num_layers == 3


def _alias_bomb(levels: int, indent: str = "") -> str:
    """`levels` anchors, each a list of nine aliases of the one before: 9**levels strings from ~50 bytes
    a line ("billion laughs" at 9)."""
    lines = [f'{indent}l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"{indent}l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


@pytest.mark.timeout(60)
def test_alias_bomb_is_refused_fast(tmp_path):
    """Under a workflow node's `set` (values of any type) the aliases used to be expanded by every dump of
    the spec: nine levels hung `palm plan` for minutes. Six levels (half a million strings) finish either
    way, so this fails by returning a spec if the bound goes, rather than by hanging."""
    import time

    path = tmp_path / "bomb.yaml"
    bomb = _alias_bomb(6, indent="      ").replace("      l", "      workflow.train.set.l")
    path.write_text(_child("workflow:\n  data: {}\n  train:\n    needs: [data]\n    set:\n" + bomb), encoding="utf-8")
    start = time.monotonic()
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert time.monotonic() - start < 5
    assert e.value.file == str(path) and "refused YAML" in e.value.detail, str(e.value)
    assert f"expands to more than {safeyaml.MAX_NODES:,} values" in e.value.detail


@pytest.mark.parametrize("text, message", [
    (_alias_bomb(9), "expands to more than"),
    # Merge keys copy the merged mapping's entries: five levels of ten merges, 400,000 entries.
    ("m0: &m0 {a: 1, b: 2, c: 3, d: 4}\n" + "".join(
        f"m{i}: &m{i} {{<<: [{', '.join([f'*m{i - 1}'] * 10)}]}}\n" for i in range(1, 6)), "expands to more than"),
    ("x: " + "[" * 200 + "]" * 200 + "\n", f"nested more than {safeyaml.MAX_DEPTH} levels"),
    ("x: &a [1, *a]\n", "alias *a refers to a node that contains it"),
], ids=["billion-laughs", "merge-bomb", "deep-nesting", "recursive-alias"])
@pytest.mark.timeout(60)
def test_unbounded_yaml_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "bomb.yaml"
    path.write_text(text, encoding="utf-8")
    assert main(["spec", "show", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"palm: error: {path}: refused YAML: line ") and message in err, err


def test_oversized_spec_file_is_one_line(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("# " + "x" * safeyaml.MAX_BYTES + "\nname: huge\n", encoding="utf-8")
    assert main(["spec", "show", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"palm: error: {path}: is larger than 4 MiB, too large for a YAML file"


def _extends(tmp_path: Path, parent: str) -> Path:
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: '{parent}'\nname: child\n", encoding="utf-8")
    return child


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make, what", [
    (lambda d: "/dev/zero", "/dev/zero is a device, not a regular file"),
    (lambda d: os.mkfifo(d / "fifo") or "fifo", "fifo is a FIFO, not a regular file"),  # nobody writes: a hang
    (lambda d: (d / "dir").mkdir() or "dir", "dir is a directory, not a file"),
    (lambda d: (d / "big.yaml").write_text("#" * (safeyaml.MAX_BYTES + 1)) and "big.yaml",
     "big.yaml is larger than 4 MiB"),
], ids=["device", "fifo", "directory", "oversized"])
def test_extends_reads_regular_files_only(tmp_path, capsys, make, what):
    child = _extends(tmp_path, make(tmp_path))
    assert main(["spec", "show", str(child)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"palm: error: {child}: extends: {what}" + (
        ", too large for a YAML file" if "larger" in what else "")


SECRET = "s3cr3t-Value-42"


@pytest.mark.parametrize("content", [
    f"root:x:0:0:{SECRET}:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n",  # like /etc/passwd
    f"api_token: {SECRET}\nname: x\n",                     # a mapping, not of spec sections
    f"{SECRET}: 1\n",                                      # a secret as a key
    f"name: x\nmodel: *{SECRET}\n",                        # invalid YAML whose error would name the alias
    f"name: x\nmodel: {{d: [{SECRET}\n",                   # invalid YAML whose error would quote the line
    f"- {SECRET}\n",
], ids=["passwd-like", "foreign-mapping", "secret-key", "undefined-alias", "unclosed", "list"])
def test_extends_never_prints_another_files_content(tmp_path, capsys, content):
    (tmp_path / "other.conf").write_text(content, encoding="utf-8")
    child = _extends(tmp_path, "other.conf")
    assert main(["spec", "show", str(child)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{child}: extends: other.conf is not a spec file" in err, err
    assert SECRET not in err and "api_token" not in err and "root:x" not in err, err


def test_extends_etc_passwd_is_not_a_spec_file(tmp_path, capsys):
    if not Path("/etc/passwd").is_file():
        pytest.fail("this test needs /etc/passwd (a Linux host)")
    first = Path("/etc/passwd").read_text().splitlines()[0]
    child = _extends(tmp_path, "/etc/passwd")
    assert main(["spec", "show", str(child)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"palm: error: {child}: extends: /etc/passwd is not a spec file (not a YAML mapping)"
    assert first not in err


def test_unknown_keys_are_escaped_and_truncated(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text(_child('"bad\\nkey\\u001b[31m": 1\n' + f'"{"k" * 500}": 2\n'), encoding="utf-8")
    assert main(["plan", str(path)]) == 2
    err = capsys.readouterr().err
    assert "\x1b" not in err and "k" * 100 not in err, err
    assert "'bad\\nkey\\x1b[31m': unknown key" in err
    assert len(err.strip().splitlines()) == 2, err  # the first error and one "also" line


def test_long_values_are_truncated_in_messages(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(TINY, ["train.steps=" + "x" * 5000])
    assert e.value.key == "train.steps" and len(str(e.value)) < 300, str(e.value)


def test_a_spec_on_gs_is_read_with_the_same_bounds(gcs_emulator):
    """The resolved spec a launched worker reads from gs://: too large, duplicate keys, an alias bomb."""
    import uuid

    from palm.base import storage

    root = f"gs://bucket/{uuid.uuid4().hex[:8]}"
    cases = {
        "big.yaml": ("#" * (safeyaml.MAX_BYTES + 1), "is larger than 4 MiB"),
        "dup.yaml": ("name: a\nname: b\n", "duplicate key name (first at line 1)"),
        "bomb.yaml": (_alias_bomb(9), "expands to more than"),
    }
    for name, (text, message) in cases.items():
        storage.write_text_atomic(f"{root}/{name}", text)
        with pytest.raises(SpecError) as e:
            load_spec(f"{root}/{name}")
        assert e.value.file == f"{root}/{name}" and message in e.value.detail, str(e.value)


def test_a_long_extends_chain_is_one_line_at_its_bound(tmp_path, capsys):
    """1,499 files extending each other used to be a RecursionError: the walk is iterative and bounded
    (palm.spec.loading.MAX_EXTENDS files); a chain within the bound still merges, nearest file last."""
    from palm.spec.loading import MAX_EXTENDS

    def chain(n: int) -> Path:
        (tmp_path / "s0.yaml").write_text(f"extends: {TINY}\ntrain: {{steps: 7}}\n")
        for i in range(1, n):
            (tmp_path / f"s{i}.yaml").write_text(f"extends: s{i - 1}.yaml\nname: chain-{i}\n")
        return tmp_path / f"s{n - 1}.yaml"

    spec = load_spec(chain(MAX_EXTENDS - 1))  # the spec and its parents, tiny.yaml included: the bound
    assert spec.name == f"chain-{MAX_EXTENDS - 2}" and spec.train.steps == 7
    top = chain(1499)
    rc = main(["plan", str(top)])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip().splitlines() == [
        f"palm: error: {top}: extends: the extends chain is longer than {MAX_EXTENDS} files; flatten it"], err


@pytest.mark.parametrize("where", ["set", "file", "node"])
def test_an_integer_out_of_range_is_one_line(tmp_path, capsys, where):
    """`--set train.steps=<4,000 digits>` used to be an OverflowError in `palm plan`: integers are bounded
    to 64 bits when the spec is read, in a file, in --set and in a node's set."""
    huge = "9" * 4000
    args = ["plan", str(TINY)]
    if where == "set":
        args += ["--set", f"train.steps={huge}"]
        key = "train.steps"
    elif where == "file":
        path = tmp_path / "huge.yaml"
        path.write_text(f"extends: {TINY}\ntrain: {{steps: {huge}}}\n")
        args = ["plan", str(path)]
        key = "train.steps"
    else:
        path = tmp_path / "huge.yaml"
        path.write_text(f"extends: {TINY}\nworkflow:\n  data: {{}}\n  tokenizer: {{needs: [data]}}\n"
                        f"  pack: {{needs: [data, tokenizer]}}\n  train: {{needs: [pack], set: {{train.steps: {huge}}}}}\n")
        args = ["plan", str(path)]
        key = "workflow.train.set.train.steps"
    rc = main(args)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{key}: integer of 4,000 digits is out of range (at most 2**63 - 1)" in err, err
