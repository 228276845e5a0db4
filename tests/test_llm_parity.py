"""SmolLM2-135M-Instruct: our Flax model and tokenizer against transformers.

The reference is transformers' PyTorch Llama loaded through transformers'
own GGUF reader (`from_pretrained(dir, gguf_file=...)`), so the dequantized
weights and the q/k row un-permutation are checked independently of our
loader. Known pitfalls of that reference (RESOURCES.md) are asserted rather
than assumed: rope theta 1e5 and an lm_head tied to the embeddings.
"""

import functools

import jax
import numpy as np
import pytest
import torch
import transformers

from ilm_jax import decoding, resources
from ilm_jax.models import llm, llm_loading

pytestmark = [pytest.mark.slow, pytest.mark.reference]

PROMPTS = [
  "The capital of France is",
  "Toy Story (1995) is an animated film about",
  "<|im_start|>user\nRecommend a movie like Heat (1995).<|im_end|>\n"
  "<|im_start|>assistant\n",
  "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def gguf_path():
  (path,) = resources.fetch(resources.SMOLLM2_135M_INSTRUCT).values()
  return path


@pytest.fixture(scope="module")
def ours():
  return llm_loading.load_pretrained("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(gguf_path):
  # One torch thread: with two, torch's thread pool stalls for seconds per
  # call when other processes share this machine's two cores.
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  model = transformers.AutoModelForCausalLM.from_pretrained(
    gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
  )
  yield model.eval()
  torch.set_num_threads(threads)


@functools.partial(jax.jit, static_argnames="model")
def forward(model, params, ids, mask):
  return model.apply({"params": params}, input_ids=ids, attention_mask=mask)[0]


def test_reference_is_configured_like_the_checkpoint(reference, ours):
  config, _, _ = ours
  assert reference.config.rope_theta == config.rope_theta == 100_000.0
  assert (
    reference.lm_head.weight.data_ptr()
    == reference.model.embed_tokens.weight.data_ptr()
  )
  assert config.tie_word_embeddings
  assert (
    config.num_layers,
    config.hidden_size,
    config.num_heads,
    config.num_kv_heads,
    config.vocab_size,
  ) == (30, 576, 9, 3, 49152)


def test_logits_match_reference_on_padded_batch(reference, ours):
  config, params, tokenizer = ours
  ids, mask = tokenizer.encode_batch(PROMPTS, add_special_tokens=False)
  assert (mask == 0).any()  # the batch is really padded
  logits = np.asarray(forward(llm.Llama(config), params, ids, mask))
  positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
  with torch.no_grad():
    expected = reference(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      position_ids=torch.from_numpy(positions).long(),
    ).logits.numpy()
  real = mask.astype(bool)
  assert np.abs(expected[real]).max() > 10  # real logits, not near zero
  np.testing.assert_allclose(logits[real], expected[real], atol=1e-3, rtol=0)


def test_greedy_generation_matches_reference(reference, ours):
  config, params, tokenizer = ours
  chat = tokenizer.apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}]
  )
  ids, mask = tokenizer.encode_batch(
    ["The capital of France is", chat], add_special_tokens=False
  )
  out = np.asarray(
    decoding.greedy(
      llm.Llama(config),
      params,
      prompt_ids=ids,
      prompt_mask=mask,
      max_new_tokens=8,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
    )
  )
  with torch.no_grad():
    expected = reference.generate(
      input_ids=torch.from_numpy(ids).long(),
      attention_mask=torch.from_numpy(mask).long(),
      do_sample=False,
      max_new_tokens=8,
      eos_token_id=2,
      pad_token_id=2,
    )[:, ids.shape[1] :]
  expected = np.pad(
    expected.numpy(), ((0, 0), (0, 8 - expected.shape[1])), constant_values=2
  )
  np.testing.assert_array_equal(out, expected)
  completion = tokenizer.decode(out[0])
  assert completion.startswith(" Paris")
  assert tokenizer.decode(out[1]) == "The capital of France is Paris."


def test_tokenizer_matches_reference(gguf_path, ours):
  _, _, tokenizer = ours
  ref = transformers.AutoTokenizer.from_pretrained(
    gguf_path.parent, gguf_file=gguf_path.name
  )
  texts = PROMPTS + [
    "Ünïcödé café — naïve 日本語 😀  double  spaces\n\n\ttab",
    "It's 2024; 3.14159 x=42 <|im_end|> trailing ",
  ]
  for text in texts:
    assert tokenizer.encode(text) == ref.encode(text, add_special_tokens=False)
    assert (
      tokenizer.decode(tokenizer.encode(text), skip_special_tokens=False)
      == text
    )
  messages = [{"role": "user", "content": "Hi!"}]
  assert tokenizer.apply_chat_template(messages) == ref.apply_chat_template(
    messages, tokenize=False, add_generation_prompt=True
  )
  # transformers' GGUF tokenizer takes eos = <|im_start|> and no pad; the
  # model's turn actually ends with <|im_end|>.
  assert tokenizer.eos_id == tokenizer.token_to_id("<|im_end|>") == 2
  assert tokenizer.pad_id == 2 and tokenizer.bos_id == 1
  assert not tokenizer.add_bos
