"""Where things run: device placement and offload, torch.compile."""
