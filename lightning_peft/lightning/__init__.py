"""The thin Lightning layer over the pure-PyTorch core: the callback, strategy hooks and the CLI."""
