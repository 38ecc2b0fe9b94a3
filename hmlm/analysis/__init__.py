"""What a trained model does: bits per character (`evaluate.py`), generation (`sample.py`, stepping through
`stepper.py`), where its boundaries fall (`boundaries/`), and streams locked into one layer (`locks.py`)."""
