"""Evaluation: perplexity, generation with BLEU/ROUGE-L."""
