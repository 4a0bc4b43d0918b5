"""fo_rl: first-order-correct RL for Mixture-of-Experts LLMs in JAX."""
