"""The `memflow` command (`main.py`) and playing a stream to an mp4 with live prompts
(`live.py`)."""
