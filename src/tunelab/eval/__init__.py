"""Evaluation: perplexity, generation with BLEU/ROUGE-L, passkey retrieval, perplexity vs context length,
lm-evaluation-harness tasks."""
