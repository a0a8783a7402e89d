"""Speed benchmarks (not tests): inference (infer_speed.py) and training (train_speed.py)."""
