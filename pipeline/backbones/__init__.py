"""The model zoo: the pretrained networks, their weights and their compute engines."""
