"""Phase-2 prompts: soft-token positions, truncation, templates, tasks."""

import json

import jinja2
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from ilm_jax.data import ilm_tasks, processing, prompts, synthetic
from ilm_jax.models import llm_tokenizer
from tests import data_helpers

_CHAT = (
  "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
  "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>"
  "assistant {% endif %}"
)
_WORDS = [
  "<pad>",
  "<|im_start|>",
  "<|im_end|>",
  "user",
  "assistant",
  "watched",
  ",",
  ".",
  "A",
  "B",
  "C",
  "the",
  "Describe",
  "[UNK]",
]


def _tokenizer():
  """A word-level tokenizer whose ids are easy to check by hand."""
  vocab = {w: i for i, w in enumerate(_WORDS)}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(
    [
      tokenizers.AddedToken(t, special=True)
      for t in ("<pad>", "<|im_start|>", "<|im_end|>")
    ]
  )
  return llm_tokenizer.LlmTokenizer(
    tok, eos_id=2, pad_id=0, chat_template=_CHAT
  )


def test_chat_template_is_compiled_once_and_follows_a_replaced_template():
  """Prompts render from one compiled template (compiling it per prompt
  cost 5.8 of 6.9 ms a training prompt); the text is the hand-written one,
  and a tokenizer given another template renders that one."""
  llm_tokenizer._compiled_chat_template.cache_clear()
  tok = _tokenizer()
  messages = [{"role": "user", "content": "watched A"}]
  for _ in range(3):
    assert tok.apply_chat_template(messages) == (
      "<|im_start|>user watched A<|im_end|><|im_start|>assistant "
    )
  info = llm_tokenizer._compiled_chat_template.cache_info()
  assert (info.misses, info.hits) == (1, 2)
  tok.chat_template = "{{ messages[0]['content'] }}!"
  assert tok.apply_chat_template(messages) == "watched A!"
  assert llm_tokenizer._compiled_chat_template.cache_info().misses == 2
  tok.chat_template = "{{ raise_exception('no system role') }}"
  with pytest.raises(jinja2.exceptions.TemplateError, match="no system role"):
    tok.apply_chat_template(messages)


def _ids(*words):
  return [_WORDS.index(w) for w in words]


def _encoder(**kwargs):
  options = dict(tokens_per_entity=2, max_len=20, max_entities=4)
  options.update(kwargs)
  return prompts.PromptEncoder(_tokenizer(), ["A", "B", "C"], **options)


REQUEST = prompts.Request(
  "sequential",
  "{user} watched {history} .",
  user=7,
  history=(0, 1),
  target_text="B",
  target_item=1,
)


def test_soft_tokens_land_exactly_at_placeholders():
  out = _encoder().encode(REQUEST)
  pad = 0
  expected_ids = (
    _ids("<|im_start|>", "user")
    + [pad, pad]
    + _ids("watched")
    + [pad, pad]
    + _ids(",")
    + [pad, pad]
    + _ids(".", "<|im_end|>", "<|im_start|>", "assistant", "B", "<|im_end|>")
  )
  n = len(expected_ids)  # 16
  np.testing.assert_array_equal(out["input_ids"][:n], expected_ids)
  np.testing.assert_array_equal(
    out["soft_entity"][:n],
    [-1, -1, 0, 0, -1, 1, 1, -1, 2, 2, -1, -1, -1, -1, -1, -1],
  )
  np.testing.assert_array_equal(
    out["soft_slot"][[2, 3, 5, 6, 8, 9]], [0, 1, 0, 1, 0, 1]
  )
  np.testing.assert_array_equal(
    out["entity_kind"], [prompts.USER, prompts.ITEM, prompts.ITEM, 0]
  )
  np.testing.assert_array_equal(out["entity_index"], [7, 0, 1, 0])
  np.testing.assert_array_equal(out["entity_mask"], [1, 1, 1, 0])
  assert (
    out["attention_mask"].sum() == n and not out["attention_mask"][n:].any()
  )
  # Loss only where the next token is the answer ("B", then eos).
  assert list(np.flatnonzero(out["loss_mask"])) == [13, 14]
  np.testing.assert_array_equal(
    out["targets"][[13, 14]], _ids("B", "<|im_end|>")
  )


def test_generation_prompt_is_left_padded_without_target():
  out = _encoder().encode(REQUEST, with_target=False)
  n = 14  # the 16 tokens above minus the answer and eos
  assert not out["attention_mask"][: 20 - n].any()
  assert out["attention_mask"][20 - n :].all()
  np.testing.assert_array_equal(
    out["input_ids"][-2:], _ids("<|im_start|>", "assistant")
  )
  assert out["soft_entity"][20 - n + 2] == 0
  assert not out["loss_mask"].any()
  assert out["target_item"] == 1


def test_history_longer_than_context_drops_oldest_and_counts():
  encoder = _encoder(max_len=13)
  out = encoder.encode(REQUEST)
  # One history item (3 tokens with its separator) had to go: item 0.
  assert encoder.stats.history_items_truncated == 1
  np.testing.assert_array_equal(out["entity_index"][:2], [7, 1])
  assert out["attention_mask"].sum() == 13


# REQUEST in text-only mode: titles as text, "the user" for the user.
TEXT_ONLY_IDS = _ids(
  "<|im_start|>",
  "user",
  "the",
  "user",
  "watched",
  "A",
  ",",
  "B",
  ".",
  "<|im_end|>",
  "<|im_start|>",
  "assistant",
  "B",
  "<|im_end|>",
)


def test_text_only_mode_writes_titles_and_no_soft_tokens():
  out = _encoder(soft_tokens=False).encode(REQUEST)
  n = int(out["attention_mask"].sum())
  assert (out["soft_entity"] == -1).all() and not out["entity_mask"].any()
  np.testing.assert_array_equal(out["input_ids"][:n], TEXT_ONLY_IDS)


def test_learned_prompt_mode_opens_the_request_with_its_soft_tokens():
  out = _encoder(soft_tokens=False, learned_prompt=True).encode(REQUEST)
  n = int(out["attention_mask"].sum())
  # <|im_start|> user [prompt slot 0] [prompt slot 1] the user watched ...
  np.testing.assert_array_equal(out["soft_entity"][:n][:5], [-1, -1, 0, 0, -1])
  np.testing.assert_array_equal(out["soft_slot"][2:4], [0, 1])
  assert (out["soft_entity"][4:] == -1).all()
  np.testing.assert_array_equal(out["entity_mask"], [True, False, False, False])
  assert out["entity_kind"][0] == prompts.PROMPT
  pad = _ids("<pad>")
  np.testing.assert_array_equal(
    out["input_ids"][:n], TEXT_ONLY_IDS[:2] + pad * 2 + TEXT_ONLY_IDS[2:]
  )


def test_unknown_placeholder_names_file_task_and_placeholder(tmp_path):
  bad = json.loads(prompts.DEFAULT_TEMPLATES.read_text())
  bad["description"]["seen"][3] = "Describe {film}."
  path = tmp_path / "prompts.json"
  path.write_text(json.dumps(bad))
  with pytest.raises(
    prompts.TemplateError,
    match=r"task 'description', seen template 3: unknown "
    r"placeholder \{film\}",
  ):
    prompts.load_templates(path)


def test_packaged_templates_have_ten_seen_and_one_unseen_per_task():
  templates = prompts.load_templates()
  assert set(templates) == set(ilm_tasks.TASKS)
  for task in templates.values():
    assert len(task.seen) >= 10 and len(task.unseen) == 1
    assert not set(task.unseen) & set(task.seen)


def test_training_requests_use_train_part_only_and_are_deterministic():
  dataset = processing.process(synthetic.generate())
  sampler = ilm_tasks.TaskSampler(
    dataset,
    prompts.load_templates(),
    max_history=5,
    seed=3,
    task_weights=dict(
      sequential=1, straightforward=1, description=1, conversation=1, title=1
    ),
  )
  seen_tasks = set()
  for index in range(200):
    request = sampler.training_request(index)
    assert request == sampler.training_request(index)
    seen_tasks.add(request.task)
    if request.task in ilm_tasks.ITEM_TASKS:
      item = request.item
      assert request.target_item == item
      expected = (
        dataset.item_texts
        if request.task == "description"
        else dataset.item_titles
      )[item]
      assert request.target_text == expected
      continue
    user = request.user
    if request.task == "conversation":
      user = next(
        u
        for u in range(dataset.num_users)
        if set(request.liked) <= set(data_helpers.train_sequence(dataset, u))
        and request.target_item in data_helpers.train_sequence(dataset, u)
      )
    train_items = set(data_helpers.train_sequence(dataset, user).tolist())
    assert request.target_item in train_items
    assert set(request.history) <= train_items
  assert seen_tasks == set(ilm_tasks.TASKS)


def test_a_weighted_task_without_templates_is_refused_by_name():
  dataset = processing.process(synthetic.generate())
  templates = prompts.load_templates()
  del templates["title"]
  with pytest.raises(ValueError, match=r"\['title'\] a positive weight"):
    ilm_tasks.TaskSampler(
      dataset,
      templates,
      max_history=3,
      task_weights=dict(sequential=1, title=0.5),
    )
  # Weight 0 (the default config) needs no templates.
  ilm_tasks.TaskSampler(
    dataset, templates, max_history=3, task_weights=dict(sequential=1, title=0)
  )


def test_title_evaluation_request_asks_for_the_title_alone():
  dataset = processing.process(synthetic.generate())
  sampler = ilm_tasks.TaskSampler(
    dataset, prompts.load_templates(), max_history=3, task_weights={"title": 1}
  )
  request = sampler.evaluation_request("title", 7, "test", unseen=True)
  assert request.item == 7 and request.user == -1
  assert request.target_text == dataset.item_titles[7]
  assert request.template == prompts.load_templates()["title"].unseen[0]


def test_evaluation_request_targets_follow_the_split():
  dataset = processing.process(synthetic.generate())
  sampler = ilm_tasks.TaskSampler(
    dataset,
    prompts.load_templates(),
    max_history=4,
    task_weights={"sequential": 1},
  )
  sequence = dataset.sequence(3)
  test = sampler.evaluation_request("sequential", 3, "test", unseen=True)
  assert test.target_item == sequence[-1]
  assert test.history == tuple(sequence[-5:-1])
  assert test.template == prompts.load_templates()["sequential"].unseen[0]
  valid = sampler.evaluation_request("sequential", 3, "valid", unseen=False)
  assert valid.target_item == sequence[-2]
  assert valid.history == tuple(sequence[-6:-2])


def test_a_user_row_replaces_the_user_id_in_the_soft_token_slots():
  plain = _encoder(num_users=20).encode(REQUEST)
  moved = _encoder(num_users=20).encode(
    prompts.Request(**{**REQUEST.__dict__, "user_row": 12})
  )
  user_slots = plain["entity_kind"] == prompts.USER
  assert user_slots.sum() == 1
  assert plain["entity_index"][user_slots] == [7]
  assert moved["entity_index"][user_slots] == [12]
  np.testing.assert_array_equal(
    moved["entity_index"][~user_slots], plain["entity_index"][~user_slots]
  )


def test_sequence_user_state_rows_are_the_state_before_the_target():
  """user_state='sequence': {user} is row num_users + p, where p is the
  target's position in sequence_items (training: inside the training
  part; valid and test: items[-2] and items[-1]); straightforward asks
  for the item at p too. 'user' keeps the user's own row."""
  dataset = processing.process(synthetic.generate())
  weights = dict(sequential=1, straightforward=1)
  kwargs = dict(max_history=4, seed=5, task_weights=weights)
  templates = prompts.load_templates()
  by_user = ilm_tasks.TaskSampler(dataset, templates, **kwargs)
  by_state = ilm_tasks.TaskSampler(
    dataset, templates, user_state="sequence", **kwargs
  )
  offsets, items = dataset.sequence_offsets, dataset.sequence_items
  tasks = set()
  for index in range(100):
    plain, request = (
      by_user.training_request(index),
      by_state.training_request(index),
    )
    tasks.add(request.task)
    assert plain.user_row == -1 and plain.user_index == plain.user
    assert request.user == plain.user
    p = request.user_row - dataset.num_users
    assert offsets[request.user] < p < offsets[request.user + 1] - 2
    assert request.target_item == items[p]
    if request.task == "sequential":
      assert request.history == tuple(
        items[max(offsets[request.user], p - 4) : p]
      )
  assert tasks == set(weights)
  for split, back in (("valid", 2), ("test", 1)):
    request = by_state.evaluation_request("straightforward", 3, split, False)
    p = offsets[4] - back
    assert request.user_row == dataset.num_users + p
    assert request.target_item == items[p]
    np.testing.assert_array_equal(
      by_state.split_user_rows(split, np.array([3, 0])),
      [dataset.num_users + p, dataset.num_users + offsets[1] - back],
    )
    np.testing.assert_array_equal(
      by_user.split_user_rows(split, np.array([3, 0])), [3, 0]
    )
  with pytest.raises(ValueError, match=r"user_state='state'; allowed"):
    ilm_tasks.TaskSampler(dataset, templates, user_state="state", **kwargs)


def test_titles_that_do_not_round_trip_are_reported_at_trie_build(caplog):
  from ilm_jax.evaluators import generative  # noqa: PLC0415

  titles = ["A B", "A Zebra", "C", "A  B"]  # unknown word; a duplicate
  with caplog.at_level("WARNING"):
    trie, report = generative.build_title_trie(_tokenizer(), titles)
  assert report == dict(titles=4, not_round_trip=2, duplicate_token_sequences=1)
  assert "A Zebra" in caplog.text and "(0, 3)" in caplog.text
  # Reported, not dropped: every title (with eos) is still a trie path;
  # the root's child "A" continues with "B" or "[UNK]".
  a = trie.edge_targets[list(trie.edge_tokens[: trie.offsets[1]]).index(8)]
  children = trie.edge_tokens[trie.offsets[a] : trie.offsets[a + 1]]
  assert sorted(children) == sorted(_ids("B", "[UNK]"))
  assert (trie.sequence_ids >= 0).sum() == 3  # the duplicate shares a leaf


def test_answer_positions_list_the_scored_positions_in_order():
  # The REQUEST's answer "B <eos>" is predicted at positions 13 and 14.
  out = _encoder(max_answer_tokens=4).encode(REQUEST)
  np.testing.assert_array_equal(out["answer_positions"], [13, 14, 0, 0])
  assert not out["loss_mask"][0]  # padding slots point at a masked position
  # Narrower than the answer: only the first positions are scored.
  out = _encoder(max_answer_tokens=1).encode(REQUEST)
  np.testing.assert_array_equal(out["answer_positions"], [13])


def test_per_task_lengths_shape_each_task_and_name_a_missing_task():
  encoder = _encoder(
    max_len={"sequential": 18, "description": 30},
    max_answer_tokens={"sequential": 2, "description": 5},
  )
  out = encoder.encode(REQUEST)
  assert out["input_ids"].shape == (18,) and out["answer_positions"].shape == (
    2,
  )
  # Left-padded generation layout takes the task's length too.
  gen = encoder.encode(REQUEST, with_target=False)
  assert gen["input_ids"].shape == (18,) and gen["attention_mask"][-14:].all()
  with pytest.raises(ValueError, match="no entry for task 'conversation'"):
    encoder.encode(
      prompts.Request("conversation", "I liked {liked} .", liked=(0,))
    )


def _sampler(**weights):
  dataset = processing.process(synthetic.generate())
  return ilm_tasks.TaskSampler(
    dataset,
    prompts.load_templates(),
    max_history=3,
    seed=5,
    task_weights=weights
    or dict(
      sequential=1, straightforward=1, description=1, conversation=1, title=1
    ),
  )


def _dataset_encoder(sampler):
  """The word-level encoder over every item of the sampler's dataset."""
  titles = ["A B C"[2 * (i % 3)] for i in range(sampler.dataset.num_items)]
  return prompts.PromptEncoder(
    _tokenizer(), titles, tokens_per_entity=2, max_len=200, max_entities=6
  )


def test_one_task_batches_share_their_group_task_in_order():
  sampler = _sampler()
  encoder = _dataset_encoder(sampler)
  examples = ilm_tasks.training_prompts(sampler, encoder, 64, group_size=8)
  tasks = [ilm_tasks.TASKS[int(t)] for t in examples.gather(range(32))["task"]]
  for group in range(4):
    expected = sampler.task_of_group(group)
    assert tasks[8 * group : 8 * group + 8] == [expected] * 8
  # The unshuffled iterator keeps consecutive examples in one batch.
  from ilm_jax.data import pipeline  # noqa: PLC0415

  iterator = pipeline.training_iterator(examples, 8, seed=0, shuffle=False)
  for group in range(3):
    batch = next(iterator)
    assert set(batch["task"].tolist()) == {
      ilm_tasks.TASKS.index(sampler.task_of_group(group))
    }
  # Two processes, each with half of every global batch of 8: both halves
  # of batch b are examples of group b, so they share its task.
  for process_index in range(2):
    half = pipeline.training_iterator(
      examples, 4, 0, process_index, 2, shuffle=False
    )
    for group in range(10):  # past the 8 batches of an epoch
      assert set(next(half)["task"].tolist()) == {
        ilm_tasks.TASKS.index(sampler.task_of_group(group % 8))
      }
  # Over many groups the tasks follow the weights (all four appear).
  drawn = {sampler.task_of_group(g) for g in range(200)}
  assert drawn == set(ilm_tasks.TASKS)


def test_task_lengths_are_the_rounded_longest_sample_within_the_caps():
  sampler = _sampler(sequential=1)
  encoder = _dataset_encoder(sampler)
  lengths, answers = ilm_tasks.task_lengths(
    sampler, encoder, max_len=200, max_answer_tokens=3, samples=20, multiple=8
  )
  assert set(lengths) == set(ilm_tasks.TASKS)  # every task with templates
  for task in ilm_tasks.TASKS:
    longest = 0
    for index in range(20):
      out = encoder.encode(sampler.training_request(index, task=task))
      answer = int(out["loss_mask"].sum())
      longest = max(
        longest, int(out["attention_mask"].sum()) - answer + min(answer, 3)
      )
    assert lengths[task] == min(200, -(-longest // 8) * 8)
    assert answers[task] == 3  # every answer has >= 3 tokens; capped at 3
  assert encoder.stats == prompts.EncodeStats()  # measuring is not counted


def test_generation_batches_drop_all_padding_columns_in_steps():
  from ilm_jax.evaluators import generative  # noqa: PLC0415

  mask = np.zeros((2, 40), bool)
  mask[0, -20:] = True
  mask[1, -5:] = True
  batch = dict(
    input_ids=np.arange(80).reshape(2, 40),
    soft_entity=np.zeros((2, 40)),
    soft_slot=np.zeros((2, 40)),
    attention_mask=mask,
    entity_kind=np.zeros((2, 3)),
  )
  out = generative.trim_left_padding(batch, 16)
  # Longest prompt 20 tokens -> 32 columns (steps of 16), the last ones.
  assert out["input_ids"].shape == (2, 32)
  np.testing.assert_array_equal(out["input_ids"][0], np.arange(8, 40))
  np.testing.assert_array_equal(out["attention_mask"], mask[:, 8:])
  assert out["entity_kind"].shape == (2, 3)  # not a token axis


def _templates_file(tmp_path, task, template):
  raw = json.loads(prompts.DEFAULT_TEMPLATES.read_text())
  raw[task] = dict(raw[task], seen=[template])
  path = tmp_path / "templates.json"
  path.write_text(json.dumps(raw))
  return path


def test_a_placeholder_the_task_never_fills_is_rejected_at_load(tmp_path):
  path = _templates_file(tmp_path, "description", "Describe {item} for {user}.")
  with pytest.raises(prompts.TemplateError) as error:
    prompts.load_templates(path)
  message = str(error.value)
  assert str(path) in message and "'description'" in message
  assert "unfilled placeholder {user}" in message and "allows {item}" in message


def test_unknown_task_in_a_templates_file_is_named(tmp_path):
  raw = json.loads(prompts.DEFAULT_TEMPLATES.read_text())
  raw["sequentail"] = raw["sequential"]
  path = tmp_path / "templates.json"
  path.write_text(json.dumps(raw))
  with pytest.raises(prompts.TemplateError, match="unknown task 'sequentail'"):
    prompts.load_templates(path)


@pytest.mark.parametrize(
  "template, kind",
  [("{user} liked {movie} .", "unknown"), ("{user} and {item} .", "unfilled")],
)
def test_encode_rejects_bad_placeholders_without_load_templates(template, kind):
  request = prompts.Request("sequential", template, user=1, history=(0,))
  with pytest.raises(prompts.TemplateError, match=f"{kind} placeholder"):
    _encoder().encode(request)


@pytest.mark.parametrize(
  "changes, message",
  [
    (dict(history=(0, 3)), r"\{history\} id 3 is out of range .*< 3"),
    (dict(history=(-1,)), r"\{history\} id -1"),
    (dict(user=-1), r"\{user\} id -1 is out of range \(ids are >= 0 and"),
    (dict(user=5), r"\{user\} id 5 is out of range .*< 5"),
    (dict(user=1, user_row=9), r"\{user\} id 9 is out of range .*< 5"),
  ],
)
def test_out_of_range_entity_ids_are_errors_never_clipped(changes, message):
  request = prompts.Request(**{**REQUEST.__dict__, **changes})
  with pytest.raises(ValueError, match=message):
    _encoder(num_users=5).encode(request)


def test_empty_history_is_counted_and_warned(caplog):
  encoder = _encoder()
  request = prompts.Request(**{**REQUEST.__dict__, "history": ()})
  with caplog.at_level("WARNING"):
    out = encoder.encode(request)
  assert encoder.stats.empty_histories == 1
  assert "empty history" in caplog.text
  assert out["entity_mask"].sum() == 1  # the user only
  encoder.encode(REQUEST)
  assert encoder.stats.empty_histories == 1
