"""Annotation parsers: Charades-STA text and ActivityNet Captions JSON, matched to source files by video id."""

import json

import pytest

from pipelines import annotations as ann
from pipelines.config import GroundingConfig, StorageConfig


def test_charades_sta_lines_with_hashes_in_the_sentence_and_blank_lines():
    text = "AO8RW 0.0 6.9##a person is putting a book on a shelf.\n\nAO8RW 5.1 12.0##person opens the #2 door\n" \
           "Y6R7T 3.20 9.45##the man turns off the light.\n"
    parsed = ann.parse_charades_sta(text, "x.txt")
    assert sorted(parsed) == ["AO8RW", "Y6R7T"]
    assert parsed["AO8RW"][1] == ann.Query("person opens the #2 door", 5.1, 12.0)
    assert parsed["Y6R7T"][0].start == pytest.approx(3.2) and parsed["Y6R7T"][0].duration is None


@pytest.mark.parametrize("line, where", [
    ("AO8RW 0.0 6.9 a person without the separator", "x.txt:2"),
    ("AO8RW zero 6.9##bad start", "x.txt:2"),
    ("AO8RW 7.0 6.9##ends before it starts", "x.txt:2"),
    ("AO8RW 0.0##missing end", "x.txt:2"),
])
def test_charades_sta_errors_name_file_and_line(line, where):
    with pytest.raises(ValueError, match=where):
        ann.parse_charades_sta("AO8RW 0.0 1.0##fine\n" + line + "\n", "x.txt")


def test_activitynet_json_and_id_matching_with_and_without_v_prefix():
    data = {"v_QOlSCBRmfWY": {"duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
                              "sentences": ["A young woman is seen standing.", " She then dances."]}}
    parsed = ann.parse_activitynet(data, "train.json")
    assert parsed["v_QOlSCBRmfWY"] == [ann.Query("A young woman is seen standing.", 0.83, 19.86, 82.73),
                                        ann.Query("She then dances.", 17.37, 60.81, 82.73)]
    assert ann.queries_for("s3://b/anet/v_QOlSCBRmfWY.mp4", parsed) == parsed["v_QOlSCBRmfWY"]
    assert ann.queries_for("/data/QOlSCBRmfWY.mkv", parsed) == parsed["v_QOlSCBRmfWY"]  # saved without v_
    assert ann.queries_for("/data/other.mp4", parsed) == []
    with pytest.raises(ValueError, match="2 timestamps, 1 sentences"):
        ann.parse_activitynet({"v_x": {"duration": 5, "timestamps": [[0, 1], [1, 2]], "sentences": ["a"]}}, "t.json")


def test_load_merges_files_and_matches_the_synthetic_ground_truth(synthetic_corpus, tmp_path):
    cfg = GroundingConfig(annotations=[str(synthetic_corpus.annotation_file(s)) for s in ("train", "test")])
    table = ann.load(cfg, StorageConfig())
    for video in synthetic_corpus.of_kind("grounding"):
        queries = ann.queries_for(str(synthetic_corpus.path(video)), table)
        assert [(q.sentence, q.start, q.end) for q in queries] == [
            (e["sentence"], e["start"], e["end"]) for e in video["events"]]
    # ActivityNet through the same loader
    anet = tmp_path / "anet.json"
    anet.write_text(json.dumps({"v_a": {"duration": 10, "timestamps": [[1, 2]], "sentences": ["s"]}}))
    assert ann.load(GroundingConfig(annotations=[str(anet)], format="activitynet"), StorageConfig()) == {
        "v_a": [ann.Query("s", 1.0, 2.0, 10.0)]}
    assert ann.queries_hash(table["gr_00000"]) != ann.queries_hash(table["gr_00000"][:1])
