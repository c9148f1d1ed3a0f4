"""asyncrunner: concurrent, crash-safe LLM classification of case narratives."""

__version__ = "0.1.0"
