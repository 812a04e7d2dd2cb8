"""The from-scratch aid for TVP grounding (tvlt_core.models.tvp_aids): its targets, its loss, that off is the
reference loss bit for bit, that on changes training, and that an export holds no trace of it."""

from __future__ import annotations

import pytest
import torch

from jobs.config import ConfigError, parse
from jobs.finetune_tvp import FinetuneConfig
from tvlt_core.data import StreamingLoader
from tvlt_core.hf_folder import read_folder
from tvlt_core.models.tvp import TvpForVideoGrounding, tvp_loss, tvp_tiny_config
from tvlt_core.models.tvp_aids import TvpForGroundingWithAids, query_token_mask, segment_l1, word_segment_targets
from tvlt_core.text import TextTokenizer, build_vocab
from tvlt_core.train.tasks import TvpGroundingTask

FRAMES, SIZE = 4, 64


def test_targets_keep_only_the_tokens_of_exactly_one_sentence():
    # sentence 0 = tokens {5, 6, 7}, sentence 1 = {5, 8}: 5 is shared, so it names neither moment
    target, mask = word_segment_targets([{5, 6, 7}, {5, 8}], [(0.1, 0.3), (0.6, 0.9)], vocab_size=10)
    assert mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 0]
    assert target[6].tolist() == target[7].tolist() == pytest.approx([0.1, 0.3])
    assert target[8].tolist() == pytest.approx([0.6, 0.9])
    assert target[5].tolist() == [0, 0]
    with pytest.raises(ValueError, match="2 sentences but 1 segments"):
        word_segment_targets([{1}, {2}], [(0.0, 1.0)], vocab_size=4)


def test_query_token_mask_marks_the_querys_own_tokens_wherever_they_sit():
    input_ids = torch.tensor([[2, 5, 6, 3, 0], [2, 9, 5, 3, 0]])
    assert query_token_mask(input_ids, [{6}, {9, 5}]).tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0]]


def test_loss_is_the_mean_l1_over_masked_tokens_only():
    predicted = torch.tensor([[[0.2, 0.4], [0.9, 0.9]]])
    target = torch.tensor([[[0.1, 0.3], [0.0, 0.0]]])
    assert segment_l1(predicted, target, torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.1)
    assert segment_l1(predicted, target, torch.zeros(1, 2)).item() == 0.0  # nothing to learn from


@pytest.fixture
def grounding_batches(shard_writer, grounding_sentences, tmp_path):
    """(tokenizer, a function that returns the loader's first batch for a task's batcher)."""
    url = shard_writer(tmp_path / "g", counts=[4], frames=6, size=SIZE, grounding=True)
    tokenizer = TextTokenizer.from_vocab(build_vocab(grounding_sentences, vocab_size=60), max_text_length=12)
    tokenizer.save(str(tmp_path / "tok"))

    def first_batch(task: TvpGroundingTask, model):
        loader = StreamingLoader(url, task.batcher(model), batch_size=4, shuffle_buffer=1)
        return next(iter(loader))

    return tokenizer, str(tmp_path / "tok"), first_batch


def make_task(tokenizer_dir: str, vocab_size: int, weight: float, query_weight: float = 0.0) -> TvpGroundingTask:
    config = tvp_tiny_config(num_frames=FRAMES, max_img_size=SIZE, visual_prompt_size=8, vocab_size=vocab_size,
                             distance_loss_floor=0.0, duration_loss_floor=0.0)  # fmt: skip
    return TvpGroundingTask(model_config=config, tokenizer_dir=tokenizer_dir, max_text_length=12,
                            word_segment_weight=weight, query_token_weight=query_weight)  # fmt: skip


def test_batches_carry_each_videos_targets_when_the_aid_is_on(grounding_batches):
    tokenizer, folder, first_batch = grounding_batches
    off = make_task(folder, tokenizer.vocab_size, 0.0)
    assert "word_segments" not in first_batch(off, off.build_model())
    on = make_task(folder, tokenizer.vocab_size, 1.0)
    batch = first_batch(on, on.build_model())
    assert batch["word_segments"].shape == (4, tokenizer.vocab_size, 2)
    assert batch["word_segment_mask"].shape == (4, tokenizer.vocab_size)
    # the fixture's videos have two sentences; a token found in one of them only carries that sentence's segment
    assert (batch["word_segment_mask"].sum(1) > 0).all()
    masked = batch["word_segments"][batch["word_segment_mask"] > 0]
    assert ((0 <= masked) & (masked <= 1)).all() and (masked[:, 0] < masked[:, 1]).all()
    # the query's own tokens: in its sentence, and in none of the video's other sentences
    own = batch["query_token_mask"]
    assert own.shape == batch["input_ids"].shape and (own.sum(1) > 0).all()
    for i, sentence in enumerate(batch["sentences"]):
        marked = set(batch["input_ids"][i][own[i] > 0].tolist())
        assert marked <= tokenizer.word_ids(sentence)
        assert all(batch["word_segment_mask"][i, t] == 1 for t in marked)  # found once in the video: its own


def test_off_is_the_reference_loss_bit_for_bit(grounding_batches):
    tokenizer, folder, first_batch = grounding_batches
    task = make_task(folder, tokenizer.vocab_size, 0.0)
    torch.manual_seed(0)
    model = task.build_model().eval()
    assert type(model) is TvpForVideoGrounding
    batch = first_batch(task, model)
    loss, parts, out = task.forward(model, batch, torch.device("cpu"), torch.float32)
    c = model.config
    reference = tvp_loss(out.logits, batch["labels"], c.distance_loss_weight, c.duration_loss_weight,
                         c.distance_loss_floor, c.duration_loss_floor).mean()  # fmt: skip
    assert torch.equal(loss, reference)
    assert "word_segment_loss" not in parts
    # the aided model starts from the same draws: the same grounding weights and the same reference loss beside its aid
    torch.manual_seed(0)
    aided = make_task(folder, tokenizer.vocab_size, 1.0, 0.5).build_model().eval()
    plain_state = model.state_dict()
    assert set(TvpForGroundingWithAids.grounding_state(aided.state_dict())) == set(plain_state)
    assert all(torch.equal(v, plain_state[k]) for k, v in TvpForGroundingWithAids.grounding_state(aided.state_dict()).items())
    aided_task = make_task(folder, tokenizer.vocab_size, 1.0, 0.5)
    aided_loss, aided_parts, _ = aided_task.forward(aided, first_batch(aided_task, aided), torch.device("cpu"), torch.float32)
    assert torch.equal(aided_parts["grounding_loss"], reference)
    expected = reference + aided_parts["word_segment_loss"] + 0.5 * aided_parts["query_token_loss"]
    assert torch.allclose(aided_loss, expected, rtol=0, atol=1e-6) and aided_parts["query_token_loss"] > 0


def train(task: TvpGroundingTask, batch_of, steps: int) -> tuple[TvpForVideoGrounding, list[dict[str, float]]]:
    torch.manual_seed(0)
    model = task.build_model().train()
    batch = batch_of(task, model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        loss, parts, _ = task.forward(model, batch, torch.device("cpu"), torch.float32)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    return model, history


@pytest.mark.parametrize("weights, aid", [((1.0, 0.0), "word_segment_loss"), ((0.0, 1.0), "query_token_loss")])
def test_on_changes_training_and_its_loss_falls(grounding_batches, weights, aid):
    tokenizer, folder, first_batch = grounding_batches
    plain, _ = train(make_task(folder, tokenizer.vocab_size, 0.0), first_batch, 30)
    aided, history = train(make_task(folder, tokenizer.vocab_size, *weights), first_batch, 30)
    # the aid's gradient reaches the visual path: the backbone ends elsewhere than the reference recipe's
    key = "model.vision_model.backbone.embedder.embedder.convolution.weight"
    plain_state, aided_state = plain.state_dict(), aided.state_dict()
    assert key in plain_state and not torch.allclose(plain_state[key], aided_state[key])
    first, last = history[0][aid], history[-1][aid]
    assert last < 0.5 * first, history


def test_an_export_is_the_reference_layout(grounding_batches, tmp_path):
    tokenizer, folder, _ = grounding_batches
    task = make_task(folder, tokenizer.vocab_size, 1.0, 1.0)
    aided = task.build_model()
    aided.save_pretrained(str(tmp_path / "out"), state_dict=aided.state_dict())  # as the run's export calls it
    config, exported = read_folder(str(tmp_path / "out"))
    assert {k.split(".")[0] for k in aided.state_dict()} - {k.split(".")[0] for k in exported} == {
        "word_segment_head", "query_token_head"}
    assert set(exported) == set(TvpForVideoGrounding(aided.config).state_dict())
    assert config["architectures"] == ["TvpForVideoGrounding"]
    loaded = TvpForVideoGrounding.from_pretrained(str(tmp_path / "out"))  # strict: no missing or extra name
    assert torch.equal(loaded.state_dict()["video_grounding_head.layer_1.weight"],
                       aided.state_dict()["video_grounding_head.layer_1.weight"])  # fmt: skip


def test_the_aid_is_off_by_default_and_a_bad_weight_names_the_setting():
    base = ["--data.manifest", "work/shards/grounding"]
    assert parse(FinetuneConfig, base + ["--config", "tvp_tiny"], prog="finetune_tvp").aids.word_segment_weight == 0.0
    assert parse(FinetuneConfig, base + ["--config", "tvp_base"], prog="finetune_tvp").aids.word_segment_weight == 0.0
    for name in ("word_segment_weight", "query_token_weight"):
        with pytest.raises(ConfigError, match=f"aids.{name}"):
            parse(FinetuneConfig, base + [f"--aids.{name}", "-1"], prog="finetune_tvp")
