"""MiniLM branch: tokenizer, loader and encoder against independent references."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from ilm_jax.models import bert
from tests import references

SENTENCES = [
  "The Shawshank Redemption (1994): two imprisoned men bond over years.",
  "Toy Story",
  "Amélie is a whimsical French comedy, isn't it?",
  "hello world",
]


@pytest.fixture(scope="module")
def tokenizer():
  return bert.WordPieceTokenizer.from_pretrained(max_length=24)


def test_tokenizer_known_ids_and_padding(tokenizer):
  encoded = tokenizer.encode(["hello world", "Toy Story"])
  # bert-base-uncased vocab: hello=7592, world=2088, toy=9121, story=2466.
  np.testing.assert_array_equal(encoded.ids[0, :5], [101, 7592, 2088, 102, 0])
  np.testing.assert_array_equal(encoded.ids[1, :5], [101, 9121, 2466, 102, 0])
  np.testing.assert_array_equal(encoded.mask[0], [1] * 4 + [0] * 20)
  assert encoded.ids.dtype == np.int32 and encoded.ids.shape == (2, 24)
  assert encoded.num_truncated == 0
  assert tokenizer.decoder_bos_id == 1 and tokenizer.vocab_size == 30522
  assert tokenizer.decode(encoded.ids) == ["hello world", "toy story"]
  # ITG decodes from the decoder BOS ([unused0]) instead of [CLS].
  assert tokenizer.decode([[1, 7592, 2088, 102, 0]]) == ["hello world"]


def test_long_text_is_truncated_and_counted():
  short = bert.WordPieceTokenizer.from_pretrained(max_length=6)
  encoded = short.encode(
    ["one two three four five six", "one two", "one two three four"]
  )
  # one=2028 two=2048 three=2093 four=2176: the 4-word text fits exactly.
  np.testing.assert_array_equal(
    encoded.ids[0], [101, 2028, 2048, 2093, 2176, 102]
  )
  np.testing.assert_array_equal(
    encoded.ids[2], [101, 2028, 2048, 2093, 2176, 102]
  )
  assert encoded.num_truncated == 1


@pytest.mark.parametrize("text", ["", "   ", "\t\n"])
def test_empty_text_raises(tokenizer, text):
  with pytest.raises(ValueError, match="empty"):
    tokenizer.encode(["fine", text])


def test_single_string_is_rejected(tokenizer):
  with pytest.raises(TypeError):
    tokenizer.encode("not a list")


def test_mean_pool_by_hand():
  hidden = jnp.array([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
  pooled = bert.mean_pool(hidden, jnp.array([[1, 1, 0]]))
  np.testing.assert_allclose(pooled, [[2**-0.5, 2**-0.5]], rtol=1e-6)


def test_bert_model_has_every_checkpoint_tensor_but_the_pooler():
  model, params = bert.load_bert_model()
  tensors = safetensors.numpy.load_file(
    str(bert.minilm_files()["model.safetensors"])
  )
  wanted = sum(
    v.size
    for k, v in tensors.items()
    if not k.startswith("pooler") and k != "embeddings.position_ids"
  )
  assert sum(x.size for x in jax.tree.leaves(params)) == wanted
  shapes = jax.eval_shape(
    model.init,
    jax.random.key(0),
    jnp.zeros((1, 4), jnp.int32),
    jnp.ones((1, 4), jnp.int32),
  )["params"]
  assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(
    jnp.shape, params
  )


@pytest.mark.slow
@pytest.mark.reference
def test_tokenizer_matches_transformers_python_wordpiece(tokenizer):
  transformers = pytest.importorskip("transformers")
  vocab = bert.minilm_files()["vocab.txt"]
  # The slow BertTokenizer is a pure-Python WordPiece over vocab.txt, an
  # implementation independent of the `tokenizers` Rust one we use.
  reference = transformers.BertTokenizer(str(vocab), do_lower_case=True)
  expected = reference(
    SENTENCES,
    padding="max_length",
    truncation=True,
    max_length=24,
    return_tensors="np",
  )
  encoded = tokenizer.encode(SENTENCES)
  np.testing.assert_array_equal(encoded.ids, expected["input_ids"])
  np.testing.assert_array_equal(encoded.mask, expected["attention_mask"])


@pytest.mark.slow
@pytest.mark.reference
def test_sentence_embeddings_match_transformers_bert(tokenizer):
  encoded = tokenizer.encode(SENTENCES)
  assert len(set(encoded.mask.sum(1))) >= 3  # padding varies
  model, params = bert.load_bert_model()
  ours = np.asarray(
    bert.mean_pool(
      model.apply({"params": params}, encoded.ids, encoded.mask), encoded.mask
    )
  )
  expected = references.minilm_sentence_embeddings(encoded.ids, encoded.mask)
  np.testing.assert_allclose(ours, expected, atol=1e-4)


if __name__ == "__main__":
  sys.exit(pytest.main([__file__]))


def test_item_text_embeddings_are_cached_on_disk_by_content(
  tmp_path, monkeypatch
):
  from ilm_jax.evaluators import generative  # noqa: PLC0415

  texts = ["A quiet western.", "A loud musical."]
  first = generative.cached_sentence_embeddings(texts, tmp_path)
  np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, rtol=1e-5)
  assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 1

  def not_again(_):
    raise AssertionError("recomputed despite the cache")

  monkeypatch.setattr(generative, "sentence_embeddings", not_again)
  np.testing.assert_array_equal(
    generative.cached_sentence_embeddings(texts, tmp_path), first
  )
  with pytest.raises(AssertionError, match="recomputed"):  # other content
    generative.cached_sentence_embeddings(texts[:1], tmp_path)


def test_mean_pool_of_an_all_zero_sentence_has_finite_gradients():
  hidden = jnp.zeros((1, 3, 4))
  mask = jnp.array([[1, 1, 0]])
  assert np.all(np.asarray(bert.mean_pool(hidden, mask)) == 0)
  grad = jax.grad(lambda h: bert.mean_pool(h, mask).sum())(hidden)
  assert np.all(np.isfinite(np.asarray(grad)))
  # A real sentence still comes out unit-norm.
  hidden = jnp.arange(12.0).reshape(1, 3, 4)
  np.testing.assert_allclose(
    np.linalg.norm(np.asarray(bert.mean_pool(hidden, mask))), 1.0, rtol=1e-6
  )
