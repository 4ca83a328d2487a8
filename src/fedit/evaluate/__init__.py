"""Above the round loop: comparison of arms, generation metrics, the LLM judge, reports."""
