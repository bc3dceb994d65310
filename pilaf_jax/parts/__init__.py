"""The parts an Experiment wires together, one job each: models.py (model, mesh, jitted steps),
labelling_pipeline.py (oracle, queue, store, waiting), run_files.py (workdir, checkpoints, TensorBoard)."""
