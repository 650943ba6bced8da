"""The real world: hivemind's DHT and libp2p streams, and the wall clock."""
