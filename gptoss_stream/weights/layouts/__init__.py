"""One module per checkpoint layout, each built on base.py only (never on each other); weights/checkpoint.py
sits above them and chooses."""
