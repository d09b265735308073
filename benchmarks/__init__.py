"""``make bench``: the provider's speed and memory figures, each next to its goal and an anchor from the same run."""
