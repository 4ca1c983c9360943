"""LLM quality judge: a rubric prompted through the chat template, scores read from token probabilities."""
