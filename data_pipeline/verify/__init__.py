"""`megaqwen-data verify-pairs`: samples responses from a checkpoint, checks them with the verifiers of
`megaqwen.rewards` (maths answer equivalence, the Python sandbox for code with unit tests; GRPO's
rewards use the same ones) and keeps (passing, failing) pairs in the DPO format
`megaqwen-data tokenize --format dpo` reads."""
