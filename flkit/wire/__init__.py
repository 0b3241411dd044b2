"""Everything that crosses a process boundary: tensor codec, chunking, gRPC plumbing."""
