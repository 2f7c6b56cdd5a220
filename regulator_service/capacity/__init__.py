"""Capacity: the memory budget and its size estimates, history pages cached as encoded bytes,
and the pacing of history reads, so that reads and caches never take what Reports need."""
