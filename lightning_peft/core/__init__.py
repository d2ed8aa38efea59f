"""The pure-PyTorch core: targeting, adapter layers, injection and adapter state. Never imports lightning."""
