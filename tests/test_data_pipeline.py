"""The Beam data stage end to end on Beam's in-process runner."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from palm.cli import main
from palm.data import builtin
from palm.data.pipeline import run_data_stage
from palm.base.errors import PalmError
from palm.spec.schema import DataSpec
from palm.store.outputs import read_manifest, run_stage
from tests.conftest import SPECS


def data_spec(**kw) -> DataSpec:
    base = {"sources": [{"name": "planted", "format": "builtin", "paths": ["synthetic-planted"], "weight": 1.0}],
            "validation_fraction": 0.0, "num_shards": 2}
    return DataSpec.model_validate({**base, **kw})


def read_docs(out: Path, split: str = "*") -> list[dict]:
    docs = []
    for shard in sorted(out.glob(f"{split}-*.jsonl.gz")):
        with gzip.open(shard, "rt", encoding="utf-8") as f:
            docs.extend(json.loads(line) for line in f)
    return docs


def balanced(manifest: dict) -> None:
    for name, src in manifest["sources"].items():
        assert src["docs_in"] == src["docs_kept"] + sum(src["dropped"].values()), name
        assert src["docs_kept"] == sum(src["kept_by_split"].values()), name


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    out = tmp_path_factory.mktemp("planted")
    return out, run_data_stage(data_spec(), out)


def test_planted_corpus_removes_exactly_the_planted_documents(planted):
    out, manifest = planted
    kept = {d["id"].split("/", 1)[1] for d in read_docs(out)}
    src = manifest["sources"]["planted"]
    assert kept == set(builtin.PLANTED["distinct"]) | set(builtin.PLANTED["invalid_utf8"])
    assert src["dropped"]["exact_duplicate"] == len(builtin.PLANTED["exact_duplicate"])
    assert src["dropped"]["near_duplicate"] == len(builtin.PLANTED["near_duplicate"])
    junk_reasons: dict[str, int] = {}
    for reason in builtin.PLANTED_REASON.values():
        junk_reasons[reason] = junk_reasons.get(reason, 0) + 1
    for reason, count in junk_reasons.items():
        assert src["dropped"][reason] == count, reason
    assert src["repaired_utf8"] == len(builtin.PLANTED["invalid_utf8"])
    assert src["docs_in"] == sum(len(ids) for ids in builtin.PLANTED.values())
    balanced(manifest)


def test_repaired_documents_carry_the_replacement_character(planted):
    out, _ = planted
    docs = {d["id"].split("/", 1)[1]: d["text"] for d in read_docs(out)}
    for doc_id in builtin.PLANTED["invalid_utf8"]:
        assert "\ufffd" in docs[doc_id]


def test_invalid_utf8_dropped_when_asked(tmp_path):
    manifest = run_data_stage(data_spec(invalid_utf8="drop", dedup={"near": {"enabled": False}}), tmp_path)
    src = manifest["sources"]["planted"]
    assert src["dropped"]["invalid_utf8"] == len(builtin.PLANTED["invalid_utf8"])
    assert "near_duplicate" not in src["dropped"]
    balanced(manifest)


def test_output_is_deterministic(planted, tmp_path):
    out, _ = planted
    run_data_stage(data_spec(), tmp_path)
    for shard in sorted(out.glob("*.jsonl.gz")):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes()


def test_file_formats_and_malformed_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    prose = ("The committee met on a quiet morning to review the plans for the new library and the park. "
             "Members discussed the budget, the schedule and the needs of the town in careful detail. "
             "Afterwards the council walked along the river to see where the footbridge would be built, "
             "and everyone agreed that the old mill should become a small museum with a garden. ")
    texts = [f"Record {i}. " + prose + f"It closed with note number {i}." for i in range(6)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": t}) for t in texts[:3])
                                      + "\n{not json}\n" + json.dumps({"other": "x"}) + "\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": texts[3]}) + "\n")
    pq.write_table(pa.table({"body": texts[4:]}), tmp_path / "c.parquet")
    (tmp_path / "d.txt").write_text(texts[0] + "\n\n" + texts[1] + "\n\n" + texts[5])
    spec = DataSpec.model_validate({
        "sources": [
            {"name": "j", "format": "jsonl", "paths": [str(tmp_path / "a.jsonl")], "text_field": "body", "weight": 0.25},
            {"name": "g", "format": "jsonl.gz", "paths": [str(tmp_path / "*.jsonl.gz")], "text_field": "body",
             "weight": 0.25},
            {"name": "p", "format": "parquet", "paths": [str(tmp_path / "c.parquet")], "text_field": "body",
             "weight": 0.25},
            {"name": "t", "format": "txt", "paths": [str(tmp_path / "d.txt")], "split_pattern": r"^(?=Record)",
             "weight": 0.25}],
        "validation_fraction": 0.0, "num_shards": 1, "dedup": {"exact": True, "near": {"enabled": False}},
        "token_budget": 100})
    out = tmp_path / "out"
    out.mkdir()
    manifest = run_data_stage(spec, out)
    s = manifest["sources"]
    assert s["j"]["docs_in"] == 5 and s["j"]["dropped"]["malformed_record"] == 2
    assert s["g"]["docs_in"] == 1 and s["p"]["docs_in"] == 2 and s["t"]["docs_in"] == 3
    # The txt copies of records 0 and 1 duplicate the jsonl ones exactly (cross-source dedup), modulo
    # the separator newlines that stay with the earlier document.
    assert s["t"]["dropped"].get("exact_duplicate", 0) <= 2
    balanced(manifest)
    for doc in read_docs(out):
        assert doc["text"].strip() in {t.strip() for t in texts}


@pytest.mark.slow
def test_real_corpora_books_and_wikipedia(shared_data, tmp_path):
    spec = DataSpec.model_validate({
        "sources": [
            {"name": "books", "kind": "books", "format": "txt", "weight": 0.5, "split_pattern": r"\n\n(?=[A-Z][A-Za-z ]+:\n)",
             "paths": [str(shared_data / "tinyshakespeare" / "input.txt")], "filters": {"min_words": 20}},
            {"name": "wikipedia", "kind": "wikipedia", "format": "txt", "weight": 0.5,
             "split_pattern": r"^ = [^=\n]+ = *$", "paths": [str(shared_data / "wikitext2" / "*.txt")]}],
        "validation_fraction": 0.01, "num_shards": 2})
    manifest = run_data_stage(spec, tmp_path)
    balanced(manifest)
    books, wiki = manifest["sources"]["books"], manifest["sources"]["wikipedia"]
    assert books["docs_in"] > 1000 and wiki["docs_in"] > 100
    assert books["docs_kept"] > 100 and wiki["docs_kept"] > 20  # WikiText-2 holds ~120 articles
    assert abs(books["share"] - 0.5) < 0.02 and abs(wiki["share"] - 0.5) < 0.02
    # Lossless: every kept document is a verbatim slice of its source file, whitespace included.
    originals = {"books": (shared_data / "tinyshakespeare" / "input.txt").read_text(),
                 "wikipedia": "".join(p.read_text() for p in sorted((shared_data / "wikitext2").glob("*.txt")))}
    docs = read_docs(tmp_path)
    assert {d["source"] for d in docs} == {"books", "wikipedia"}
    for doc in docs[:200]:
        assert doc["text"] in originals[doc["source"]]


def test_missing_files_and_impossible_budget_are_clear_errors(tmp_path):
    spec = DataSpec.model_validate({"sources": [{"name": "x", "format": "jsonl", "weight": 1.0,
                                                 "paths": [str(tmp_path / "nothing-*.jsonl")]}]})
    with pytest.raises(PalmError, match=r"data.sources.0.paths: no file matches"):
        run_data_stage(spec, tmp_path)
    with pytest.raises(PalmError, match=r"source 'planted' has ~[\d,]+ tokens.*token_budget"):
        run_data_stage(data_spec(token_budget=10**9), tmp_path)


def test_a_source_left_empty_by_cleaning_is_refused_and_nothing_cached(tmp_path):
    """A source whose every document is dropped stops the stage with one line naming it and its drop
    reasons; the stage leaves no output that a later run could take for complete."""
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"text": f"just {i} words here"}) + "\n"
                                                  for i in range(5)))
    spec = data_spec(sources=[
        {"name": "planted", "format": "builtin", "paths": ["synthetic-planted"], "weight": 0.5},
        {"name": "tweets", "format": "jsonl", "paths": [str(tmp_path / "short.jsonl")], "weight": 0.5}])
    root = tmp_path / "runs"
    with pytest.raises(PalmError) as info:
        run_stage("data", spec.model_dump(), {}, root, lambda out: run_data_stage(spec, out))
    message = str(info.value)
    assert message.startswith("data.sources.1 ('tweets') has no documents left: 5 read, dropped: too_few_words 5")
    assert "\n" not in message and "loosen data.sources.1.filters" in message
    assert list((root / "data").iterdir()) == []


def test_stage_is_atomic_and_content_addressed(tmp_path):
    def broken(out: Path):
        (out / "half-written.jsonl.gz").write_bytes(b"partial")
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        run_stage("data", {"a": 1}, {}, tmp_path, broken)
    assert list((tmp_path / "data").iterdir()) == []  # nothing half-written is left to be picked up

    calls = []

    def good(out: Path):
        calls.append(out)
        (out / "x").write_text("ok")
        return {"docs": 1}

    first = run_stage("data", {"a": 1}, {}, tmp_path, good)
    again = run_stage("data", {"a": 1}, {}, tmp_path, good)
    other = run_stage("data", {"a": 2}, {}, tmp_path, good)
    forced = run_stage("data", {"a": 1}, {}, tmp_path, good, force=True)
    assert (first.cached, again.cached, other.cached, forced.cached) == (False, True, False, False)
    assert first.path == again.path == forced.path != other.path
    assert len(calls) == 3
    assert read_manifest(first.path)["docs"] == 1


@pytest.mark.slow
def test_palm_run_data_stage_prints_its_manifest(prefect_server, tmp_path, capsys):
    rc = main(["run", str(SPECS / "tiny.yaml"), "--stages", "data", "--output", str(tmp_path), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    manifest = Path(out["stages"]["data"]["output"]) / "manifest.json"
    assert manifest.is_file()
    data = json.loads(manifest.read_text())
    assert set(data["sources"]) == {"stdlib-docs", "stdlib-code", "planted"}
    balanced(data)
    rc = main(["run", str(SPECS / "tiny.yaml"), "--stages", "data", "--output", str(tmp_path), "--json"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["stages"]["data"]["cached"] is True


@pytest.mark.slow
def test_multi_process_runner(tmp_path):
    manifest = run_data_stage(data_spec(beam={"runner": "multi_process", "num_workers": 2}), tmp_path)
    assert manifest["sources"]["planted"]["docs_kept"] == len(builtin.PLANTED["distinct"]) + len(
        builtin.PLANTED["invalid_utf8"])


def test_cluster_runner_options_come_from_the_spec(tmp_path):
    from palm.data.beam import pipeline_options

    worker = "us-docker.pkg.dev/proj/palm/palm-pipeline:latest"
    cloud = {"runner": "dataflow", "project": "proj", "region": "us-central2", "temp_location": "gs://bucket/tmp",
             "machine_type": "n2-highmem-16", "num_workers": 10, "max_num_workers": 1000}
    # The default: the workers run the worker image (infra.launcher.image); nothing is staged for them.
    dataflow = data_spec(beam=cloud)
    opts = pipeline_options(dataflow, worker_image=worker).get_all_options(drop_default=True)
    assert opts == {"runner": "DataflowRunner", "project": "proj", "region": "us-central2",
                    "temp_location": "gs://bucket/tmp", "job_name": "palm-data", "num_workers": 10,
                    "machine_type": "n2-highmem-16", "max_num_workers": 1000,
                    "autoscaling_algorithm": "THROUGHPUT_BASED", "save_main_session": False,
                    "sdk_container_image": worker, "sdk_location": "container"}
    # An image of the spec's own wins over the worker image.
    own = pipeline_options(data_spec(beam={**cloud, "sdk_container_image": "gcr.io/p/palm-data:2"}),
                           worker_image=worker).get_all_options(drop_default=True)
    assert own["sdk_container_image"] == "gcr.io/p/palm-data:2" and own["sdk_location"] == "container"
    with pytest.raises(PalmError, match="data.beam.sdk_container_image: the dataflow workers run palm from a "
                                        "container image; set infra.launcher.image"):
        pipeline_options(dataflow)
    with pytest.raises(PalmError, match="are staged only with data.beam.packaging: wheel"):
        pipeline_options(data_spec(beam={**cloud, "requirements_file": "requirements.txt"}), worker_image=worker)

    # packaging: wheel, with the files named in the spec.
    wheel = data_spec(beam={**cloud, "packaging": "wheel", "extra_packages": ["dist/palm_pipeline-0.1.0-py3-none-any.whl"],
                            "requirements_file": "requirements.txt"})
    opts = pipeline_options(wheel, worker_image=worker).get_all_options(drop_default=True)
    assert opts["extra_packages"] == ["dist/palm_pipeline-0.1.0-py3-none-any.whl"]
    assert opts["requirements_file"] == "requirements.txt" and opts["save_main_session"] is False
    assert "sdk_container_image" not in opts and "sdk_location" not in opts  # Dataflow's own Beam image

    flink = pipeline_options(data_spec(beam={"runner": "flink", "master_url": "localhost:8081"}),
                             worker_image="img:1").get_all_options(drop_default=True)
    assert (flink["runner"], flink["flink_master"], flink["environment_type"], flink["sdk_container_image"]) == (
        "FlinkRunner", "localhost:8081", "DOCKER", "img:1")
    spark = pipeline_options(data_spec(beam={"runner": "spark", "master_url": "spark://m:7077", "packaging": "wheel"}),
                             package_dir=tmp_path)
    assert spark.get_all_options()["spark_master_url"] == "spark://m:7077"
    assert spark.get_all_options()["extra_packages"] == [str(tmp_path / "palm_pipeline-0.1.0-py3-none-any.whl")]
    assert spark.get_all_options()["environment_type"] == "LOOPBACK"

    local = pipeline_options(data_spec()).get_all_options()
    assert local["direct_running_mode"] == "in_memory"

    with pytest.raises(PalmError, match="cannot write to the local path"):
        run_data_stage(dataflow, "/tmp/somewhere")


def _read_with_pids(spec: DataSpec, out: Path) -> list[tuple[str, int]]:
    """(doc id, pid of the worker process that read it) for every record `ReadSources` reads."""
    import apache_beam as beam
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from palm.data.beam import pipeline_options
    from palm.data.sources import ReadSources

    def tag(record):
        import os

        return record[0], os.getpid()

    def write(pairs, path=str(out)):
        Path(path).write_text(json.dumps(pairs))

    with beam.Pipeline(runner=FnApiRunner(), options=pipeline_options(spec)) as p:
        p | ReadSources(spec) | beam.Map(tag) | beam.combiners.ToList() | beam.Map(write)
    return [tuple(x) for x in json.loads(out.read_text())]


@pytest.mark.slow
def test_many_files_are_spread_over_workers_each_read_by_one(tmp_path):
    """40 files of one source on Beam's multi-process runner with 2 workers: the pattern is listed and
    the files read by the workers, each file whole by one worker process, the files spread over both;
    every record arrives once; `max_docs` keeps the source's first records by id."""
    src = tmp_path / "src"
    src.mkdir()
    for f in range(40):
        (src / f"part-{f:03d}.jsonl").write_text("".join(json.dumps({"text": f"file {f} record {r}"}) + "\n"
                                                         for r in range(5)))
    source = {"name": "web", "format": "jsonl", "paths": [str(src / "part-*.jsonl")], "weight": 1.0}
    spec = DataSpec.model_validate({"sources": [source], "beam": {"runner": "multi_process", "num_workers": 2}})
    seen = _read_with_pids(spec, tmp_path / "seen.json")
    assert sorted(doc_id for doc_id, _ in seen) == [f"web/{f:05d}/{r:08d}" for f in range(40) for r in range(5)]
    readers: dict[str, set[int]] = {}
    for doc_id, pid in seen:
        readers.setdefault(doc_id.split("/")[1], set()).add(pid)
    assert all(len(pids) == 1 for pids in readers.values()), readers
    assert len(set().union(*readers.values())) == 2, readers

    limited = DataSpec.model_validate({"sources": [{**source, "max_docs": 12}],
                                       "beam": {"runner": "multi_process", "num_workers": 2}})
    first = sorted(doc_id for doc_id, _ in _read_with_pids(limited, tmp_path / "limited.json"))
    assert first == [f"web/{f:05d}/{r:08d}" for f in range(3) for r in range(5)][:12]


def _pairs_of_known_similarity(rng, low: float, high: float, count: int, start: int) -> list[tuple[str, str, float]]:
    """`count` (text, variant, exact 5-gram shingle Jaccard in [low, high)) pairs of 300-word documents,
    each pair from fresh words (no two pairs share a word)."""
    from palm.data import minhash
    from palm.data.dedup import exact_jaccard

    out, n = [], start
    while len(out) < count:
        base = [f"w{n}x{i}" for i in range(300)]
        n += 1
        variant = list(base)
        for pos in rng.sample(range(300), rng.randint(2, 30)):
            variant[pos] = f"v{n}x{pos}"
        a, b = (minhash.shingle_hashes(minhash.words(" ".join(t)), 5) for t in (base, variant))
        j = exact_jaccard(a, b)
        if low <= j < high:
            out.append((" ".join(base), " ".join(variant), j))
    return out


@pytest.mark.slow
def test_near_duplicates_are_verified_by_exact_jaccard(tmp_path):
    """Planted pairs with exact shingle Jaccard in [0.8, 0.9) are all found (one of each dropped), pairs in
    [0.5, 0.7) none; the manifest counts candidate and verified pairs; the output is the same on 1 and 2
    workers."""
    import random

    rng = random.Random(7)
    close = _pairs_of_known_similarity(rng, 0.8, 0.9, 20, 0)
    far = _pairs_of_known_similarity(rng, 0.5, 0.7, 20, 10_000)
    lines = []
    for text, variant, _ in close + far:
        lines += [json.dumps({"text": text}), json.dumps({"text": variant})]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    # Random words have no stop words: that rule is off, so that only deduplication decides.
    source = {"name": "web", "kind": "web", "format": "jsonl", "paths": [str(tmp_path / "docs.jsonl")], "weight": 1.0,
              "filters": {"min_stop_words": None}}
    outputs = []
    for beam_settings in ({"runner": "in_process"}, {"runner": "multi_process", "num_workers": 2}):
        spec = DataSpec.model_validate({"sources": [source], "validation_fraction": 0.0, "num_shards": 2,
                                        "beam": beam_settings})
        out = tmp_path / f"out-{beam_settings['runner']}"
        out.mkdir()
        manifest = run_data_stage(spec, out)
        kept = {d["id"] for d in read_docs(out)}
        ids = [f"web/00000/{i:08d}" for i in range(len(lines))]
        for k in range(len(close)):  # the base (smaller id) stays, its variant goes
            assert ids[2 * k] in kept and ids[2 * k + 1] not in kept, (k, close[k][2])
        for k in range(len(close), len(close) + len(far)):
            assert ids[2 * k] in kept and ids[2 * k + 1] in kept, (k, far[k - len(close)][2])
        near = manifest["near_duplicates"]
        assert near["verified_pairs"] == len(close) and near["documents_dropped"] == len(close)
        assert near["candidate_pairs"] > near["verified_pairs"]  # far pairs that reached the candidate level, refused
        assert manifest["sources"]["web"]["dropped"]["near_duplicate"] == len(close)
        balanced(manifest)
        outputs.append({p.name: p.read_bytes() for p in sorted(out.glob("*.jsonl.gz"))})
    assert outputs[0] == outputs[1]


def test_beams_complaint_about_its_missing_gcp_extra_is_not_shown(caplog):
    """`import apache_beam` logs it on the root logger where the gcp extra (Dataflow's) is not installed, as
    after the README's first command; palm.data drops that one record and nothing else."""
    import logging

    from palm.data import BEAM_WITHOUT_GCP

    with caplog.at_level(logging.WARNING):
        logging.warning(BEAM_WITHOUT_GCP + " despite the import not raising an ImportError.")
        logging.warning("another warning")
    assert [r.getMessage() for r in caplog.records] == ["another warning"]
