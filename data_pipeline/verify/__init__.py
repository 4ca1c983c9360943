"""Verifiers for offline-RL preference data: maths answer equivalence, a Python sandbox for code with
unit tests, and `megaqwen-data verify-pairs`, which samples responses from a checkpoint, checks them
and keeps (passing, failing) pairs in the DPO format `megaqwen-data tokenize --format dpo` reads."""
