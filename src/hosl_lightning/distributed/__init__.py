"""Client and server in separate processes over torch.distributed: the wire, peers, both ends of a step, several clients."""
