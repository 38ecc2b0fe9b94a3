"""Training: the loop (`trainer.py`), what a checkpoint holds (`state.py`), validation and the learning
rate (`validation.py`), what a run reports (`log.py`), what a step leaves on the device (`window.py`), the captured step
(`cuda_graph.py`), several processes (`distributed.py`), random generators (`rng.py`), and what is checked before
anything is allocated (`limits.py`, `memory.py`)."""
