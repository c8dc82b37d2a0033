"""llm2emb synth: templates, spec, reply parsing and retries, filters, contamination, resume, determinism, errors.

Most tests drive the pipeline with a stub generator (scripted replies, no model); determinism and the
causal-LM checks use the tiny random models; the real smollm2-135m run is in test_synth_smollm2.py."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from llm2emb.errors import UserError
from llm2emb.synth import SynthOptions, synthesize
from llm2emb.synth.contamination import BUILTIN_HELDOUT, NgramIndex, build_index
from llm2emb.synth.corpus import Corpus, Passage, load_corpus
from llm2emb.synth.filters import FilterContext, SynthRow, apply_filters, parse_filter_list
from llm2emb.synth.generate import sample_placeholders
from llm2emb.synth.generators import Generator, build_generator
from llm2emb.synth.replies import ReplyError, parse_fields, parse_judgement
from llm2emb.synth.spec import FilterSettings, load_spec
from llm2emb.synth.store import LOG_FILE, STATE_DIR
from llm2emb.synth.templates import parse_template

TOPICS = ["volcano lava eruption magma", "penguin antarctic ice colony", "violin orchestra string bow",
          "bakery sourdough bread oven", "satellite orbit rocket launch", "coral reef fish ocean",
          "chess opening gambit board", "glacier melting climate ice", "honey bee hive pollen",
          "railway steam locomotive track", "desert cactus dry sand", "telescope galaxy star observation"]


def _corpus_file(tmp_path: Path, n: int = 12) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [{"_id": f"d{i}", "text": f"A passage about {TOPICS[i % len(TOPICS)]} number {i}."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _spec_file(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


BASIC_SPEC = """
dataset: synth_test
task_type: retrieval
placeholders:
  persona: [a student, an expert]
negatives: {mode: retrieved, num: 2, candidates: 4, relabel: false}
generation: {retries: 2}
filters: {min_query_words: 2}
"""


class StubGenerator(Generator):
    """Replies from `reply(prompt_user_text, attempt_temperature)`; records every call."""

    name = "stub"

    def __init__(self, reply, fail_on_call: int | None = None) -> None:
        self.reply = reply
        self.calls: list[int] = []          # prompts per call
        self.fail_on_call = fail_on_call

    def identity(self):
        return {"backend": "stub"}

    def generate(self, prompts, settings, complete=None):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise KeyboardInterrupt  # a kill in the middle of the run
        self.calls.append(len(prompts))
        return [self.reply(p, settings) for p in prompts]


def _topic_query(prompt, settings) -> str:
    """A query naming the passage's topic words (so BM25 finds the passage), as JSON after the reply start."""
    text = prompt.user.split('"""')[1]
    words = text.split("about ")[1].split(" number")[0]
    return f'{words} facts"}}'


def _opts(tmp_path, corpus, spec, out="out", **kw) -> SynthOptions:
    return SynthOptions(corpus=str(corpus), spec=str(spec), model="stub", output=str(tmp_path / out),
                        progress=False, batch_size=kw.pop("batch_size", 4), **kw)


# ------------------------------------------------------------------------------------------------ templates

def test_template_sections_placeholders_and_literal_braces():
    t = parse_template('[system]\nBe brief.\n[user]\nWrite for {persona}: {passage}. Form {"query": "..."} '
                       "and {{persona}} stays.\n[reply]\n{\"query\": \"\n", "t.txt")
    assert t.system == "Be brief." and t.reply == '{"query": "'
    assert t.placeholders() == ["persona", "passage"]
    p = t.render({"persona": "a cat", "passage": "P {x}"})
    assert p.user == 'Write for a cat: P {x}. Form {"query": "..."} and {persona} stays.'
    assert p.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": p.user}]
    no_sections = parse_template("Just {task}.", "plain")
    assert no_sections.user == "Just {task}." and no_sections.system == "" and no_sections.reply == ""


def test_unknown_placeholder_names_template_and_placeholder(tmp_path):
    (tmp_path / "mine.txt").write_text("[user]\nWrite a {mood} query for {passage}\n")
    spec = _spec_file(tmp_path, "task_type: retrieval\ntemplate: mine.txt\n")
    with pytest.raises(UserError, match=r"mine\.txt: unknown placeholder \{mood\}"):
        load_spec(str(spec))
    ok = _spec_file(tmp_path, "task_type: retrieval\ntemplate: mine.txt\nplaceholders:\n  mood: [happy, sad]\n",
                    "ok.yaml")
    assert load_spec(str(ok)).placeholders["mood"] == ("happy", "sad")
    # the judge template is checked too, against its own context (query, candidates)
    (tmp_path / "judge.txt").write_text("[user]\n{query} {passage}\n")
    bad_judge = _spec_file(tmp_path, "task_type: retrieval\nnegatives: {mode: retrieved, relabel_template: "
                           "judge.txt}\n", "judge.yaml")
    with pytest.raises(UserError, match=r"judge\.txt: unknown placeholder \{passage\}"):
        load_spec(str(bad_judge))


def test_every_shipped_template_and_spec_loads():
    from llm2emb.synth.spec import parse_spec, shipped_specs

    for task in ("retrieval", "pairs", "sts", "clustering"):
        for mode in ("none", "generated", "retrieved"):
            s = parse_spec({"task_type": task, "negatives": {"mode": mode}}, "t")
            assert s.num_negatives == {"none": 0, "generated": 1, "retrieved": 3}[mode]
    s = parse_spec({"task_type": "classification", "labels": ["good", "bad"]}, "t")
    assert s.negatives.mode == "label" and s.num_negatives == 1
    for name in shipped_specs():
        load_spec(f"builtin:{name}")


def test_spec_errors_are_one_sentence(tmp_path):
    cases = {
        "task_type: retrival\n": "retrieval",                         # did-you-mean
        "task_type: retrieval\ngeneration: {temprature: 1}\n": "temperature",
        "task_type: retrieval\nnegatives: {mode: label}\n": "does not apply",
        "task_type: classification\nlabels: [one]\n": "at least two",
        "task_type: retrieval\nweight: -1\n": "weight",
        "task_type: retrieval\ndataset: _hidden\n": "dataset",
        "task_type: retrieval\ntemplate: nowhere.txt\n": "neither a file nor a shipped template",
    }
    for i, (text, needle) in enumerate(cases.items()):
        with pytest.raises(UserError, match=needle):
            load_spec(str(_spec_file(tmp_path, text, f"s{i}.yaml")))


def test_placeholders_are_drawn_per_passage_with_the_seed(tmp_path):
    spec = load_spec(str(_spec_file(tmp_path, BASIC_SPEC)))
    a = [sample_placeholders(spec, 0, f"d{i}") for i in range(40)]
    assert a == [sample_placeholders(spec, 0, f"d{i}") for i in range(40)]
    assert {x["persona"] for x in a} == {"a student", "an expert"}       # the spec's list, both drawn
    assert a != [sample_placeholders(spec, 1, f"d{i}") for i in range(40)]
    assert {x["length"] for x in a} <= {"fewer than 8 words", "8 to 15 words", "15 to 25 words"}  # defaults


# ------------------------------------------------------------------------------------------------ replies

def test_parse_fields_tolerates_prose_and_unclosed_objects():
    assert parse_fields('Sure! ```json\n{"query": "  how  to\nbake "}\n```', ["query"]) == {"query": "how to bake"}
    assert parse_fields('{"query": "x y", "note": "never clo', ["query"]) == {"query": "x y"}
    with pytest.raises(ReplyError) as e:
        parse_fields('{"query": "never closed', ["query"])
    assert e.value.reason == "no_json"
    for text, reason in [('{"q": "a"}', "missing_field"), ('{"query": ""}', "empty_field"),
                         ('{"query": 3}', "empty_field"), ("no json here", "no_json")]:
        with pytest.raises(ReplyError) as e:
            parse_fields(text, ["query"])
        assert e.value.reason == reason
    assert parse_fields('{"label": " Positive "}', ["label"], ["positive", "negative"]) == {"label": "positive"}
    with pytest.raises(ReplyError, match="unknown_label"):
        parse_fields('{"label": "neutral"}', ["label"], ["positive", "negative"])
    assert parse_judgement('{"best": "2", "relevant": [2, 3, 3]}', 4) == (2, [2, 3])
    with pytest.raises(ReplyError):
        parse_judgement('{"best": 7}', 4)


def test_retries_are_bounded_and_a_reply_that_never_parses_is_counted_not_fatal(tmp_path):
    corpus = _corpus_file(tmp_path, 8)
    spec = _spec_file(tmp_path, BASIC_SPEC.replace("retrieved, num: 2", "none, num: 2"))
    temperatures = []

    def reply(prompt, settings):
        temperatures.append(settings.temperature)
        if "number 3." in prompt.user:          # never parses
            return "I cannot answer that."
        if "number 5." in prompt.user and settings.temperature == 0:  # parses on the first retry
            return "no json"
        return _topic_query(prompt, settings)

    gen = StubGenerator(reply)
    report = synthesize(_opts(tmp_path, corpus, spec, batch_size=8, filters="none"), generator=gen)
    g = report["generation"]
    assert (g["passages"], g["parsed"], g["failed"]) == (8, 7, 1)
    assert g["failure_reasons"] == {"no_json": 1}
    assert g["reasons_over_all_attempts"] == {"no_json": 4}      # passage 3 three times, passage 5 once
    assert gen.calls == [8, 2, 1]                                 # retries ask only for what failed, 2 at most
    assert temperatures[:8] == [0.0] * 8 and set(temperatures[8:]) == {0.7}  # greedy first, sampled retries
    assert report["rows"]["kept"] == 7
    records = [r for line in (tmp_path / "out" / STATE_DIR / LOG_FILE).read_text().splitlines()
               for r in json.loads(line)["records"]]
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["attempts"] == 3 and failed[0]["id"] == "d3"


# ------------------------------------------------------------------------------------------------ filters

def _rows(queries_and_positives):
    return [SynthRow(pid, pid, q, "", [], True) for q, pid in queries_and_positives]


def test_consistency_filter_keeps_queries_that_retrieve_their_passage(tmp_path):
    corpus = load_corpus(str(_corpus_file(tmp_path)))
    rows = _rows([("volcano magma eruption", "d0"),          # retrieves d0: kept
                  ("penguin colony on the ice", "d0"),         # retrieves d1, not d0: dropped
                  ("bakery bread", "d3")])
    ctx = FilterContext(corpus, FilterSettings(consistency_top_k=1))
    kept, dropped, report = apply_filters(rows, ["consistency"], ctx)
    assert [r.query for r in kept] == ["volcano magma eruption", "bakery bread"]
    assert dropped[0][0].query == "penguin colony on the ice" and dropped[0][1] == "consistency: not_in_top_1"
    assert report == [{"filter": "consistency", "input": 3, "dropped": 1, "kept": 2, "reasons": {"not_in_top_1": 1}}]
    # a wider top-k lets the off-target query through (the filter really ranks)
    kept, _, _ = apply_filters(rows, ["consistency"], FilterContext(corpus, FilterSettings(consistency_top_k=12)))
    assert len(kept) == 3


def test_length_and_dedup_filters():
    rows = _rows([("one", "a"), ("how to bake sourdough bread", "b"), ("How to bake sourdough bread?", "c"),
                  ("how to bake the sourdough bread", "d"), ("a completely different question here", "e"),
                  (" ".join(["word"] * 70), "f")])
    rows.append(SynthRow("g", "g", "same text as passage", "Same text, as passage!", [], True))
    ctx = FilterContext(Corpus("c", []), FilterSettings(min_query_words=2, dedup_jaccard=0.8))
    kept, _, report = apply_filters(rows, ["length", "dedup"], ctx)
    assert [r.passage_id for r in kept] == ["b", "e"]
    assert report[0]["reasons"] == {"query_copies_passage": 1, "query_too_long": 1, "query_too_short": 1}
    assert report[1]["reasons"] == {"duplicate_query": 1, "near_duplicate_query": 1}
    assert parse_filter_list("dedup,length") == ["length", "dedup"] and parse_filter_list("none") == []
    with pytest.raises(UserError, match="unknown filter 'lenght'.*length"):
        parse_filter_list("lenght")


def _beir(folder: Path, queries: list[str], docs: list[str]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": f"c{i}", "title": "", "text": t}) + "\n"
                                                 for i, t in enumerate(docs)))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": f"q{i}", "text": t}) + "\n"
                                                  for i, t in enumerate(queries)))
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\tc0\t1\n" for i in range(len(queries))))
    return folder


def test_contamination_detects_overlap_with_eval_queries_and_documents(tmp_path):
    task = _beir(tmp_path / "evalset", ["Which drugs reduce the risk of stroke in older adults?"],
                 ["Aspirin taken daily lowers the incidence of ischemic stroke among patients over seventy years."])
    index = build_index([str(task)], n=8, min_n=4)
    assert index.match("WHICH drugs reduce the risk of stroke in older adults") == "evalset"   # case, punctuation
    assert index.match("intro: aspirin taken daily lowers the incidence of ischemic stroke, it says") == "evalset"
    assert index.match("drugs that reduce stroke risk") is None              # shares words, no 8-word run
    assert index.match("aspirin taken daily lowers the incidence") is None    # 6 words of a long text
    short = NgramIndex(n=8, min_n=4)
    short.add(["best pizza in naples"], "s")                                   # shorter than n: matched whole
    assert short.match("where is the best pizza in naples today") == "s" and short.match("pizza in naples") is None
    corpus = load_corpus(str(_corpus_file(tmp_path)))
    rows = [SynthRow("d0", "d0", "which drugs reduce the risk of stroke in older adults", "p", [], True),
            SynthRow("d1", "d1", "penguin facts", "p",
                     ["Aspirin taken daily lowers the incidence of ischemic stroke among patients"], True),
            SynthRow("d2", "d2", "bread facts", "p", ["q"], True)]
    kept, _, report = apply_filters(rows, ["contamination"], FilterContext(corpus, FilterSettings(), "", index))
    assert [r.passage_id for r in kept] == ["d2"] and report[0]["reasons"] == {"contaminated:evalset": 2}


def test_builtin_heldout_contamination_catches_heldout_functions():
    from llm2emb.data.builtin import extract_functions, is_held_out

    held = next(f for f in extract_functions() if is_held_out(f.package))
    index = build_index([BUILTIN_HELDOUT], n=8, min_n=4)
    assert index.match(held.passage) == "stdlib-heldout" and index.match(held.query) == "stdlib-heldout"
    assert index.match("a query about something else entirely") is None


def test_stdlib_undocumented_corpus_has_no_docstrings_and_no_heldout_package():
    import ast

    from llm2emb.data.builtin import extract_functions, extract_undocumented, is_held_out, split_functions

    corpus = load_corpus("builtin:stdlib-undocumented")
    assert len(corpus) > 500 and len(set(corpus.by_id)) == len(corpus)
    assert not any(is_held_out(p.id.split(".")[0]) for p in corpus.passages)
    parsed = 0
    for p in corpus.passages[:200]:
        try:
            node = ast.parse(p.text).body[0]
        except SyntaxError:  # a function cut at 60 lines
            continue
        parsed += 1
        assert ast.get_docstring(node) is None
    assert parsed > 150
    # one held-out rule: the documented task's split uses the same per-package test
    functions = extract_functions()
    _, evaluation = split_functions(functions)
    assert all(is_held_out(f.package) for f in evaluation)
    assert not any(f.query for f in extract_undocumented())


# ------------------------------------------------------------------------------------------- whole runs

def test_run_writes_prepare_layout_and_merges_the_manifest(tmp_path, smollm2_dir):
    from llm2emb.data.tokenize import prepare, read_prepared

    corpus = _corpus_file(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    pd.DataFrame({"query": ["q1", "q2"], "passage": ["p1", "p2"]}).to_parquet(out / "real.parquet")
    (out / "manifest.json").write_text(json.dumps({"real": {"type": "retrieval", "instruction": "I: "}}))
    spec = _spec_file(tmp_path, BASIC_SPEC + "weight: 2.5\ninstruction: \"Instruct: find it\\nQuery: \"\n")
    report = synthesize(_opts(tmp_path, corpus, spec), generator=StubGenerator(_topic_query))
    frame = pd.read_parquet(out / "synth_test.parquet")
    assert list(frame.columns) == ["query", "passage", "negative_1", "negative_2"]
    assert len(frame) == report["rows"]["kept"] == 12
    for _, row in frame.iterrows():
        assert row["passage"] not in (row["negative_1"], row["negative_2"])
        assert row["query"].split()[0] in row["passage"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest == {"real": {"type": "retrieval", "instruction": "I: "},
                        "synth_test": {"type": "retrieval", "instruction": "Instruct: find it\nQuery: ",
                                       "weight": 2.5}}
    saved = json.loads((out / STATE_DIR / "report.json").read_text())
    assert saved["rows"]["kept"] == 12 and saved["generation"]["parse_rate"] == 1.0
    prepared = prepare(str(smollm2_dir), out, tmp_path / "tok", max_seq_length=64, workers=1, progress=False)
    assert set(prepared["datasets"]) == {"real", "synth_test"}            # _synth/ is not taken for a dataset
    assert read_prepared(tmp_path / "tok")["manifest"]["synth_test"]["weight"] == 2.5


def test_gecko_relabelling_moves_the_positive_and_keeps_relevant_candidates_out(tmp_path):
    corpus = _corpus_file(tmp_path)
    spec = _spec_file(tmp_path, BASIC_SPEC.replace("relabel: false", "relabel: true"))
    texts = {json.loads(line)["text"]: json.loads(line)["_id"] for line in corpus.read_text().splitlines()}

    def reply(prompt, settings):
        if prompt.user.startswith("Query:"):        # the judge: pick the candidate about penguins as best
            listing = prompt.user.split("\n\n")
            numbered = {int(b[1:b.index("]")]): b[b.index("]") + 2:] for b in listing if b.startswith("[")}
            best = next((k for k, t in numbered.items() if "penguin" in t), 1)
            return f'{best}, "relevant": [{best}]}}'
        return _topic_query(prompt, settings)

    report = synthesize(_opts(tmp_path, corpus, spec, filters="none"), generator=StubGenerator(reply))
    assert report["generation"]["judge"]["parsed"] == 12
    records = [r for line in (tmp_path / "out" / STATE_DIR / LOG_FILE).read_text().splitlines()
               for r in json.loads(line)["records"]]
    moved = [r for r in records if r["positive"] != r["id"]]
    assert moved and all(texts_of_positive.startswith("A passage about penguin") for texts_of_positive in
                         [next(t for t, i in texts.items() if i == r["positive"]) for r in moved])
    for r in records:
        assert r["positive"] not in r["negatives"] and r["id"] not in r["negatives"]
        assert not set(r["judge"]["relevant"]) & set(r["negatives"])


def test_generated_negatives_and_classification_labels(tmp_path):
    corpus = _corpus_file(tmp_path, 6)
    spec = _spec_file(tmp_path, "task_type: retrieval\nnegatives: {mode: generated}\n")
    report = synthesize(_opts(tmp_path, corpus, spec, filters="none"),
                        generator=StubGenerator(lambda p, s: 'a query", "hard_negative": "an unrelated text"}'))
    frame = pd.read_parquet(tmp_path / "out" / "synth_retrieval.parquet")
    assert list(frame.columns) == ["query", "passage", "negative_1"] and set(frame["negative_1"]) == {"an unrelated text"}
    assert report["rows"]["kept"] == 6
    spec = _spec_file(tmp_path, "task_type: classification\nlabels: [sports, science, food]\n", "cls.yaml")
    synthesize(_opts(tmp_path, corpus, spec, out="cls", filters="none"),
               generator=StubGenerator(lambda p, s: 'Science"}'))
    frame = pd.read_parquet(tmp_path / "cls" / "synth_classification.parquet")
    assert set(frame["passage"]) == {"science"} and set(frame["negative_1"]) <= {"sports", "food"}
    assert frame["query"].str.startswith("A passage about").all()
    assert json.loads((tmp_path / "cls" / "manifest.json").read_text())["synth_classification"]["type"] == \
        "classification"


def test_resume_after_a_kill_writes_what_an_uninterrupted_run_writes(tmp_path):
    corpus = _corpus_file(tmp_path)
    spec = _spec_file(tmp_path, BASIC_SPEC)
    whole = StubGenerator(_topic_query)
    synthesize(_opts(tmp_path, corpus, spec, out="whole"), generator=whole)
    assert whole.calls == [4, 4, 4]

    killed = StubGenerator(_topic_query, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        synthesize(_opts(tmp_path, corpus, spec, out="resumed"), generator=killed)
    log = tmp_path / "resumed" / STATE_DIR / LOG_FILE
    assert len(log.read_text().splitlines()) == 2 and not (tmp_path / "resumed" / "synth_test.parquet").exists()
    with open(log, "a") as fh:                        # a kill in the middle of writing the third line
        fh.write('{"chunk": 2, "ids": ["d')
    again = StubGenerator(_topic_query)
    report = synthesize(_opts(tmp_path, corpus, spec, out="resumed"), generator=again)
    assert again.calls == [4]                         # only the unfinished chunk
    assert report["this_invocation"]["resumed"] and report["this_invocation"]["chunks_already_done"] == 2
    assert log.read_bytes() == (tmp_path / "whole" / STATE_DIR / LOG_FILE).read_bytes()
    assert (tmp_path / "resumed" / "synth_test.parquet").read_bytes() == \
        (tmp_path / "whole" / "synth_test.parquet").read_bytes()
    # finished: a third start generates nothing; other filters reuse the generated text
    third = StubGenerator(_topic_query)
    report = synthesize(_opts(tmp_path, corpus, spec, out="resumed", filters="none"), generator=third)
    assert third.calls == [] and report["rows"]["kept"] == 12


def test_a_folder_holding_a_different_run_is_refused(tmp_path):
    corpus = _corpus_file(tmp_path)
    spec = _spec_file(tmp_path, BASIC_SPEC)
    synthesize(_opts(tmp_path, corpus, spec), generator=StubGenerator(_topic_query))
    other_spec = _spec_file(tmp_path, BASIC_SPEC.replace("an expert", "a chef"), "other.yaml")
    with pytest.raises(UserError, match=r"holds a different synth run \(its spec differs\)"):
        synthesize(_opts(tmp_path, corpus, other_spec), generator=StubGenerator(_topic_query))
    with pytest.raises(UserError, match=r"its seed differs"):
        synthesize(_opts(tmp_path, corpus, spec, seed=1), generator=StubGenerator(_topic_query))
    other_corpus = tmp_path / "c2.txt"
    other_corpus.write_text("one passage\nanother passage\nthird\nfourth\n")
    with pytest.raises(UserError, match=r"its corpus differs"):
        synthesize(_opts(tmp_path, other_corpus, spec), generator=StubGenerator(_topic_query))
    # not a synth run at all: a real dataset of the same name is never overwritten
    real = tmp_path / "real"
    real.mkdir()
    (real / "synth_test.parquet").write_bytes(b"x")
    with pytest.raises(UserError, match="was not written by a synth run"):
        synthesize(_opts(tmp_path, corpus, spec, out="real"), generator=StubGenerator(_topic_query))
    # an instruction or weight change is not a different run: generation is reused
    same = _spec_file(tmp_path, BASIC_SPEC + "weight: 3\n", "same.yaml")
    again = StubGenerator(_topic_query)
    synthesize(_opts(tmp_path, corpus, same), generator=again)
    assert again.calls == []


def test_deterministic_for_a_seed_with_a_real_model(tmp_path, tiny_model):
    """Two runs of a (tiny, random) causal LM with seeded sampling and retries write identical logs; another
    seed writes a different one. Random weights never produce JSON: every reply is retried and counted."""
    corpus = _corpus_file(tmp_path, 6)
    spec = _spec_file(tmp_path, "task_type: retrieval\ngeneration: {max_new_tokens: 6, temperature: 0.9, "
                      "retries: 1}\n")
    logs = []
    for out, seed in (("a", 3), ("b", 3), ("c", 4)):
        opts = SynthOptions(corpus=str(corpus), spec=str(spec), model=str(tiny_model), output=str(tmp_path / out),
                            seed=seed, batch_size=4, progress=False, filters="none")
        with pytest.raises(UserError, match="No generated row survived"):
            synthesize(opts)
        logs.append((tmp_path / out / STATE_DIR / LOG_FILE).read_text())
        report = json.loads((tmp_path / out / STATE_DIR / "report.json").read_text())
        assert report["generation"]["failed"] == 6 and report["generation"]["generator_calls_per_passage"] == 2
    assert logs[0] == logs[1]
    assert logs[0] != logs[2]
    replies = [r["reply"] for line in logs[0].splitlines() for r in json.loads(line)["records"]]
    assert all(r.startswith('{"query": "') for r in replies) and len(set(replies)) > 1


# ------------------------------------------------------------------------------------------- bad input

def test_corpus_without_text_is_one_sentence(tmp_path):
    no_field = tmp_path / "a.jsonl"
    no_field.write_text('{"id": 1, "body_text": "x"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl has no text: none of its fields \(body_text, id\)"):
        load_corpus(str(no_field))
    assert load_corpus(str(no_field), text_field="body_text").passages == [Passage("1", "x")]
    empty = tmp_path / "b.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(UserError, match=r"b\.jsonl has no text: 2 rows, all empty"):
        load_corpus(str(empty))
    blank = tmp_path / "c.txt"
    blank.write_text("\n\n")
    with pytest.raises(UserError, match=r"c\.txt is empty"):
        load_corpus(str(blank))
    with pytest.raises(UserError, match="builtin:stdlib-undocumented"):
        load_corpus("builtin:stdlib-undocumneted")


def test_a_generator_that_is_not_a_causal_lm_is_refused(tmp_path, tiny_model):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    config = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    config.architectures = ["BertModel"]
    config.save_pretrained(bert)
    with pytest.raises(UserError, match="is BertModel, not a causal language model"):
        build_generator("transformers", str(bert))
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "llm2emb_config.json").write_text("{}")
    with pytest.raises(UserError, match="saved llm2emb embedding model, not a generator"):
        build_generator("transformers", str(tmp_path / "emb"))
    with pytest.raises(UserError, match="Unknown generator"):
        build_generator("llama.cpp", str(tiny_model))
    # the vLLM backend is registered; without vLLM installed it says how to get it
    pytest.importorskip("transformers")
    try:
        import vllm  # noqa: F401
    except ImportError:
        gen = build_generator("vllm", str(tiny_model))
        from llm2emb.synth.generators import SamplingSettings
        from llm2emb.synth.templates import Prompt
        with pytest.raises(UserError, match=r"pip install 'llm2emb\[vllm\]'"):
            gen.generate([Prompt("", "hi", "")], SamplingSettings(4, 0.0, 1.0, 0))


def test_cli_prints_one_line_for_bad_input(tmp_path, capsys):
    from llm2emb.cli import main

    (tmp_path / "t.txt").write_text("[user]\n{passage} for {audience}\n")
    spec = _spec_file(tmp_path, "task_type: retrieval\ntemplate: t.txt\n")
    corpus = _corpus_file(tmp_path)
    code = main(["synth", "--corpus", str(corpus), "--spec", str(spec), "--model", "smollm2-135m",
                 "--output", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: Template ") and "{audience}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()


def test_consistency_with_an_embedder_scorer(tmp_path, tiny_model):
    """Round-trip through llm2emb.Embedder: a query identical to a passage retrieves it first even with random
    weights; a query copied from another passage does not retrieve its supposed positive."""
    corpus = load_corpus(str(_corpus_file(tmp_path)))
    texts = [p.text for p in corpus.passages]
    rows = _rows([(texts[0], "d0"), (texts[1], "d1"), (texts[2], "d5")])
    ctx = FilterContext(corpus, FilterSettings(consistency_scorer=str(tiny_model), consistency_top_k=1),
                        scorer_options={"max_length": 64})
    kept, dropped, _ = apply_filters(rows, ["consistency"], ctx)
    assert [r.positive_id for r in kept] == ["d0", "d1"] and dropped[0][0].positive_id == "d5"


def test_contamination_against_scifact_mini(shared_data):
    """The issue's example: --contamination /work/shared/data/eval/scifact_mini."""
    task = shared_data / "eval" / "scifact_mini"
    index = build_index([str(task)], n=8, min_n=4)
    query = json.loads((task / "queries.jsonl").read_text().splitlines()[0])["text"]
    assert index.match(f"Is it true that {query.lower()}") == "scifact_mini"
    assert index.match("how do I bake sourdough bread at home in a cast iron pot") is None


def test_bad_filter_settings_fail_before_anything_is_generated(tmp_path):
    corpus = _corpus_file(tmp_path)
    spec = _spec_file(tmp_path, BASIC_SPEC)
    gen = StubGenerator(_topic_query)
    with pytest.raises(UserError, match="does not exist"):
        synthesize(_opts(tmp_path, corpus, spec, consistency_scorer=str(tmp_path / "no_model")), generator=gen)
    with pytest.raises(UserError, match="Contamination source"):
        synthesize(_opts(tmp_path, corpus, spec, contamination=(str(tmp_path / "no_eval"),)), generator=gen)
    assert gen.calls == [] and not (tmp_path / "out").exists()
