"""The LLM's tokenizer and chat template, without torch or transformers.

Built with the `tokenizers` library from either source the loaders accept:
the metadata of a GGUF file (vocabulary, BPE merges, special token ids,
chat template) or a Hugging Face directory (tokenizer.json plus
tokenizer_config.json / chat_template.jinja / generation_config.json).
Chat templates are Jinja, rendered in a sandbox as transformers does.
"""

import functools
import json
import os
import pathlib
from collections.abc import Sequence

import jinja2
import jinja2.sandbox
import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user
# defined. Both are matched whole in the input, never split by BPE.
_SPECIAL_TOKEN_TYPES = (3, 4)

# llama.cpp pre-tokenizer names whose regex is GPT-2's after splitting every
# digit on its own (SmolLM's vocabulary has no multi-digit tokens).
_DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")


def _gguf_value(reader, key, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def _byte_level_bpe(vocab, merges, pre: str) -> tokenizers.Tokenizer:
  """A GPT-2-style byte-level BPE tokenizer with llama.cpp's pre-split."""
  tok = tokenizers.Tokenizer(
    models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False)
  )
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _DIGIT_SPLIT_PRE:
    tok.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True), byte_level]
    )
  elif pre in ("gpt2", "default"):
    tok.pre_tokenizer = byte_level
  else:
    raise ValueError(
      f"GGUF pre-tokenizer {pre!r} is not supported (supported: "
      f"{', '.join(_DIGIT_SPLIT_PRE + ('gpt2', 'default'))}); load the "
      "model from its Hugging Face directory (tokenizer.json) instead."
    )
  tok.decoder = decoders.ByteLevel()
  return tok


class LlmTokenizer:
  """Text <-> token ids for the LLM, plus its special ids and chat template.

  Attributes:
    tokenizer: the underlying `tokenizers.Tokenizer`.
    eos_id: the id that ends a reply (SmolLM2: <|im_end|> = 2).
    pad_id: the id used to pad batches (the eos id when the source has none).
    bos_id: the begin-of-sequence id, or None.
    add_bos: whether `encode` prepends bos_id by default.
    stop_ids: every id that ends generation (eos_id first).
    chat_template: the Jinja chat template, or None.
  """

  def __init__(
    self,
    tokenizer: tokenizers.Tokenizer,
    *,
    eos_id: int,
    pad_id: int | None = None,
    bos_id: int | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
    stop_ids: Sequence[int] = (),
  ):
    self.tokenizer = tokenizer
    self.eos_id = int(eos_id)
    self.pad_id = self.eos_id if pad_id is None else int(pad_id)
    self.bos_id = None if bos_id is None else int(bos_id)
    self.add_bos = bool(add_bos)
    self.chat_template = chat_template
    self.stop_ids = tuple(dict.fromkeys([self.eos_id, *map(int, stop_ids)]))

  @classmethod
  def from_gguf(cls, reader) -> "LlmTokenizer":
    """Builds the tokenizer stored in a `gguf.GGUFReader`'s metadata."""
    kind = _gguf_value(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
      raise ValueError(
        f"GGUF tokenizer model {kind!r} is not supported (only byte-level "
        "BPE, 'gpt2'); load the model from its Hugging Face directory."
      )
    tokens = _gguf_value(reader, "tokenizer.ggml.tokens")
    types = _gguf_value(reader, "tokenizer.ggml.token_type")
    merges = [
      tuple(m.split(" ", 1))
      for m in _gguf_value(reader, "tokenizer.ggml.merges")
    ]
    pre = _gguf_value(reader, "tokenizer.ggml.pre", "default")
    tok = _byte_level_bpe({t: i for i, t in enumerate(tokens)}, merges, pre)
    tok.add_special_tokens(
      [
        tokenizers.AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, types, strict=True)
        if kind in _SPECIAL_TOKEN_TYPES
      ]
    )
    bos_id = _gguf_value(reader, "tokenizer.ggml.bos_token_id")
    eos_id = _gguf_value(reader, "tokenizer.ggml.eos_token_id")
    add_bos = bool(_gguf_value(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos:
      tok.post_processor = processors.TemplateProcessing(
        single=f"{tokens[bos_id]} $A",
        pair=f"{tokens[bos_id]} $A $B",
        special_tokens=[(tokens[bos_id], bos_id)],
      )
    return cls(
      tok,
      eos_id=eos_id,
      bos_id=bos_id,
      add_bos=add_bos,
      pad_id=_gguf_value(reader, "tokenizer.ggml.padding_token_id"),
      chat_template=_gguf_value(reader, "tokenizer.chat_template"),
    )

  @classmethod
  def from_hf_dir(cls, path: os.PathLike) -> "LlmTokenizer":
    """Reads tokenizer.json and the special tokens of a Hugging Face dir."""
    path = pathlib.Path(path)
    tok = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))

    def read_json(name):
      f = path / name
      return json.loads(f.read_text()) if f.exists() else {}

    cfg = read_json("tokenizer_config.json")
    gen = read_json("generation_config.json")

    def token_id(key):
      value = cfg.get(key)
      if isinstance(value, dict):
        value = value.get("content")
      return None if value is None else tok.token_to_id(value)

    gen_eos = gen.get("eos_token_id")
    gen_eos = [gen_eos] if isinstance(gen_eos, int) else list(gen_eos or [])
    eos_id = token_id("eos_token")
    if eos_id is None:
      if not gen_eos:
        raise ValueError(f"No eos token in {path}.")
      eos_id = gen_eos[0]
    template = cfg.get("chat_template")
    if (path / "chat_template.jinja").exists():
      template = (path / "chat_template.jinja").read_text()
    return cls(
      tok,
      eos_id=eos_id,
      pad_id=token_id("pad_token"),
      bos_id=token_id("bos_token"),
      add_bos=bool(cfg.get("add_bos_token", False)),
      chat_template=template,
      stop_ids=gen_eos,
    )

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; special tokens written in the text are kept whole.

    Args:
      text: the string to tokenize.
      add_special_tokens: prepend bos if the source asks for it; pass False
        for text from `apply_chat_template`, which already contains it.

    Returns:
      The token ids.
    """
    return self.tokenizer.encode(
      text, add_special_tokens=add_special_tokens
    ).ids

  def encode_batch(
    self,
    texts: Sequence[str],
    max_len: int | None = None,
    add_special_tokens: bool = True,
  ):
    """Left-padded ids and mask for a batch (the layout generation expects).

    Args:
      texts: strings to tokenize.
      max_len: pad (and keep the last max_len tokens) to this length; by
        default the longest sequence.
      add_special_tokens: as in `encode`.

    Returns:
      (ids, mask): int32 arrays [len(texts), length]; mask is 1 on real tokens.
    """
    seqs = [self.encode(t, add_special_tokens) for t in texts]
    length = max_len or max(len(s) for s in seqs)
    ids = np.full((len(seqs), length), self.pad_id, np.int32)
    mask = np.zeros((len(seqs), length), np.int32)
    for row, seq in enumerate(seqs):
      seq = seq[-length:]
      ids[row, length - len(seq) :] = seq
      mask[row, length - len(seq) :] = 1
    return ids, mask

  def decode(self, ids, skip_special_tokens: bool = True) -> str:
    """Text of token ids (a list or 1-D array)."""
    return self.tokenizer.decode(
      [int(i) for i in ids], skip_special_tokens=skip_special_tokens
    )

  def token_to_id(self, token: str) -> int | None:
    return self.tokenizer.token_to_id(token)

  def apply_chat_template(
    self, messages: Sequence[dict], add_generation_prompt: bool = True
  ) -> str:
    """Renders chat messages ({"role", "content"} dicts) to a prompt string.

    Args:
      messages: the conversation so far.
      add_generation_prompt: end with the header of an assistant turn.

    Returns:
      The prompt text; encode it with add_special_tokens=False.

    Raises:
      ValueError: the tokenizer has no chat template.
      jinja2.TemplateSyntaxError: the template does not parse (not cached:
        each call reports it again).
      jinja2.TemplateError: the template's own raise_exception(message).
    """
    if self.chat_template is None:
      raise ValueError("This tokenizer has no chat template.")
    decode = self.tokenizer.id_to_token
    return _compiled_chat_template(self.chat_template).render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      bos_token="" if self.bos_id is None else decode(self.bos_id),
      eos_token=decode(self.eos_id),
    )


def _raise_template_error(message):
  raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=8)
def _compiled_chat_template(source: str) -> jinja2.Template:
  """The chat template `source`, compiled once per distinct template.

  Compiling (lexing, parsing, generating Python) took 5.8 of the 6.9 ms
  that building one phase-2 training prompt cost (the input pipeline of
  the GPU run was held to 4.4 batches of 64 a second by it); rendering a
  compiled template is cheap. Keyed by the source, so a tokenizer whose
  `chat_template` is replaced gets the new one.
  """
  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
    trim_blocks=True,
    lstrip_blocks=True,
    extensions=["jinja2.ext.loopcontrols"],
  )
  env.filters["tojson"] = lambda x, indent=None: json.dumps(
    x, ensure_ascii=False, indent=indent
  )
  env.globals["raise_exception"] = _raise_template_error
  return env.from_string(source)
