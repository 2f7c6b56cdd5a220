"""The edge: gRPC and HTTP (the server's assembly, the servicer and its interceptors, bearer tokens
and TLS, the Prometheus series and their endpoint). Nothing below this room knows about gRPC."""
