"""shrink: compress face-recognition teachers into portable students (ShrinkTeaNet)."""

__version__ = "0.1.0"
