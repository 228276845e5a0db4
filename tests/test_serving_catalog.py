"""Mention resolution, message parsing and reason checks (no model).

The catalogue is a hand-made slice of MovieLens-1M titles in both spellings
the data uses ("Matrix, The (1999)" and "The Godfather (1972)"), with the
expected match of every mention checked by hand.
"""

import numpy as np
import pytest

from ilm_jax.serving import catalog as catalog_lib
from ilm_jax.serving import grounding, session

TITLES = [
  "Matrix, The (1999)",  # 0
  "Toy Story (1995)",  # 1
  "Toy Story 2 (1999)",  # 2
  "Psycho (1960)",  # 3
  "Psycho (1998)",  # 4
  "Star Wars: Episode IV - A New Hope (1977)",  # 5
  "Star Wars: Episode V - The Empire Strikes Back (1980)",  # 6
  "Sense and Sensibility (1995)",  # 7
  "The Godfather (1972)",  # 8
  "Blade Runner (1982)",  # 9
  "Shanghai Triad (Yao a yao yao dao waipo qiao) (1995)",  # 10
  "Heat (1995)",  # 11
  "Fargo (1996)",  # 12
]
GENRES = [
  "Action, Sci-Fi",
  "Animation, Children's, Comedy",
  "Animation, Children's, Comedy",
  "Horror, Thriller",
  "Crime, Horror, Thriller",
  "Action, Sci-Fi",
  "Action, Sci-Fi",
  "Drama, Romance",
  "Crime, Drama",
  "Film-Noir, Sci-Fi",
  "Drama",
  "Action, Crime, Thriller",
  "Crime, Drama, Thriller",
]
DIRECTORS = [
  "Andy Wachowski, Lana Wachowski",
  "John Lasseter",
  "John Lasseter",
  "Alfred Hitchcock",
  "Gus Van Sant",
  "George Lucas",
  "Irvin Kershner",
  "Ang Lee",
  "Francis Ford Coppola",
  "Ridley Scott",
  "Zhang Yimou",
  "Michael Mann",
  "Joel Coen",
]
POPULARITY = [9, 8, 5, 4, 1, 9, 8, 3, 7, 6, 1, 5, 6]


@pytest.fixture(scope="module")
def catalog():
  return catalog_lib.Catalog(
    TITLES,
    item_ids=[str(100 + i) for i in range(len(TITLES))],
    attributes=dict(genres=GENRES, director=DIRECTORS),
    popularity=POPULARITY,
  )


def test_normalise_moves_the_trailing_article_and_drops_the_year():
  assert catalog_lib.normalise("Matrix, The (1999)") == "the matrix"
  assert catalog_lib.key("Matrix, The (1999)") == "matrix"
  assert catalog_lib.split_year("Toy Story 2 (1999)") == ("Toy Story 2", "1999")
  assert catalog_lib.split_year("1999") == ("1999", "")  # a title, not a year


@pytest.mark.parametrize(
  "mention, item",
  [
    ("Matrix, The (1999)", 0),  # the catalogue spelling
    ("The Matrix", 0),  # article in front, no year
    ("the matrix", 0),  # case
    ("matrix", 0),  # no article
    ("Matrix 1999", 0),  # year without brackets
    ("The Matrx", 0),  # typo (ratio 91 >= 85)
    ("blade runer", 9),  # typo
    ("Toy Story", 1),  # exact beats the partial "Toy Story 2"
    ("toy story 2", 2),
    ("Psycho (1998)", 4),  # the year picks the remake
    ("empire strikes back", 6),  # partial title: words of one title only
    ("Sense and Sensibility", 7),
    ("Godfather", 8),
    ("Shanghai Triad", 10),  # the title without its alternative title
    ("Yao a yao yao dao waipo qiao", 10),  # the alternative title
    ("105", 5),  # a raw item id
  ],
)
def test_every_mention_form_resolves_to_the_hand_checked_item(
  catalog, mention, item
):
  match = catalog.resolve(mention)
  assert match.status == "resolved", match
  assert match.item == item


def test_ambiguous_mentions_list_the_candidates_most_popular_first(catalog):
  psycho = catalog.resolve("psycho")
  assert psycho.status == "ambiguous"
  assert psycho.candidates == (3, 4)  # popularity 4 before 1
  star_wars = catalog.resolve("Star Wars")
  assert star_wars.status == "ambiguous"
  assert star_wars.candidates == (5, 6)


@pytest.mark.parametrize("mention", ["Xyzzy Adventures", "The Sopranos", "z"])
def test_unknown_mentions_are_reported_not_guessed(catalog, mention):
  match = catalog.resolve(mention)
  assert match.status == "unknown"
  assert match.item == -1 and match.candidates == ()


def test_search_puts_word_matches_first(catalog):
  found = [i for i, _ in catalog.search("toy story")]
  assert found[:2] == [1, 2]
  assert catalog.search("   ") == []


@pytest.mark.parametrize(
  "message, mentions",
  [
    (
      "I loved The Matrix and Toy Story but hated Heat",
      [("The Matrix", True), ("Toy Story", True), ("Heat", False)],
    ),
    ("Something like Heat, Fargo and Blade Runner please", None),
    ("I liked Sense and Sensibility", [("Sense and Sensibility", True)]),
    ('I really enjoyed "Fargo"', [("Fargo", True)]),
    ("I didn't like Psycho 1998", [("Psycho 1998", False)]),
    ("Toy Story, Heat", [("Toy Story", True), ("Heat", True)]),
    ("what should I watch next?", []),
  ],
)
def test_parse_finds_mentions_and_their_polarity(catalog, message, mentions):
  if mentions is None:
    mentions = [("Heat", True), ("Fargo", True), ("Blade Runner", True)]
  assert session.parse(message, catalog).mentions == mentions


def test_parse_reads_references_moods_genres_and_describe(catalog):
  assert session.parse("not that one", catalog).references == [(0, False)]
  assert session.parse("more like the second one", catalog).references == [
    (1, True)
  ]
  assert session.parse("not the third one", catalog).references == [(2, False)]
  assert session.parse("something darker", catalog).mood == "dark"
  assert session.parse("something funnier", catalog).mood == "light"
  intent = session.parse("some comedies please", catalog)
  assert intent.genres == {"Comedy"} and intent.mentions == []
  assert session.parse("tell me about the matrix", catalog).describe == (
    "the matrix"
  )


def test_a_generated_reason_is_kept_only_when_the_metadata_backs_it(catalog):
  liked = [0]  # The Matrix
  # Star Wars IV and The Matrix share Action and Sci-Fi: backed.
  ok = "It is a sci-fi movie, like Matrix, The (1999). More text"
  assert grounding.check_reason(ok, 5, liked, catalog) == (
    "It is a sci-fi movie, like Matrix, The (1999)."
  )
  # Star Wars IV is no comedy.
  assert (
    grounding.check_reason("It is a comedy movie.", 5, liked, catalog) is None
  )
  # Heat is not directed by George Lucas; Michael Mann is right.
  assert (
    grounding.check_reason(
      "It is directed by George Lucas.", 11, liked, catalog
    )
    is None
  )
  assert grounding.check_reason(
    "It is directed by Michael Mann.", 11, liked, catalog
  )
  # A compared title the user never liked, a wrong year, free text.
  assert (
    grounding.check_reason("It is a drama, like Fargo (1996).", 8, [], catalog)
    is None
  )
  assert grounding.check_reason("It is from 1990.", 11, liked, catalog) is None
  assert grounding.check_reason("It is from 1995.", 11, liked, catalog)
  assert (
    grounding.check_reason("1 is a great classic.", 11, liked, catalog) is None
  )


def test_metadata_summary_states_only_catalogue_facts(catalog):
  assert grounding.metadata_summary(11, catalog) == (
    "A 1995 action and crime movie directed by Michael Mann."
  )
  assert grounding.fix_articles("It is a action movie.") == (
    "It is an action movie."
  )


def test_masked_trie_keeps_only_allowed_items_with_the_full_shapes():
  from ilm_jax import decoding  # noqa: PLC0415
  from ilm_jax.serving import recommender  # noqa: PLC0415

  sequences = [[1, 2], [1, 3], [4]]
  full = decoding.TokenTrie(sequences, eos_id=9)
  masked = recommender.masked_trie(full, sequences, np.array([0, 2]), 9)
  for name, array in full.arrays().items():
    assert masked.arrays()[name].shape == array.shape, name
  assert (masked.max_children, masked.max_depth) == (2, 3)

  # Walk the masked trie: root -> 1 -> 2 -> eos ends at item 0; the root's
  # other child 4 -> eos ends at item 2; token 3 is gone.
  def child(node, token):
    lo, hi = masked.offsets[node], masked.offsets[node + 1]
    edges = dict(
      zip(masked.edge_tokens[lo:hi], masked.edge_targets[lo:hi], strict=True)
    )
    return edges.get(token)

  assert child(child(0, 1), 3) is None
  assert masked.sequence_ids[child(child(child(0, 1), 2), 9)] == 0
  assert masked.sequence_ids[child(child(0, 4), 9)] == 2
  assert sorted(int(i) for i in masked.sequence_ids if i >= 0) == [0, 2]


def test_trim_padding_drops_all_padding_columns_in_multiples():
  from ilm_jax.serving import recommender  # noqa: PLC0415

  mask = np.zeros((2, 128), bool)
  mask[0, -40:] = True
  mask[1, -70:] = True  # the longest row: 70 real -> 128 kept (64s)
  batch = dict(
    attention_mask=mask,
    input_ids=np.arange(256).reshape(2, 128),
    soft_entity=np.zeros((2, 128)),
    soft_slot=np.zeros((2, 128)),
    entity_index=np.zeros((2, 4)),
    entity_kind=np.zeros((2, 4)),
    entity_mask=np.zeros((2, 4)),
    targets=np.zeros((2, 128)),  # training only: dropped
  )
  out = recommender.trim_padding(batch)
  assert out["attention_mask"].shape == (2, 128)
  out = recommender.trim_padding(batch, buckets=4)  # multiples of 32
  assert out["attention_mask"].shape == (2, 96)
  assert out["attention_mask"].sum() == 110  # no real token lost
  assert out["input_ids"][0, 0] == 32 and out["input_ids"][1, -1] == 255
  assert out["entity_index"].shape == (2, 4) and "targets" not in out
