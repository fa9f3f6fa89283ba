"""Placeholder: the demo model (AlexNet conv1 -> ReLU -> maxpool 3/2) and sample images land here."""
