"""Learning: supervised fine-tuning of the reference and the DPO update."""
