"""Models: see resnet.py."""
