"""`hmlm bench` (`command.py`): throughput against torch's own LSTM in the same run (`throughput.py`), on a trained
run's own data (`trained.py`), and kernel launches counted by dispatch and by the profiler (`launches.py`)."""
