"""neuromerge: fine-grained model merging, one tensor at a time."""

__version__ = "0.1.0"
