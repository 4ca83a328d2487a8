"""Records, prompt templates and partitioning."""
