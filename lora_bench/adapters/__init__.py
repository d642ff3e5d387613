"""Adapter layers, the research object: LoRA (and DoRA), NF4 / bitsandbytes 4-bit bases, and what an adapter
costs to ship and serve."""
