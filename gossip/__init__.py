"""What travels between peers and how it is mixed: messages, transports, mixing rules, protocols."""
