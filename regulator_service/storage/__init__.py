"""Persistence behind one small interface; the manager never knows which backend it writes to."""

from .base import StateStore, StoredSession, StoreError
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["MemoryStore", "SQLiteStore", "StateStore", "StoreError", "StoredSession"]
