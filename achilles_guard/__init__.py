"""achilles-guard: find, fingerprint, monitor and harden the critical neurons of an LLM."""

__all__ = ["__version__"]

__version__ = "0.1.0"
