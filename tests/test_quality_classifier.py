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
