"""sprec-ray: self-play debiasing for LLM recommenders on Ray."""
