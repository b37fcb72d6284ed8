"""hosl-lightning: hybrid-order split learning for Hugging Face causal LMs."""
