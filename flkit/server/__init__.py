"""The aggregation server: gRPC service, round loop, strategies, best-model selection, persistence."""
