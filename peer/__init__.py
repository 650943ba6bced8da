"""A peer of the gossip training system: tasks, local training and its gossip loop."""
