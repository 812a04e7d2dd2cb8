"""The vocabulary command: annotation files in, a tokenizer folder out that covers every sentence."""

from __future__ import annotations

import json

import pytest
import torch

from jobs.build_vocab import main
from tvlt_core.models.tvp import TvpForVideoGrounding, tvp_tiny_config
from tvlt_core.text import TextTokenizer

CHARADES = [
    "vid0 0.00 3.50##A red circle spins.",
    "vid0 4.00 9.25##The red circle turns blue, then stops",
    "vid1 1.50 6.00##a green square slides left",
]
ACTIVITYNET = {
    "v_x": {"duration": 20.0, "timestamps": [[0.0, 5.0], [6.5, 19.0]],
            "sentences": ["A yellow triangle bounces twice.", "The triangle fades out"]},
}


@pytest.fixture
def annotations(tmp_path):
    charades = tmp_path / "charades_sta_train.txt"
    charades.write_text("\n".join(CHARADES) + "\n")
    anet = tmp_path / "train.json"
    anet.write_text(json.dumps(ACTIVITYNET))
    return charades, anet


def test_builds_a_tokenizer_that_covers_every_sentence(tmp_path, annotations, capsys):
    out = tmp_path / "vocab"
    summary = main(["--annotations", *map(str, annotations), "--out", str(out), "--max-text-length", "12"])
    assert {"vocab.txt", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert summary.sentences == 5 and summary.with_unknown == 0 and summary.truncated == 0
    assert f"set the model's vocab_size to {summary.vocab_size}" in capsys.readouterr().out

    tokenizer = TextTokenizer.from_folder(str(out), max_text_length=12)
    assert tokenizer.vocab_size == summary.vocab_size == len((out / "vocab.txt").read_text().splitlines())
    sentences = [line.split("##", 1)[1] for line in CHARADES] + ACTIVITYNET["v_x"]["sentences"]
    batch = tokenizer(sentences)
    assert batch["input_ids"].shape == (5, 12)
    assert int(batch["attention_mask"].sum(1).max()) == summary.longest_tokens
    assert tokenizer.decode(batch["input_ids"][2].tolist()) == "a green square slides left"

    # The ids index a model sized by the printed vocab_size.
    config = tvp_tiny_config(vocab_size=summary.vocab_size, num_frames=2, max_img_size=64, visual_prompt_size=8)
    model = TvpForVideoGrounding(config).eval()
    with torch.no_grad():
        logits = model(batch["input_ids"], torch.zeros(5, 2, 3, 64, 64), batch["attention_mask"]).logits
    assert logits.shape == (5, 2)


def test_reports_truncation_and_writes_to_urls(annotations):
    summary = main(["--annotations", str(annotations[0]), "--out", "memory://vocab-test/tok", "--max-text-length", "5"])
    assert summary.truncated == 3  # every Charades sentence is longer than 3 words + [CLS] + [SEP]
    assert TextTokenizer.from_folder("memory://vocab-test/tok", max_text_length=5).vocab_size == summary.vocab_size


def test_rejects_files_without_sentences(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no sentences"):
        main(["--annotations", str(empty), "--out", str(tmp_path / "out")])
