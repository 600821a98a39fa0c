"""The quality classifier stage (palm.data.quality): trained on real curated prose (WikiText-2 paragraphs,
from ../shared/data) against synthetic low-quality web pages (fluent spam, which every rule lets through),
it must separate them on documents it never saw; the data stage then samples by its score, with the
accounting and the manifest saying what it did."""

from __future__ import annotations

import gzip
import json
import random
import re

import numpy as np
import pytest

from palm.data import filters
from palm.data.quality import QualityClassifier, train_quality_stage
from palm.data.synthetic_web import fluent_spam, keyword_list, web_page
from palm.base.errors import PalmError, SpecError
from palm.spec.schema import DataSpec
from palm.dag.workflow import load_spec
from tests.conftest import SPECS


def wikitext_paragraphs(data_dir, min_words: int = 60) -> list[str]:
    text = (data_dir / "wikitext2" / "valid.txt").read_text(encoding="utf-8")
    return [line.strip() + "\n" for line in text.splitlines()
            if len(line.split()) >= min_words and not line.strip().startswith("=")]


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return str(path)


def data_spec(tmp_path, curated, web, **quality) -> DataSpec:
    return DataSpec.model_validate({
        "sources": [
            {"name": "wiki", "kind": "wikipedia", "weight": 0.5, "format": "jsonl",
             "paths": [write_jsonl(tmp_path / "wiki.jsonl", curated)]},
            {"name": "web", "kind": "web", "weight": 0.5, "format": "jsonl",
             "paths": [write_jsonl(tmp_path / "web.jsonl", web)], "filters": {"quality_sampling": True}},
        ],
        "quality": {"max_docs_per_class": 300, **quality},
        "num_shards": 1,
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_data):
    tmp = tmp_path_factory.mktemp("quality")
    paragraphs = wikitext_paragraphs(shared_data)
    rng = random.Random(1)
    web = [web_page(rng) for _ in range(500)]  # the keyword lists among them fall to the stop-word rule
    spec = data_spec(tmp, paragraphs[:400], web)
    out = tmp / "out"
    out.mkdir()
    report = train_quality_stage(spec, out)
    return spec, out, report, paragraphs[400:]


@pytest.mark.slow
def test_the_classifier_separates_curated_prose_from_spam_and_keyword_lists_it_never_saw(trained):
    spec, out, report, unseen_prose = trained
    assert report["held_out_auc"] > 0.98
    assert report["documents"]["positive"] == 300 and report["documents"]["negative"] == 300  # the cap, each class one source
    classifier = QualityClassifier.load(str(out))
    rng = random.Random(12345)  # other documents than the training ones
    spam = [fluent_spam(rng) for _ in range(100)]
    keywords = [keyword_list(rng) for _ in range(100)]
    rules = spec.sources[1].filters
    prose = [d for d in unseen_prose if filters.quality_drop_reason(d, rules) is None][:100]
    assert len(prose) == 100
    # Fluent spam passes every rule-based filter: only a trained score tells it from prose. (Keyword lists are
    # also caught by Gopher's stop-word rule; the classifier scores them low all the same.)
    assert all(filters.quality_drop_reason(d, rules) is None for d in spam)
    assert {filters.quality_drop_reason(d, rules) for d in keywords} == {"too_few_stop_words"}
    s_prose, s_spam, s_keys = (classifier.scores(d) for d in (prose, spam, keywords))
    assert np.median(s_prose) > 0.8 and np.median(s_spam) < 0.2
    # Keyword lists never reach the classifier (the stop-word rule drops them first, in training as in the
    # data stage), so it never learned them; it still ranks them below curated prose.
    assert np.median(s_keys) < 0.5
    assert (s_prose[:, None] > s_spam[None, :]).mean() > 0.98  # pairwise: the AUC of prose against spam
    assert (s_prose[:, None] > s_keys[None, :]).mean() > 0.98
    # The hand-written heuristic it replaces is fooled by fluent spam: prose-like function words and lengths.
    assert np.median([filters.quality_score(d) for d in spam]) > np.median([filters.quality_score(d) for d in prose])


@pytest.mark.slow
def test_the_report_and_the_saved_model_agree(trained):
    spec, out, report, _ = trained
    saved = json.loads((out / "classifier.json").read_text())
    assert saved["report"] == json.loads(json.dumps(report))
    web = report["sources"]["web"]
    assert web["class"] == "negative" and sum(web["held_out_histogram"]) == web["held_out"] > 0
    assert 0 <= web["expected_keep_rate"] < report["sources"]["wiki"]["expected_keep_rate"] <= 1
    assert report["positive_sources"] == ["wiki"] and report["negative_sources"] == ["web"]
    # Deterministic: the same documents and settings give the same model, bit for bit.
    again = out.parent / "again"
    again.mkdir()
    train_quality_stage(spec, again)
    assert (again / "weights.npy").read_bytes() == (out / "weights.npy").read_bytes()


@pytest.mark.slow
def test_a_damaged_classifier_is_one_clear_error(trained, tmp_path):
    _, out, _, _ = trained
    (tmp_path / "classifier.json").write_text((out / "classifier.json").read_text())
    np.save(tmp_path / "weights.npy", np.zeros(7, np.float32))
    with pytest.raises(PalmError, match=r"weights shaped \(7,\).*rerun the quality stage"):
        QualityClassifier.load(str(tmp_path))
    (tmp_path / "weights.npy").unlink()
    with pytest.raises(PalmError, match="weights.npy is missing"):
        QualityClassifier.load(str(tmp_path))


def test_a_class_with_no_documents_is_refused(tmp_path):
    spec = data_spec(tmp_path, ["too short to pass the word-count filter\n"] * 5, [web_page(random.Random(0))] * 3)
    (tmp_path / "out").mkdir()
    with pytest.raises(PalmError, match=r"no documents in source 'wiki' \(positives\)"):
        train_quality_stage(spec, tmp_path / "out")


def test_specs_name_their_curated_sources(tmp_path):
    base = SPECS / "tiny.yaml"
    sampled = ["data.sources.2.filters.quality_sampling=true"]
    spec = load_spec(base, sampled)  # stdlib-docs is of kind books: the default positives
    from palm.dag.workflow import resolve_workflow

    graph = resolve_workflow(spec)
    assert "quality" in graph.nodes and graph.nodes["data"].inputs == {"quality": "quality"}
    assert "quality" not in resolve_workflow(load_spec(base)).nodes  # nothing samples: no classifier
    heuristic = load_spec(base, [*sampled, "data.quality.scorer=heuristic"])
    assert "quality" not in resolve_workflow(heuristic).nodes
    with pytest.raises(SpecError, match=re.escape("data.quality.positive_sources")):
        load_spec(base, [*sampled, "data.quality.positive_kinds=[wikipedia]"])
    with pytest.raises(SpecError, match="both curated"):
        load_spec(base, [*sampled, "data.quality.positive_sources=[planted]"])
    with pytest.raises(SpecError, match="'nowhere' is not a source"):
        load_spec(base, ["data.quality.positive_sources=[nowhere]"])


@pytest.mark.slow
def test_the_data_stage_samples_by_the_classifier_and_accounts_for_it(trained, tmp_path):
    from palm.data.pipeline import run_data_stage

    _, out, report, unseen_prose = trained
    # The web as it comes: mostly spam and keyword lists, some good prose (documents the classifier never saw).
    rng = random.Random(7)
    prose = unseen_prose[100:150]
    spec = data_spec(tmp_path, unseen_prose[150:250], [web_page(rng) for _ in range(200)] + prose)
    manifest = run_data_stage(spec, tmp_path / "data", classifier=str(out), classifier_key="abc")
    assert manifest["quality"] == {"scorer": "classifier", "classifier": str(out), "classifier_key": "abc",
                                   "held_out_auc": report["held_out_auc"], "positive_sources": ["wiki"],
                                   "negative_sources": ["web"]}
    web, wiki = manifest["sources"]["web"], manifest["sources"]["wiki"]
    assert "quality_sampling" not in wiki  # curated sources are not sampled
    sampling = web["quality_sampling"]
    hist = sampling["score_histogram"]
    assert sampling["scored"] == sum(hist["kept"]) + sum(hist["dropped"]) == web["docs_in"] - sum(
        n for reason, n in web["dropped"].items() if reason not in ("quality_sampling", "exact_duplicate",
                                                                      "near_duplicate", "mixture_excess"))
    assert web["dropped"]["quality_sampling"] == sum(hist["dropped"]) == sampling["scored"] - sampling["kept"]
    # Pareto(9) keeps a document of score 0.9 with probability 1.1^-9 = 0.42, of score 0.15 with 0.004: what
    # survives of the web is mostly its prose, from the top score bins.
    assert sum(hist["kept"][7:]) >= 0.9 * sampling["kept"] and 8 <= sampling["kept"] <= 40
    texts = {json.loads(line)["text"] for f in sorted((tmp_path / "data").glob("*.jsonl.gz"))
             for line in gzip.open(f, "rt", encoding="utf-8")}
    assert len(texts & set(prose)) >= 0.8 * sampling["kept"]  # the web documents kept are its prose
    for entry in (web, wiki):  # the accounting balances
        assert entry["docs_in"] == entry["docs_kept"] + sum(entry["dropped"].values())
    # Same documents, same classifier: the same verdicts and the same bytes on two worker processes.
    two = spec.model_copy(update={"beam": spec.beam.model_copy(update={"runner": "multi_process", "num_workers": 2})})
    again = run_data_stage(two, tmp_path / "again", classifier=str(out), classifier_key="abc")
    assert again["sources"] == manifest["sources"]
    shards = sorted(p.name for p in (tmp_path / "data").glob("*.jsonl.gz"))
    assert shards and all((tmp_path / "data" / n).read_bytes() == (tmp_path / "again" / n).read_bytes() for n in shards)
    with pytest.raises(PalmError, match="no classifier"):
        run_data_stage(spec, tmp_path / "none")


# ------------------------------------------------------------------ the AUC floor (issue 27.3)


def _learned_nothing(tmp_path, paragraphs, min_auc=None) -> DataSpec:
    """Positives and negatives the same documents: a classifier of them cannot tell the classes apart."""
    return data_spec(tmp_path, paragraphs[:300], paragraphs[:300],
                     **({} if min_auc is None else {"min_auc": min_auc}))


def test_a_classifier_that_learned_nothing_is_refused_and_not_cached(shared_data, tmp_path):
    from palm.dag.table import STAGES
    from palm.store.outputs import run_stage

    spec = _learned_nothing(tmp_path, wikitext_paragraphs(shared_data))
    root = tmp_path / "runs"
    with pytest.raises(PalmError) as info:
        run_stage("quality", spec.classifier_config(), {}, root, lambda out: train_quality_stage(spec, out))
    message = str(info.value)
    auc = float(re.search(r"held-out AUC is ([\d.]+), below data.quality.min_auc 0.7", message).group(1))
    assert auc < 0.7 and "\n" not in message
    assert "curated sources (wiki)" in message and "quality-sampled ones (web)" in message
    assert "data.quality.positive_sources" in message and "lower data.quality.min_auc" in message
    assert list((root / "quality").iterdir()) == []  # nothing a later run could reuse
    # The floor is a spec setting: lowered, the same classifier is accepted (and its AUC reported).
    lowered = _learned_nothing(tmp_path, wikitext_paragraphs(shared_data), min_auc=0.0)
    (tmp_path / "low").mkdir()
    assert train_quality_stage(lowered, tmp_path / "low")["held_out_auc"] == pytest.approx(auc, abs=5e-4)
    assert STAGES["quality"].config(_spec_with(lowered)) == STAGES["quality"].config(_spec_with(spec))


def _spec_with(data: DataSpec):
    spec = load_spec(SPECS / "tiny.yaml")
    return spec.model_copy(update={"data": data})


def test_the_auc_floor_is_in_no_stage_key_and_a_reused_classifier_below_it_is_refused(shared_data, tmp_path):
    """min_auc only accepts or refuses: every spec's keys stay as they were; a classifier accepted under a
    lower floor (reused: same key) is refused by the data stage under a higher one, before Beam runs."""
    from palm.dag.table import STAGES
    from palm.stages.data import build
    from palm.store.outputs import StageOutput

    paragraphs = wikitext_paragraphs(shared_data)
    low, high = _learned_nothing(tmp_path, paragraphs, min_auc=0.0), _learned_nothing(tmp_path, paragraphs)
    for stage in ("quality", "data"):
        assert STAGES[stage].config(_spec_with(low)) == STAGES[stage].config(_spec_with(high))
    assert "min_auc" not in json.dumps(STAGES["data"].config(_spec_with(high)))
    out = tmp_path / "classifier"
    out.mkdir()
    train_quality_stage(low, out)
    inputs = {"quality": StageOutput("quality", "k", str(out), {}, True)}
    with pytest.raises(PalmError, match=r"held-out AUC is [\d.]+, below data.quality.min_auc 0.7"):
        build(_spec_with(high), inputs, None)(tmp_path / "data")
    assert not (tmp_path / "data").exists()


def test_palm_run_refuses_a_useless_classifier_in_one_line(prefect_server, shared_data, tmp_path, capsys):
    from palm.cli import main

    docs = write_jsonl(tmp_path / "docs.jsonl", wikitext_paragraphs(shared_data)[:300])
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"extends: {SPECS / 'tiny.yaml'}\ndata:\n  sources:\n"
                    f"    - {{name: wiki, kind: wikipedia, weight: 0.5, format: jsonl, paths: [{docs}]}}\n"
                    f"    - {{name: web, kind: web, weight: 0.5, format: jsonl, paths: [{docs}], "
                    "filters: {quality_sampling: true}}\n"
                    "  quality: {max_docs_per_class: 300}\n")
    out = tmp_path / "run"
    rc = main(["run", str(spec), "--stages", "quality,data", "--output", str(out)])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("palm: error: ")]
    assert rc == 2 and len(lines) == 1, err[-3000:]
    assert re.search(r"the quality classifier's held-out AUC is [\d.]+, below data.quality.min_auc 0.7", lines[0])
    assert not list(out.glob("*/*/manifest.json"))


def test_plan_and_report_show_each_sampled_sources_expected_keep_rate(tmp_path):
    from palm.app.plan import quality_plan, render, plan
    from palm.app.report import report_markdown
    from palm.dag.runner import run_node
    from palm.dag.workflow import resolve_workflow

    spec = load_spec(SPECS / "tiny.yaml", ["data.sources.2.filters.quality_sampling=true",
                                           "data.quality.min_auc=0", "data.quality.max_docs_per_class=200"])
    sampled = spec.data.sources[2].name
    before = quality_plan(spec, str(tmp_path))
    assert [r["source"] for r in before] == [sampled] and before[0]["expected_keep_rate"] is None
    assert before[0]["keep_rate_at_chance"] == pytest.approx(filters.keep_probability(0.5, 9.0))
    text = render({**plan(spec), "quality_sampling": before})
    assert f"  {sampled}: expected keep rate known after the quality stage" in text
    workflow = resolve_workflow(spec)
    out = run_node(workflow.nodes["quality"], tmp_path, {})
    after = quality_plan(spec, str(tmp_path))
    expected = out.manifest["sources"][sampled]["expected_keep_rate"]
    assert after[0]["expected_keep_rate"] == expected and after[0]["classifier"] == out.path
    assert f"  {sampled}: expected keep rate {expected:.1%} (held out; classifier AUC" in render(
        {**plan(spec), "quality_sampling": after})
    report = report_markdown(tmp_path, spec.name, workflow, {"quality": out})
    assert "## Quality classifier" in report and f"| {sampled} | negative |" in report
