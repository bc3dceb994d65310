"""Labelling: the oracle that answers preference queries, and the durable store of its answers."""
