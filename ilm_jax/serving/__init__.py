"""Serving a trained ILM: recommender, catalogue search, chat sessions, HTTP.

recommender  `Recommender.from_workdir(DIR)`: recommend, describe, chat,
             recommend_batch over the phase-2 export
catalog      free-text item mentions -> catalogue items (rapidfuzz)
grounding    reasons checked against the catalogue metadata
session      conversation state and one chat turn
app          the FastAPI app (`python -m ilm_jax.serve`)
"""
