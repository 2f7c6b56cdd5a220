"""The domain core: sessions and their transitions (plan, persist, commit), the deferred Fisher
values, the session manager and what it keeps of every job. Free of gRPC and protobuf."""
