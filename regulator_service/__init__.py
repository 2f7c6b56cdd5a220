"""InfoReg regulation service: sessions, window detection, policies, persistence, metrics."""

__version__ = "0.1.0"
